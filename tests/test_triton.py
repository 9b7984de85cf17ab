"""What is specific to the Triton launchers of rdr_fast.kernels: the block_sizes keyword,
the device they launch on, the CUDA backend choice, the sm_90 compile without a GPU, and
no host synchronisation (on the interpreter, and as a CUDA-graph capture on a GPU).
Every shared case (shapes, edge cases, modes, losses, 100 000 classes) runs against the
launchers, interpreted and compiled, in tests/test_backends.py.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from backends import (TOL, expected_loss, expected_weights, loss_args, needs_compiled_triton, on,
                      weights_args)
from conftest import HostReads, long_tail_counts, long_tail_labels

pytest.importorskip("triton")

import rdr_fast  # noqa: E402
from rdr_fast import functional as Fn  # noqa: E402
from rdr_fast.kernels import rdr_weights_and_update_triton, weighted_loss_triton  # noqa: E402


def test_launchers_take_block_sizes(make_batch):
    """Other block sizes (run in Triton's interpreter) give the same results as the
    defaults; malformed ones are refused by name."""
    args = weights_args(*make_batch(24, 6, 8))
    states = [on("cpu", args[2:4]) for _ in range(2)]
    default, blocked = (rdr_weights_and_update_triton(*args[:2], *state, *args[4:], block_sizes=sizes)
                        for state, sizes in zip(states, (None, (32, 32, 1))))
    torch.testing.assert_close(blocked, default, rtol=1e-12, atol=0)
    torch.testing.assert_close(states[1][0], states[0][0], rtol=1e-12, atol=0)
    logits, labels = torch.randn(3, 600, dtype=torch.float64), torch.tensor([5, 300, 599])
    weights = torch.rand(3, dtype=torch.float64)
    default, chunked = (weighted_loss_triton(logits, labels, weights, None, 1.5, True, block_sizes=sizes)
                        for sizes in (None, (64, 1)))
    torch.testing.assert_close(chunked, default, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="block_sizes must be 2 positive powers of two"):
        weighted_loss_triton(logits, labels, weights, None, 0.0, True, block_sizes=(48, 1))
    with pytest.raises(ValueError, match="block_sizes must be 3 positive powers of two"):
        rdr_weights_and_update_triton(*args, block_sizes=(16, 16))


def test_launches_enter_the_tensors_device():
    """Triton launches on the current CUDA device; the launchers enter the tensors' one."""
    from rdr_fast.kernels._utils import on_device

    guard = on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with on_device(torch.device("cpu")):
        pass


@pytest.mark.gpu
@needs_compiled_triton
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_the_second_gpu(make_batch):
    weight_args = weights_args(*make_batch(64, 6, 16))
    loss_case = loss_args(torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 5, (8,)),
                          torch.rand(8, dtype=torch.float64), "la", long_tail_counts(5))
    with torch.cuda.device(0):
        args = on("cuda:1", weight_args)
        got = (rdr_weights_and_update_triton(*args), args[2], args[3])
        for g, e in zip(got, expected_weights(weight_args)):
            torch.testing.assert_close(g.cpu().double(), e.double(), **TOL[torch.float64])
        for g, e in zip(weighted_loss_triton(*on("cuda:1", loss_case)), expected_loss(loss_case)):
            torch.testing.assert_close(g.cpu(), e, **TOL[torch.float64])


def test_cuda_backend_is_triton():
    if rdr_fast.ops.IMPL != "auto":
        pytest.skip(f"RDR_FAST_IMPL={rdr_fast.ops.IMPL} forces the PyTorch path")
    assert {devices["cuda"] for devices in rdr_fast.backends().values()} == {"triton"}


