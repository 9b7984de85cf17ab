"""Stateless RDR functions (docs/algorithm.md): validated wrappers over the two custom ops
(rdr_weights_and_update, weighted_loss; loss_from_weights, the loss from given weights
and logit adjustment, for RDRLoss and SAM), the unchecked weights_from_factors and
loss_from_weights_unchecked for RDRLoss, which has checked its inputs, plus density_ratios (the PyTorch path, for
inspection) and the plain-torch helpers class_factors and log_prior.

Shapes: B samples, C classes, K feature width. Labels are integers in [0, C), of any
integer dtype (converted to int64).
Features and logits may be float64, float32, bfloat16 or float16; everything but
float64 is computed in float32. Weights never carry gradient.

Every argument is checked in rdr_fast._checks (docs/reliability.md, "Python API"). Data
checks (label range, NaN/Inf, feature magnitude) run when ``validate`` is True, or when it
is None and the inputs are on the CPU; on a GPU the default skips them to avoid a host
sync. Type, shape, dtype, device and hyperparameter checks always run. An input that
shares memory with the prototypes or seen flags updated in place is copied first.
"""
from __future__ import annotations

import math

import torch

from . import _checks, ops  # noqa: F401  (ops registers the custom ops)
from . import torch_impl
from .constants import BASE_LOSSES, REWEIGHT_MODES  # noqa: F401  (re-exported for compatibility)
from .constants import DEFAULT_RIDGE, weight_mode


