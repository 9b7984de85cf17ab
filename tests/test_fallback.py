"""The first-use check of the CUDA kernels (rdr_fast.ops.CheckedKernel).

On CUDA each op's Triton kernel is compared with the PyTorch path on a small fixed probe
at its first call; a compile failure, a launch failure or a mismatch there makes the op
run the PyTorch path, with one KernelFallbackWarning, or raise with RDR_FAST_IMPL=triton.
Without a GPU the wrapper runs here on CPU tensors, around fake kernels that fail in each
way and around the real Triton launchers (interpreted on CPU tensors, see
tests/test_triton.py); the GPU tests check the registered kernels pass on a device.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

import rdr_fast
from rdr_fast import functional as Fn
from rdr_fast import ops, reference, torch_impl
from conftest import CPU_AND_CUDA, HostReads, long_tail_counts, long_tail_labels, random_state

OPS = list(ops.PROBES)
TORCH_PATH = {name: getattr(torch_impl, f"{name}_torch") for name in OPS}
CPU = torch.device("cpu")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def op_args(name: str) -> tuple:
    """A user's call of op ``name`` on the CPU (not the probe's inputs); the same every time."""
    torch.manual_seed(1)
    counts = long_tail_counts(5)
    labels = long_tail_labels(20, counts)
    if name == "weighted_loss":
        return torch.randn(20, 5), labels, torch.rand(20) + 0.5, None, 0.0, True
    protos, seen = random_state(5, 6, torch.float32)
    return torch.randn(20, 6), labels, protos, seen, Fn.class_factors(counts), 1e-5, 1.0, 0.9, "density_ratio", True


class CompilationError(Exception):
    """Stands for Triton's triton.compiler.errors.CompilationError."""


class Fake:
    """A fast kernel that counts its calls and fails in one way (or not at all)."""

    def __init__(self, name: str, failure: str | None = None):
        self.kernel, self.failure, self.calls = TORCH_PATH[name], failure, 0

    def __call__(self, *args):
        self.calls += 1
        if self.failure == "compile":
            raise CompilationError("at 12:8: fp64 tl.dot is not supported on this target")
        if self.failure == "launch":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if self.failure == "state":  # the prototype update is lost
            args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        out = self.kernel(*args)
        if self.failure == "values":  # 0.1 % off: beyond the float32 tolerance of the probe
            return out * 1.001 if isinstance(out, torch.Tensor) else (out[0] * 1.001, out[1])
        return out


# failure → what the reason must say (the exception's type and message, or what differs and by how much)
FAILURES = {"compile": r"CompilationError: at 12:8: fp64 tl\.dot is not supported",
            "launch": r"RuntimeError: CUDA error: an illegal memory access",
            "values": r"(weights|loss) not close to the PyTorch path's: .*[Aa]bsolute difference: ",
            "state": r"prototypes not close to the PyTorch path's"}
CASES = [(name, failure) for name in OPS for failure in FAILURES
         if not (failure == "state" and name == "weighted_loss")]  # weighted_loss has no state


def checked(name: str, fast, strict: bool = False):
    """(kernel, its backends entry): ``fast`` behind a CheckedKernel, as ops registers it for CUDA."""
    backends = {"cpu": "cpp", "cuda": "triton"}
    kernel = ops.CheckedKernel(name, fast, TORCH_PATH[name], ops.PROBES[name], strict=strict, backends=backends,
                               device_type="cuda")
    return kernel, backends


def results(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def assert_same(got, expected):
    for g, e in zip(results(got), results(expected), strict=True):
        assert torch.equal(g, e)


def one_fallback_warning(caught, name: str, cause: str) -> str:
    """The message of the one KernelFallbackWarning in ``caught``, checked to name op and cause."""
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, ops.KernelFallbackWarning)]
    assert len(fallbacks) == 1, fallbacks
    assert f"rdr_fast: {name}:" in fallbacks[0]
    assert re.search(cause, fallbacks[0]), fallbacks[0]
    return fallbacks[0]


