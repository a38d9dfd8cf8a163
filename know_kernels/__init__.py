"""know-kernels: fused kernels for KNOW prediction (retrodiction of forgetting)."""
from .known.heads import KNOWN, KNOWNHead
from .kernels.l1 import l1_loss
from .kernels.nowcast import nowcast
from .pipeline.predict import predict
from .kernels.reference import nowcast_ref, num_params

__version__ = "0.1.0"
__all__ = ["KNOWN", "KNOWNHead", "l1_loss", "nowcast", "nowcast_ref", "num_params", "predict", "__version__"]
