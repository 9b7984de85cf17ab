"""Constants that several layers of rdr_fast share, defined once.

The Python layers (``RDRLoss``, ``functional``, ``ops``, the PyTorch path, the reference)
import them from here. The C++ kernels (csrc/) and the Triton kernels (kernels/) cannot:
they repeat a literal with a comment naming this file, and tests/test_ops.py checks that
every backend agrees with the values here.

Weight modes: the custom op ``rdr_weights_and_update`` does not know the reweighting
names; it takes one of three ways to form the weights, and ``weight_mode`` is the one
place that maps a reweighting (and warm-up) to it (see docs/algorithm.md, "Weights").
"""
from __future__ import annotations

import torch

from . import _checks

RATIO_FLOOR = 1e-9    # r ← max(r, RATIO_FLOOR): a ratio is positive even for an all-zero class block
DEFAULT_RIDGE = 1e-5  # λ_c = ridge · trace(X_c X_cᵀ) / b_c, relative to the class block's scale

REWEIGHT_MODES = ("none", "inv_freq", "cb", "rdr")
BASE_LOSSES = ("ce", "focal", "la")
# w = (r · factor_y)^γ; r ≡ 1 (inv_freq, cb); w ≡ 1 (reweight "none", or warm-up).
WEIGHT_MODES = ("density_ratio", "class_factor", "uniform")


def weight_mode(reweight: str, warmup: bool = False) -> str:
    """The op's weight mode for a reweighting name, and for warm-up (uniform weights)."""
    _checks.check_choice("reweight", reweight, REWEIGHT_MODES)
    if reweight == "none" or warmup:
        return "uniform"
    return "density_ratio" if reweight == "rdr" else "class_factor"


def check_weight_mode(mode: str) -> None:
    """ValueError unless ``mode`` is one of WEIGHT_MODES. Every Python backend of the op
    calls this; the C++ kernel raises the same message (csrc/rdr_weights.cpp)."""
    if mode not in WEIGHT_MODES:
        raise ValueError(f"rdr_weights_and_update: mode must be one of {WEIGHT_MODES}, got {mode!r}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype (fp32, bf16, fp16) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