# Compiles the kernels for an H100/H200 (sm_90) without a GPU, in a process without
# TRITON_INTERPRET: catches what only the compiler checks (types, layouts, fp64 dot).
_AOT_SCRIPT = r"""
import triton, triton.language as tl
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as err:
    raise SystemExit(f"this Triton's compile API differs: {err!r}")
from rdr_fast.kernels import rdr_weights_and_update as W, weighted_loss as L
def build(fn, sig, consts, warps):
    sig = {**sig, **{k: "constexpr" for k in consts}}
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    except TypeError as err:
        raise SystemExit(f"this Triton's compile API differs: {err!r}")
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
seg = dict(seg_ptr="*i64", order_ptr="*i64", slabel_ptr="*i64", z_ptr="*fp64", proto_ptr="*fp32",
           proto_stride0="i32", proto_stride1="i32", seen_ptr="*u8", seen_stride="i32", factor_ptr="*fp64",
           w_ptr="*fp64", ws_ptr="*fp64", y_ptr="*fp64", a_ptr="*fp64", K="i32", LD="i32", ridge="fp64",
           temperature="fp64", momentum="fp64")
bs, bk, warps = W._block_sizes(__import__("torch").device("cuda"))
# A launch turns every int argument equal to 1 into a constant: the unit strides always
# (as here with SOLVE), K = LD = 1 for one-feature inputs (as here without).
unit = (dict(proto_stride1=1, seen_stride=1), dict(proto_stride1=1, seen_stride=1, K=1, LD=1))
for solve, ones in zip((True, False), unit):
    build(W._rdr_segment_kernel, seg, dict(SOLVE=solve, WEIGHTS=solve, UPDATE=True, POW=solve, BS=bs, BK=bk, **ones),
          warps)
build(W._normalize_kernel, dict(w_ptr="*fp64", out_ptr="*fp32", B="i32"), dict(BLOCK=128), 4)
loss = dict(logits_ptr="*bf16", logits_stride="i32", labels_ptr="*i64", weights_ptr="*fp32", adjust_ptr="*fp64",
            loss_ptr="*fp32", grad_ptr="*bf16", grad_stride="i32", B="i32", C="i32", focal_gamma="fp64")
for flag in (True, False):
    build(L._weighted_loss_kernel, loss, dict(HAS_ADJUST=flag, FOCAL=flag, COMPUTE_GRAD=flag,
          DTYPE=tl.float32 if flag else tl.float64, BLOCK_C=4096, **({} if flag else dict(B=1))), 8)
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Fails (never skips) when this Triton cannot compile the kernels, its compile API
    included: the kernels must build with the Triton installed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]


def test_no_host_reads_in_the_gpu_path(make_batch):
    """The CPU counterpart of the CUDA-graph test below: the launchers (interpreted here),
    and RDRLoss's own code around the ops with the GPU default validate=None → no data
    checks, issue no op that waits for a device value. The detector itself is checked on
    an op that does read one."""
    features, labels, protos, seen, counts = make_batch(64, 6, 16)
    factors = Fn.class_factors(counts, "rdr")
    logits = torch.randn(64, 6, requires_grad=True)
    crit = rdr_fast.RDRLoss(counts, 16, base="la", warmup_steps=2, validate=False)
    with HostReads() as mode:
        rdr_weights_and_update_triton(features, labels, protos, seen, factors, 1e-5, 0.5, 0.9, "density_ratio", True)
        weighted_loss_triton(logits.detach(), labels, torch.ones(64), factors, 1.5, True)
        crit(features.float(), logits, labels).backward()
    assert mode.reads == []
    with HostReads() as mode:
        features[labels == 0].sum().item()
    assert "aten._local_scalar_dense.default" in mode.reads and len(mode.reads) >= 2


@pytest.mark.gpu
@needs_compiled_triton
def test_resnet32_rdr_step_is_capturable_in_a_cuda_graph():
    """A whole training step (forward, RDRLoss, backward, SGD) captured in a CUDA graph: any
    host synchronisation inside would make the capture fail."""
    from rdr_fast.models import resnet32

    counts = long_tail_counts(100)
    model = resnet32(100).cuda()
    crit = rdr_fast.RDRLoss(counts, model.feat_dim, warmup_steps=2).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    x = torch.randn(128, 3, 32, 32, device="cuda")
    y = long_tail_labels(128, counts).cuda()

    def step():
        opt.zero_grad(set_to_none=False)
        feats, logits = model(x)
        loss = crit(feats, logits, y)
        loss.backward()
        opt.step()
        return loss.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: Triton compiles, cuDNN picks algorithms
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    protos = crit.prototypes.clone()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(static_loss).item()
    assert int(crit.step) == 3 + 3  # warm-up and replays; the capture itself runs nothing
    assert not torch.equal(crit.prototypes, protos)


@pytest.mark.gpu
@pytest.mark.slow
@needs_compiled_triton
def test_resnet32_rdr_step_under_compile_reduce_overhead():
    """torch.compile(mode="reduce-overhead"): Inductor with CUDA graphs over a ResNet-32
    and RDRLoss (the ops run as extern kernels inside the graph). It must not skip CUDA
    graphs (a host sync or an unsupported mutation would make it) and must follow eager."""
    from torch._dynamo.utils import counters

    from rdr_fast.models import resnet32

    counts = long_tail_counts(100)
    x = torch.randn(64, 3, 32, 32, device="cuda")
    y = long_tail_labels(64, counts).cuda()

    def make():
        torch.manual_seed(0)
        model = resnet32(100).cuda()
        return model, rdr_fast.RDRLoss(counts, model.feat_dim).cuda()

    eager, compiled = make(), make()

    def loss_of(model, crit):
        features, logits = model(x)
        return crit(features, logits, y)

    compiled_loss = torch.compile(lambda: loss_of(*compiled), mode="reduce-overhead")
    counters.clear()
    for _ in range(4):
        for (model, crit), fn in ((eager, lambda: loss_of(*eager)), (compiled, compiled_loss)):
            model.zero_grad(set_to_none=True)
            fn().backward()
        torch.testing.assert_close(compiled[1].prototypes, eager[1].prototypes, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(compiled[0].fc.weight.grad, eager[0].fc.weight.grad, rtol=1e-2, atol=1e-4)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert int(compiled[1].step) == 4
