"""rdr_fast: Re-weighting with Density Ratio (Luo et al., "Revive Re-weighting in Imbalanced
Learning by Density Ratio Estimation", NeurIPS 2024) for long-tailed classification, with
fused kernels. See README.md and docs/."""
from __future__ import annotations

import os as _os
import sys as _sys

# The command-line tools share the machine politely: OpenMP threads waiting for work sleep
# instead of spinning, which on a machine that runs other jobs costs the training loop
# little and the neighbours a lot (docs/install.md, "On a shared machine"). Only for
# `python -m rdr_fast.<tool>` (torchrun's workers too), and only before torch loads
# OpenMP, which reads the variable once; importing rdr_fast as a library changes nothing,
# and a value the user set wins.
CLI_MODULES = ("rdr_fast.train", "rdr_fast.evaluate", "rdr_fast.analyze", "rdr_fast.info")
_argv = getattr(_sys, "orig_argv", [])
if "-m" in _argv[:-1] and _argv[_argv.index("-m") + 1] in CLI_MODULES:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import _extension  # noqa: E402

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


# For your own model and data, loaded on first use (they import torchvision).
_LAZY = {"with_features": "models", "class_counts": "data"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'rdr_fast' has no attribute {name!r}")


__all__ = ["RDRLoss", "functional", "backends", "extension_info", "with_features", "class_counts", "__version__"]
