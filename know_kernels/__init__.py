"""know-kernels: fused kernels for KNOW prediction (retrodiction of forgetting)."""
from .heads import KNOWN, KNOWNHead
from .nowcast import nowcast
from .reference import nowcast_ref, num_params

__version__ = "0.1.0"
__all__ = ["KNOWN", "KNOWNHead", "nowcast", "nowcast_ref", "num_params", "__version__"]
