"""rdr_fast: Re-weighting with Density Ratio (Luo et al., NeurIPS 2024) for long-tailed
classification, with fused kernels. See README.md and ../shared/SPEC.md."""
from __future__ import annotations

import importlib
import importlib.util
import os


def _load_cpp_kernels() -> str | None:
    """Load rdr_fast._C, whose static initialisers register the C++ CPU kernels with
    torch.library; ops.py then finds them. Returns None when loaded, else why not (ops
    reports it in its one import-time warning). Never raises.

    Not loaded when RDR_FAST_IMPL forces a Python path: a kernel registered from C++
    would otherwise have to be overridden, which torch warns about.
    """
    if os.environ.get("RDR_FAST_IMPL", "").strip().lower() in ("torch", "reference"):
        return None
    if importlib.util.find_spec(f"{__name__}._C") is None:
        return ("rdr_fast._C is not built (RDR_FAST_BUILD_CPP=0, no C++ toolchain, or a failed build at "
                "install time; reinstall with `pip install --no-build-isolation -e .` to build it)")
    try:
        import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

        importlib.import_module(f"{__name__}._C")
    except Exception as err:  # noqa: BLE001 — e.g. built against another torch: undefined symbols
        return f"loading rdr_fast._C failed ({type(err).__name__}: {err})"
    return None


_CPP_LOAD_ERROR = _load_cpp_kernels()

from . import functional, ops  # noqa: E402  (after _C, so ops sees its kernels)
from .losses import RDRLoss  # noqa: E402

__version__ = "0.1.0"


def backends() -> dict[str, dict[str, str]]:
    """Which implementation each op uses per device, e.g.
    ``{"weighted_loss": {"cpu": "cpp", "cuda": "torch"}, ...}``."""
    return {name: dict(devices) for name, devices in ops.BACKENDS.items()}


__all__ = ["RDRLoss", "functional", "backends", "__version__"]
