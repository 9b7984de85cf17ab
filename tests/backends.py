"""The test harness every backend of the two ops shares: which backends there are, how to
call each one's kernel with the op's exact signature, what it must equal (the reference
loop in float64 on the very values the kernel sees) and how closely.

Backends: "reference" (rdr_fast.reference, the ``*_ref`` functions at the inputs'
precision), "torch" (rdr_fast.torch_impl), "cpp" (the kernels of rdr_fast._C, reached as
torch.ops.rdr_fast.* on CPU tensors), "triton-interpreter" (rdr_fast.kernels on CPU
tensors: the launchers hand CPU launches to Triton's interpreter, see kernels/_utils.py)
and "triton-cuda" (the same launchers, compiled, on a GPU; marked gpu).

Tolerances. Inputs in float64 or float32: the result must be within TOL of its own dtype.
Inputs in bf16/fp16: every backend computes in float32 from the same rounded inputs, and
the results differ from the float64 reference by float32 round-off (amplified by the
ill-conditioned solves) and by the final rounding to the output dtype. That error is not
a constant, so it is measured: the PyTorch path's own error on the same inputs, checked
once against TOL, and every other backend's must be at most LOW_PRECISION_FACTOR times it
(plus LOW_PRECISION_FLOOR, for results the PyTorch path happens to get exact). The factor
is 4: another summation order changes a float32 error by a small factor, and a result
rounded to bf16/fp16 can land one unit in the last place beside the PyTorch path's when
the float32 values straddle a rounding boundary (half a unit becomes at most 1.5).
"""
from __future__ import annotations

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    # Effective only before the first `import triton`; the launchers interpret CPU
    # launches either way (kernels/_utils.py), this only spares the compiled decoration.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import rdr_fast  # noqa: E402
from rdr_fast import functional as Fn  # noqa: E402
from rdr_fast import reference, torch_impl  # noqa: E402
from rdr_fast.constants import DEFAULT_RIDGE, compute_dtype, weight_mode  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
MOMENTUM = 0.9

# Keyed by the dtype of the result compared; bf16/fp16: half a unit in the last place.
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6),
       torch.bfloat16: dict(rtol=2 ** -8, atol=1e-5), torch.float16: dict(rtol=2 ** -11, atol=1e-5)}
LOW_PRECISION = (torch.bfloat16, torch.float16)
LOW_PRECISION_FACTOR = 4
LOW_PRECISION_FLOOR = 1e-6


def triton_is_compiled() -> bool:
    """Whether the Triton kernels were decorated for compilation (not TRITON_INTERPRET=1)."""
    from rdr_fast.kernels import rdr_weights_and_update as weights_module
    from rdr_fast.kernels._utils import interpreting

    return not interpreting(weights_module._rdr_segment_kernel)


needs_compiled_triton = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON and triton_is_compiled()),
                                           reason="needs a GPU and compiled Triton kernels")
BACKENDS = ["reference", "torch", "cpp", "triton-interpreter",
            pytest.param("triton-cuda", marks=[pytest.mark.gpu, needs_compiled_triton])]


def device_of(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "triton-cuda" else "cpu")


def kernel(backend: str, op: str):
    """The kernel of ``op`` ("rdr_weights_and_update" or "weighted_loss") of one backend,
    with the op's signature."""
    if backend == "reference":
        return getattr(reference, f"{op}_ref")
    if backend == "torch":
        return getattr(torch_impl, f"{op}_torch")
    if backend == "cpp":
        return cpp_kernel(op)
    if not HAS_TRITON:
        pytest.skip("Triton is not installed")
    from rdr_fast import kernels
    return getattr(kernels, f"{op}_triton")


def cpp_kernel(op: str):
    """torch.ops.rdr_fast.<op> on the CPU, which must be the C++ kernel: a C++ module that
    did not load is a failure (never a skip), unless RDR_FAST_IMPL chose a Python path."""
    if rdr_fast.ops.IMPL != "auto":
        pytest.skip(f"RDR_FAST_IMPL={rdr_fast.ops.IMPL} keeps rdr_fast._C from loading")
    if rdr_fast.backends()[op]["cpu"] != "cpp":
        pytest.fail(f"the C++ kernels did not load: {rdr_fast.extension_info()['reason']}")
    return getattr(torch.ops.rdr_fast, op).default


def on(device, args):
    """The op's arguments with every tensor copied to ``device`` (the caller's stay intact)."""
    return tuple(a.to(device, copy=True) if isinstance(a, torch.Tensor) else a for a in args)


def cpu(values):
    return tuple(v.cpu() for v in values)


