"""Triton kernels for rdr_fast, installed as ``rdr_fast.kernels`` (setup.py maps this
top-level folder into the package). One module per op, each with private ``_*_kernel``
Triton kernels and one launcher with the op's signature, plus a keyword-only
``block_sizes`` (see rdr_fast/ops.py, which registers the launchers as the CUDA
implementation). Importing does no GPU work; without Triton installed the launchers
raise. Design notes: docs/gpu.md.
"""
from ._utils import HAS_TRITON

if HAS_TRITON:
    from .rdr_weights_and_update import rdr_weights_and_update_triton
    from .weighted_loss import weighted_loss_triton
else:
    def _needs_triton(*args, **kwargs):
        raise NotImplementedError("rdr_fast.kernels requires triton installed (pip install triton)")

    rdr_weights_and_update_triton = weighted_loss_triton = _needs_triton

__all__ = ["HAS_TRITON", "rdr_weights_and_update_triton", "weighted_loss_triton"]
