"""bench/official.py, the authors' per-step RDR structure that the benchmarks time as
their baseline, computes what rdr_fast computes: the same weights (every backend) where
the authors' Gram inverse exists and every class in the batch has been met, the same
prototype update (their [K, C] layout against rdr_fast's [C, K]), and, as a criterion, the
loss and gradient of RDRLoss with its default arguments."""
from __future__ import annotations

import pytest
import torch

import rdr_fast
from rdr_fast.constants import DEFAULT_RIDGE
from backends import BACKENDS, run_weights, weights_args
from conftest import load_bench_module, long_tail_counts

official = load_bench_module("official")

NUM_CLASSES, DIM, BATCH = 6, 16, 40


def steady_state_batch(seed=0):
    """(features, labels, prototypes [C, K], counts): every class present with b_c ≤ 12 < K
    rows, independent Gaussian rows (so X_c X_cᵀ is invertible), and prototypes near the
    class means, so that the ratios spread around 1 instead of sitting at the floor."""
    g = torch.Generator().manual_seed(seed)
    counts = long_tail_counts(NUM_CLASSES)
    labels = torch.cat([torch.arange(NUM_CLASSES), torch.randint(0, NUM_CLASSES, (BATCH - NUM_CLASSES,), generator=g)])
    labels = labels[torch.randperm(BATCH, generator=g)]
    assert int(torch.bincount(labels).max()) < DIM
    features = torch.randn(BATCH, DIM, generator=g)
    means = torch.zeros(NUM_CLASSES, DIM, ).index_add_(0, labels, features)
    means /= torch.bincount(labels, minlength=NUM_CLASSES)[:, None]
    protos = means + 0.05 * torch.randn(NUM_CLASSES, DIM, generator=g)
    return features, labels, protos, counts


def official_state(protos_ck, met):
    """An OfficialRDR whose prototype columns are ``protos_ck``'s rows and whose labels met
    are ``met``."""
    state = official.OfficialRDR(long_tail_counts(NUM_CLASSES), DIM)
    state.prototypes.copy_(protos_ck.T)
    state.labels_met.update(met)
    return state


# Without a ridge the authors' float32 inverse is within 2e-6 of the exact weights here;
# rdr_fast's default relative ridge 1e-5 moves them by up to 2e-4 on these batches.
RIDGE_TOLERANCE = {1e-12: dict(rtol=1e-5, atol=1e-7), DEFAULT_RIDGE: dict(rtol=1e-3, atol=1e-6)}


@pytest.mark.parametrize("ridge", list(RIDGE_TOLERANCE))
@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_and_update_equal_every_backend(backend, ridge):
    features, labels, protos, counts = steady_state_batch()
    seen = torch.ones(NUM_CLASSES, dtype=torch.bool)
    state = official_state(protos, range(NUM_CLASSES))
    weights = state.weights_and_update(features, labels)
    assert float(weights.min()) > 1e-4  # no ratio at the floor
    args = list(weights_args(features, labels, protos, seen, counts))
    args[5] = ridge
    got_w, got_protos, got_seen = run_weights(backend, tuple(args))
    torch.testing.assert_close(got_w.float(), weights, **RIDGE_TOLERANCE[ridge])
    torch.testing.assert_close(got_protos, state.prototypes_ck, rtol=1e-6, atol=1e-7)
    assert bool(got_seen.all()) and state.labels_met == set(range(NUM_CLASSES))


def test_update_of_first_met_and_absent_classes():
    """A class met for the first time takes its batch mean, an absent one keeps its column,
    a met one blends with momentum μ: rdr_fast's update, column for row."""
    features, labels, protos, counts = steady_state_batch(seed=1)
    keep = labels != 5  # class 5 absent from the batch
    features, labels = features[keep], labels[keep]
    met = {0, 2, 3, 5}  # classes 1 and 4 are met for the first time
    seen = torch.tensor([c in met for c in range(NUM_CLASSES)])
    state = official_state(protos, met)
    official.official_update(features, labels, state.prototypes, state.labels_met, 0.9)
    new_protos, new_seen = rdr_fast.reference.update_prototypes_ref(protos, seen, features, labels, 0.9)
    torch.testing.assert_close(state.prototypes_ck, new_protos, rtol=1e-6, atol=1e-7)
    assert state.labels_met == {c for c in range(NUM_CLASSES) if new_seen[c]} == set(range(NUM_CLASSES))
    torch.testing.assert_close(state.prototypes_ck[5], protos[5], rtol=0, atol=0)


def test_a_class_not_met_gets_the_floor_where_rdr_fast_gives_ratio_one():
    """The documented difference: the authors' zero prototype column gives ratio 1e-9 (its
    weights ≈ 0); rdr_fast's unseen class has ratio 1, so its weights are N/n_c scaled."""
    features, labels, protos, counts = steady_state_batch(seed=2)
    state = official_state(protos, set(range(1, NUM_CLASSES)))
    state.prototypes[:, 0] = 0  # class 0 not met: its column is still the initial zeros
    weights = state.weights_and_update(features, labels)
    seen = torch.arange(NUM_CLASSES) > 0
    ours, _, _ = run_weights("reference", weights_args(features, labels, protos, seen, counts))
    class0 = labels == 0
    assert float(weights[class0].max()) < 1e-6 < float(ours[class0].min())
    # the others keep their ratios: equal up to the batch scaling, which the floor changes
    scale = ours[~class0].sum() / weights[~class0].sum()
    torch.testing.assert_close(weights[~class0] * scale, ours[~class0], **RIDGE_TOLERANCE[DEFAULT_RIDGE])


def test_criterion_equals_rdrloss_with_default_arguments():
    """OfficialRDR as a criterion: RDRLoss(counts, K)'s loss, gradient and prototypes."""
    features, labels, protos, counts = steady_state_batch(seed=3)
    logits = torch.randn(BATCH, NUM_CLASSES, requires_grad=True)
    state = official_state(protos, range(NUM_CLASSES))
    crit = rdr_fast.RDRLoss(counts, DIM)
    crit.prototypes.copy_(protos)
    crit.seen.fill_(True)
    loss = crit(features, logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    expected = state(features, logits, labels)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(loss, expected, **RIDGE_TOLERANCE[DEFAULT_RIDGE])
    torch.testing.assert_close(grad, expected_grad, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(crit.prototypes, state.prototypes_ck, rtol=1e-6, atol=1e-7)
