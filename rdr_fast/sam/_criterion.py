"""What the SAM family needs from a criterion, and the passes built on it.

A criterion is any callable (features, logits, targets) -> loss. A *reweighting*
criterion (:class:`ReweightingCriterion`; rdr_fast.RDRLoss is one) also keeps the
per-sample weights of its latest call and computes its loss from given weights. SAM's
second pass then reuses the first pass's weights (RDR + SAM, Algorithm 2 of "Revive
Re-weighting in Imbalanced Learning by Density Ratio Estimation"): calling the criterion
again, even in eval mode, would recompute the weights from the features at the
perturbed point, and in train mode would update the prototypes a second time.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ReweightingCriterion(Protocol):
    """A criterion whose per-sample weights the second pass can reuse."""

    last_weights: torch.Tensor | None   # [B], the weights of the latest call, detached

    def __call__(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """features [B, K], logits [B, C], targets [B] → scalar loss; sets ``last_weights``."""

    def loss_from_weights(self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(1/B) Σ_j w_j ℓ_j(logits) with the given weights [B]; no state change."""


def first_pass_weights(criterion):
    """The weights the criterion's last (first-pass) call used, or None for a criterion
    that does not reweight (its second-pass loss is then just a second call)."""
    return criterion.last_weights if isinstance(criterion, ReweightingCriterion) else None


def reused_loss(criterion, features, logits, targets, weights) -> torch.Tensor:
    """The second-pass loss L = (1/B) Σ w_j ℓ_j(logits) with the *given* weights: the
    criterion's base loss, no density ratios and no prototype update. ``weights`` None:
    ``criterion(...)``."""
    if weights is None:
        return criterion(features, logits, targets)
    return criterion.loss_from_weights(logits, targets, weights)


def second_pass(forward, criterion, inputs, targets, weights):
    """The closure of the perturbed pass: forward at w + e, the loss with the first pass's
    weights (reused_loss), backward; returns that loss."""
    def run():
        features, logits = forward(inputs)
        loss = reused_loss(criterion, features, logits, targets, weights)
        loss.backward()
        return loss
    return run


def weighted_first_pass(optimizer, forward, criterion, inputs, targets):
    """The unperturbed pass of ImbSAM / CC-SAM, which need the per-sample weights:
    (features, logits, loss, weights), the weights (and an RDR prototype update)
    computed once, here."""
    if not isinstance(criterion, ReweightingCriterion):
        raise TypeError(f"{type(optimizer).__name__}.step_batch needs a reweighting criterion (last_weights and "
                        f"loss_from_weights, e.g. rdr_fast.RDRLoss; reweight='none' for plain CE), "
                        f"got {type(criterion).__name__}")
    features, logits = forward(inputs)
    loss = criterion(features, logits, targets)
    return features, logits, loss, criterion.last_weights
