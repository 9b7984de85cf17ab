"""The portable fast path (and whatever backend the ops dispatch to) equals the reference."""
from __future__ import annotations

import pytest
import torch

from rdr_fast import functional as Fn
from rdr_fast import reference as ref

# (B, C, K): realistic shapes, b_c > K (the K×K path), single sample, single class, K = 1.
SHAPES = [(128, 10, 64), (128, 100, 64), (96, 4, 8), (64, 2, 3), (1, 4, 6), (40, 1, 8), (33, 7, 1)]
MODES = ["rdr", "inv_freq", "cb", "none"]
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-6)}


def reference_step(features, labels, protos, seen, counts, **kw):
    """The reference run in float64 on exactly the values the fast path sees."""
    return ref.rdr_loss_ref(features.double(), torch.zeros(len(labels), len(counts), dtype=torch.float64),
                            labels, protos.double(), seen, counts, **kw)


def assert_step_matches(features, labels, protos, seen, counts, dtype, **kw):
    mode = kw.get("reweight", "rdr")
    expected_w, expected_p, expected_s = reference_step(features, labels, protos, seen, counts, **kw)[1:]
    p, s = protos.clone(), seen.clone()
    w = Fn.rdr_weights_and_update(features, labels, p, s, counts, **kw)
    tol = TOL[torch.float64 if dtype == torch.float64 else torch.float32]
    assert w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(w.double(), expected_w, **tol, msg=f"weights ({mode})")
    torch.testing.assert_close(p.double(), expected_p, **tol, msg="prototypes")
    assert torch.equal(s, expected_s)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}C{}K{}".format(*s))
@pytest.mark.parametrize("mode", MODES)
def test_weights_and_update_match_reference(make_batch, shape, dtype, mode):
    for trial in range(3):
        features, labels, protos, seen, counts = make_batch(*shape, dtype=dtype, relu=trial == 1)
        assert_step_matches(features, labels, protos.to(dtype), seen, counts, dtype, reweight=mode,
                            temperature=[1.0, 0.5, 2.0][trial])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_duplicate_rows(make_batch, dtype):
    features, labels, protos, seen, counts = make_batch(64, 5, 16, dtype=dtype, seen_fraction=1.0)
    features[1::2] = features[0::2]
    labels[1::2] = labels[0::2]
    assert_step_matches(features, labels, protos.to(dtype), seen, counts, dtype)


@pytest.mark.parametrize("dim", [4, 32])
def test_all_zero_rows_and_all_zero_class(make_batch, dim):
    features, labels, protos, seen, counts = make_batch(48, 6, dim, seen_fraction=1.0, relu=True)
    features[::3] = 0.0                 # some zero rows inside classes
    features[labels == 0] = 0.0         # one class entirely zero: r = floor
    w_rdr = ref.density_ratios_ref(features, labels, protos, seen)
    assert (w_rdr[labels == 0] == ref.RATIO_FLOOR).all()
    assert_step_matches(features, labels, protos, seen, counts, torch.float64)


def test_never_seen_class_gets_ratio_one_and_mean_prototype(make_batch):
    features, labels, protos, seen, counts = make_batch(64, 8, 16)
    seen[:] = False
    seen[0] = True
    ratios = Fn.density_ratios(features, labels, protos, seen)
    assert (ratios[labels != 0] == 1).all()
    assert_step_matches(features, labels, protos, seen, counts, torch.float64)


def test_absent_classes_keep_their_prototype(make_batch):
    features, labels, protos, seen, counts = make_batch(32, 20, 8)
    labels = labels % 3
    p = protos.clone()
    Fn.rdr_weights_and_update(features, labels, p, seen.clone(), counts)
    assert torch.equal(p[3:], protos[3:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_upcast(make_batch, dtype):
    features, labels, protos, seen, counts = make_batch(128, 10, 64, dtype=dtype)
    protos = protos.float()
    # The reference on the same (rounded) values in float64 is the truth; the fast path
    # computes in float32, so float32 tolerances apply.
    assert_step_matches(features, labels, protos, seen, counts, dtype)


def test_warmup_weights_are_ones_but_prototypes_update(make_batch):
    features, labels, protos, seen, counts = make_batch(32, 5, 8)
    p = protos.clone()
    w = Fn.rdr_weights_and_update(features, labels, p, seen.clone(), counts, warmup=True)
    assert torch.equal(w, torch.ones_like(w))
    assert not torch.equal(p, protos)


@pytest.mark.parametrize("base", ["ce", "focal", "la"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_weighted_loss_and_gradient_match_reference(base, dtype):
    counts = [100, 40, 10, 3, 1, 1, 1]
    logits = (3 * torch.randn(50, 7, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, 7, (50,))
    weights = torch.rand(50, dtype=torch.float64) + 0.1
    x = logits.detach().double().requires_grad_(True)
    per_sample = ref.per_sample_loss_ref(x, labels, base, counts, tau=0.8, focal_gamma=1.5)
    expected = (weights * per_sample).sum() / 50
    expected.backward()
    leaf = logits.detach().clone().requires_grad_(True)
    loss = Fn.weighted_loss(leaf, labels, weights, base=base, class_counts=counts, tau=0.8, focal_gamma=1.5)
    loss.backward()
    tol = TOL[torch.float64] if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), expected, **tol)
    assert leaf.grad.dtype == dtype
    grad_tol = tol if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(leaf.grad.double(), x.grad, **grad_tol)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_focal_gradient_is_finite_when_confident(gamma):
    logits = torch.tensor([[60.0, 0.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    loss = Fn.weighted_loss(logits, torch.tensor([0, 1]), torch.ones(2, dtype=torch.float64), base="focal",
                            focal_gamma=gamma)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(loss)


def test_no_gradient_is_computed_without_autograd():
    logits = torch.randn(8, 3)
    loss = Fn.weighted_loss(logits, torch.randint(0, 3, (8,)), torch.ones(8))
    assert not loss.requires_grad
