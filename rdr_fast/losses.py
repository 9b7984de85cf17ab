"""RDRLoss: Re-weighting with Density Ratio as an nn.Module (docs/algorithm.md)."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import _checks, distributed, functional
from .constants import BASE_LOSSES, DEFAULT_RIDGE, REWEIGHT_MODES, weight_mode

REDUCTIONS = ("mean", "sum", "none")


class RDRLoss(nn.Module):
    """Loss weighted by class inverse frequency times an on-the-fly density ratio.

    Each training call: density ratios of the batch's (detached) features against the
    per-class prototypes → weights w (batch mean 1) → L = (1/B) Σ w_j ℓ_j → momentum
    update of the prototypes. In eval mode the loss uses the current prototypes and no
    state changes.

    Arguments:
        class_counts: training count per class, [C] positive integers.
        feat_dim: K, the width of the features passed to forward.
        base: "ce", "focal" or "la" (CE on logits + τ·log π; predict with raw logits).
        reweight: "rdr", "inv_freq" (r ≡ 1), "cb" (class-balanced, β) or "none".
        momentum: μ of the prototype update P ← μP + (1−μ)·mean.
        temperature: γ in w = (r·N/n_y)^γ.
        warmup_steps: training steps with w ≡ 1 (the prototypes still update).
        tau: LA's τ. focal_gamma: focal's γ_f. beta: CB's β. ridge: the relative ridge
            of the least-squares systems.
        validate: data checks (label range, NaN/Inf, feature magnitude): None = on CPU
            inputs only, True = always (forces a host sync on GPU), False = never. Type,
            shape, dtype and device checks always run (docs/reliability.md, "Python API").
        reduction: "mean" (L above), "sum" (Σ w_j ℓ_j) or "none" (w_j ℓ_j per sample, [B];
            computed by plain torch ops, the fused op only gives the mean).
        sync_prototypes: under torch.distributed (world size > 1), all-reduce the
            per-class feature sums and counts ([C, K+1], one call per step) so every rank
            applies the update of the global batch. The weights stay per rank: each rank's
            ratios come from its local batch (rdr_fast.distributed.update_prototypes_global_).

    State (buffers, saved by ``state_dict``): ``prototypes`` [C, K] float32, ``seen`` [C]
    bool, ``step`` (training calls so far), ``class_counts`` [C] int64 (checked on load).
    ``last_weights`` holds the detached weights of the latest call, for logging.
    """

    def __init__(self, class_counts, feat_dim: int, base: str = "ce", reweight: str = "rdr",
                 momentum: float = 0.9, temperature: float = 1.0, warmup_steps: int = 0,
                 tau: float = 1.0, focal_gamma: float = 1.0, beta: float = 0.9999,
                 ridge: float = DEFAULT_RIDGE, validate: bool | None = None, sync_prototypes: bool = True,
                 reduction: str = "mean"):
        super().__init__()
        counts = _checks.as_class_counts(class_counts)
        _checks.check_choice("base", base, BASE_LOSSES)
        _checks.check_choice("reweight", reweight, REWEIGHT_MODES)
        feat_dim = _checks.check_count("feat_dim", feat_dim, 1)
        warmup_steps = _checks.check_count("warmup_steps", warmup_steps, 0)
        _checks.check_validate(validate)
        _checks.check_flag("sync_prototypes", sync_prototypes)
        _checks.check_choice("reduction", reduction, REDUCTIONS)
        functional.check_hyperparameters(temperature=temperature, ridge=ridge, momentum=momentum,
                                         beta=beta, focal_gamma=focal_gamma, tau=tau)
        self.base, self.reweight, self.validate = base, reweight, validate
        self.sync_prototypes, self.reduction = sync_prototypes, reduction
        self.momentum, self.temperature, self.ridge = float(momentum), float(temperature), float(ridge)
        self.warmup_steps, self.tau, self.focal_gamma, self.beta = warmup_steps, float(tau), float(focal_gamma), beta
        num_classes = len(counts)
        self.register_buffer("prototypes", torch.zeros(num_classes, feat_dim))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("class_counts", counts)
        # Derived from the counts, so not saved; float64 so float64 runs lose nothing.
        self.register_buffer("class_factors", functional.class_factors(counts, reweight, beta), persistent=False)
        adjust = tau * functional.log_prior(counts) if base == "la" else None
        self.register_buffer("logit_adjust", adjust, persistent=False)
        self.last_weights: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)

    @property
    def feat_dim(self) -> int:
        return self.prototypes.shape[1]

    def forward(self, features: torch.Tensor | None, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """features [B, K] floating, logits [B, C] floating, targets [B] integer → the loss
        (a scalar; [B] with reduction="none"). ``features`` may be None for the reweightings
        that do not use them (inv_freq, cb, none); the prototypes then do not change."""
        if features is None:
            if self.reweight == "rdr":
                raise ValueError("features: reweight='rdr' needs the features (its density ratios come from them); "
                                 "None only goes with reweight 'inv_freq', 'cb' or 'none'")
            # The same op on zero features, without the update: the weights of these modes
            # do not read the features, and so they stay those of the fused kernel.
            _checks.check_logits(logits, self.num_classes)
            features = logits.new_zeros(logits.shape[0], self.feat_dim)
            update_state = False
        else:
            update_state = self.training
        prototypes, seen = self.prototypes, self.seen  # one module attribute lookup each
        features, logits, targets = self._checked_inputs(features, logits, targets, prototypes, seen)
        global_update = update_state and self.sync_prototypes and distributed.multi_rank()
        # The mode leaves warm-up out: it is applied below from the step buffer, without a host sync.
        weights = functional.weights_from_factors(
            features, targets, prototypes, seen, self.class_factors, mode=weight_mode(self.reweight),
            ridge=self.ridge, temperature=self.temperature, momentum=self.momentum,
            update=update_state and not global_update)
        if global_update:
            distributed.update_prototypes_global_(prototypes, seen, features, targets, self.momentum)
        if self.warmup_steps > 0 and self.reweight != "none":
            # A tensor comparison, not `if step < warmup`: no host sync, capturable.
            weights = torch.where(self.step < self.warmup_steps, torch.ones_like(weights), weights)
        if self.training:
            self.step.add_(1)
        self.last_weights = weights.detach()
        return self._loss(logits, targets, weights, validate=None, checked=True)  # the inputs are checked above

    def loss_from_weights(self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """This criterion's base loss (ce / focal / la) weighted by the given ``weights``:
        no density ratios, no state change. SAM's second pass uses it to reuse the first
        pass's weights at the perturbed point."""
        _checks.check_logits(logits, self.num_classes)
        return self._loss(logits, targets, weights, validate=self.validate)

    def _loss(self, logits, targets, weights, validate, checked: bool = False) -> torch.Tensor:
        """The base loss weighted by ``weights``; ``checked``: the inputs have been checked
        (forward), so the fused op is called without checking them again."""
        gamma = self.focal_gamma if self.base == "focal" else 0.0
        if self.reduction == "none":
            return functional.per_sample_losses(logits, targets, weights, logit_adjust=self.logit_adjust,
                                                focal_gamma=gamma, validate=False if checked else validate)
        if checked:
            loss = functional.loss_from_weights_unchecked(logits, targets, weights, self.logit_adjust, gamma)
        else:
            loss = functional.loss_from_weights(logits, targets, weights, logit_adjust=self.logit_adjust,
                                                focal_gamma=gamma, validate=validate)
        return loss * len(targets) if self.reduction == "sum" else loss

    def _checked_inputs(self, features, logits, targets, prototypes, seen):
        """(features, logits, targets) checked, targets as int64, and in training (which
        updates the prototypes and seen flags in place) any input that shares their memory
        copied. The data checks make one pass (_checks.data_ok); only if it fails do the
        precise checks run, for the message."""
        num_classes = len(prototypes)
        _checks.check_logits(logits, num_classes)
        _checks.check_features(features, prototypes.shape[1], batch=logits.shape[0])
        _checks.check_tensor("targets", targets, 1)
        data_checks = _checks.wants_data_checks(self.validate, features, logits, targets)
        targets = _checks.as_labels(targets, logits.shape[0], name="targets", batch_of="logits")
        _checks.check_same_device(features=features, logits=logits, targets=targets, prototypes=prototypes)
        if data_checks and not _checks.data_ok(targets, num_classes, (features, logits),
                                               (_checks.feature_limit(features, prototypes), math.inf)):
            _checks.check_label_range(targets, num_classes, name="targets", classes_of="class_counts")
            _checks.check_feature_scale(features, prototypes)
            _checks.check_finite("logits", logits)
        if self.training:
            features, logits, targets = _checks.unaliased((prototypes, seen), features=features,
                                                          logits=logits, targets=targets)
        return features, logits, targets

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "class_counts")
        if saved is not None and not torch.equal(saved.cpu(), self.class_counts.cpu()):
            raise ValueError(
                f"checkpoint has class_counts for {len(saved)} classes (sum {int(saved.sum())}) that differ "
                f"from this RDRLoss's ({self.num_classes} classes, sum {int(self.class_counts.sum())})")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, base={self.base!r}, "
                f"reweight={self.reweight!r}, momentum={self.momentum}, temperature={self.temperature}, "
                f"warmup_steps={self.warmup_steps}")

