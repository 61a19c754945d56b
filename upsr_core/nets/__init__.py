"""Networks of UPSR, key-compatible with the official checkpoints."""
from .atd import ATD, official_sort
from .denoiser import UPSRDenoiser

__all__ = ["ATD", "UPSRDenoiser", "official_sort"]
