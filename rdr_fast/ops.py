"""The rdr_fast custom ops: schemas, fakes, autograd and per-device dispatch.

Two ops, defined once here with torch.library (docs/algorithm.md):

- ``rdr_fast::rdr_weights_and_update`` — density ratios, weights and the in-place
  prototype update in one call. Mutates ``prototypes`` and ``seen``. ``weight_mode`` is
  one of rdr_fast.constants.WEIGHT_MODES.
- ``rdr_fast::weighted_loss`` — the weighted loss and its gradient in one pass over the
  logits; autograd replays the saved gradient.

Autograd for ``weighted_loss`` replays the gradient the forward computed; rdr_fast._C
registers it in C++ (for every device) when built, else ``_backward`` below does.

Which implementation runs is decided per device at import and recorded in ``BACKENDS``:
the C++ kernels of ``rdr_fast._C`` on CPU when that extension is built, otherwise the
vectorised PyTorch path of ``rdr_fast.torch_impl``; on CUDA the Triton kernels of
``rdr_fast.kernels`` when Triton is installed. ``RDR_FAST_IMPL=torch`` forces the
PyTorch path and ``RDR_FAST_IMPL=reference`` the per-class reference loop of
``rdr_fast.reference`` (CPU only), for A/B runs. Each backend is one function per op
with the op's signature; this module only registers them.
"""
from __future__ import annotations

import os
import warnings

import torch

from . import torch_impl
from .constants import check_weight_mode, compute_dtype

LIB = torch.library.Library("rdr_fast", "FRAGMENT")
# The weight mode is not called `mode`: torch.compile functionalises this mutating op by
# passing its arguments as keywords to a function whose own first parameter is `mode`.
LIB.define(
    "rdr_weights_and_update(Tensor features, Tensor labels, Tensor(a!) prototypes, Tensor(b!) seen, "
    "Tensor class_factors, float ridge, float temperature, float momentum, str weight_mode, bool update) -> Tensor"
)
LIB.define(
    "weighted_loss(Tensor logits, Tensor labels, Tensor weights, Tensor? logit_adjust, "
    "float focal_gamma, bool compute_grad) -> (Tensor, Tensor)"
)

IMPLS = ("auto", "torch", "reference")
BACKENDS: dict[str, dict[str, str]] = {"rdr_weights_and_update": {}, "weighted_loss": {}}


@torch.library.register_fake("rdr_fast::rdr_weights_and_update")
def _(features, labels, prototypes, seen, class_factors, ridge, temperature, momentum, weight_mode, update):
    check_weight_mode(weight_mode)
    torch._check(features.dim() == 2 and labels.dim() == 1 and labels.shape[0] == features.shape[0])
    torch._check(prototypes.dim() == 2 and prototypes.shape[1] == features.shape[1])
    return features.new_empty(features.shape[0], dtype=compute_dtype(features.dtype))


@torch.library.register_fake("rdr_fast::weighted_loss")
def _(logits, labels, weights, logit_adjust, focal_gamma, compute_grad):
    torch._check(logits.dim() == 2 and labels.shape[0] == logits.shape[0])
    loss = logits.new_empty((), dtype=compute_dtype(logits.dtype))
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    return loss, grad


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    # The returned gradient is data, not something to differentiate: without these two
    # lines autograd materialises a [B, C] zero tensor for its (unused) incoming gradient
    # on every backward, a pass over the logits as costly as the fused kernel itself.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


# The saved gradient is not itself differentiable. Under create_graph=True the backward
# wraps it in a node that raises this message if it is ever differentiated, instead of
# returning a constant (autograd would then fail later, or silently drop the term). The
# C++ autograd (csrc/weighted_loss.cpp) raises the same message.
DOUBLE_BACKWARD_ERROR = ("rdr_fast::weighted_loss: double backward (differentiating the gradient of "
                         "weighted_loss, e.g. after backward(create_graph=True)) is not supported")


def _backward(ctx, grad_loss, _grad_of_grad):
    if grad_loss is None:  # grads are not materialised: no gradient reached the loss
        return None, None, None, None, None, None
    (grad_logits,) = ctx.saved_tensors
    grad = grad_logits * grad_loss.to(grad_logits.dtype)
    if torch.is_grad_enabled():  # create_graph=True
        grad = torch._C._functions.DelayedError(DOUBLE_BACKWARD_ERROR, 1)(grad.detach().requires_grad_(True))
    return grad, None, None, None, None, None


