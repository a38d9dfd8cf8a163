"""know-kernels: fused kernels for KNOW prediction (retrodiction of forgetting)."""
from .heads import KNOWN, KNOWNHead
from .l1 import l1_loss
from .nowcast import nowcast
from .predict import predict
from .reference import nowcast_ref, num_params

__version__ = "0.1.0"
__all__ = ["KNOWN", "KNOWNHead", "l1_loss", "nowcast", "nowcast_ref", "num_params", "predict", "__version__"]
