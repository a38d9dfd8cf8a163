"""know-kernels: fused kernels for KNOW prediction (retrodiction of forgetting)."""
from .known.heads import KNOWN, KNOWNHead
from .kernels.l1 import l1_loss
from .kernels.nowcast import nowcast
from .io.load import load_into
from .pipeline.options import Options
from .pipeline.predict import predict, predict_files
from .kernels.reference import nowcast_ref, num_params

__version__ = "0.1.0"
__all__ = ["KNOWN", "KNOWNHead", "Options", "l1_loss", "load_into", "nowcast", "nowcast_ref", "num_params",
           "predict", "predict_files", "__version__"]
