"""The reference loop (the executable definition every fast path is tested against) against independent formulas."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rdr_fast import reference as ref


def ridge(x, ridge):
    """λ_c = ridge · trace(X_c X_cᵀ) / b_c."""
    return ridge * float((x * x).sum()) / len(x)


@pytest.mark.parametrize("b,k", [(1, 5), (4, 16), (16, 16), (40, 8)])
def test_density_ratio_is_scaled_ridge_least_squares(b, k):
    """r = b · argmin_a ‖Xᵀa − P‖² + λ‖a‖², by NumPy's least squares on the augmented system."""
    x = torch.randn(b, k, dtype=torch.float64)
    proto = torch.randn(k, dtype=torch.float64)
    lam = ridge(x, 1e-5)
    design = np.concatenate([x.numpy().T, np.sqrt(lam) * np.eye(b)])
    target = np.concatenate([proto.numpy(), np.zeros(b)])
    expected = b * np.linalg.lstsq(design, target, rcond=None)[0]
    np.testing.assert_allclose(ref.density_ratio_one_class_ref(x, proto, 1e-5).numpy(), expected, rtol=1e-7,
                               atol=1e-9)


@pytest.mark.parametrize("b,k", [(3, 8), (8, 8), (20, 6)])
def test_both_system_sizes_agree_by_the_push_through_identity(b, k):
    """(X Xᵀ + λI_b)⁻¹ X P = X (Xᵀ X + λI_K)⁻¹ P: the reference solves whichever system is
    smaller; the other one, solved here with NumPy, gives the same ratios."""
    x = torch.randn(b, k, dtype=torch.float64)
    proto = torch.randn(k, dtype=torch.float64)
    xn, pn, lam = x.numpy(), proto.numpy(), ridge(x, 1e-3)
    small_b = np.linalg.solve(xn @ xn.T + lam * np.eye(b), xn @ pn)
    small_k = xn @ np.linalg.solve(xn.T @ xn + lam * np.eye(k), pn)
    np.testing.assert_allclose(small_b, small_k, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ref.density_ratio_one_class_ref(x, proto, 1e-3).numpy(), b * small_b, rtol=1e-9,
                               atol=1e-12)


def test_density_ratios_are_invariant_to_scale_and_follow_row_order():
    """λ scales with the features' energy: scaling features and prototype together leaves
    the ratios as they are; permuting a class's rows permutes its ratios."""
    x = torch.randn(6, 4, dtype=torch.float64)
    proto = torch.randn(4, dtype=torch.float64)
    r = ref.density_ratio_one_class_ref(x, proto, 1e-2)
    torch.testing.assert_close(ref.density_ratio_one_class_ref(7.5 * x, 7.5 * proto, 1e-2), r)
    order = torch.randperm(6)
    torch.testing.assert_close(ref.density_ratio_one_class_ref(x[order], proto, 1e-2), r[order])


def test_density_ratio_of_prototype_in_span_is_exact_combination():
    # P = mean of the rows and rows independent: coefficients 1/b each, so r = 1 (tiny ridge).
    x = torch.randn(5, 20, dtype=torch.float64)
    r = ref.density_ratio_one_class_ref(x, x.mean(0), 1e-12)
    torch.testing.assert_close(r, torch.ones(5, dtype=torch.float64), rtol=1e-6, atol=0)


