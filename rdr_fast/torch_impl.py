"""The portable fast path: RDR in vectorised PyTorch, with no Python loop over classes
and no host synchronisation (no `.item()`, no data-dependent shapes).

It computes exactly what `rdr_fast.reference` computes (same ridge rule, same choice
of system, same compute dtype) and is what runs wherever no compiled kernel is
available, on any device. The kernels in csrc/ and kernels/ must beat it.

How the per-class systems become one batched solve:
- Classes with b_c ≤ K use the b_c×b_c form. Their Gram blocks, masked by "same
  class", form one B×B matrix that is block-diagonal up to a permutation of the rows.
  Cholesky of such a matrix keeps its block structure exactly (no fill-in between
  blocks), so one B×B solve is every class's small solve at once.
- Classes with b_c > K (at most B // (K+1) of them, a bound known without looking at
  the data) use the K×K form, one slot each in a batched [M, K, K] solve.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .constants import RATIO_FLOOR, check_weight_mode, compute_dtype


class BatchClasses(NamedTuple):
    """Who shares a class with whom in a batch, and the state rows each sample reads;
    gathered once per step for the density ratios and the prototype update."""
    same: torch.Tensor      # [B, B] float64: 1 where y_i = y_j (block-diagonal up to a permutation)
    counts: torch.Tensor    # [B] float64: b_{y_j}
    first: torch.Tensor     # [B] int64: batch index of the first sample of y_j's class
    protos_y: torch.Tensor  # [B, K]: P_{y_j} before this step's update
    seen_y: torch.Tensor    # [B] bool: seen[y_j] before this step's update


def gather_classes(labels, protos, seen) -> BatchClasses:
    same = labels[:, None] == labels[None, :]
    first = same.to(torch.uint8).argmax(1)
    same = same.to(torch.float64)
    return BatchClasses(same, same.sum(1), first, protos[labels], seen[labels])


def _ridge(trace: torch.Tensor, count: torch.Tensor, ridge: float) -> torch.Tensor:
    """λ = ridge · trace / b, or 1 for an all-zero block (any λ > 0 gives r = 0 there)."""
    return torch.where(trace > 0, trace * ridge / count, 1.0)


def _spd_solve(system, rhs):
    """system⁻¹ · rhs for (batched) SPD systems: Cholesky without error checks (no host
    sync; the ridge keeps every system positive definite), then two triangular solves."""
    chol, _ = torch.linalg.cholesky_ex(system)
    half = torch.linalg.solve_triangular(chol, rhs, upper=False)
    return torch.linalg.solve_triangular(chol.mT, half, upper=True)


def _class_masked_gram(z, same):
    """The Gram matrix z zᵀ [B,B] kept only on same-class pairs, inside an [n, n] buffer
    with n = B rounded up to odd: the extra row and column are a decoupled identity.

    Masked by class, the Gram matrix is block-diagonal up to a permutation of the rows,
    and Cholesky keeps that structure exactly (no fill-in between blocks), so one solve
    with it is every class's b_c×b_c solve. The odd size is for MKL, whose Cholesky is
    1.5-3× slower at multiples of 64 and some other multiples of 32 (128: 121 µs, 129:
    43 µs; 224: 177 µs vs 200: 105 µs; single-threaded, on the bench machine).
    """
    batch = len(z)
    system = z.new_zeros(batch | 1, batch | 1)
    system.diagonal()[batch:].fill_(1.0)
    system[:batch, :batch] = (z @ z.T).mul_(same)
    return system


def _block_diagonal_solve(system, lam, rhs):
    """a with (X_c X_cᵀ + λ_c I) a_c = X_c P_c for every class at once. [B]

    ``system`` is _class_masked_gram's buffer, consumed. Classes with b_c > K are solved
    here too (their blocks are SPD all the same) and replaced by the K×K form afterwards.
    """
    batch = len(rhs)
    system.diagonal()[:batch].add_(lam)
    return _spd_solve(system, F.pad(rhs, (0, len(system) - batch))[:, None])[:batch, 0]


def _large_class_ratios(z, first, large, lam, protos_y):
    """b_c · z_jᵀ (X_cᵀX_c + λ_c I)⁻¹ P_c for the classes with b_c > K. [B], valid where large.

    At most M = B // (K+1) classes can be that large (a bound known without looking at
    the data), so each gets one slot of a batched [M, K, K] solve, in order of first
    appearance in the batch. The right-hand side is Σ_{i∈c} P_c = b_c·P_c, so the
    solution already carries the factor b_c.
    """
    batch, dim = z.shape
    slots = batch // (dim + 1)
    if slots == 1:  # room for one large class only: its members are the large samples
        members = large[None].to(z.dtype)
    else:
        rows = torch.arange(batch, device=z.device)
        starts = large & (first == rows)                            # first sample of each large class
        slot = (torch.cumsum(starts, 0)[first] - 1).clamp_min(0)   # its class's slot (0 where not large)
        members = ((slot == rows[:slots, None]) & large).to(z.dtype)  # [M, B]
    systems = (z.T * members[:, None, :]) @ z                       # [M, K, K]
    # λ_c is shared by the class's samples; an empty slot gets the smallest positive λ
    # (its right-hand side is 0, so its solution is 0 and it is never read).
    slot_lam = (members * lam).amax(1).clamp_min(torch.finfo(z.dtype).tiny)
    systems.diagonal(dim1=1, dim2=2).add_(slot_lam[:, None])
    u = _spd_solve(systems, (members @ protos_y)[:, :, None])[:, :, 0]  # [M, K]
    per_slot = z @ u.T                                              # [B, M]
    return per_slot[:, 0] if slots == 1 else per_slot.gather(1, slot[:, None])[:, 0]


def density_ratios_torch(features, labels, protos, seen, ridge: float) -> torch.Tensor:
    """The density ratios [B] in the compute dtype of features [B,K] (docs/algorithm.md,
    "Density ratios")."""
    return _density_ratios(features, gather_classes(labels, protos, seen), ridge)


def _density_ratios(features, classes: BatchClasses, ridge: float) -> torch.Tensor:
    """Ratios [B] in the compute dtype of features [B,K]. The systems are built and solved
    in float64 (see rdr_fast.reference: a float32 Gram matrix of near-duplicate rows
    loses up to 1e-2 of relative accuracy at ridge 1e-5)."""
    z = features.detach().to(torch.float64)
    batch, dim = z.shape
    system = _class_masked_gram(z, classes.same)
    sq_norms = system.diagonal()[:batch]               # masking keeps the diagonal
    lam = _ridge(classes.same @ sq_norms, classes.counts, ridge)  # λ_{y_j}
    protos_y = classes.protos_y.to(z.dtype)
    rhs = (z * protos_y).sum(1)                        # z_j · P_{y_j}
    ratios = classes.counts * _block_diagonal_solve(system, lam, rhs)
    if batch > dim:  # a static condition: only then can some b_c exceed K
        large = classes.counts > dim
        large_ratios = _large_class_ratios(z, classes.first, large, lam, protos_y)
        ratios = torch.where(large, large_ratios, ratios)
    ratios = torch.where(classes.seen_y, ratios.clamp_min_(RATIO_FLOOR), 1.0)
    return ratios.to(compute_dtype(features.dtype))


def sample_weights_torch(ratios, labels, class_factors, temperature: float, mode: str) -> torch.Tensor:
    """w = (r · factor_y)^γ normalised to batch mean 1; r ≡ 1 for mode "class_factor", and
    ones for "uniform" (docs/algorithm.md, "Weights").

    In log space and float64, as every backend does: log w = γ·log(r·factor), minus the
    batch max, exp, scaled to mean 1. The power itself overflows or underflows at large γ
    (γ = 50 does, even in float64); the shifted exponentials lie in (0, 1] with the largest
    exactly 1. The inputs are rounded to the compute dtype first, as the kernels do."""
    if mode == "uniform":
        return torch.ones_like(ratios)
    log_w = class_factors.to(ratios.dtype)[labels].to(torch.float64).log()
    if mode == "density_ratio":
        log_w = log_w + ratios.to(torch.float64).log()
    log_w = log_w * temperature
    weights = torch.exp(log_w - log_w.max())
    return (weights / weights.mean()).to(ratios.dtype)  # w · B / Σ w


def update_prototypes_torch_(protos, seen, z, labels, classes: BatchClasses, momentum: float) -> None:
    """The prototype update (docs/algorithm.md, "Prototype update"), in place on protos
    [C,K] and seen [C]; touches only present classes.

    Class means are accumulated per *batch slot* (the first batch index of each class),
    so the scratch memory is [B, K] whatever C is (C may be 100 000).
    """
    sums = torch.zeros_like(z).index_add_(0, classes.first, z)
    mean_y = sums[classes.first] / classes.counts.to(z.dtype)[:, None]
    blended = torch.lerp(mean_y, classes.protos_y.to(z.dtype), momentum)  # m·P + (1−m)·mean
    new_y = torch.where(classes.seen_y[:, None], blended, mean_y)
    protos.index_put_((labels,), new_y.to(protos.dtype))
    seen.index_fill_(0, labels, True)


def class_sums(z, labels, num_classes: int) -> torch.Tensor:
    """[C, K+1]: per-class feature sums, then the per-class count in the last column
    (one buffer, so a distributed run all-reduces it in one call)."""
    sums = torch.zeros(num_classes, z.shape[1] + 1, dtype=z.dtype, device=z.device)
    return sums.index_add_(0, labels, torch.cat([z, torch.ones_like(z[:, :1])], dim=1))


def update_prototypes_from_sums_(protos, seen, sums_and_counts, momentum: float) -> None:
    """The prototype update from per-class sums and counts ([C, K+1], e.g. all-reduced
    over ranks), in place; classes with count 0 keep their prototype."""
    counts = sums_and_counts[:, -1]
    present = counts > 0
    mean = sums_and_counts[:, :-1] / counts.clamp_min(1)[:, None]
    old = protos.to(mean.dtype)
    blended = torch.where(seen[:, None], momentum * old + (1 - momentum) * mean, mean)
    protos.copy_(torch.where(present[:, None], blended, old).to(protos.dtype))
    seen.logical_or_(present)


def rdr_weights_and_update_torch(features, labels, prototypes, seen, class_factors, ridge: float,
                                 temperature: float, momentum: float, mode: str, update: bool) -> torch.Tensor:
    """The op rdr_weights_and_update: weights from the current prototypes, then the
    in-place update. ``mode`` is one of rdr_fast.constants.WEIGHT_MODES."""
    check_weight_mode(mode)
    dtype = compute_dtype(features.dtype)
    z = features.detach().to(dtype)
    classes = gather_classes(labels, prototypes, seen)
    if mode == "density_ratio":
        ratios = _density_ratios(features, classes, ridge)
    else:
        ratios = torch.ones(len(labels), dtype=dtype, device=z.device)
    weights = sample_weights_torch(ratios, labels, class_factors, temperature, mode)
    if update:
        update_prototypes_torch_(prototypes, seen, z, labels, classes, momentum)
    return weights


def weighted_loss_torch(logits, labels, weights, logit_adjust, focal_gamma: float,
                        compute_grad: bool):
    """The op weighted_loss: the loss and its gradient in one pass over the logits.

    ℓ_j = −(1−p_j)^γ log p_j with p_j = softmax(logits_j + adjust)_{y_j} (γ = 0 is CE,
    LA passes τ·log π as adjust). Returns (L = Σ w ℓ / B, ∂L/∂logits or an empty tensor).
    """
    log_probs, log_pt = _adjusted_log_probs(logits.detach(), labels, logit_adjust)
    w = weights.detach().to(log_probs.dtype) / len(labels)
    if focal_gamma == 0.0:
        per_sample, dloss_dlogpt = -log_pt, -torch.ones_like(log_pt)
    else:
        per_sample, dloss_dlogpt = _focal_terms(log_pt, focal_gamma)
    loss = (w * per_sample).sum()
    if not compute_grad:
        return loss, logits.new_empty(0)
    # ∂ log p_y / ∂x_k = 1[k = y] − softmax_k
    grad = -torch.exp(log_probs)
    grad.scatter_add_(1, labels[:, None], torch.ones_like(log_pt)[:, None])
    grad.mul_((w * dloss_dlogpt)[:, None])
    return loss, grad.to(logits.dtype)


def weighted_losses_differentiable(logits, labels, weights, logit_adjust, focal_gamma: float):
    """w_j ℓ_j per sample [B], with differentiable torch ops on the logits as given."""
    _, log_pt = _adjusted_log_probs(logits, labels, logit_adjust)
    per_sample = -log_pt if focal_gamma == 0.0 else _focal_terms(log_pt, focal_gamma)[0]
    return weights.detach().to(log_pt.dtype) * per_sample


def weighted_loss_grad_differentiable(logits, labels, weights, logit_adjust, focal_gamma: float):
    """∂L/∂logits of the op weighted_loss, written with out-of-place, differentiable torch ops
    on the logits as given (not detached): the gradient the op's backward returns when
    autograd is asked for a graph (create_graph=True), so that it can be differentiated
    again (Hessian-vector products). The weights are constants, as in training."""
    log_probs, log_pt = _adjusted_log_probs(logits, labels, logit_adjust)
    dloss_dlogpt = -torch.ones_like(log_pt) if focal_gamma == 0.0 else _focal_terms(log_pt, focal_gamma)[1]
    coefficient = weights.detach().to(log_pt.dtype) / len(labels) * dloss_dlogpt
    one_hot = F.one_hot(labels, log_probs.shape[1]).to(log_pt.dtype)
    return ((one_hot - torch.exp(log_probs)) * coefficient[:, None]).to(logits.dtype)


def _adjusted_log_probs(logits, labels, logit_adjust):
    """(log softmax of logits + adjust, its entry at each label), in the compute dtype;
    differentiable in ``logits`` unless the caller detached them."""
    x = logits.to(compute_dtype(logits.dtype))
    if logit_adjust is not None:
        x = x + logit_adjust.to(x.dtype)
    log_probs = torch.log_softmax(x, dim=1)
    return log_probs, log_probs.gather(1, labels[:, None])[:, 0]


def _focal_terms(log_pt, gamma: float):
    """ℓ = −(1−p)^γ log p and dℓ/dlog p = γ(1−p)^{γ−1} p log p − (1−p)^γ."""
    p = torch.exp(log_pt)
    one_minus = (1 - p).clamp_min(0)
    modulator = one_minus.pow(gamma)
    # (1−p)^{γ−1} · log p → 0 as p → 1; guard the 0 · inf that γ < 1 would give there.
    safe = torch.where(one_minus > 0, one_minus, torch.ones_like(one_minus))
    slope = torch.where(one_minus > 0, gamma * safe.pow(gamma - 1) * p * log_pt, torch.zeros_like(p))
    return -modulator * log_pt, slope - modulator


def data_ok_torch(labels, num_classes: int, values, limits, labelled_rows) -> bool:
    """The op data_ok: every label in [0, num_classes), every |x| of values[i] within
    limits[i] (capped at the dtype's largest finite value, so NaN and ±Inf fail), and the
    rows of ``labelled_rows`` [C, K] that the labels name finite. One host read."""
    ok = ((labels >= 0) & (labels < num_classes)).all()
    for value, limit in zip(values, limits):
        ok = ok & (value.abs() <= min(limit, torch.finfo(value.dtype).max)).all()
    if labelled_rows is not None:
        rows = labelled_rows.index_select(0, labels.clamp(0, num_classes - 1).to(torch.int64))
        ok = ok & torch.isfinite(rows).all()
    return bool(ok)
