"""RDRLoss: the module API, its state and its errors."""
from __future__ import annotations

import io

import pytest
import torch

import rdr_fast
from rdr_fast import reference as ref
from conftest import CPU_AND_CUDA, long_tail_counts, long_tail_labels

COUNTS = long_tail_counts(10)


def batches(steps, batch=64, dim=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        labels = long_tail_labels(batch, COUNTS, generator=g)
        yield (torch.randn(batch, dim, generator=g, dtype=dtype),
               torch.randn(batch, len(COUNTS), generator=g, dtype=dtype), labels)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("base", ["ce", "focal", "la"])
@pytest.mark.parametrize("reweight", ["rdr", "inv_freq", "cb", "none"])
def test_module_matches_reference_over_steps(base, reweight, device):
    """Loss, its gradient, weights and state over steps, on the device's registered
    kernels (C++ on the CPU when built, Triton on CUDA), against the CPU reference."""
    crit = rdr_fast.RDRLoss(COUNTS, 16, base=base, reweight=reweight, warmup_steps=2, tau=0.5,
                            focal_gamma=2.0, temperature=0.7).double().to(device)
    protos = torch.zeros(10, 16, dtype=torch.float64)
    seen = torch.zeros(10, dtype=torch.bool)
    tol = dict(rtol=1e-9, atol=1e-12)
    for step, (feats, logits, labels) in enumerate(batches(5)):
        x = logits.to(device, copy=True).requires_grad_(True)  # a leaf of its own, also on the CPU
        loss = crit(feats.to(device), x, labels.to(device))
        loss.backward()
        logits.requires_grad_(True)
        expected, w, protos, seen = ref.rdr_loss_ref(
            feats, logits, labels, protos, seen, COUNTS, base=base, reweight=reweight, tau=0.5,
            focal_gamma=2.0, temperature=0.7, warmup=step < 2)
        expected.backward()
        torch.testing.assert_close(loss.cpu(), expected.detach(), **tol)
        torch.testing.assert_close(x.grad.cpu(), logits.grad, **tol)
        torch.testing.assert_close(crit.last_weights.cpu(), w, **tol)
        torch.testing.assert_close(crit.prototypes.cpu(), protos, **tol)
        assert torch.equal(crit.seen.cpu(), seen)
    assert int(crit.step) == 5


def test_gradient_flows_to_logits_and_model_not_through_weights():
    crit = rdr_fast.RDRLoss(COUNTS, 16)
    feats = torch.randn(32, 16, requires_grad=True)
    logits = torch.randn(32, 10, requires_grad=True)
    crit(feats, logits, torch.randint(0, 10, (32,))).backward()
    assert logits.grad is not None and feats.grad is None
    assert crit.last_weights.requires_grad is False


def test_state_dict_round_trip_continues_identically():
    steps = list(batches(6, dtype=torch.float32))
    straight = rdr_fast.RDRLoss(COUNTS, 16, warmup_steps=1)
    losses = [straight(*b) for b in steps]
    first = rdr_fast.RDRLoss(COUNTS, 16, warmup_steps=1)
    for b in steps[:3]:
        first(*b)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = rdr_fast.RDRLoss(COUNTS, 16, warmup_steps=1)
    resumed.load_state_dict(torch.load(buffer))
    assert set(resumed.state_dict()) == {"prototypes", "seen", "step", "class_counts"}
    for b, expected in zip(steps[3:], losses[3:]):
        assert torch.equal(resumed(*b), expected)
    assert torch.equal(resumed.prototypes, straight.prototypes)


def test_eval_mode_changes_no_state():
    crit = rdr_fast.RDRLoss(COUNTS, 16)
    feats, logits, labels = next(batches(1, dtype=torch.float32))
    crit(feats, logits, labels)
    before = {k: v.clone() for k, v in crit.state_dict().items()}
    crit.eval()
    with torch.no_grad():
        crit(feats * 2, logits, labels)
    for key, value in crit.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert crit.last_weights is not None and crit.last_weights.shape == (64,)


def test_mismatched_checkpoint_is_refused():
    crit = rdr_fast.RDRLoss(COUNTS, 16)
    other = rdr_fast.RDRLoss(COUNTS[:-1] + [2], 16)
    with pytest.raises(ValueError, match="class_counts"):
        other.load_state_dict(crit.state_dict())


def test_to_device_moves_state():
    crit = rdr_fast.RDRLoss(COUNTS, 16).to("meta")
    assert crit.prototypes.device.type == "meta" and crit.class_factors.device.type == "meta"


GOOD = dict(feats=torch.randn(8, 16), logits=torch.randn(8, 10), labels=torch.randint(0, 10, (8,)))


@pytest.mark.parametrize("change,error,pattern", [
    (dict(feats=torch.randn(8, 15)), ValueError, "width 15 but feat_dim is 16"),
    (dict(feats=torch.randn(8)), ValueError, "features must be 2-D"),
    (dict(feats=torch.randn(7, 16)), ValueError, "features have 7 rows but logits have 8"),
    (dict(logits=torch.randn(8, 9)), ValueError, "9 columns but there are 10 classes"),
    (dict(labels=torch.randint(0, 10, (7,))), ValueError, "labels has 7 entries"),
    (dict(labels=torch.full((8,), 10)), ValueError, r"labels must lie in \[0, 10\)"),
    (dict(labels=torch.full((8,), -1)), ValueError, r"labels must lie in \[0, 10\)"),
    (dict(labels=torch.zeros(8)), TypeError, "labels must be an integer tensor"),
    (dict(feats=torch.full((8, 16), float("nan"))), ValueError, "features contains 128 NaN or Inf"),
    (dict(logits=torch.full((8, 10), float("inf"))), ValueError, "logits contains 80 NaN or Inf"),
    (dict(feats=torch.randint(0, 3, (8, 16))), TypeError, "features must be a floating-point"),
    (dict(labels=torch.randint(0, 10, (8,), device="meta")), ValueError, "must be on one device"),
    (dict(feats=[[1.0] * 16] * 8), TypeError, "features must be a torch.Tensor"),
])
def test_bad_input_raises_a_clear_error(change, error, pattern):
    args = {**GOOD, **change}
    with pytest.raises(error, match=pattern):
        rdr_fast.RDRLoss(COUNTS, 16)(args["feats"], args["logits"], args["labels"])


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(class_counts=[5, 0, 1]), "must all be positive"),
    (dict(class_counts=[5, -2, 1]), "must all be positive"),
    (dict(class_counts=[5.5, 2.0]), "whole numbers"),
    (dict(class_counts=[]), "non-empty 1-D"),
    (dict(base="bce"), "base must be one of"),
    (dict(reweight="ldam"), "reweight must be one of"),
    (dict(momentum=1.0), "momentum must lie in"),
    (dict(temperature=-1.0), "temperature must lie in"),
    (dict(ridge=0.0), "ridge must lie in"),
    (dict(beta=float("nan")), "beta must lie in"),
    (dict(feat_dim=0), "feat_dim must be a positive int"),
    (dict(warmup_steps=-1), "warmup_steps must be a non-negative int"),
])
def test_bad_construction_raises(kwargs, pattern):
    args = {"class_counts": COUNTS, "feat_dim": 16, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        rdr_fast.RDRLoss(**args)


def test_validate_false_skips_data_checks_only():
    crit = rdr_fast.RDRLoss(COUNTS, 16, validate=False)
    feats = GOOD["feats"].clone()
    feats[0, 0] = float("nan")
    crit(feats, GOOD["logits"], GOOD["labels"])  # no data check: no error
    with pytest.raises(ValueError, match="width"):
        crit(torch.randn(8, 3), GOOD["logits"], GOOD["labels"])