@pytest.mark.parametrize("name", OPS)
def test_a_kernel_that_agrees_is_used_without_a_warning(name):
    """The reference loop (another implementation, equal within float32) passes the probe,
    and the call's result is its own."""
    ref = getattr(reference, f"{name}_ref")
    kernel, backends = checked(name, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = kernel(*op_args(name))
    assert_same(got, ref(*op_args(name)))
    assert kernel.passed == {CPU} and kernel.failure is None
    assert backends == {"cpu": "cpp", "cuda": "triton"}


@pytest.mark.parametrize("name", OPS)
def test_the_probe_runs_once_and_later_calls_read_nothing_back(name):
    """The first call probes (reading results back to the host) and then runs the fast
    kernel; later calls run only the fast kernel, with no host read."""
    fast, fallback = Fake(name), Fake(name)
    kernel = ops.CheckedKernel(name, fast, fallback, ops.PROBES[name], strict=False, backends={},
                               device_type="cuda")
    args = op_args(name)
    with HostReads() as first:
        kernel(*args)
    assert (fast.calls, fallback.calls) == (2, 1)  # probe + call; probe
    assert first.reads  # the comparison
    calls = [(op_args(name), op_args(name)) for _ in range(3)]
    with HostReads() as later:
        outputs = [kernel(*args) for args, _ in calls]
    assert later.reads == []
    for out, (_, same_args) in zip(outputs, calls):
        assert_same(out, TORCH_PATH[name](*same_args))
    assert (fast.calls, fallback.calls) == (5, 1)


@pytest.mark.parametrize("name,failure", CASES)
def test_a_failing_kernel_falls_back_with_one_warning(name, failure):
    fast = Fake(name, failure)
    kernel, backends = checked(name, fast)
    with pytest.warns(ops.KernelFallbackWarning) as caught:
        got = kernel(*op_args(name))
    message = one_fallback_warning(caught, name, FAILURES[failure])
    assert "PyTorch path for the rest of this process" in message
    assert_same(got, TORCH_PATH[name](*op_args(name)))
    assert backends["cuda"] == "torch" and re.search(FAILURES[failure], backends["cuda_fallback"])
    assert backends["cpu"] == "cpp" and kernel.passed == set()
    calls = fast.calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        for _ in range(2):
            assert_same(kernel(*op_args(name)), TORCH_PATH[name](*op_args(name)))
    assert fast.calls == calls  # never tried again


@pytest.mark.parametrize("name,failure", CASES)
def test_rdr_fast_impl_triton_makes_the_failure_an_error(name, failure):
    kernel, backends = checked(name, Fake(name, failure), strict=True)
    for _ in range(2):  # every call, not only the first
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an error, not a warning
            with pytest.raises(RuntimeError, match=f"rdr_fast: {name}: .*RDR_FAST_IMPL=triton") as err:
                kernel(*op_args(name))
        assert re.search(FAILURES[failure], str(err.value))
    assert backends == {"cpu": "cpp", "cuda": "triton"}


def test_a_failure_on_one_device_sends_every_device_to_the_fallback():
    """A kernel that passed on one device and fails on another (here: the meta device)
    is not used on the first one either: the op has one backend per device type."""
    def fast(x):
        if x.device.type == "meta":
            raise RuntimeError("no kernel image is available for execution on the device")
        return x * 2
    fallback = Fake("weighted_loss")
    fallback.kernel = lambda x: x * 2
    kernel = ops.CheckedKernel("op", fast, fallback, lambda k, device: {"out": k(torch.ones(3, device=device))},
                               strict=False, backends={}, device_type="cuda")
    kernel(torch.ones(2))
    assert kernel.passed == {CPU} and fallback.calls == 1
    with pytest.warns(ops.KernelFallbackWarning, match="on meta: RuntimeError: no kernel image"):
        kernel(torch.ones(2, device="meta"))
    kernel(torch.ones(2))
    assert kernel.passed == set() and fallback.calls == 3


@pytest.mark.parametrize("strict", [False, True])
def test_a_first_call_inside_a_cuda_graph_capture_is_refused(monkeypatch, strict):
    """The probe reads results back, which a capture forbids: the first call refuses,
    runs neither kernel; the next call outside the capture probes as usual."""
    fast = Fake("weighted_loss")
    kernel, backends = checked("weighted_loss", fast, strict=strict)
    monkeypatch.setattr(ops, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="weighted_loss: the first call on cpu .*CUDA graph capture.*warm-up"):
        kernel(*op_args("weighted_loss"))
    assert fast.calls == 0 and kernel.passed == set() and kernel.failure is None
    monkeypatch.undo()
    kernel(*op_args("weighted_loss"))
    assert fast.calls == 2 and kernel.passed == {CPU} and backends["cuda"] == "triton"


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("name", OPS)
def test_the_probe_inputs_are_fixed_and_on_the_kernels_device(name, device):
    """Whatever the global seed and the default device: the same inputs, all on ``device``."""
    calls = []

    def record(*args):
        calls.append([a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        return TORCH_PATH[name](*args)
    for seed in (0, 1):
        torch.manual_seed(seed)
        with torch.device("meta"):  # a default device must not leak into the probe
            ops.PROBES[name](record, torch.device(device))
    tensors = [a for a in calls[0] if isinstance(a, torch.Tensor)]
    assert tensors and all(a.device.type == device for a in tensors)
    for first, second in zip(*calls, strict=True):
        assert torch.equal(first, second) if isinstance(first, torch.Tensor) else first == second


# ---- what ops registers for CUDA ---------------------------------------------------------
@pytest.fixture
def own_backends(monkeypatch):
    """ops.BACKENDS entries that this test may change (restored after it)."""
    for name in OPS:
        monkeypatch.setitem(ops.BACKENDS, name, dict(ops.BACKENDS[name]))


@pytest.mark.skipif(not HAS_TRITON, reason="without Triton, auto registers the PyTorch path for CUDA")
@pytest.mark.parametrize("name", OPS)
def test_the_registered_cuda_kernel_reports_its_fallback_in_backends(monkeypatch, own_backends, name):
    backend, kernel = ops._cuda_kernel(name, "auto", TORCH_PATH[name])
    assert backend == "triton" and isinstance(kernel, ops.CheckedKernel) and not kernel.strict
    assert kernel.fallback is TORCH_PATH[name] and kernel.probe is ops.PROBES[name]
    monkeypatch.setattr(kernel, "fast", Fake(name, "launch"))
    with pytest.warns(ops.KernelFallbackWarning):
        kernel(*op_args(name))
    cuda = {key: value for key, value in rdr_fast.backends()[name].items() if key.startswith("cuda")}
    assert cuda == {"cuda": "torch", "cuda_fallback": "on cpu: RuntimeError: CUDA error: an illegal memory "
                                                      "access was encountered"}


@pytest.mark.parametrize("name", OPS)
def test_rdr_fast_impl_triton_registers_the_strict_check(monkeypatch, own_backends, name):
    """With or without Triton installed; a missing Triton (its launcher raises) is an error."""
    from rdr_fast import kernels

    backend, kernel = ops._cuda_kernel(name, "triton", TORCH_PATH[name])
    assert backend == "triton" and isinstance(kernel, ops.CheckedKernel) and kernel.strict

    def needs_triton(*args):
        raise NotImplementedError("rdr_fast.kernels requires triton installed (pip install triton)")
    monkeypatch.setattr(kernels, f"{name}_triton", needs_triton)
    with pytest.raises(RuntimeError, match=f"{name}: .*NotImplementedError: rdr_fast.kernels requires triton"):
        kernel(*op_args(name))
    for impl in ("torch", "reference"):
        assert ops._cuda_kernel(name, impl, TORCH_PATH[name]) == ("torch", TORCH_PATH[name])


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (its interpreter runs the launchers on CPU tensors)")
@pytest.mark.parametrize("name", OPS)
def test_the_triton_launchers_pass_the_probe_in_the_interpreter(own_backends, name):
    from rdr_fast import kernels

    backend, kernel = ops._cuda_kernel(name, "auto", TORCH_PATH[name])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = kernel(*op_args(name))
    assert kernel.passed == {CPU} and kernel.failure is None
    assert_same(got, getattr(kernels, f"{name}_triton")(*op_args(name)))
    assert rdr_fast.backends()[name]["cuda"] == "triton"


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (its interpreter runs the launchers on CPU tensors)")
def test_a_real_triton_error_falls_back(monkeypatch, own_backends):
    """Block sizes that are no power of two: Triton itself refuses the launch."""
    from rdr_fast.kernels import rdr_weights_and_update as launcher_module

    monkeypatch.setattr(launcher_module, "_block_sizes", lambda device: (12, 12, 1))
    _, kernel = ops._cuda_kernel("rdr_weights_and_update", "auto", TORCH_PATH["rdr_weights_and_update"])
    with pytest.warns(ops.KernelFallbackWarning) as caught:
        got = kernel(*op_args("rdr_weights_and_update"))
    one_fallback_warning(caught, "rdr_weights_and_update", r"on cpu: \w+Error: .*power of 2")
    assert_same(got, TORCH_PATH["rdr_weights_and_update"](*op_args("rdr_weights_and_update")))
    assert rdr_fast.backends()["rdr_weights_and_update"]["cuda"] == "torch"


# ---- RDR_FAST_IMPL -------------------------------------------------------------------------
@pytest.mark.parametrize("value,impl", [(None, "auto"), ("", "auto"), ("auto", "auto"), (" Triton ", "triton"),
                                        ("torch", "torch"), ("REFERENCE", "reference")])
def test_rdr_fast_impl_values(monkeypatch, value, impl):
    if value is None:
        monkeypatch.delenv("RDR_FAST_IMPL", raising=False)
    else:
        monkeypatch.setenv("RDR_FAST_IMPL", value)
    assert ops._selected_impl() == impl


def import_rdr_fast(impl: str) -> subprocess.CompletedProcess:
    code = "import warnings; warnings.simplefilter('error'); import rdr_fast; print(rdr_fast.backends())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RDR_FAST_IMPL": impl})


def test_an_unknown_rdr_fast_impl_is_an_error_at_import(monkeypatch):
    monkeypatch.setenv("RDR_FAST_IMPL", "cuda")
    accepted = re.escape("one of ('auto', 'triton', 'torch', 'reference'), got 'cuda'")
    with pytest.raises(ValueError, match=f"RDR_FAST_IMPL must be {accepted}"):
        ops._selected_impl()
    done = import_rdr_fast("tritn")
    assert done.returncode != 0
    assert "ValueError: RDR_FAST_IMPL must be one of ('auto', 'triton', 'torch', 'reference'), got 'tritn'" in (
        done.stderr.strip().splitlines()[-1])


def test_rdr_fast_impl_triton_imports_quietly_with_the_cpu_kernels_of_auto():
    done = import_rdr_fast("triton")
    assert done.returncode == 0, done.stderr
    backends = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    expected = {name: {"cpu": devices["cpu"], "cuda": "triton"} for name, devices in rdr_fast.backends().items()}
    assert backends == expected


# ---- on a GPU -------------------------------------------------------------------------------
ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("name", [pytest.param(name, marks=ON_GPU) for name in OPS])
def test_the_registered_triton_kernels_pass_their_probe_on_the_gpu(name):
    if ops.IMPL not in ("auto", "triton") or not HAS_TRITON:
        pytest.skip("RDR_FAST_IMPL or a missing Triton puts the PyTorch path on CUDA")
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in op_args(name))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ops.KernelFallbackWarning)
        getattr(torch.ops.rdr_fast, name)(*args)
    assert rdr_fast.backends()[name]["cuda"] == "triton" and "cuda_fallback" not in rdr_fast.backends()[name]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_capturing_sees_a_cuda_graph_capture():
    device = torch.device("cuda")
    assert not ops._capturing(device)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            inside = ops._capturing(device)
    assert inside
