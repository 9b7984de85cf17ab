"""rdr_fast: Re-weighting with Density Ratio (Luo et al., "Revive Re-weighting in Imbalanced
Learning by Density Ratio Estimation", NeurIPS 2024) for long-tailed classification, with
fused kernels. See README.md and docs/."""
from __future__ import annotations

from . import _extension

# Before ops: the C++ kernels must be registered when ops.py picks each device's kernel.
_extension.load()

from . import functional, ops  # noqa: E402
from ._extension import extension_info  # noqa: E402
from .losses import RDRLoss  # noqa: E402

__version__ = "0.1.0"


def backends() -> dict[str, dict[str, str]]:
    """Which implementation each op uses per device, e.g.
    ``{"weighted_loss": {"cpu": "cpp", "cuda": "triton"}, ...}``. ``"triton"`` is checked
    against the PyTorch path at the op's first CUDA call; if that check failed, the op
    reads ``{"cuda": "torch", "cuda_fallback": "<why>"}`` (docs/gpu.md)."""
    return {name: dict(devices) for name, devices in ops.BACKENDS.items()}


__all__ = ["RDRLoss", "functional", "backends", "extension_info", "__version__"]
