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
``rdr_fast.kernels`` when Triton is installed, each checked against the PyTorch path at
its first call on a device and replaced by it, with one KernelFallbackWarning, if it
fails (``CheckedKernel``). ``RDR_FAST_IMPL=triton`` makes such a failure an error;
``RDR_FAST_IMPL=torch`` forces the PyTorch path and ``RDR_FAST_IMPL=reference`` the
per-class reference loop of ``rdr_fast.reference`` (CPU only), for A/B runs; any other
value is an error at import. Each backend is one function per op with the op's
signature; this module only registers them.
"""
from __future__ import annotations

import os
import threading
import warnings

import torch

from . import torch_impl
from ._extension import compile_pending, extension_info
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
# The gradient of weighted_loss as differentiable torch ops: what its backward returns under
# create_graph=True (double backward). CompositeImplicitAutograd: autograd records the
# torch ops inside, on every device. C++'s autograd formula calls it too.
LIB.define("weighted_loss_grad(Tensor logits, Tensor labels, Tensor weights, Tensor? logit_adjust, "
           "float focal_gamma) -> Tensor")
LIB.impl("weighted_loss_grad", torch_impl.weighted_loss_grad_differentiable, "CompositeImplicitAutograd")
# Whether one call's data passes every data check (label range, NaN/Inf, magnitude), in one
# pass and one dispatch; rdr_fast._checks runs its precise checks, for the message, only
# when it does not. rdr_fast._C brings the CPU kernel; every other device (and the CPU
# without _C) runs the PyTorch version, one host sync.
LIB.define("data_ok(Tensor labels, int num_classes, Tensor[] values, float[] limits, Tensor? labelled_rows) -> bool")
LIB.impl("data_ok", torch_impl.data_ok_torch, "CompositeExplicitAutograd")

IMPLS = ("auto", "triton", "torch", "reference")
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
    # For a double backward only. Kept as plain references: save_for_backward's version
    # check would refuse even a first-order backward after an in-place edit of the logits.
    ctx.inputs = inputs[:5]
    # The returned gradient is data, not something to differentiate: without these two
    # lines autograd materialises a [B, C] zero tensor for its (unused) incoming gradient
    # on every backward, a pass over the logits as costly as the fused kernel itself.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_of_grad):
    if grad_loss is None:  # grads are not materialised: no gradient reached the loss
        return None, None, None, None, None, None
    if torch.is_grad_enabled():  # create_graph=True: a gradient that can be differentiated again
        grad_logits = torch.ops.rdr_fast.weighted_loss_grad(*ctx.inputs)
    else:  # training: the gradient the forward computed
        (grad_logits,) = ctx.saved_tensors
    return grad_logits * grad_loss.to(grad_logits.dtype), None, None, None, None, None


# rdr_fast._C brings the same autograd formula in C++ (cheaper per call); else this one.
if not torch._C._dispatch_has_kernel_for_dispatch_key("rdr_fast::weighted_loss", "Autograd"):
    torch.library.register_autograd("rdr_fast::weighted_loss", _backward, setup_context=_setup_context, lib=LIB)


def _has_compiled_cpu_kernel(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"rdr_fast::{name}", "CPU")


def _warn_missing_cpp_kernels() -> None:
    """One warning (at import, or at the first CPU call when they were to be compiled
    then), not one per call, when the C++ CPU kernels did not load."""
    reason = extension_info()["reason"] or "the compiled module registered no CPU kernels"
    warnings.warn(f"rdr_fast: C++ CPU kernels unavailable, using the PyTorch path on CPU. {reason}",
                  RuntimeWarning, stacklevel=3)


_WARNED_NO_TRITON = []


class KernelFallbackWarning(RuntimeWarning):
    """A fast kernel failed its first-use check; its op runs the PyTorch path from then on."""


# The probe compares float32 results of two float32 computations (both solve in float64).
PROBE_TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def _probe_weights_and_update(kernel, device) -> dict[str, torch.Tensor]:
    """``kernel`` (an implementation of rdr_weights_and_update) on RDRLoss's default path,
    density ratios with the prototype update, on a small fixed batch on ``device``: 16
    float32 samples, 8 features, 4 classes. Class 0 has more samples than features (the
    K×K form), class 1 fewer (the b×b form), class 2 is not yet seen, class 3 is absent.
    The prototypes lie near the class means, so that the ratios spread over 0.1..3 (and
    one reaches the floor) instead of most of them sitting at the floor."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    labels = torch.tensor([0, 1, 0, 2, 0, 1, 0, 0, 1, 0, 2, 0, 0, 1, 0, 0], device="cpu")
    features = torch.randn(16, 8, generator=generator, device="cpu")
    counts = torch.bincount(labels, minlength=4).clamp(min=1)
    means = torch.zeros(4, 8, device="cpu").index_add_(0, labels, features) / counts[:, None]
    prototypes = (means + 0.1 * torch.randn(4, 8, generator=generator, device="cpu")).to(device)
    seen = torch.tensor([True, True, False, True], device="cpu").to(device)
    factors = torch.tensor([1.6, 4.0, 8.0, 16.0], dtype=torch.float64, device="cpu")
    weights = kernel(features.to(device), labels.to(device), prototypes, seen, factors.to(device), 1e-5, 1.0, 0.9,
                     "density_ratio", True)
    return {"weights": weights, "prototypes": prototypes, "seen": seen}