def class_factors(class_counts, reweight: str = "rdr", beta: float = 0.9999) -> torch.Tensor:
    """The per-class factor of the weights: N/n_c (rdr, inv_freq), CB's (1−β)/(1−β^{n_c})
    normalised to sum C (cb), or 1 (none). Returns [C] float64 on the CPU."""
    _checks.check_choice("reweight", reweight, REWEIGHT_MODES)
    counts = _checks.as_class_counts(class_counts).to(torch.float64)
    if reweight in ("rdr", "inv_freq"):
        return counts.sum() / counts
    if reweight == "cb":
        _checks.check_range("beta", beta, 0.0, 1.0, high_open=True)
        cb = (1 - beta) / (1 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
        return cb * (len(counts) / cb.sum())
    return torch.ones_like(counts)


def log_prior(class_counts) -> torch.Tensor:
    """log π_c = log(n_c / N), the logit adjustment of LA before τ. [C] float64 on the CPU."""
    counts = _checks.as_class_counts(class_counts).to(torch.float64)
    return torch.log(counts / counts.sum())


def density_ratios(features, labels, prototypes, seen, ridge: float = DEFAULT_RIDGE, validate=None) -> torch.Tensor:
    """Per-sample density ratios r_j (docs/algorithm.md, "Density ratios"), without any
    state change.

    Arguments:
        features: [B, K] floating. labels: [B] integer. prototypes: [C, K]. seen: [C] bool.
    Returns:
        [B] in the compute dtype (float64 for float64 features, else float32).
    """
    labels = _checked_state_inputs(features, labels, prototypes, seen, validate)
    _checks.check_range("ridge", ridge, 0.0, float("inf"), low_open=True)
    return torch_impl.density_ratios_torch(features, labels, prototypes, seen, ridge)


def rdr_weights_and_update(features, labels, prototypes, seen, class_counts, *, reweight: str = "rdr",
                           temperature: float = 1.0, beta: float = 0.9999, ridge: float = DEFAULT_RIDGE,
                           momentum: float = 0.9, warmup: bool = False, update: bool = True,
                           validate=None) -> torch.Tensor:
    """Weights from the current prototypes, then (if ``update``) the momentum update of
    ``prototypes`` [C, K] and ``seen`` [C] in place, in one op (docs/algorithm.md,
    "Density ratios", "Weights", "Prototype update").

    Returns:
        weights: [B], batch mean 1, detached, in the compute dtype. Ones during warm-up
        or with reweight="none".

    The class factors are made from ``class_counts`` on the host at every call and
    copied to the features' device, which a CUDA graph cannot capture: for graphs use
    ``RDRLoss``, which keeps them (and the logit adjustment) as buffers.
    """
    _checks.check_flag("warmup", warmup)
    _checks.check_flag("update", update)
    labels = _checked_state_inputs(features, labels, prototypes, seen, validate)
    check_hyperparameters(temperature=temperature, ridge=ridge, momentum=momentum, beta=beta)
    factors = class_factors(class_counts, reweight, beta)
    if len(factors) != len(prototypes):
        raise ValueError(f"class_counts has {len(factors)} classes but prototypes have {len(prototypes)} rows")
    if update:
        features, labels = _checks.unaliased((prototypes, seen), features=features, labels=labels)
    return weights_from_factors(features, labels, prototypes, seen, factors.to(features.device),
                                mode=weight_mode(reweight, warmup), ridge=ridge, temperature=temperature,
                                momentum=momentum, update=update)


def weights_from_factors(features, labels, prototypes, seen, class_factors, *, mode: str = "density_ratio",
                         ridge: float = DEFAULT_RIDGE, temperature: float = 1.0, momentum: float = 0.9,
                         update: bool = True) -> torch.Tensor:
    """The weights from given class factors [C] (on the features' device), then (if
    ``update``) the prototype update, through the op and without input checks: the caller
    (``rdr_weights_and_update``, RDRLoss) has checked them, labels converted to int64 and
    inputs that alias the state copied included. ``mode`` is one of
    rdr_fast.constants.WEIGHT_MODES; ``constants.weight_mode`` maps a reweighting to it."""
    return torch.ops.rdr_fast.rdr_weights_and_update(
        features.detach(), labels, prototypes, seen, class_factors, float(ridge), float(temperature),
        float(momentum), mode, bool(update))


def weighted_loss(logits, labels, weights, *, base: str = "ce", class_counts=None, tau: float = 1.0,
                  focal_gamma: float = 1.0, validate=None) -> torch.Tensor:
    """L = (1/B) Σ_j w_j ℓ_j (docs/algorithm.md, "Base losses"), forward and gradient fused.

    Arguments:
        logits: [B, C] floating. labels: [B] integer. weights: [B] floating (no gradient
        flows into it). base: "ce", "focal" (−(1−p_t)^γ log p_t) or "la" (CE on logits +
        τ·log π; needs ``class_counts``).
    Returns:
        A scalar in the compute dtype; differentiable with respect to ``logits``, twice
        too (Hessian-vector products: the weights are constants).
    """
    _checks.check_choice("base", base, BASE_LOSSES)
    check_hyperparameters(tau=tau, focal_gamma=focal_gamma)
    labels = _checked_loss_inputs(logits, labels, weights, None, validate)
    adjust = None
    if base == "la":
        if class_counts is None:
            raise ValueError('base="la" needs class_counts for the logit adjustment τ·log π')
        adjust = tau * log_prior(class_counts)
        if len(adjust) != logits.shape[1]:
            raise ValueError(f"class_counts has {len(adjust)} classes but logits have {logits.shape[1]}")
        adjust = adjust.to(logits.device)
    gamma = float(focal_gamma) if base == "focal" else 0.0
    return loss_from_weights_unchecked(logits, labels, weights, adjust, gamma)


def loss_from_weights(logits, labels, weights, *, logit_adjust=None, focal_gamma: float = 0.0,
                      validate=None) -> torch.Tensor:
    """L = (1/B) Σ_j w_j ℓ_j with the given weights, through the fused op: the loss of
    ``weighted_loss`` with the logit adjustment given as a tensor. ``logit_adjust`` [C]
    (or None) is added to the logits (LA); ``focal_gamma`` 0 is CE. RDRLoss's
    ``loss_from_weights`` (SAM's second pass) calls it."""
    _checks.check_range("focal_gamma", focal_gamma, 0.0, float("inf"))
    labels = _checked_loss_inputs(logits, labels, weights, logit_adjust, validate)
    return loss_from_weights_unchecked(logits, labels, weights, logit_adjust, float(focal_gamma))


def loss_from_weights_unchecked(logits, labels, weights, logit_adjust, focal_gamma: float) -> torch.Tensor:
    """The loss through the op, without checks: the caller (RDRLoss.forward, the two
    functions above) has made them. The gradient is only computed when autograd will need it."""
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = torch.ops.rdr_fast.weighted_loss(logits, labels, weights.detach(), logit_adjust, focal_gamma,
                                               compute_grad)
    return loss


def per_sample_losses(logits, labels, weights, *, logit_adjust=None, focal_gamma: float = 0.0,
                      validate=None) -> torch.Tensor:
    """w_j ℓ_j for each sample [B] (RDRLoss's reduction="none"): the terms whose mean
    ``loss_from_weights`` returns, with the same checks, computed by plain differentiable
    torch ops on the PyTorch path (the fused op only returns their mean)."""
    _checks.check_range("focal_gamma", focal_gamma, 0.0, float("inf"))
    labels = _checked_loss_inputs(logits, labels, weights, logit_adjust, validate)
    return torch_impl.weighted_losses_differentiable(logits, labels, weights, logit_adjust, float(focal_gamma))


def check_hyperparameters(*, temperature=1.0, ridge=DEFAULT_RIDGE, momentum=0.9, beta=0.9999, focal_gamma=1.0,
                          tau=1.0) -> None:
    """TypeError for a hyperparameter that is not a real number, ValueError for one that
    is out of range or not finite."""
    _checks.check_range("temperature", temperature, 0.0, float("inf"))
    _checks.check_range("ridge", ridge, 0.0, float("inf"), low_open=True)
    _checks.check_range("momentum", momentum, 0.0, 1.0, high_open=True)
    _checks.check_range("beta", beta, 0.0, 1.0, high_open=True)
    _checks.check_range("focal_gamma", focal_gamma, 0.0, float("inf"))
    _checks.check_range("tau", tau, -float("inf"), float("inf"))


def _checked_state_inputs(features, labels, prototypes, seen, validate) -> torch.Tensor:
    """Checks the inputs of the weights op; returns the labels as int64."""
    _checks.check_tensor("prototypes", prototypes, 2)
    _checks.check_floating("prototypes", prototypes)
    _checks.check_tensor("seen", seen, 1)
    if seen.dtype != torch.bool:
        raise TypeError(f"seen must be a bool tensor, got dtype {seen.dtype}")
    if len(seen) != len(prototypes):
        raise ValueError(f"seen has {len(seen)} entries but prototypes have {len(prototypes)} rows")
    _checks.check_features(features, prototypes.shape[1], width_name="the prototypes' width")
    _checks.check_tensor("labels", labels, 1)
    data_checks = _checks.wants_data_checks(validate, features, labels)
    labels = _checks.as_labels(labels, features.shape[0])
    _checks.check_same_device(features=features, labels=labels, prototypes=prototypes, seen=seen)
    # Only the prototype rows of the batch's classes are read (and checked): O(B·K), not O(C·K).
    if data_checks and not _checks.data_ok(labels, len(prototypes), (features,),
                                           (_checks.feature_limit(features, prototypes),), prototypes):
        _checks.check_label_range(labels, len(prototypes))
        _checks.check_feature_scale(features, prototypes)
        _checks.check_finite_rows("prototypes", prototypes, labels)
    return labels


def _checked_loss_inputs(logits, labels, weights, logit_adjust, validate) -> torch.Tensor:
    """Checks the inputs of the loss op; returns the labels as int64."""
    _checks.check_logits(logits)
    _checks.check_weights(weights, logits.shape[0])
    _checks.check_tensor("labels", labels, 1)
    if logit_adjust is not None:
        _checks.check_tensor("logit_adjust", logit_adjust, 1)
        _checks.check_floating("logit_adjust", logit_adjust)
        if len(logit_adjust) != logits.shape[1]:
            raise ValueError(f"logit_adjust has {len(logit_adjust)} entries but logits have {logits.shape[1]} classes")
    data_checks = _checks.wants_data_checks(validate, logits, labels, weights)
    labels = _checks.as_labels(labels, logits.shape[0], batch_of="logits")
    _checks.check_same_device(logits=logits, labels=labels, weights=weights, logit_adjust=logit_adjust)
    named = {"logits": logits, "weights": weights, "logit_adjust": logit_adjust}
    named = {name: value for name, value in named.items() if value is not None}
    values = tuple(named.values())
    if data_checks and not _checks.data_ok(labels, logits.shape[1], values, (math.inf,) * len(values)):
        _checks.check_label_range(labels, logits.shape[1], classes_of="the logits' columns")
        for name, value in named.items():
            _checks.check_finite(name, value)
    return labels
