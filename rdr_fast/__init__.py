"""rdr_fast: Re-weighting with Density Ratio (Luo et al., NeurIPS 2024) for long-tailed
classification, with fused kernels. See README.md and ../shared/SPEC.md."""
from __future__ import annotations

from . import functional, ops
from .losses import RDRLoss

__version__ = "0.1.0"


def backends() -> dict[str, dict[str, str]]:
    """Which implementation each op uses per device, e.g.
    ``{"weighted_loss": {"cpu": "cpp", "cuda": "triton"}, ...}``."""
    return {name: dict(devices) for name, devices in ops.BACKENDS.items()}


__all__ = ["RDRLoss", "functional", "backends", "__version__"]
