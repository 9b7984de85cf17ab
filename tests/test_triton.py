"""The Triton launchers of rdr_fast.kernels equal the reference.

Two variants of every test: "cpu" runs the kernels in Triton's interpreter on CPU tensors
(that is how CI, without a GPU, tests them; the launchers interpret CPU launches whether
or not TRITON_INTERPRET was set before Triton was imported, see kernels/_utils.py), and
"cuda" runs them compiled on a GPU, when one is present. Without a GPU this module also
sets TRITON_INTERPRET=1 before Triton is imported, if nothing imported it earlier.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

import pytest  # noqa: E402

pytest.importorskip("triton")

import rdr_fast  # noqa: E402
from rdr_fast import functional as Fn  # noqa: E402
from rdr_fast import reference as ref  # noqa: E402
from rdr_fast.constants import weight_mode  # noqa: E402
from rdr_fast.kernels import rdr_weights_and_update_triton, weighted_loss_triton  # noqa: E402
from rdr_fast.kernels import rdr_weights_and_update as weights_module  # noqa: E402
from rdr_fast.kernels._utils import interpreting  # noqa: E402
from conftest import HostReads, long_tail_counts, long_tail_labels  # noqa: E402

INTERPRETED = interpreting(weights_module._rdr_segment_kernel)
HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",  # the interpreter: never skipped
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA or INTERPRETED,
                                                                    reason="needs a GPU and compiled kernels")]),
]
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-6)}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def batch(num, num_classes, dim, dtype=torch.float64, relu=False, seen_fraction=0.8):
    """(features, labels, prototypes, seen, counts) on the CPU; labels long-tailed."""
    counts = long_tail_counts(num_classes)
    labels = long_tail_labels(num, counts)
    features = torch.randn(num, dim, dtype=torch.float64)
    features = features.relu() if relu else features
    protos = torch.randn(num_classes, dim, dtype=torch.float64)
    return features.to(dtype), labels, protos, torch.rand(num_classes) < seen_fraction, counts


def run_triton(device, features, labels, protos, seen, counts, reweight="rdr", temperature=1.0, warmup=False,
               update=True):
    """The launcher on ``device`` with the op's argument mapping; returns CPU tensors."""
    p, s = protos.to(device), seen.to(device)
    w = rdr_weights_and_update_triton(features.to(device), labels.to(device), p, s,
                                      Fn.class_factors(counts, reweight).to(device), 1e-5, temperature, 0.9,
                                      weight_mode(reweight, warmup), update)
    return w.cpu(), p.cpu(), s.cpu()


def assert_matches_reference(device, features, labels, protos, seen, counts, **kw):
    """Weights, prototypes and seen flags vs the float64 reference on the same values."""
    expected = ref.rdr_loss_ref(features.double(), torch.zeros(len(labels), len(counts), dtype=torch.float64),
                                labels, protos.double(), seen, counts, **kw)[1:]
    w, p, s = run_triton(device, features, labels, protos, seen, counts, **kw)
    compute = torch.float64 if features.dtype == torch.float64 else torch.float32
    tol = TOL[torch.float64 if compute == torch.float64 and protos.dtype == torch.float64 else torch.float32]
    assert w.dtype == compute and p.dtype == protos.dtype
    torch.testing.assert_close(w.double(), expected[0], **tol, msg="weights")
    torch.testing.assert_close(p.double(), expected[1], **tol, msg="prototypes")
    assert torch.equal(s, expected[2])


# (B, C, K, temperature): b_c over one 16-wide block, b_c > K (the K×K form) with K < and
# > the block, K = 3 and 1, one sample, one class.
SHAPES = [(128, 10, 64, 1.0), (96, 4, 8, 0.5), (96, 2, 40, 2.0), (64, 2, 3, 1.0), (1, 4, 6, 1.0),
          (40, 1, 8, 0.7), (33, 7, 1, 1.0)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}C{}K{}T{}".format(*s))
