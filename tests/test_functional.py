"""Every CPU backend equals the reference: the registered op (the C++ kernel when
rdr_fast._C is built) and the vectorised PyTorch path, called directly."""
from __future__ import annotations

import pytest
import torch

import rdr_fast
from rdr_fast import functional as Fn
from rdr_fast import reference as ref
from rdr_fast import torch_impl
from rdr_fast.constants import weight_mode

# (B, C, K): realistic shapes, b_c > K (the K×K path: several slots, and a single slot
# when B < 2(K+1)), single sample, single class, K = 1.
SHAPES = [(128, 10, 64), (128, 100, 64), (96, 4, 8), (64, 2, 3), (100, 2, 60), (1, 4, 6), (40, 1, 8), (33, 7, 1)]
MODES = ["rdr", "inv_freq", "cb", "none"]
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-6)}
# "op": the public functions, dispatching to the registered CPU kernel; "torch": torch_impl.
KERNELS = ["op", "torch"]


def kernel_id(kernel: str) -> str:
    return f"op-{rdr_fast.backends()['rdr_weights_and_update']['cpu']}" if kernel == "op" else kernel


@pytest.fixture(params=KERNELS, ids=kernel_id)
def kernel(request):
    return request.param


def run_weights(kernel, features, labels, protos, seen, counts, reweight="rdr", temperature=1.0, warmup=False):
    """Fn.rdr_weights_and_update, or the same argument mapping onto the PyTorch path."""
    if kernel == "op":
        return Fn.rdr_weights_and_update(features, labels, protos, seen, counts, reweight=reweight,
                                         temperature=temperature, warmup=warmup)
    factors = Fn.class_factors(counts, reweight)
    return torch_impl.rdr_weights_and_update_torch(features, labels, protos, seen, factors, 1e-5, temperature, 0.9,
                                                   weight_mode(reweight, warmup), True)


def loss_and_grad(kernel, logits, labels, weights, base="ce", counts=None, tau=1.0, focal_gamma=1.0):
    """(L, dL/dlogits): autograd through Fn.weighted_loss, or the PyTorch path's fused pair."""
    if kernel == "op":
        leaf = logits.detach().clone().requires_grad_(True)
        loss = Fn.weighted_loss(leaf, labels, weights, base=base, class_counts=counts, tau=tau,
                                focal_gamma=focal_gamma)
        loss.backward()
        return loss, leaf.grad
    adjust = tau * Fn.log_prior(counts) if base == "la" else None
    gamma = focal_gamma if base == "focal" else 0.0
    return torch_impl.weighted_loss_torch(logits, labels, weights, adjust, gamma, True)


def reference_step(features, labels, protos, seen, counts, **kw):
    """The reference run in float64 on exactly the values the fast path sees."""
    return ref.rdr_loss_ref(features.double(), torch.zeros(len(labels), len(counts), dtype=torch.float64),
                            labels, protos.double(), seen, counts, **kw)


def assert_step_matches(kernel, features, labels, protos, seen, counts, dtype, **kw):
    mode = kw.get("reweight", "rdr")
    expected_w, expected_p, expected_s = reference_step(features, labels, protos, seen, counts, **kw)[1:]
    p, s = protos.clone(), seen.clone()
    w = run_weights(kernel, features, labels, p, s, counts, **kw)
    tol = TOL[torch.float64 if dtype == torch.float64 else torch.float32]
    assert w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(w.double(), expected_w, **tol, msg=f"weights ({mode})")
    torch.testing.assert_close(p.double(), expected_p, **tol, msg="prototypes")
    assert torch.equal(s, expected_s)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}C{}K{}".format(*s))
@pytest.mark.parametrize("mode", MODES)
def test_weights_and_update_match_reference(kernel, make_batch, shape, dtype, mode):
    for trial in range(3):
        features, labels, protos, seen, counts = make_batch(*shape, dtype=dtype, relu=trial == 1)
        assert_step_matches(kernel, features, labels, protos.to(dtype), seen, counts, dtype, reweight=mode,
                            temperature=[1.0, 0.5, 2.0][trial])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_duplicate_rows(kernel, make_batch, dtype):
    features, labels, protos, seen, counts = make_batch(64, 5, 16, dtype=dtype, seen_fraction=1.0)
    features[1::2] = features[0::2]
    labels[1::2] = labels[0::2]
    assert_step_matches(kernel, features, labels, protos.to(dtype), seen, counts, dtype)