def test_all_zero_block_gives_floor_and_unseen_gives_one():
    features = torch.zeros(4, 3, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    protos = torch.randn(2, 3, dtype=torch.float64)
    r = ref.density_ratios_ref(features, labels, protos, torch.tensor([True, False]))
    assert r.tolist() == [ref.RATIO_FLOOR, ref.RATIO_FLOOR, 1.0, 1.0]


# One sample of each of two classes, counts [3, 1] (N = 4), worked by hand: inv_freq's
# factors N/n_c are 4/3 and 4, 1 : 3, so the batch-mean-1 weights are 1/2 and 3/2;
# ratios 3 and 1 cancel them exactly in rdr; γ = 1/2 turns 1 : 3 into 1 : √3; cb with
# β = 1/2 has (1−β)/(1−β^n) = 4/7 and 1, normalised to sum 2: 8/11 and 14/11; none: 1.
@pytest.mark.parametrize("reweight,temperature,ratios,expected", [
    ("inv_freq", 1.0, [1.0, 1.0], [0.5, 1.5]),
    ("rdr", 1.0, [3.0, 1.0], [1.0, 1.0]),
    ("rdr", 1.0, [1.0, 1.0], [0.5, 1.5]),
    ("inv_freq", 0.5, [2.0, 5.0], [2 / (1 + 3 ** 0.5), 2 * 3 ** 0.5 / (1 + 3 ** 0.5)]),
    ("cb", 1.0, [2.0, 5.0], [8 / 11, 14 / 11]),
    ("none", 1.0, [2.0, 5.0], [1.0, 1.0]),
])
def test_weights_on_a_case_worked_by_hand(reweight, temperature, ratios, expected):
    weights = ref.sample_weights_ref(torch.tensor(ratios, dtype=torch.float64), torch.tensor([0, 1]), [3, 1],
                                     reweight, temperature=temperature, beta=0.5)
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("reweight", ["rdr", "inv_freq", "cb", "none"])
def test_weights_have_batch_mean_one_and_ignore_the_scale_of_ratios(reweight):
    ratios, labels = torch.rand(9, dtype=torch.float64) + 0.1, torch.arange(9) % 3
    weights = ref.sample_weights_ref(ratios, labels, [50, 7, 1], reweight, temperature=0.7)
    torch.testing.assert_close(weights.mean(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(ref.sample_weights_ref(30 * ratios, labels, [50, 7, 1], reweight, temperature=0.7),
                               weights)


def test_warmup_gives_unit_weights():
    w = ref.sample_weights_ref(torch.rand(6, dtype=torch.float64) + 0.1, torch.arange(6) % 3, [5, 3, 1],
                               "rdr", warmup=True)
    assert w.tolist() == [1.0] * 6


def test_prototype_update_first_seen_then_momentum():
    protos = torch.zeros(3, 2, dtype=torch.float64)
    seen = torch.tensor([False, True, False])
    protos[1] = torch.tensor([10.0, 10.0])
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 2.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    new, new_seen = ref.update_prototypes_ref(protos, seen, feats, labels, momentum=0.9)
    assert new[0].tolist() == [2.0, 3.0]                              # first seen: the mean
    torch.testing.assert_close(new[1], torch.tensor([9.0, 9.2], dtype=torch.float64))  # 0.9·10 + 0.1·m
    assert new[2].tolist() == [0.0, 0.0] and new_seen.tolist() == [True, True, False]
    assert protos[0].tolist() == [0.0, 0.0], "the reference must not mutate its inputs"


@pytest.mark.parametrize("base", ["ce", "focal", "la"])
def test_per_sample_losses_match_torch(base):
    logits = torch.randn(7, 5, dtype=torch.float64)
    labels = torch.randint(0, 5, (7,))
    counts = [50, 20, 10, 5, 1]
    got = ref.per_sample_loss_ref(logits, labels, base, counts, tau=0.7, focal_gamma=2.0)
    if base == "la":
        prior = torch.tensor(counts, dtype=torch.float64) / sum(counts)
        expected = F.cross_entropy(logits + 0.7 * prior.log(), labels, reduction="none")
    else:
        ce = F.cross_entropy(logits, labels, reduction="none")
        expected = ce if base == "ce" else (1 - torch.exp(-ce)) ** 2 * ce
    torch.testing.assert_close(got, expected)


def test_weighted_loss_is_batch_mean_and_equals_weighted_mean():
    logits = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.randint(0, 4, (6,))
    feats = torch.randn(6, 3, dtype=torch.float64)
    protos, seen = torch.randn(4, 3, dtype=torch.float64), torch.ones(4, dtype=torch.bool)
    loss, w, _, _ = ref.rdr_loss_ref(feats, logits, labels, protos, seen, [9, 5, 3, 1])
    weighted_mean = F.cross_entropy(logits, labels, reduction="none") @ w / w.sum()
    torch.testing.assert_close(loss, weighted_mean)


def test_reference_loss_gradcheck():
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 3, 2])
    feats = torch.randn(5, 3, dtype=torch.float64)
    protos, seen = torch.randn(4, 3, dtype=torch.float64), torch.ones(4, dtype=torch.bool)

    def loss_of(x):
        return ref.rdr_loss_ref(feats, x, labels, protos, seen, [9, 5, 3, 1], base="focal", update=False)[0]
    assert torch.autograd.gradcheck(loss_of, (logits,))


_REFERENCE_BACKEND_SCRIPT = """
import torch, rdr_fast
from rdr_fast import reference as ref
assert {devices["cpu"] for devices in rdr_fast.backends().values()} == {"reference"}
torch.manual_seed(0)
counts, labels = [9, 5, 3, 1], torch.tensor([0, 0, 1, 2, 3, 0, 1, 0])
crit = rdr_fast.RDRLoss(counts, 3, base="focal", focal_gamma=1.5).double()
protos, seen = crit.prototypes.clone(), crit.seen.clone()
for _ in range(2):  # the second step has prototypes: density ratios
    feats = torch.randn(8, 3, dtype=torch.float64)
    logits = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    loss = crit(feats, logits, labels)
    loss.backward()
    x = logits.detach().clone().requires_grad_(True)
    expected, _, protos, seen = ref.rdr_loss_ref(feats, x, labels, protos, seen, counts, base="focal",
                                                 focal_gamma=1.5)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(logits.grad, x.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(crit.prototypes, protos, rtol=1e-12, atol=1e-15)
print("ok")
"""


def test_rdrloss_on_the_reference_backend_follows_the_reference():
    """RDR_FAST_IMPL=reference registers the reference behind the ops' signatures as the
    CPU kernels: RDRLoss's gradient and prototypes are then the reference's own."""
    done = subprocess.run([sys.executable, "-c", _REFERENCE_BACKEND_SCRIPT], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "RDR_FAST_IMPL": "reference"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "ok"
