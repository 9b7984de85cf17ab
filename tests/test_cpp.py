"""The C++ CPU kernels (rdr_fast._C) called as the raw ops: bench-sized long-tailed batches
against the reference, layouts and dtypes the public wrappers never produce, thread-count
determinism, opcheck, gradcheck, TORCH_CHECK errors and the import-time dispatch.

Every edge case of tests/test_functional.py also runs against the C++ kernel there (its
"op" parameter dispatches to it when built).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch

import rdr_fast
from rdr_fast import functional as Fn
from rdr_fast import reference as ref
from rdr_fast import torch_impl
from conftest import long_tail_counts, long_tail_labels

pytestmark = pytest.mark.skipif(
    any(devices["cpu"] != "cpp" for devices in rdr_fast.backends().values()),
    reason="rdr_fast._C is not built (or RDR_FAST_IMPL forces a Python path)")

WEIGHTS_OP = torch.ops.rdr_fast.rdr_weights_and_update.default
LOSS_OP = torch.ops.rdr_fast.weighted_loss.default
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-6)}


def long_tail_batch(batch, num_classes, dim, dtype=torch.float32, seen_fraction=0.9):
    counts = long_tail_counts(num_classes)
    labels = long_tail_labels(batch, counts)
    features = torch.randn(batch, dim, dtype=torch.float64).relu().to(dtype)
    protos = torch.randn(num_classes, dim, dtype=torch.float64).relu().to(dtype)
    return features, labels, protos, torch.rand(num_classes) < seen_fraction, counts


def weights_args(features, labels, protos, seen, counts, temperature=1.0, mode="density_ratio", update=True):
    return (features, labels, protos, seen, Fn.class_factors(counts), 1e-5, temperature, 0.9, mode, update)


def expected_step(features, labels, protos, seen, counts, temperature=1.0):
    """(weights, prototypes, seen) of the reference, in float64 on the values the op sees."""
    _, w, p, s = ref.rdr_loss_ref(features.double(), torch.zeros(len(labels), len(counts), dtype=torch.float64),
                                  labels, protos.double(), seen, counts, temperature=temperature)
    return w, p, s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(128, 100, 64), (256, 1000, 512), (200, 3, 16)], ids=str)
def test_bench_shapes_match_reference(shape, dtype):
    features, labels, protos, seen, counts = long_tail_batch(*shape, dtype=dtype)
    expected_w, expected_p, expected_s = expected_step(features, labels, protos, seen, counts, temperature=0.7)
    p, s = protos.clone(), seen.clone()
    w = WEIGHTS_OP(*weights_args(features, labels, p, s, counts, temperature=0.7))
    assert w.dtype == dtype
    torch.testing.assert_close(w.double(), expected_w, **TOL[dtype])
    torch.testing.assert_close(p.double(), expected_p, **TOL[dtype])
    assert torch.equal(s, expected_s)


def state_in_layout(layout, protos, seen):
    """Fresh prototypes and seen flags in the layout under test."""
    if layout == "bf16_prototypes":
        return protos.bfloat16(), seen.clone()
    if layout == "strided_state":  # every other row/entry of a bigger buffer
        return torch.stack([protos, protos], dim=1)[:, 0], torch.stack([seen, seen], dim=1)[:, 0]
    return protos.clone(), seen.clone()


@pytest.mark.parametrize("layout", ["transposed_features", "int32_labels", "bf16_prototypes", "strided_state",
                                    "float64_features_float32_prototypes"])
def test_unusual_layouts_and_dtypes_match_the_torch_path(layout):
    features, labels, protos, seen, counts = long_tail_batch(96, 12, 24, dtype=torch.float32)
    if layout == "transposed_features":
        features = features.T.contiguous().T
    elif layout == "float64_features_float32_prototypes":
        features = features.double()
    expected_state, got_state = state_in_layout(layout, protos, seen), state_in_layout(layout, protos, seen)
    expected = torch_impl.rdr_weights_and_update_torch(*weights_args(features, labels, *expected_state, counts))
    op_labels = labels.int() if layout == "int32_labels" else labels
    got = WEIGHTS_OP(*weights_args(features, op_labels, *got_state, counts))
    torch.testing.assert_close(got, expected, **TOL[torch.float32])
    proto_tol = dict(rtol=1e-2, atol=1e-2) if layout == "bf16_prototypes" else TOL[torch.float32]
    torch.testing.assert_close(got_state[0], expected_state[0], **proto_tol)  # updated in place
    assert torch.equal(got_state[1], expected_state[1])


@pytest.mark.parametrize("mode,update", [("uniform", True), ("class_factor", True), ("density_ratio", False)])
def test_modes_that_skip_the_solve_or_the_update(mode, update):
    features, labels, protos, seen, counts = long_tail_batch(64, 10, 8)
    args = weights_args(features, labels, protos.clone(), seen.clone(), counts, 2.0, mode, update)
    got_args = weights_args(features, labels, protos.clone(), seen.clone(), counts, 2.0, mode, update)
    torch.testing.assert_close(WEIGHTS_OP(*got_args), torch_impl.rdr_weights_and_update_torch(*args))
    torch.testing.assert_close(got_args[2], args[2])
    assert torch.equal(got_args[2], protos) != update


def with_threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def test_results_do_not_depend_on_the_thread_count():
    # Large enough that both kernels split the work across threads.
    features, labels, protos, seen, counts = long_tail_batch(256, 40, 1024)
    logits, weights = torch.randn(256, 1000), torch.rand(256)

    def run():
        p, s = protos.clone(), seen.clone()
        w = WEIGHTS_OP(*weights_args(features, labels, p, s, counts))
        loss, grad = LOSS_OP(logits, labels, weights, None, 0.0, True)
        return w, p, loss, grad
    for one, two in zip(with_threads(1, run), with_threads(2, run)):
        assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("num_classes", [1, 7, 1000])
@pytest.mark.parametrize("gamma,adjust", [(0.0, False), (0.0, True), (2.0, False), (0.5, True)])
def test_loss_matches_reference(dtype, num_classes, gamma, adjust):
    logits = (4 * torch.randn(64, num_classes, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, num_classes, (64,))
    if num_classes > 1:  # masked classes: probability 0, gradient 0
        logits[3, 1::2] = -float("inf")
        labels[3] = 0
    weights = torch.rand(64, dtype=torch.float64) + 0.1
    log_prior = 0.7 * Fn.log_prior(long_tail_counts(num_classes)) if adjust else None
    x = logits.detach().double().requires_grad_(True)
    adjusted = x if log_prior is None else x + log_prior
    per_sample = ref.per_sample_loss_ref(adjusted, labels, "focal" if gamma else "ce", focal_gamma=gamma)
    expected = (weights * per_sample).sum() / 64
    expected.backward()
    loss, grad = LOSS_OP(logits, labels, weights.to(dtype), log_prior, gamma, True)
    assert loss.dtype == torch_impl.compute_dtype(dtype) and grad.dtype == dtype
    tol = TOL[torch.float64] if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    low = dtype in (torch.bfloat16, torch.float16)
    torch.testing.assert_close(loss.double(), expected, **(dict(rtol=1e-2, atol=1e-3) if low else tol))
    # One class: p = 1 and the gradient is 0, where autograd of the reference's (1−p)^γ gives 0·inf.
    expected_grad = torch.zeros_like(x) if num_classes == 1 else x.grad
    torch.testing.assert_close(grad.double(), expected_grad, **(dict(rtol=1e-2, atol=1e-4) if low else tol))


def test_loss_of_non_contiguous_logits_and_no_grad():
    logits = torch.randn(30, 64).T  # [64, 30], column-major
    labels, weights = torch.randint(0, 30, (64,)), torch.rand(64)
    loss, grad = LOSS_OP(logits, labels, weights, None, 0.0, True)
    expected, expected_grad = torch_impl.weighted_loss_torch(logits, labels, weights, None, 0.0, True)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    loss_only, empty = LOSS_OP(logits, labels, weights, None, 0.0, False)
    assert empty.numel() == 0 and torch.equal(loss_only, loss)


def test_backward_scales_by_the_incoming_gradient_and_supports_retain_graph():
    logits = torch.randn(16, 9, requires_grad=True)
    labels, weights = torch.randint(0, 9, (16,)), torch.rand(16)
    _, expected = torch_impl.weighted_loss_torch(logits, labels, weights, None, 0.0, True)
    loss = LOSS_OP(logits, labels, weights, None, 0.0, True)[0]
    loss.backward(retain_graph=True)  # dL_out = 1: the saved gradient is used as it is
    (2.5 * loss).backward()           # the saved gradient is still intact, then scaled
    torch.testing.assert_close(logits.grad, 3.5 * expected)


def opcheck_weights_samples():
    base = long_tail_batch(24, 6, 8, dtype=torch.float64)
    yield weights_args(*base)
    features, labels, protos, seen, counts = long_tail_batch(40, 2, 4, dtype=torch.bfloat16)  # b_c > K
    yield weights_args(features, labels, protos.float(), seen, counts, 0.5)
    features, labels, protos, _, counts = long_tail_batch(16, 5, 8)
    yield weights_args(features, labels, protos, torch.zeros(5, dtype=torch.bool), counts, mode="uniform")


@pytest.mark.parametrize("index", range(3))
def test_opcheck_weights(index):
    torch.library.opcheck(WEIGHTS_OP, list(opcheck_weights_samples())[index])


@pytest.mark.parametrize("dtype,gamma,adjust", [(torch.float32, 0.0, True), (torch.float64, 1.5, False),
                                                (torch.bfloat16, 0.0, False)])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck_loss(dtype, gamma, adjust, requires_grad):
    logits = torch.randn(12, 5, dtype=dtype, requires_grad=requires_grad)
    adjust_t = Fn.log_prior([50, 20, 9, 4, 1]) if adjust else None
    args = (logits, torch.randint(0, 5, (12,)), torch.rand(12) + 0.5, adjust_t, gamma, requires_grad)
    torch.library.opcheck(LOSS_OP, args)


@pytest.mark.parametrize("gamma,adjust", [(0.0, False), (0.0, True), (0.5, False), (2.0, True)])
def test_gradcheck_raw_loss_op(gamma, adjust):
    logits = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    labels, weights = torch.randint(0, 4, (6,)), torch.rand(6, dtype=torch.float64) + 0.5
    log_prior = Fn.log_prior([30, 10, 3, 1]) if adjust else None
    assert torch.autograd.gradcheck(lambda x: LOSS_OP(x, labels, weights, log_prior, gamma, True)[0], (logits,))


def bad_weights_args(case):
    features, labels, protos, seen, counts = long_tail_batch(16, 4, 8)
    args = list(weights_args(features, labels, protos, seen, counts))
    edits = {
        "features 1-D": (0, features[0], "features must be 2-D"),
        "integer features": (0, features.long(), "features must be a floating-point tensor"),
        "float labels": (1, labels.float(), "labels must be an integer tensor"),
        "short labels": (1, labels[:-1], "labels has 15 entries along dim 0 but features"),
        "label too large": (1, torch.full_like(labels, 4), r"labels must lie in \[0, 4\), got 4"),
        "negative label": (1, torch.full_like(labels, -1), r"labels must lie in \[0, 4\), got -1"),
        "prototype width": (2, protos[:, :5], "prototypes has 5 entries along dim 1"),
        "seen not bool": (3, seen.float(), "seen must be a bool tensor"),
        "factors length": (4, args[4][:3], "class_factors has 3 entries along dim 0"),
        "ridge": (5, 0.0, "ridge must be > 0"),
        "momentum": (7, 1.0, r"momentum must lie in \[0, 1\)"),
    }
    index, value, message = edits[case]
    args[index] = value
    return args, message


@pytest.mark.parametrize("case", ["features 1-D", "integer features", "float labels", "short labels",
                                  "label too large", "negative label", "prototype width", "seen not bool",
                                  "factors length", "ridge", "momentum"])
def test_bad_weights_inputs_raise_named_errors(case):
    args, message = bad_weights_args(case)
    protos_before = args[2].clone()
    with pytest.raises(RuntimeError, match=message):
        WEIGHTS_OP(*args)
    if args[2].shape == protos_before.shape:
        assert torch.equal(args[2], protos_before)  # checks run before any state changes


@pytest.mark.parametrize("case,message", [
    ("logits 1-D", "logits must be 2-D"), ("weights length", "weights has 7 entries along dim 0 but logits"),
    ("label range", r"labels must lie in \[0, 5\), got 5"), ("adjust length", "adjust has 4 entries"),
    ("negative gamma", "focal_gamma must be >= 0"), ("integer logits", "logits must be a floating-point")])
def test_bad_loss_inputs_raise_named_errors(case, message):
    logits, labels, weights, adjust = torch.randn(8, 5), torch.randint(0, 5, (8,)), torch.rand(8), None
    gamma = 0.0
    if case == "logits 1-D":
        logits = logits[0]
    elif case == "weights length":
        weights = weights[:7]
    elif case == "label range":
        labels[2] = 5
    elif case == "adjust length":
        adjust = torch.zeros(4)
    elif case == "negative gamma":
        gamma = -1.0
    else:
        logits = logits.long()
    with pytest.raises(RuntimeError, match=message):
        LOSS_OP(logits, labels, weights, adjust, gamma, True)


def import_backends(impl: str) -> dict:
    """rdr_fast.backends() from a fresh interpreter with RDR_FAST_IMPL=impl; any warning fails."""
    code = "import warnings; warnings.simplefilter('error'); import rdr_fast; print(rdr_fast.backends())"
    env = dict(os.environ, RDR_FAST_IMPL=impl)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("impl,expected", [("auto", "cpp"), ("torch", "torch"), ("reference", "reference")])
def test_rdr_fast_impl_selects_the_cpu_kernel_without_warnings(impl, expected):
    assert {devices["cpu"] for devices in import_backends(impl).values()} == {expected}