def _probe_weighted_loss(kernel, device) -> dict[str, torch.Tensor]:
    """``kernel`` (an implementation of weighted_loss) on RDRLoss's default path, the
    cross-entropy with its gradient, on 6 float32 rows of 5 classes on ``device``."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    logits = 3 * torch.randn(6, 5, generator=generator, device="cpu")
    labels = torch.tensor([0, 4, 1, 0, 2, 3], device="cpu")
    weights = torch.rand(6, generator=generator, device="cpu") + 0.5
    loss, grad = kernel(logits.to(device), labels.to(device), weights.to(device), None, 0.0, True)
    return {"loss": loss, "gradient": grad}


PROBES = {"rdr_weights_and_update": _probe_weights_and_update, "weighted_loss": _probe_weighted_loss}


def _capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is capturing a CUDA graph."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


class CheckedKernel:
    """One op's fast kernel for a device type, checked against its PyTorch path at the
    first call on each device.

    That first call runs ``probe(fast, device)`` and ``probe(fallback, device)`` (the
    entries of PROBES: small fixed inputs, results by name) and compares them within
    PROBE_TOLERANCE. If the fast kernel raises there (a compile or launch failure) or
    differs, the op runs ``fallback`` from then on, on every device, after one
    KernelFallbackWarning, and ``backends`` (the op's entry of BACKENDS) records
    ``{device_type: "torch", device_type + "_fallback": reason}``; with ``strict``
    (RDR_FAST_IMPL=triton) every call raises a RuntimeError with the reason instead.
    Once a device has passed, a call is one set lookup and the fast kernel: the probe's
    host reads happen only at that first call, which therefore must not be inside a
    CUDA graph capture (it raises there; the usual warm-up before capture runs it).
    """

    def __init__(self, name: str, fast, fallback, probe, *, strict: bool, backends: dict, device_type: str):
        self.name, self.fast, self.fallback, self.probe = name, fast, fallback, probe
        self.strict, self.backends, self.device_type = strict, backends, device_type
        self.passed: set[torch.device] = set()
        self.failure: str | None = None

    def __call__(self, *args):
        device = args[0].device
        if device in self.passed:
            return self.fast(*args)
        if self.failure is None:
            self._check(device)
        if self.failure is None:
            return self.fast(*args)
        if self.strict:
            raise RuntimeError(f"rdr_fast: {self.name}: the Triton kernel failed its check against the PyTorch "
                               f"path ({self.failure}); RDR_FAST_IMPL=triton allows no fallback")
        return self.fallback(*args)

    def _check(self, device: torch.device) -> None:
        if _capturing(device):
            raise RuntimeError(
                f"rdr_fast: {self.name}: the first call on {device} checks the Triton kernel against the PyTorch "
                f"path, which reads results back to the host and cannot run inside a CUDA graph capture; run one "
                f"step before capturing (the usual warm-up)")
        try:
            got = self.probe(self.fast, device)
        except Exception as err:  # noqa: BLE001 — a compile or launch failure, whatever its type
            self._fail(device, f"{type(err).__name__}: {err}")
            return
        expected = self.probe(self.fallback, device)
        for result, value in expected.items():
            try:
                torch.testing.assert_close(got[result], value, **PROBE_TOLERANCE)
            except AssertionError as err:
                self._fail(device, f"{result} not close to the PyTorch path's: " + " ".join(str(err).split()))
                return
        self.passed.add(device)

    def _fail(self, device: torch.device, reason: str) -> None:
        self.failure = f"on {device}: {reason}"
        self.passed.clear()
        if self.strict:
            return
        self.backends.update({self.device_type: "torch", f"{self.device_type}_fallback": self.failure})
        warnings.warn(f"rdr_fast: {self.name}: the Triton kernel failed its check against the PyTorch path "
                      f"({self.failure}); {self.name} runs the PyTorch path for the rest of this process",
                      KernelFallbackWarning, stacklevel=3)


def _triton_launcher(name: str):
    """The launcher ``rdr_fast.kernels.<name>_triton``, imported (and with it Triton) at
    its first call, so importing rdr_fast never imports Triton."""
    def triton_kernel(*args):
        from . import kernels
        return getattr(kernels, f"{name}_triton")(*args)
    return triton_kernel


def _cuda_kernel(name: str, impl: str, torch_kernel):
    """(backend, kernel) for CUDA: with RDR_FAST_IMPL auto, the Triton launcher behind a
    CheckedKernel when Triton is installed, else the PyTorch path (warned once, at the
    first CUDA call); with RDR_FAST_IMPL=triton always the checked launcher, strict (a
    missing Triton fails the check too); with torch or reference, the PyTorch path."""
    import importlib.util

    if impl == "triton" or (impl == "auto" and importlib.util.find_spec("triton") is not None):
        return "triton", CheckedKernel(name, _triton_launcher(name), torch_kernel, PROBES[name],
                                       strict=impl == "triton", backends=BACKENDS[name], device_type="cuda")
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
    already registered for CPU when present; when they are still to be compiled, a CPU
    kernel that compiles them at its first call stands in. RDR_FAST_IMPL=torch|reference
    keeps them from loading at all, so the Python kernels registered here are the only
    CPU kernels then. RDR_FAST_IMPL=triton is auto on the CPU.
    """
    fastest = impl in ("auto", "triton")
    pending = fastest and extension_info()["origin"] == "pending"
    if fastest and not pending and not all(_has_compiled_cpu_kernel(name) for name in BACKENDS):
        _warn_missing_cpp_kernels()
    for name in BACKENDS:
        if fastest and _has_compiled_cpu_kernel(name):
            BACKENDS[name]["cpu"] = "cpp"
        else:
            cpu_impl = "reference" if impl == "reference" else "torch"
            kernel = _compiled_at_first_use(name) if pending else _python_kernel(cpu_impl, name)
            torch.library.register_kernel(f"rdr_fast::{name}", "cpu", kernel, lib=LIB)
            BACKENDS[name]["cpu"] = "pending" if pending else cpu_impl
        BACKENDS[name]["cuda"], cuda_kernel = _cuda_kernel(name, impl, _python_kernel("torch", name))
        torch.library.register_kernel(f"rdr_fast::{name}", "cuda", cuda_kernel, lib=LIB)


_REDISPATCHING = threading.local()


def _compiled_at_first_use(name: str):
    """The CPU kernel of ``name`` while the C++ kernels are not compiled yet. Its first call
    compiles them (rdr_fast/_extension.py); loading them registers the C++ kernels, which
    take over the CPU dispatch of both ops, and the call is dispatched again to reach them.
    When compiling fails, both ops run the PyTorch path, with one warning giving the reason."""
    torch_kernel, op = _python_kernel("torch", name), getattr(torch.ops.rdr_fast, name).default

    def kernel(*args):
        if BACKENDS[name]["cpu"] == "pending":
            _compile_cpp_kernels()
        if BACKENDS[name]["cpu"] != "cpp":
            return torch_kernel(*args)
        if getattr(_REDISPATCHING, "active", False):  # back here: the library registered no kernel
            raise RuntimeError(f"rdr_fast: the compiled C++ module registered no CPU kernel for {name}")
        _REDISPATCHING.active = True
        try:
            return op(*args)
        finally:
            _REDISPATCHING.active = False
    return kernel


def _compile_cpp_kernels() -> None:
    """Compile the pending C++ kernels and record the outcome in BACKENDS for both ops."""
    compiled = compile_pending()
    if not compiled:
        _warn_missing_cpp_kernels()
    for devices in BACKENDS.values():
        devices["cpu"] = "cpp" if compiled else "torch"


def _python_kernel(impl: str, name: str):
    """The op ``name`` of a Python backend: ``<name>_torch`` of the PyTorch path, or
    ``<name>_ref`` of the reference loop (imported only then: the reference never loads
    at training time)."""
    if impl == "reference":
        from . import reference
        return getattr(reference, f"{name}_ref")
    return getattr(torch_impl, f"{name}_torch")


def _selected_impl() -> str:
    """RDR_FAST_IMPL, lower-cased ("auto" when unset or empty); a ValueError naming the
    accepted values for anything else (a typo must not silently run another backend)."""
    impl = os.environ.get("RDR_FAST_IMPL", "auto").strip().lower() or "auto"
    if impl not in IMPLS:
        raise ValueError(f"RDR_FAST_IMPL must be one of {IMPLS}, got {impl!r}")
    return impl


IMPL = _selected_impl()
_register_backends(IMPL)
