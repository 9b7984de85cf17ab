"""What every launcher in rdr_fast.kernels shares: the Triton import guard, the reduction
combiners, and the interpreter hook.

Interpreter hook. Triton fixes at decoration time (``@triton.jit``, its own ``tl.sum``,
``tl.zeros``... included) whether a kernel is compiled or interpreted, from the
environment variable ``TRITON_INTERPRET``. The launchers accept CPU tensors either way:
``launchable(kernel, device)`` hands a CPU launch to Triton's interpreter (NumPy, one
program after another) over the kernel's own Python source, even when Triton was
imported without ``TRITON_INTERPRET=1`` (a GPU machine, or a test session where
something imported Triton first). That only works because the kernels call no
``@triton.jit`` function themselves: no helpers of their own, no ``tl.sum``/``tl.max``/
``tl.zeros``/``tl.cdiv``; reductions are ``tl.reduce(x, axis, _ADD or _MAX)`` with
Triton's own combiners, which the interpreter recognises and reduces with NumPy. This is
how CI (no GPU) tests the kernels (tests/test_backends.py); CUDA tensors always get the
compiled kernel.
"""
from __future__ import annotations

import contextlib
import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None

if HAS_TRITON:
    import triton
    import triton.language as tl

    # Triton's combiners behind tl.sum and tl.max (private names, in Triton 2.x to 3.8);
    # the same functions of our own would reduce element by element in the interpreter.
    _ADD = getattr(tl.standard, "_sum_combine", None)
    _MAX = getattr(tl.standard, "_elementwise_max", None)
    if _ADD is None:
        @triton.jit
        def _ADD(a, b):
            return a + b
    if _MAX is None:
        @triton.jit
        def _MAX(a, b):
            return tl.maximum(a, b)

_INTERPRETED: dict = {}


def interpreting(kernel) -> bool:
    """Whether ``kernel`` was decorated for Triton's interpreter (TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def _squeeze_interpreted_scalars() -> None:
    """Triton 3.6's interpreter turns a scalar tensor into a Python int with
    ``int(ndarray)``, which NumPy 2.4 refuses for the one-element rank-1 arrays a scalar
    load gives (a loop bound such as ``range(0, b, BS)`` then fails); Triton 3.8 squeezes
    first. Wrap the hook that installs ``__index__`` (whenever it exists; on 3.8 the
    wrapper changes nothing) so the interpreter runs our kernels under both (checked
    with Triton 3.6.0 and 3.8.0, NumPy 2.4)."""
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "squeezes", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
    patched.squeezes = True
    interpreter._patch_lang_tensor = patched


def on_device(device: torch.device):
    """Context for a launch: Triton launches on the *current* CUDA device and its current
    stream, not on the tensors' device, and torch.library does not switch devices for a
    Python kernel; so tensors on cuda:1 with cuda:0 current would be run on the wrong GPU
    and stream. Entering the tensors' device makes Triton use it and its current stream
    (where the launcher's torch ops ran). Capturable in a CUDA graph."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launchable(kernel, device: torch.device):
    """``kernel`` as decorated for CUDA tensors; for CPU tensors, its interpreted form."""
    if device.type != "cpu":
        return kernel
    _squeeze_interpreted_scalars()
    if interpreting(kernel):
        return kernel
    if kernel not in _INTERPRETED:
        from triton.runtime.interpreter import InterpretedFunction

        _INTERPRETED[kernel] = InterpretedFunction(kernel.fn)
    return _INTERPRETED[kernel]


def chosen_block_sizes(block_sizes, default: tuple[int, ...]) -> tuple[int, ...]:
    """A launcher's ``block_sizes`` keyword: ``default`` when None, else the given sizes,
    checked to be as many positive powers of two (block sizes and warp counts both are)."""
    if block_sizes is None:
        return default
    sizes = tuple(block_sizes)
    if len(sizes) != len(default) or not all(isinstance(n, int) and n > 0 and n & (n - 1) == 0 for n in sizes):
        raise ValueError(f"block_sizes must be {len(default)} positive powers of two, like {default}; "
                         f"got {block_sizes!r}")
    return sizes


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
