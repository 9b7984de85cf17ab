"""The executable specification of RDR: a readable per-class loop (docs/algorithm.md).

Every fast path in rdr_fast (the vectorised PyTorch path, the C++ and Triton kernels)
is tested against these functions. They are slow on purpose: a Python loop over the
classes, one small dense solve per class, no in-place tricks. They work in float64.
Nothing imports this module at training time, except RDR_FAST_IMPL=reference, which
registers ``rdr_weights_and_update_ref`` and ``weighted_loss_ref`` (the reference behind
the ops' signatures) as the CPU kernels of the ops, for A/B runs.

Choices the paper leaves open, fixed here (and mirrored by every fast path):
- Ridge: λ_c = ridge · trace(X_c X_cᵀ) / b_c. When a class block is all zeros the
  trace is 0; λ_c is then taken as 1 (any positive value gives the same answer, r = 0,
  clamped to RATIO_FLOOR), so the system is always solvable.
- System size: the b_c×b_c form is solved when b_c ≤ K, the K×K form otherwise.
- Precision: the least-squares systems are solved in float64 whatever the input dtype.
  With a ridge of 1e-5 they are ill-conditioned by design (condition number up to about
  b_c/ridge on duplicate rows), and a float32 Gram matrix then loses up to 1e-2 of
  relative accuracy. Everything else follows the compute dtype: float64 inputs stay
  float64; fp32, bf16 and fp16 are computed in float32 (never in less).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from .constants import DEFAULT_RIDGE, RATIO_FLOOR, check_weight_mode, compute_dtype, weight_mode


def density_ratio_one_class_ref(x: torch.Tensor, proto: torch.Tensor, ridge: float) -> torch.Tensor:
    """r_c = b_c · (X_c X_cᵀ + λ_c I)⁻¹ X_c P_c for one class, before the floor.

    Arguments:
        x: [b_c, K] the batch's features of class c.
        proto: [K] the class prototype P_c.
    Returns:
        [b_c] the least-squares coefficients times b_c.
    """
    b, k = x.shape
    trace = (x * x).sum()
    lam = ridge * trace / b if trace > 0 else torch.ones((), dtype=x.dtype)
    if b <= k:
        gram = x @ x.T + lam * torch.eye(b, dtype=x.dtype)
        coef = torch.linalg.solve(gram, x @ proto)
    else:
        gram = x.T @ x + lam * torch.eye(k, dtype=x.dtype)
        coef = x @ torch.linalg.solve(gram, proto)
    return b * coef


def density_ratios_ref(features, labels, prototypes, seen, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """One density ratio per sample, [B], in the compute dtype (docs/algorithm.md,
    "Density ratios")."""
    z = features.detach().to(torch.float64)
    protos = prototypes.detach().to(torch.float64)
    ratios = torch.ones(len(labels), dtype=torch.float64)
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten()
        if not bool(seen[c]):
            continue  # no prototype yet: r = 1
        r = density_ratio_one_class_ref(z[rows], protos[c], ridge)
        ratios[rows] = torch.clamp(r, min=RATIO_FLOOR)
    return ratios.to(compute_dtype(features.dtype))


def class_factors_ref(class_counts, reweight: str, beta: float = 0.9999) -> torch.Tensor:
    """The per-class factor that multiplies the ratio: N/n_c, CB's weight, or 1. [C] float64."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if reweight in ("rdr", "inv_freq"):
        return counts.sum() / counts
    if reweight == "cb":
        cb = torch.tensor([(1 - beta) / (1 - beta ** n) for n in counts.tolist()], dtype=torch.float64)
        return cb * len(counts) / cb.sum()
    return torch.ones_like(counts)


def sample_weights_ref(ratios, labels, class_counts, reweight: str = "rdr", temperature: float = 1.0,
                       beta: float = 0.9999, warmup: bool = False) -> torch.Tensor:
    """w_j = (r_j · factor_{y_j})^γ, normalised to batch mean 1, for a reweighting. [B]"""
    factors = class_factors_ref(class_counts, reweight, beta)
    return weights_from_factors_ref(ratios, labels, factors, weight_mode(reweight, warmup), temperature)


def weights_from_factors_ref(ratios, labels, class_factors, mode: str, temperature: float = 1.0) -> torch.Tensor:
    """w_j = (r_j · factor_{y_j})^γ, normalised to batch mean 1, for one of the op's weight
    modes: r ≡ 1 for "class_factor", w ≡ 1 for "uniform". [B] in the ratios' dtype.

    Computed in log space, in float64: log w_j = γ·log(r_j · factor), minus the largest,
    then exp and the scaling. The same weights, but (r · factor)^γ itself would overflow or
    underflow at a large γ (γ = 50 does)."""
    batch = len(labels)
    if mode == "uniform":
        return torch.ones(batch, dtype=ratios.dtype)
    log_w = torch.empty(batch, dtype=torch.float64)
    for j in range(batch):
        r = ratios[j].item() if mode == "density_ratio" else 1.0
        log_w[j] = temperature * math.log(r * float(class_factors[labels[j]]))
    weights = torch.exp(log_w - log_w.max())
    return (weights * batch / weights.sum()).to(ratios.dtype)


