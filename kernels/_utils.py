"""What every launcher in rdr_fast.kernels shares: the Triton import guard and the
interpreter hook.

Triton decides when ``triton`` is imported and each ``@triton.jit`` runs (its own
``tl.zeros``, ``tl.cdiv``... included) whether kernels are compiled or interpreted, from
the environment variable ``TRITON_INTERPRET``. With ``TRITON_INTERPRET=1`` set before that
import, the launchers accept CPU tensors and run the kernels in Triton's interpreter
(NumPy, one program after another): that is how CI, which has no GPU, tests them
(tests/test_triton.py). Without it, kernels are compiled and need CUDA tensors. One process
cannot do both; bench/gpu_suite.py runs the interpreter tests in a second process.
"""
from __future__ import annotations

import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreting(kernel) -> bool:
    """Whether ``kernel`` was decorated for Triton's interpreter (TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def launchable(kernel, device: torch.device):
    """``kernel``, after checking that it can run on tensors of ``device``."""
    if device.type == "cpu" and not interpreting(kernel):
        raise RuntimeError("rdr_fast's Triton kernels run on CPU tensors only in Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before triton is imported, or pass CUDA tensors")
    return kernel


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
