"""``imbsam``: ImbSAM, SAM on the tail classes' loss and a plain gradient for the head."""
from __future__ import annotations

import contextlib

import torch

from ..distributed import average_
from ._criterion import reused_loss, second_pass, weighted_first_pass
from ._foreach import serial_on_cpu
from .core import SAM


class ImbSAM(SAM):
    """ImbSAM ("ImbSAM: A Closer Look at Sharpness-Aware Minimization in Class-Imbalanced
    Recognition", arXiv:2308.07815; the step of the official cool-xuan/Imbalanced_SAM):
    SAM on the tail classes' loss only, plain gradient for the head.

    Tail T = {c : n_c < tail_threshold} (official ``eta`` = 20). With per-sample losses ℓ
    (reweighted when the criterion reweights): L_H = Σ_{head} w ℓ / B, backward (graph
    kept), g_H saved; L_T = 2·Σ_{tail} w ℓ / B (the official factor 2), backward;
    e = ρ·g_T/(‖g_T‖ + 1e-16); L_T at w + e, backward; restore; grad ← ∇L_T(w+e) + g_H;
    base step. A batch without tail samples has e = 0: an SGD step on L_H. Cost 2 F + 3 B.
    """

    eps = 1e-16

    def __init__(self, params, base_optimizer=torch.optim.SGD, *, class_counts, tail_threshold: float = 20,
                 **kwargs):
        super().__init__(params, base_optimizer, **kwargs)
        counts = torch.as_tensor(class_counts)
        self.tail_threshold = tail_threshold
        self.register_tail(counts < tail_threshold)
        self._head_grad: dict[torch.Tensor, torch.Tensor] = {}

    def register_tail(self, is_tail: torch.Tensor) -> None:
        """Set the tail classes from a [C] bool mask."""
        self.is_tail = is_tail.to(torch.bool)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        self.restore()
        params, grads = self._params_with_grad()
        with serial_on_cpu(params):
            torch._foreach_add_(grads, self._buffers(params, self._head_grad))   # + g_H
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step_batch(self, forward, criterion, inputs, targets, first_pass_local=None) -> torch.Tensor:
        """Under DDP (``first_pass_local`` is its no_sync) the first pass and both of its
        backward passes run unsynchronised — DDP's hooks fire once per forward — and the
        head gradient, which enters the update, is then averaged over ranks in one
        all-reduce; the tail gradient only builds the perturbation and stays per rank,
        like SAM's first pass."""
        self.zero_grad(set_to_none=True)
        with (first_pass_local or contextlib.nullcontext)():
            features, logits, loss, weights = weighted_first_pass(self, forward, criterion, inputs, targets)
            tail = self.is_tail.to(targets.device)[targets]
            head_w = torch.where(tail, torch.zeros_like(weights), weights)
            tail_w = torch.where(tail, 2 * weights, torch.zeros_like(weights))
            reused_loss(criterion, features, logits, targets, head_w).backward(retain_graph=True)
            with torch.no_grad():
                params, grads = self._params_with_grad()
                head = self._buffers(params, self._head_grad)
                with serial_on_cpu(params):
                    torch._foreach_copy_(head, grads)
            self.zero_grad(set_to_none=True)                  # the tail backward writes fresh grads
            reused_loss(criterion, features, logits, targets, tail_w).backward()
        if first_pass_local is not None:
            average_(head)

        self.step(second_pass(forward, criterion, inputs, targets, tail_w))
        return loss.detach()
