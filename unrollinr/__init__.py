"""UnrollINR: zero-shot, scan-specific deep unrolled MRI reconstruction with an INR prior."""

from unrollinr.config import ReconConfig
from unrollinr.recon import reconstruct

__all__ = ["ReconConfig", "reconstruct"]
__version__ = "0.1.0"