def test_weights_and_update_float64(device, shape):
    features, labels, protos, seen, counts = batch(*shape[:3], relu=shape[0] % 2 == 0)
    assert_matches_reference(device, features, labels, protos, seen, counts, temperature=shape[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_weights_and_update_low_precision(device, dtype):
    features, labels, protos, seen, counts = batch(96, 6, 24, dtype=dtype)
    assert_matches_reference(device, features, labels, protos.float(), seen, counts, temperature=0.5)


@pytest.mark.parametrize("mode", ["rdr", "inv_freq", "cb", "none"])
def test_reweight_modes_and_warmup(device, mode):
    features, labels, protos, seen, counts = batch(64, 6, 16)
    assert_matches_reference(device, features, labels, protos, seen, counts, reweight=mode, temperature=2.0)
    assert_matches_reference(device, features, labels, protos, seen, counts, reweight=mode, warmup=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_duplicate_rows(device, dtype):
    features, labels, protos, seen, counts = batch(64, 5, 16, dtype=dtype, seen_fraction=1.0)
    features[1::2] = features[0::2]
    labels[1::2] = labels[0::2]
    assert_matches_reference(device, features, labels, protos.to(dtype), seen, counts)


@pytest.mark.parametrize("dim", [4, 32])
def test_all_zero_rows_and_all_zero_class(device, dim):
    features, labels, protos, seen, counts = batch(48, 6, dim, relu=True, seen_fraction=1.0)
    features[::3] = 0.0
    features[labels == 0] = 0.0
    assert (ref.density_ratios_ref(features, labels, protos, seen)[labels == 0] == ref.RATIO_FLOOR).all()
    assert_matches_reference(device, features, labels, protos, seen, counts)


def test_never_seen_classes_and_absent_classes(device):
    features, labels, protos, seen, counts = batch(64, 20, 16)
    labels = labels % 4                 # classes 4..19 absent
    seen[:] = False
    seen[0] = True                      # classes 1..3 present but never seen: r = 1
    assert_matches_reference(device, features, labels, protos, seen, counts)
    _, p, s = run_triton(device, features, labels, protos, seen, counts)
    assert torch.equal(p[4:], protos[4:]) and torch.equal(s[4:], seen[4:])
    torch.testing.assert_close(p[1], features[labels == 1].mean(0), rtol=1e-12, atol=1e-12)


def test_many_more_classes_than_samples(device):
    features, labels, protos, seen, counts = batch(24, 3000, 8, seen_fraction=0.5)
    labels = torch.randint(0, 3000, (24,))
    assert_matches_reference(device, features, labels, protos, seen, counts, temperature=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(256, 100_000, 8), (48, 3, 2048), (1024, 5, 48)],
                         ids=["C100000", "K2048", "B1024"])
def test_the_issues_limits(device, shape):
    """One limit of the GPU issue at a time (C up to 100 000, K up to 2048, B up to 1024) on
    shapes the interpreter runs in seconds: 100 000 classes with one large class and the
    rest spread thinly (the grid is min(B, C), nothing is sized by C but the state); a
    2048-wide b×b system; a 1024-sample batch whose head classes take the K×K form."""
    features, labels, protos, seen, counts = batch(*shape, seen_fraction=0.9)
    if shape[1] == 100_000:
        labels = torch.randint(0, shape[1], (shape[0],))
        labels[:100] = 7
    assert_matches_reference(device, features, labels, protos, seen, counts, temperature=0.5)


def test_eval_mode_changes_no_state(device):
    features, labels, protos, seen, counts = batch(48, 5, 8)
    expected = ref.rdr_loss_ref(features, torch.zeros(48, 5, dtype=torch.float64), labels, protos, seen, counts,
                                update=False)[1]
    w, p, s = run_triton(device, features, labels, protos, seen, counts, update=False)
    torch.testing.assert_close(w, expected, **TOL[torch.float64])
    assert torch.equal(p, protos) and torch.equal(s, seen)


# ---- weighted loss -----------------------------------------------------------------------
@pytest.mark.parametrize("base", ["ce", "focal", "la"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
# one chunk; several (the chunk is 256 interpreted, 4096 compiled); the issue's 100 000 classes
@pytest.mark.parametrize("num_classes", [7, 600, 5000, pytest.param(100_000, marks=pytest.mark.slow)])
def test_loss_and_gradient(device, base, dtype, num_classes):
    num = 40 if num_classes == 7 else 3 if num_classes < 100_000 else 2
    counts = long_tail_counts(num_classes)
    logits = (3 * torch.randn(num, num_classes, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, num_classes, (num,))
    weights = torch.rand(num, dtype=torch.float64) + 0.1
    x = logits.detach().double().requires_grad_(True)
    expected = (weights * ref.per_sample_loss_ref(x, labels, base, counts, tau=0.8, focal_gamma=1.5)).sum() / num
    expected.backward()
    adjust = (0.8 * Fn.log_prior(counts)).to(device) if base == "la" else None
    loss, grad = weighted_loss_triton(logits.to(device), labels.to(device), weights.to(device), adjust,
                                      1.5 if base == "focal" else 0.0, True)
    tol = TOL[torch.float64] if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype and grad.shape == logits.shape
    torch.testing.assert_close(loss.cpu().double(), expected.detach(), **tol)
    grad_tol = tol if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(grad.cpu().double(), x.grad, **grad_tol)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_focal_is_finite_when_confident(device, gamma):
    logits = torch.tensor([[60.0, 0.0], [0.0, 0.0]], dtype=torch.float64, device=device)
    loss, grad = weighted_loss_triton(logits, torch.tensor([0, 1], device=device),
                                      torch.ones(2, dtype=torch.float64, device=device), None, gamma, True)
    assert torch.isfinite(loss).item() and torch.isfinite(grad).all().item()


@pytest.mark.parametrize("base", ["ce", "focal"])
def test_loss_with_whole_chunks_of_minus_inf(device, base):
    """Masked logits: rows whose first chunk (256 classes interpreted) is all −inf, or all
    but the last class; the online log-sum-exp must not turn −inf − (−inf) into NaN."""
    logits = torch.randn(3, 600, dtype=torch.float64)
    logits[:, :300] = float("-inf")
    logits[1, :599] = float("-inf")
    labels, weights = torch.tensor([400, 599, 350]), torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    gamma = 1.5 if base == "focal" else 0.0
    x = logits.clone().requires_grad_(True)
    expected = (weights * ref.per_sample_loss_ref(x, labels, base, focal_gamma=gamma)).sum() / 3
    expected.backward()
    loss, grad = weighted_loss_triton(logits.to(device), labels.to(device), weights.to(device), None, gamma, True)
    torch.testing.assert_close(loss.cpu(), expected.detach(), **TOL[torch.float64])
    torch.testing.assert_close(grad.cpu(), x.grad, **TOL[torch.float64])


def test_loss_without_gradient(device):
    logits = torch.randn(8, 3, device=device)
    labels, weights = torch.randint(0, 3, (8,), device=device), torch.ones(8, device=device)
    loss, grad = weighted_loss_triton(logits, labels, weights, None, 0.0, False)
    assert grad.numel() == 0
    expected = torch.nn.functional.cross_entropy(logits.cpu(), labels.cpu())
    torch.testing.assert_close(loss.cpu(), expected)


# ---- registration, and the whole step on a GPU --------------------------------------------
def test_launches_enter_the_tensors_device():
    """Triton launches on the current CUDA device; the launchers enter the tensors' one."""
    from rdr_fast.kernels._utils import on_device

    guard = on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with on_device(torch.device("cpu")):
        pass


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2 or INTERPRETED, reason="needs two GPUs")
def test_tensors_on_the_second_gpu():
    features, labels, protos, seen, counts = batch(64, 6, 16)
    with torch.cuda.device(0):
        assert_matches_reference(torch.device("cuda", 1), features, labels, protos, seen, counts)
        logits = torch.randn(8, 5, dtype=torch.float64)
        loss, _ = weighted_loss_triton(logits.to("cuda:1"), torch.zeros(8, dtype=torch.long, device="cuda:1"),
                                       torch.ones(8, device="cuda:1"), None, 0.0, False)
        torch.testing.assert_close(loss.cpu(), torch.nn.functional.cross_entropy(logits, torch.zeros(8).long()))


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
    raise SystemExit(f"API {err}")
from rdr_fast.kernels import rdr_weights_and_update as W, weighted_loss as L
def build(fn, sig, consts, warps):
    sig = {**sig, **{k: "constexpr" for k in consts}}
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    except TypeError as err:
        raise SystemExit(f"API {err}")
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
@pytest.mark.skipif(HAS_CUDA, reason="the GPU variant compiles the kernels for real")
def test_kernels_compile_for_sm90():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if run.returncode != 0 and run.stderr.strip().splitlines()[-1:] and "API" in run.stderr.splitlines()[-1]:
        pytest.skip(f"this Triton's ahead-of-time compile API differs: {run.stderr.splitlines()[-1]}")
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]


def test_no_host_reads_in_the_gpu_path():
    """The CPU counterpart of the CUDA-graph test below: the launchers (interpreted here),
    and RDRLoss's own code around the ops with the GPU default validate=None → no data
    checks, issue no op that waits for a device value. The detector itself is checked on
    an op that does read one."""
    features, labels, protos, seen, counts = batch(64, 6, 16)
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
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs a GPU and compiled kernels")
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
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs a GPU and compiled kernels")
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
