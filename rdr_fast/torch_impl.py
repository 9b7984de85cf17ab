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

import torch

RATIO_FLOOR = 1e-9  # SPEC §2: r ← max(r, 1e-9)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; fp32, bf16 and fp16 are computed in float32 (SPEC §2)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ridge(trace: torch.Tensor, count: torch.Tensor, ridge: float) -> torch.Tensor:
    """λ = ridge · trace / b, or 1 for an all-zero block (any λ > 0 gives r = 0 there)."""
    lam = ridge * trace / count.clamp_min(1)
    return torch.where(trace > 0, lam, torch.ones_like(lam))


def _spd_solve(system, rhs):
    """system⁻¹ · rhs for (batched) SPD systems: Cholesky without error checks (no host
    sync; the ridge keeps every system positive definite), then two triangular solves."""
    chol, _ = torch.linalg.cholesky_ex(system)
    half = torch.linalg.solve_triangular(chol, rhs, upper=False)
    return torch.linalg.solve_triangular(chol.mT, half, upper=True)


def _small_class_coefficients(gram, same, small, lam, rhs):
    """(X_c X_cᵀ + λ_c I)⁻¹ X_c P_c for every class with b_c ≤ K, as one B×B solve. [B]"""
    block = same & small[:, None]
    system = torch.where(block, gram, torch.zeros_like(gram))
    system.diagonal().add_(torch.where(small, lam, torch.ones_like(lam)))
    rhs = torch.where(small, rhs, torch.zeros_like(rhs))
    return _spd_solve(system, rhs[:, None])[:, 0]


def _large_class_ratios(z, labels, num_classes, large, sq_norms, protos_y, ridge):
    """b_c · X_c (X_cᵀX_c + λ_c I)⁻¹ P_c for the classes with b_c > K. [B], valid where large."""
    batch, dim = z.shape
    slots = batch // (dim + 1)
    is_large_class = torch.zeros(num_classes, dtype=torch.bool, device=z.device)
    is_large_class[labels] = large
    slot_of_class = torch.cumsum(is_large_class.long(), 0) - 1
    slot = slot_of_class[labels].clamp(0, slots - 1)
    members = (slot[None, :] == torch.arange(slots, device=z.device)[:, None]) & large[None, :]
    members = members.to(z.dtype)                                   # [M, B]
    counts = members.sum(1)                                         # b_c per slot
    systems = (members[:, :, None] * z[None]).transpose(1, 2) @ z  # [M, K, K]
    lam = _ridge(members @ sq_norms, counts, ridge)
    systems.diagonal(dim1=1, dim2=2).add_(lam[:, None])
    slot_protos = (members @ protos_y) / counts.clamp_min(1)[:, None]  # P_c of each slot
    u = _spd_solve(systems, slot_protos[:, :, None])[:, :, 0]  # [M, K]
    return counts[slot] * (z * u[slot]).sum(1)


def density_ratios_torch(features, labels, protos, seen, ridge: float) -> torch.Tensor:
    """SPEC §2 step 1: ratios [B] in the compute dtype of features [B,K].

    The systems are built and solved in float64 (see rdr_fast.reference: a float32 Gram
    matrix of near-duplicate rows loses up to 1e-2 of relative accuracy at ridge 1e-5).
    """
    z = features.detach().to(torch.float64)
    protos = protos.to(torch.float64)
    batch, dim = z.shape
    same = labels[:, None] == labels[None, :]
    counts = same.sum(1).to(z.dtype)                   # b_{y_j}
    gram = z @ z.T
    sq_norms = gram.diagonal()
    lam = _ridge(same.to(z.dtype) @ sq_norms, counts, ridge)
    protos_y = protos[labels]
    rhs = (z * protos_y).sum(1)                        # z_j · P_{y_j}
    small = counts <= dim
    ratios = counts * _small_class_coefficients(gram, same, small, lam, rhs)
    if batch > dim:  # a static condition: only then can some b_c exceed K
        large = _large_class_ratios(z, labels, len(protos), ~small, sq_norms, protos_y, ridge)
        ratios = torch.where(small, ratios, large)
    ratios = ratios.clamp_min(RATIO_FLOOR)
    ratios = torch.where(seen[labels], ratios, torch.ones_like(ratios))
    return ratios.to(compute_dtype(features.dtype))


def sample_weights_torch(ratios, labels, class_factors, temperature: float, use_ratios: bool,
                         uniform: bool) -> torch.Tensor:
    """SPEC §2 step 2: w = (r · factor_y)^γ normalised to batch mean 1; ones if uniform."""
    if uniform:
        return torch.ones_like(ratios)
    weights = class_factors.to(ratios.dtype)[labels]
    if use_ratios:
        weights = weights * ratios
    if temperature != 1.0:
        weights = weights.pow(temperature)
    return weights * (len(labels) / weights.sum())