# rdr_fast._C brings the same autograd formula in C++ (cheaper per call); else this one.
if not torch._C._dispatch_has_kernel_for_dispatch_key("rdr_fast::weighted_loss", "Autograd"):
    torch.library.register_autograd("rdr_fast::weighted_loss", _backward, setup_context=_setup_context, lib=LIB)


def _has_compiled_cpu_kernel(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"rdr_fast::{name}", "CPU")


def _warn_missing_cpp_kernels() -> None:
    """One warning at import (not per call) when the C++ CPU kernels did not load."""
    from ._extension import extension_info

    reason = extension_info()["reason"] or "the compiled module registered no CPU kernels"
    warnings.warn(f"rdr_fast: C++ CPU kernels unavailable, using the PyTorch path on CPU. {reason}",
                  RuntimeWarning, stacklevel=3)


_WARNED_NO_TRITON = []


def _cuda_kernel(name: str, impl: str, torch_kernel):
    """(backend, kernel) for CUDA: the Triton launcher ``rdr_fast.kernels.<name>_triton``
    when Triton is installed and RDR_FAST_IMPL is auto, else the PyTorch path (warned once,
    at the first CUDA call, when it is only for want of Triton). Triton is imported at the
    first CUDA call, so importing rdr_fast never imports it."""
    import importlib.util

    if impl == "auto" and importlib.util.find_spec("triton") is not None:
        def triton_kernel(*args):
            from . import kernels
            return getattr(kernels, f"{name}_triton")(*args)
        return "triton", triton_kernel
    if impl != "auto":
        return "torch", torch_kernel

    def torch_kernel_warned(*args):
        if not _WARNED_NO_TRITON:
            _WARNED_NO_TRITON.append(True)
            warnings.warn("rdr_fast: Triton is not installed; the CUDA ops use the PyTorch path",
                          RuntimeWarning, stacklevel=2)
        return torch_kernel(*args)
    return "torch", torch_kernel_warned


def _register_backends(impl: str) -> None:
    """Register the fastest available kernel per device and record the choice in BACKENDS.

    The C++ kernels (rdr_fast._C, loaded by rdr_fast/__init__.py before this module) are
    already registered for CPU when present; RDR_FAST_IMPL=torch|reference keeps them from
    loading at all, so the Python kernels registered here are the only CPU kernels then.
    """
    if impl == "auto" and not all(_has_compiled_cpu_kernel(name) for name in BACKENDS):
        _warn_missing_cpp_kernels()
    for name in BACKENDS:
        if impl == "auto" and _has_compiled_cpu_kernel(name):
            BACKENDS[name]["cpu"] = "cpp"
        else:
            cpu_impl = "reference" if impl == "reference" else "torch"
            torch.library.register_kernel(f"rdr_fast::{name}", "cpu", _python_kernel(cpu_impl, name), lib=LIB)
            BACKENDS[name]["cpu"] = cpu_impl
        BACKENDS[name]["cuda"], cuda_kernel = _cuda_kernel(name, impl, _python_kernel("torch", name))
        torch.library.register_kernel(f"rdr_fast::{name}", "cuda", cuda_kernel, lib=LIB)


def _python_kernel(impl: str, name: str):
    """The op ``name`` of a Python backend: ``<name>_torch`` of the PyTorch path, or
    ``<name>_ref`` of the reference loop (imported only then: the reference never loads
    at training time)."""
    if impl == "reference":
        from . import reference
        return getattr(reference, f"{name}_ref")
    return getattr(torch_impl, f"{name}_torch")


def _selected_impl() -> str:
    impl = os.environ.get("RDR_FAST_IMPL", "auto").strip().lower() or "auto"
    if impl not in IMPLS:
        warnings.warn(f"RDR_FAST_IMPL={impl!r} is not one of {IMPLS}; using 'auto'", stacklevel=2)
        impl = "auto"
    return impl


IMPL = _selected_impl()
_register_backends(IMPL)