# ---- rdr_weights_and_update ----------------------------------------------------------------
def weights_args(features, labels, protos, seen, counts, reweight="rdr", temperature=1.0, warmup=False,
                 update=True):
    """The op's arguments for one reweighting, mapped as rdr_fast.functional maps them."""
    return (features, labels, protos, seen, Fn.class_factors(counts, reweight), DEFAULT_RIDGE, temperature, MOMENTUM,
            weight_mode(reweight, warmup), update)


def run_weights(backend: str, args):
    """(weights, prototypes, seen) on the CPU: the backend's kernel on its device, the
    state updated in place on copies of ``args``' tensors."""
    args = on(device_of(backend), args)
    weights = kernel(backend, "rdr_weights_and_update")(*args)
    return cpu((weights, args[2], args[3]))


def expected_weights(args):
    """(weights, prototypes, seen) of the reference loop in float64 on the same values."""
    features, labels, protos, seen, factors, *rest = args
    return run_weights("reference", (features.double(), labels, protos.double(), seen, factors.double(), *rest))


# ---- weighted_loss -------------------------------------------------------------------------
def loss_args(logits, labels, weights, base="ce", counts=None, tau=1.0, focal_gamma=1.5, compute_grad=True):
    """The op's arguments for one base loss, mapped as rdr_fast.functional maps them."""
    adjust = tau * Fn.log_prior(counts) if base == "la" else None
    return logits, labels, weights, adjust, focal_gamma if base == "focal" else 0.0, compute_grad


def run_loss(backend: str, args):
    """(loss, gradient) on the CPU of the backend's kernel on its device."""
    return cpu(kernel(backend, "weighted_loss")(*on(device_of(backend), args)))


def expected_loss(args):
    """(loss, gradient) of the reference loop (autograd) in float64 on the same values. With
    one class p = 1 and the gradient is 0 for every base, where autograd of focal's
    (1 − p)^γ would give 0·inf."""
    logits, labels, weights, adjust, *rest = args
    loss, grad = run_loss("reference", (logits.double(), labels, weights.double(),
                                        None if adjust is None else adjust.double(), *rest))
    return loss, torch.zeros_like(grad) if logits.shape[1] == 1 else grad


# ---- the comparison -------------------------------------------------------------------------
def assert_matches(backend, got, expected, torch_path=None, what=""):
    """``got`` (a backend's result) against ``expected`` (the float64 reference). Results
    from bf16/fp16 inputs pass ``torch_path``, the PyTorch path's result on the same
    inputs: its error is checked against TOL, and bounds every other backend's."""
    assert torch.isfinite(got[torch.isfinite(expected)]).all(), f"{what}: non-finite where the reference is finite"
    if torch_path is None or backend == "torch":
        reference_result = torch_path if torch_path is not None else got
        torch.testing.assert_close(reference_result.double(), expected, **TOL[got.dtype], msg=f"{backend} {what}")
        return
    error = (got.double() - expected).abs().max()
    torch_error = (torch_path.double() - expected).abs().max()
    bound = LOW_PRECISION_FACTOR * torch_error + LOW_PRECISION_FLOOR
    assert error <= bound, f"{backend} {what}: error {error:.3g} vs the PyTorch path's {torch_error:.3g}"


def low_precision(dtype) -> bool:
    return dtype in LOW_PRECISION


def assert_weights_match(backend, args):
    """The backend's weights, prototypes and seen flags equal the reference's; classes
    absent from the batch keep their state bit for bit."""
    features, labels, protos, seen = args[:4]
    got = run_weights(backend, args)
    expected = expected_weights(args)
    torch_path = run_weights("torch", args) if low_precision(features.dtype) else (None, None, None)
    assert got[0].dtype == compute_dtype(features.dtype) and got[1].dtype == protos.dtype
    for name, g, e, t in zip(("weights", "prototypes"), got, expected, torch_path):
        assert_matches(backend, g, e, t, name)
    assert torch.equal(got[2], expected[2]), "seen"
    absent = torch.ones(len(seen), dtype=torch.bool)
    absent[labels] = False
    assert torch.equal(got[1][absent], protos[absent]) and torch.equal(got[2][absent], seen[absent])
    return got


def assert_loss_matches(backend, args):
    logits = args[0]
    got = run_loss(backend, args)
    expected = expected_loss(args)
    torch_path = run_loss("torch", args) if low_precision(logits.dtype) else (None, None)
    assert got[0].dtype == compute_dtype(logits.dtype) and got[1].dtype == logits.dtype
    assert got[1].shape == logits.shape
    for name, g, e, t in zip(("loss", "gradient"), got, expected, torch_path):
        assert_matches(backend, g, e, t, name)
    return got