@pytest.mark.parametrize("dim", [4, 32])
def test_all_zero_rows_and_all_zero_class(kernel, make_batch, dim):
    features, labels, protos, seen, counts = make_batch(48, 6, dim, seen_fraction=1.0, relu=True)
    features[::3] = 0.0                 # some zero rows inside classes
    features[labels == 0] = 0.0         # one class entirely zero: r = floor
    w_rdr = ref.density_ratios_ref(features, labels, protos, seen)
    assert (w_rdr[labels == 0] == ref.RATIO_FLOOR).all()
    assert_step_matches(kernel, features, labels, protos, seen, counts, torch.float64)


def test_never_seen_class_gets_ratio_one_and_mean_prototype(kernel, make_batch):
    features, labels, protos, seen, counts = make_batch(64, 8, 16)
    seen[:] = False
    seen[0] = True
    ratios = Fn.density_ratios(features, labels, protos, seen)
    assert (ratios[labels != 0] == 1).all()
    assert_step_matches(kernel, features, labels, protos, seen, counts, torch.float64)


def test_absent_classes_keep_their_prototype(kernel, make_batch):
    features, labels, protos, seen, counts = make_batch(32, 20, 8)
    labels = labels % 3
    p = protos.clone()
    run_weights(kernel, features, labels, p, seen.clone(), counts)
    assert torch.equal(p[3:], protos[3:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_upcast(kernel, make_batch, dtype):
    features, labels, protos, seen, counts = make_batch(128, 10, 64, dtype=dtype)
    protos = protos.float()
    # The reference on the same (rounded) values in float64 is the truth; the fast path
    # computes in float32, so float32 tolerances apply.
    assert_step_matches(kernel, features, labels, protos, seen, counts, dtype)


def test_warmup_weights_are_ones_but_prototypes_update(kernel, make_batch):
    features, labels, protos, seen, counts = make_batch(32, 5, 8)
    p = protos.clone()
    w = run_weights(kernel, features, labels, p, seen.clone(), counts, warmup=True)
    assert torch.equal(w, torch.ones_like(w))
    assert not torch.equal(p, protos)


@pytest.mark.parametrize("base", ["ce", "focal", "la"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_weighted_loss_and_gradient_match_reference(kernel, base, dtype):
    counts = [100, 40, 10, 3, 1, 1, 1]
    logits = (3 * torch.randn(50, 7, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, 7, (50,))
    weights = torch.rand(50, dtype=torch.float64) + 0.1
    x = logits.detach().double().requires_grad_(True)
    per_sample = ref.per_sample_loss_ref(x, labels, base, counts, tau=0.8, focal_gamma=1.5)
    expected = (weights * per_sample).sum() / 50
    expected.backward()
    loss, grad = loss_and_grad(kernel, logits, labels, weights, base, counts, tau=0.8, focal_gamma=1.5)
    tol = TOL[torch.float64] if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), expected, **tol)
    assert grad.dtype == dtype
    grad_tol = tol if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(grad.double(), x.grad, **grad_tol)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_focal_gradient_is_finite_when_confident(kernel, gamma, dtype):
    logits = torch.tensor([[60.0, 0.0], [0.0, 0.0]], dtype=dtype)
    loss, grad = loss_and_grad(kernel, logits, torch.tensor([0, 1]), torch.ones(2, dtype=dtype), base="focal",
                               focal_gamma=gamma)
    assert torch.isfinite(grad).all() and torch.isfinite(loss)


def test_no_gradient_is_computed_without_autograd():
    logits = torch.randn(8, 3)
    loss = Fn.weighted_loss(logits, torch.randint(0, 3, (8,)), torch.ones(8))
    assert not loss.requires_grad
