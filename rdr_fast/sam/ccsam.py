"""``ccsam``: CC-SAM, which perturbs the classifier inside the loss, not the weights."""
from __future__ import annotations

import torch
from torch import nn

from ._criterion import reused_loss, weighted_first_pass
from .wrapper import OptimizerWrapper


class CCSAM(OptimizerWrapper):
    """CC-SAM stage 1 ("Class-Conditional Sharpness-Aware Minimization for Deep Long-Tailed
    Recognition", CVPR 2023; official zzpustc/CC-SAM ``train``): each class c in the batch
    perturbs only the classifier (W, b), by its own radius, and scores its own samples with
    the perturbed classifier; one forward and one backward. The weights themselves never
    move: no backup, no restore, no second pass — the step is a plain base step on the
    gradient of the perturbed loss.

    Per classifier tensor θ ∈ {W, b}: g_c = ∂[(1/b_c) Σ_{i∈c} w_i ℓ_i]/∂θ and
    ε_c = ρ·√‖θ‖·P^{1/4} / (√2·(n_c − 1)^{1/4}·‖g_c‖^{3/2}) · g_c (the official radius
    r·√P·g_c/‖g_c‖; P = classifier parameter count; ρ = the official ``noise_ratio``;
    n_c − 1 clamped to ≥ 1, ‖g_c‖ to ≥ 1e-12). Loss = (1 − flat_ratio)·L(w) +
    flat_ratio·(1/B) Σ_j w_j ℓ_j(logits_j + ε_{y_j}·z_j + ε^b_{y_j}); ε is a constant (no
    gradient through it).

    Vectorised: g_c^W = (1/b_c) Σ_{i∈c} d_i z_iᵀ with d_i = w_i ∂ℓ_i/∂logits_i, so
    ε_c z_j and ‖g_c^W‖ are B×B Gram products masked to same-class pairs — no per-class
    loop, no host sync. Differences from the official code: no mixup (a data
    augmentation, not part of the step), and the perturbed term's gradient reaches the
    features through W + ε_c (the official ``param.data`` swap leaves W there). Stage 2
    (class-balanced classifier re-training) is not part of the optimizer.

    Arguments:
        params, base_optimizer, rho: see :class:`~rdr_fast.sam.wrapper.OptimizerWrapper`.
        classifier: the nn.Linear whose (W, b) are perturbed. class_counts: [C] training
            counts n_c. flat_ratio: the weight of the perturbed loss, in [0, 1].
    """

    eps = 1e-12

    def __init__(self, params, base_optimizer=torch.optim.SGD, *, classifier: nn.Linear, class_counts,
                 rho: float = 0.05, flat_ratio: float = 0.5, **kwargs):
        if not isinstance(classifier, nn.Linear):
            raise TypeError(f"classifier must be an nn.Linear, got {type(classifier).__name__}")
        if not 0.0 <= flat_ratio <= 1.0:
            raise ValueError(f"flat_ratio must be in [0, 1], got {flat_ratio!r}")
        super().__init__(params, base_optimizer, rho, **kwargs)
        self.classifier, self.flat_ratio = classifier, float(flat_ratio)
        counts = torch.as_tensor(class_counts, dtype=torch.float64)
        numel = sum(p.numel() for p in classifier.parameters())
        # ρ·P^{1/4} / (√2·(n_c − 1)^{1/4}) per class; the rest depends on the batch.
        self.class_scale = self.rho * numel ** 0.25 / (2 ** 0.5 * (counts - 1).clamp_min(1) ** 0.25)

    def step(self, closure=None):
        """A plain base step: CC-SAM's perturbation lives in the loss (``step_batch``)."""
        self.sam_steps += 1
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.base_optimizer.step()
        return loss

    def perturbation(self, features, logit_grads, targets) -> torch.Tensor:
        """[B, C] logit shifts ε_{y_j}·z_j + ε^b_{y_j}, differentiable w.r.t. ``features``.

        Arguments:
            features: [B, K] the classifier's input. logit_grads: [B, C] d_i = w_i ∂ℓ_i/∂logits_i
            (constant). targets: [B] int64.
        """
        d, z = logit_grads.detach(), features.detach()
        num_classes = len(self.class_scale)
        same = (targets[:, None] == targets[None, :]).to(z.dtype)
        zeros = torch.zeros(num_classes, dtype=z.dtype, device=z.device)
        b_c = zeros.index_add(0, targets, torch.ones_like(targets, dtype=z.dtype)).clamp_min(1)
        gram = z @ z.T * same                                            # z_i·z_k, same class
        sq_norm_w = zeros.index_add(0, targets, (gram * (d @ d.T)).sum(1)) / b_c ** 2   # ‖g_c^W‖²
        scale = self.class_scale.to(z.device, z.dtype)
        norm_w = sq_norm_w.clamp_min(0).sqrt().clamp_min(self.eps)
        k_w = scale * self.classifier.weight.detach().norm().sqrt() / norm_w ** 1.5
        shift = ((features @ z.T) * same) @ d * (k_w / b_c)[targets, None]   # ε_{y_j} z_j
        if self.classifier.bias is not None:
            g_b = d.new_zeros(num_classes, d.shape[1]).index_add(0, targets, d) / b_c[:, None]
            k_b = scale * self.classifier.bias.detach().norm().sqrt() / g_b.norm(dim=1).clamp_min(self.eps) ** 1.5
            shift = shift + (k_b[:, None] * g_b)[targets]
        return shift

    def step_batch(self, forward, criterion, inputs, targets, first_pass_local=None) -> torch.Tensor:
        # first_pass_local is ignored: CC-SAM has a single backward, which DDP averages.
        self.zero_grad(set_to_none=True)
        features, logits, loss, weights = weighted_first_pass(self, forward, criterion, inputs, targets)
        # ∂L/∂logits_j = (w_j/B)·∂ℓ_j/∂logits_j, so B times it is d_j.
        logit_grads = torch.autograd.grad(loss, logits, retain_graph=True)[0] * logits.shape[0]
        shifted = logits + self.perturbation(features, logit_grads, targets)
        flat = reused_loss(criterion, features, shifted, targets, weights)
        ((1 - self.flat_ratio) * loss + self.flat_ratio * flat).backward()
        self.step()
        return loss.detach()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rho={self.rho}, flat_ratio={self.flat_ratio}, base={self.base_optimizer!r})"