def update_prototypes_torch_(protos, seen, z, labels, momentum: float) -> None:
    """SPEC §2 step 4, in place on protos [C,K] and seen [C]; touches only present classes.

    Class means are accumulated per *batch slot* (the first batch index of each class),
    so the scratch memory is [B, K] whatever C is (C may be 100 000).
    """
    same = labels[:, None] == labels[None, :]
    slot = same.to(torch.uint8).argmax(1)               # first sample of y_j's class
    sums = torch.zeros_like(z).index_add_(0, slot, z)
    counts = same.sum(1, keepdim=True).to(z.dtype)
    mean_y = sums[slot] / counts
    old_y = protos[labels].to(z.dtype)
    new_y = torch.where(seen[labels, None], momentum * old_y + (1 - momentum) * mean_y, mean_y)
    protos.index_put_((labels,), new_y.to(protos.dtype))
    seen.index_fill_(0, labels, True)


def class_sums(z, labels, num_classes: int) -> torch.Tensor:
    """[C, K+1]: per-class feature sums, then the per-class count in the last column
    (one buffer, so a distributed run all-reduces it in one call)."""
    sums = torch.zeros(num_classes, z.shape[1] + 1, dtype=z.dtype, device=z.device)
    return sums.index_add_(0, labels, torch.cat([z, torch.ones_like(z[:, :1])], dim=1))


def update_prototypes_from_sums_(protos, seen, sums_and_counts, momentum: float) -> None:
    """SPEC §2 step 4 from per-class sums and counts ([C, K+1], e.g. all-reduced over
    ranks), in place; classes with count 0 keep their prototype."""
    counts = sums_and_counts[:, -1]
    present = counts > 0
    mean = sums_and_counts[:, :-1] / counts.clamp_min(1)[:, None]
    old = protos.to(mean.dtype)
    blended = torch.where(seen[:, None], momentum * old + (1 - momentum) * mean, mean)
    protos.copy_(torch.where(present[:, None], blended, old).to(protos.dtype))
    seen.logical_or_(present)


def rdr_weights_and_update_torch(features, labels, prototypes, seen, class_factors, ridge: float,
                                 temperature: float, momentum: float, use_ratios: bool,
                                 uniform: bool, update: bool) -> torch.Tensor:
    """Steps 1, 2 and 4: weights from the current prototypes, then the in-place update."""
    dtype = compute_dtype(features.dtype)
    z = features.detach().to(dtype)
    if use_ratios and not uniform:
        ratios = density_ratios_torch(features, labels, prototypes, seen, ridge)
    else:
        ratios = torch.ones(len(labels), dtype=dtype, device=z.device)
    weights = sample_weights_torch(ratios, labels, class_factors, temperature, use_ratios, uniform)
    if update:
        update_prototypes_torch_(prototypes, seen, z, labels, momentum)
    return weights


def weighted_loss_torch(logits, labels, weights, logit_adjust, focal_gamma: float,
                        compute_grad: bool):
    """Step 3 forward and its gradient in one pass over the logits.

    ℓ_j = −(1−p_j)^γ log p_j with p_j = softmax(logits_j + adjust)_{y_j} (γ = 0 is CE,
    LA passes τ·log π as adjust). Returns (L = Σ w ℓ / B, ∂L/∂logits or an empty tensor).
    """
    dtype = compute_dtype(logits.dtype)
    x = logits.detach().to(dtype)
    if logit_adjust is not None:
        x = x + logit_adjust.to(dtype)
    log_probs = torch.log_softmax(x, dim=1)
    log_pt = log_probs.gather(1, labels[:, None])[:, 0]
    w = weights.detach().to(dtype) / len(labels)
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


def _focal_terms(log_pt, gamma: float):
    """ℓ = −(1−p)^γ log p and dℓ/dlog p = γ(1−p)^{γ−1} p log p − (1−p)^γ."""
    p = torch.exp(log_pt)
    one_minus = (1 - p).clamp_min(0)
    modulator = one_minus.pow(gamma)
    # (1−p)^{γ−1} · log p → 0 as p → 1; guard the 0 · inf that γ < 1 would give there.
    safe = torch.where(one_minus > 0, one_minus, torch.ones_like(one_minus))
    slope = torch.where(one_minus > 0, gamma * safe.pow(gamma - 1) * p * log_pt, torch.zeros_like(p))
    return -modulator * log_pt, slope - modulator
