"""One training step on a batch, for any optimizer.

A SAM-family optimizer (rdr_fast.sam) runs its own forward and backward passes in
``step_batch``; any other optimizer gets forward → criterion → zero_grad → backward →
step. A training loop therefore has one path for every optimizer.
"""
from __future__ import annotations

import torch
from torch import nn


def _autocast_forward(forward, amp: bool):
    """forward(x) -> (features, logits), under bf16 autocast when ``amp`` (then cast back to
    float32); without amp the model's own dtype is kept (float64 tests)."""
    def run(x):
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
            features, logits = forward(x)
        return (features.float(), logits.float()) if amp else (features, logits)
    return run


def train_step(optimizer, forward, criterion, inputs, targets, amp: bool = False) -> torch.Tensor:
    """One training step on a batch; returns the loss at the unperturbed weights (detached).

    Arguments:
        optimizer: a torch optimizer, or one with a ``step_batch(forward, criterion,
            inputs, targets, first_pass_local=None)`` method (the SAM family), which then
            runs the whole step.
        forward: callable x -> (features [B, K], logits [B, C]) (a model, maybe compiled or
            wrapped in DistributedDataParallel).
        criterion: an RDRLoss, or any callable (features, logits, targets) -> loss.
        amp: bf16 autocast for the forward passes.
    """
    run = _autocast_forward(forward, amp)
    if hasattr(optimizer, "step_batch"):
        # Under DDP the first (ascent) pass may skip the gradient all-reduce (m-sharpness:
        # each rank perturbs with its own gradient); only the second pass is averaged.
        local = forward.no_sync if isinstance(forward, nn.parallel.DistributedDataParallel) else None
        return optimizer.step_batch(run, criterion, inputs, targets, first_pass_local=local)
    features, logits = run(inputs)
    loss = criterion(features, logits, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()