def update_prototypes_ref(prototypes, seen, features, labels, momentum: float = 0.9):
    """The prototype update (docs/algorithm.md, "Prototype update"), out of place:
    returns (new_prototypes, new_seen)."""
    protos = prototypes.clone()
    seen = seen.clone()
    z = features.detach().to(compute_dtype(features.dtype))
    for c in labels.unique().tolist():
        mean = z[labels == c].mean(0).to(protos.dtype)
        if bool(seen[c]):
            protos[c] = momentum * protos[c] + (1 - momentum) * mean
        else:
            protos[c] = mean
            seen[c] = True
    return protos, seen


def per_sample_loss_ref(logits, labels, base: str = "ce", class_counts=None, tau: float = 1.0,
                        focal_gamma: float = 1.0) -> torch.Tensor:
    """The base loss ℓ_j of each sample (docs/algorithm.md, "Base losses"), one sample at
    a time. [B] in the logits' compute dtype."""
    logits = logits.to(compute_dtype(logits.dtype))
    if base == "la":
        counts = torch.as_tensor(class_counts, dtype=torch.float64)
        logits = logits + tau * torch.log(counts / counts.sum()).to(logits.dtype)
    losses = []
    for j in range(len(labels)):
        log_p = F.log_softmax(logits[j], dim=0)[labels[j]]
        if base == "focal":
            losses.append(-((1 - log_p.exp()) ** focal_gamma) * log_p)
        else:
            losses.append(-log_p)
    return torch.stack(losses)


def rdr_loss_ref(features, logits, labels, prototypes, seen, class_counts, *, base="ce", reweight="rdr",
                 temperature=1.0, beta=0.9999, tau=1.0, focal_gamma=1.0, ridge=DEFAULT_RIDGE, momentum=0.9,
                 warmup=False, update=True):
    """One whole RDR step in the algorithm's order: ratios, weights, loss, prototype update.

    Returns (loss, weights, new_prototypes, new_seen); the state is unchanged when
    update is False (eval mode).
    """
    ratios = density_ratios_ref(features, labels, prototypes, seen, ridge)
    weights = sample_weights_ref(ratios, labels, class_counts, reweight, temperature, beta, warmup)
    losses = per_sample_loss_ref(logits, labels, base, class_counts, tau, focal_gamma)
    loss = (weights.to(losses.dtype) * losses).sum() / len(labels)
    if update:
        prototypes, seen = update_prototypes_ref(prototypes, seen, features, labels, momentum)
    return loss, weights, prototypes, seen



# ---- the reference behind the ops' signatures (RDR_FAST_IMPL=reference) ----------------------
def rdr_weights_and_update_ref(features, labels, prototypes, seen, class_factors, ridge: float, temperature: float,
                               momentum: float, mode: str, update: bool) -> torch.Tensor:
    """The op rdr_weights_and_update by the reference loop (CPU): weights from the current
    prototypes, then (if ``update``) the prototype update, in place."""
    check_weight_mode(mode)
    ratios = density_ratios_ref(features, labels, prototypes, seen, ridge)
    weights = weights_from_factors_ref(ratios, labels, class_factors.to(torch.float64), mode, temperature)
    if update:
        new_protos, new_seen = update_prototypes_ref(prototypes, seen, features, labels, momentum)
        prototypes.copy_(new_protos)
        seen.copy_(new_seen)
    return weights


def weighted_loss_ref(logits, labels, weights, logit_adjust, focal_gamma: float, compute_grad: bool):
    """The op weighted_loss by the reference loop (CPU): (L = Σ w ℓ / B, ∂L/∂logits by
    autograd, or an empty tensor). ``focal_gamma`` 0 is CE; LA passes τ·log π as the
    adjust.

    Inside an op's kernel autograd records nothing on the calling thread (the dispatcher
    has switched it off there), so the loss and its gradient are taken on a fresh thread.
    """
    with ThreadPoolExecutor(max_workers=1) as thread:
        return thread.submit(_loss_and_grad_ref, logits, labels, weights, logit_adjust, focal_gamma,
                             compute_grad).result()


def _loss_and_grad_ref(logits, labels, weights, logit_adjust, focal_gamma: float, compute_grad: bool):
    x = logits.detach().to(compute_dtype(logits.dtype)).requires_grad_(True)
    adjusted = x if logit_adjust is None else x + logit_adjust.to(x.dtype)
    base = "ce" if focal_gamma == 0.0 else "focal"
    losses = per_sample_loss_ref(adjusted, labels, base, focal_gamma=focal_gamma)
    loss = (weights.detach().to(x.dtype) * losses).sum() / len(labels)
    if not compute_grad:
        return loss.detach(), logits.new_empty(0)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad.to(logits.dtype)
