"""What is specific to the C++ CPU kernels (rdr_fast._C), called as the raw ops:
bench-sized batches, layouts and dtypes the public wrappers never produce, thread-count
determinism, the C++ autograd kernel, opcheck, gradcheck, TORCH_CHECK errors and the
import-time dispatch. Every shared case (shapes, edge cases, modes, losses) runs against
the C++ kernels in tests/test_backends.py.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch

from rdr_fast import functional as Fn
from backends import (TOL, assert_loss_matches, assert_weights_match, cpp_kernel, expected_loss, loss_args,
                      weights_args)

WEIGHTS_OP = torch.ops.rdr_fast.rdr_weights_and_update.default
LOSS_OP = torch.ops.rdr_fast.weighted_loss.default


@pytest.fixture(autouse=True)
def _cpp_kernels_loaded():
    """Fails (never skips) where rdr_fast._C did not load; skips under RDR_FAST_IMPL=torch|reference."""
    for op in ("rdr_weights_and_update", "weighted_loss"):
        cpp_kernel(op)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(128, 100, 64), (256, 1000, 512), (200, 3, 16)], ids=str)
def test_bench_shapes_match_reference(make_batch, shape, dtype):
    features, labels, protos, seen, counts = make_batch(*shape, relu=True, seen_fraction=0.9)
    assert_weights_match("cpp", weights_args(features.to(dtype), labels, protos.relu().to(dtype), seen, counts,
                                             temperature=0.7))


def state_in_layout(layout, protos, seen):
    """Prototypes and seen flags in the layout under test."""
    if layout == "bf16_prototypes":
        return protos.bfloat16(), seen
    if layout == "strided_state":  # every other row/entry of a bigger buffer
        return torch.stack([protos, protos], dim=1)[:, 0], torch.stack([seen, seen], dim=1)[:, 0]
    return protos, seen


@pytest.mark.parametrize("layout", ["transposed_features", "int32_labels", "bf16_prototypes", "strided_state",
                                    "float64_features_float32_prototypes"])
def test_unusual_layouts_and_dtypes_match_reference(make_batch, layout):
    features, labels, protos, seen, counts = make_batch(96, 12, 24, dtype=torch.float32, relu=True)
    protos = protos.float()
    if layout == "transposed_features":
        features = features.T.contiguous().T
    elif layout == "float64_features_float32_prototypes":
        features = features.double()
    elif layout == "int32_labels":
        labels = labels.int()
    protos, seen = state_in_layout(layout, protos, seen)
    assert_weights_match("cpp", weights_args(features, labels, protos, seen, counts))


def test_loss_of_non_contiguous_logits():
    logits = torch.randn(30, 64).T  # [64, 30], column-major
    assert not logits.is_contiguous()
    assert_loss_matches("cpp", loss_args(logits, torch.randint(0, 30, (64,)), torch.rand(64) + 0.1))


def with_threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def test_results_do_not_depend_on_the_thread_count(make_batch):
    # Large enough that both kernels split the work across threads.
    features, labels, protos, seen, counts = make_batch(256, 40, 1024, dtype=torch.float32, relu=True)
    protos = protos.float()
    logits, weights = torch.randn(256, 1000), torch.rand(256)

    def run():
        p, s = protos.clone(), seen.clone()
        w = WEIGHTS_OP(*weights_args(features, labels, p, s, counts))
        loss, grad = LOSS_OP(logits, labels, weights, None, 0.0, True)
        return w, p, loss, grad
    for one, two in zip(with_threads(1, run), with_threads(2, run)):
        assert torch.equal(one, two)


def test_backward_scales_by_the_incoming_gradient_and_supports_retain_graph():
    logits = torch.randn(16, 9, requires_grad=True)
    labels, weights = torch.randint(0, 9, (16,)), torch.rand(16)
    expected = expected_loss(loss_args(logits.detach(), labels, weights))[1]
    loss = LOSS_OP(logits, labels, weights, None, 0.0, True)[0]
    loss.backward(retain_graph=True)  # dL_out = 1: the saved gradient is used as it is
    (2.5 * loss).backward()           # the saved gradient is still intact, then scaled
    torch.testing.assert_close(logits.grad.double(), 3.5 * expected, **TOL[torch.float32])


def opcheck_weights_samples(make_batch):
    yield weights_args(*make_batch(24, 6, 8))
    features, labels, protos, seen, counts = make_batch(40, 2, 4, dtype=torch.bfloat16)  # b_c > K
    yield weights_args(features, labels, protos.float(), seen, counts, temperature=0.5)
    features, labels, protos, _, counts = make_batch(16, 5, 8, dtype=torch.float32)
    yield weights_args(features, labels, protos.float(), torch.zeros(5, dtype=torch.bool), counts, "none")


@pytest.mark.parametrize("index", range(3))
def test_opcheck_weights(make_batch, index):
    torch.library.opcheck(WEIGHTS_OP, list(opcheck_weights_samples(make_batch))[index])


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


def bad_weights_args(make_batch, case):
    features, labels, protos, seen, counts = make_batch(16, 4, 8, dtype=torch.float32)
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
def test_bad_weights_inputs_raise_named_errors(make_batch, case):
    args, message = bad_weights_args(make_batch, case)
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


def data_ok_cases():
    """(name, args of data_ok, the expected answer), over the dtypes and faults the checks meet."""
    g = torch.Generator().manual_seed(5)
    labels = torch.tensor([0, 3, 3, 1, 0, 2, 5, 3])
    cases = []
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        x = torch.randn(8, 300, generator=g).to(dtype)  # > one vector of every ISA level
        rows = torch.randn(7, 5, generator=g).to(dtype)  # class 4 and 6 are not in the batch
        t = str(dtype).removeprefix("torch.")
        cases.append((f"good-{t}", (labels, 7, [x, x.T], [float("inf")] * 2, rows), True))
        for position, value in ((0, float("nan")), (1799, float("inf")), (2399, -float("inf"))):
            bad = x.clone()
            bad.view(-1)[position] = value
            cases.append((f"{value}-at-{position}-{t}", (labels, 7, [x, bad], [float("inf")] * 2, None), False))
        cases.append((f"beyond-limit-{t}", (labels, 7, [x], [float(x.abs().max()) * 0.99], None), False))
        cases.append((f"at-limit-{t}", (labels, 7, [x], [float(x.abs().max())], None), True))
        for row, expected in ((4, True), (6, True), (5, False), (0, False)):
            bad_rows = rows.clone()
            bad_rows[row, 2] = float("nan")
            cases.append((f"nan-row-{row}-{t}", (labels, 7, [], [], bad_rows), expected))
    for value in (-1, 7, 2 ** 40):
        bad = labels.clone()
        bad[3] = value
        cases.append((f"label-{value}", (bad, 7, [], [], None), False))
    cases.append(("int8-labels", (labels.to(torch.int8), 7, [], [], None), True))
    cases.append(("uint8-label-200", (torch.tensor([1, 200], dtype=torch.uint8), 7, [], [], None), False))
    cases.append(("float64-above-1e150", (labels, 7, [torch.tensor([1e151, 0.0], dtype=torch.float64)], [1e150],
                                          None), False))
    return cases


@pytest.mark.parametrize("name,args,expected", data_ok_cases(), ids=[c[0] for c in data_ok_cases()])
def test_data_ok_kernel_agrees_with_the_pytorch_version(name, args, expected):
    """rdr_fast::data_ok, C++ and the PyTorch version (torch_impl.data_ok_torch), on every
    fault the data checks look for, in every floating dtype and a transposed layout."""
    from rdr_fast import torch_impl

    assert torch._C._dispatch_has_kernel_for_dispatch_key("rdr_fast::data_ok", "CPU")  # the C++ kernel runs
    assert torch_impl.data_ok_torch(*args) is expected
    assert torch.ops.rdr_fast.data_ok.default(*args) is expected
