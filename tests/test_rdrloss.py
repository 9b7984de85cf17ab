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


def test_validate_false_skips_data_checks_only():
    crit = rdr_fast.RDRLoss(COUNTS, 16, validate=False)
    feats = GOOD["feats"].clone()
    feats[0, 0] = float("nan")
    crit(feats, GOOD["logits"], GOOD["labels"])  # no data check: no error
    with pytest.raises(ValueError, match="width"):
        crit(torch.randn(8, 3), GOOD["logits"], GOOD["labels"])
