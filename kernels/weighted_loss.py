"""Triton kernel for ``rdr_fast::weighted_loss`` (docs/algorithm.md, "Base losses"): the
weighted loss and its gradient with respect to the logits in one kernel.

One program per sample row. Pass 1 walks the row in chunks of BLOCK_C with an online
log-sum-exp (running max and rescaled sum), so a 100 000-class row never has to fit in
registers; pass 2 re-reads the row (from L2 for any realistic row) and writes
∂L/∂logits = (w/B) · dℓ/dlog p_y · (onehot(y) − softmax). When the row fits in one chunk
both passes read the same cached chunk. Each program writes its weighted loss w·ℓ/B to a
[B] buffer that the launcher sums (deterministic, no atomics).

ℓ = −(1 − p_y)^γ log p_y with p_y = softmax(logits + adjust)_y: γ = 0 is CE, and LA
passes adjust = τ·log π. Numerics: float64 logits are computed in float64, every other
dtype in float32, like the PyTorch path; the gradient is stored in the logits'
dtype.
"""
from __future__ import annotations

import torch

from ._utils import HAS_TRITON, chosen_block_sizes, launchable, next_power_of_2, on_device

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._utils import _ADD, _MAX

    @triton.jit
    def _weighted_loss_kernel(logits_ptr, logits_stride, labels_ptr, weights_ptr, adjust_ptr, loss_ptr,
                              grad_ptr, grad_stride, B, C, focal_gamma: tl.float64,
                              HAS_ADJUST: tl.constexpr, FOCAL: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                              DTYPE: tl.constexpr, BLOCK_C: tl.constexpr):
        """Loss and gradient of one row.

        Pointers: logits_ptr [B, C] (row stride logits_stride, unit column stride);
            labels_ptr [B] int64; weights_ptr [B]; adjust_ptr [C] logit adjustment (read only
            if HAS_ADJUST); loss_ptr [B] out, w_j ℓ_j / B in DTYPE; grad_ptr [B, C] out (row
            stride grad_stride), written only if COMPUTE_GRAD, in its own dtype.
        Scalars: B, C; focal_gamma γ (float64; used only if FOCAL).
        Constexprs: HAS_ADJUST (LA), FOCAL (γ ≠ 0), COMPUTE_GRAD, DTYPE (tl.float32 or
            tl.float64, the compute dtype), BLOCK_C (chunk of the class dimension).
        """
        row = tl.program_id(0).to(tl.int64)
        x_row = logits_ptr + row * logits_stride
        cols = tl.arange(0, BLOCK_C)
        label = tl.load(labels_ptr + row)
        # 1. Online log-sum-exp over the chunks; the first chunk seeds the running max.
        x = tl.load(x_row + cols, mask=cols < C, other=float("-inf")).to(DTYPE)
        if HAS_ADJUST:
            x += tl.load(adjust_ptr + cols, mask=cols < C, other=0.0).to(DTYPE)
        # While every logit so far is −inf the running max is −inf, and x − max would be
        # −inf − (−inf) = NaN: shift by 0 then (the sum stays 0 until a finite logit comes).
        run_max = tl.reduce(x, 0, _MAX)
        shift = tl.where(run_max == float("-inf"), 0.0, run_max)
        run_sum = tl.reduce(tl.exp(x - shift), 0, _ADD)
        for c0 in range(BLOCK_C, C, BLOCK_C):
            x = tl.load(x_row + c0 + cols, mask=c0 + cols < C, other=float("-inf")).to(DTYPE)
            if HAS_ADJUST:
                x += tl.load(adjust_ptr + c0 + cols, mask=c0 + cols < C, other=0.0).to(DTYPE)
            new_max = tl.maximum(run_max, tl.reduce(x, 0, _MAX))
            new_shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(shift - new_shift) + tl.reduce(tl.exp(x - new_shift), 0, _ADD)
            run_max, shift = new_max, new_shift
        lse = run_max + tl.log(run_sum)
        # 2. log p_y and the per-sample loss; slope = dℓ/dlog p_y.
        x_y = tl.load(x_row + label).to(DTYPE)
        if HAS_ADJUST:
            x_y += tl.load(adjust_ptr + label).to(DTYPE)
        log_p = x_y - lse
        scale = tl.load(weights_ptr + row).to(DTYPE) / B
        if FOCAL:
            # ℓ = −(1−p)^γ log p; dℓ/dlog p = γ(1−p)^{γ−1} p log p − (1−p)^γ. Where 1 − p = 0
            # both powers are taken as 0 (γ > 0), which also avoids 0 · inf for γ < 1.
            gamma = (focal_gamma + tl.full((1,), 0.0, tl.float64)).to(DTYPE)
            p = tl.exp(log_p)
            one_minus = tl.maximum(1.0 - p, 0.0)
            positive = one_minus > 0
            log_om = tl.log(tl.where(positive, one_minus, 1.0))
            modulator = tl.where(positive, tl.exp(gamma * log_om), 0.0)
            slope = tl.where(positive, gamma * tl.exp((gamma - 1.0) * log_om) * p * log_p, 0.0)
            loss = tl.reduce(-modulator * log_p, 0, _ADD)
            slope = tl.reduce(slope - modulator, 0, _ADD)
        else:
            loss = -log_p
            slope = -1.0
        tl.store(loss_ptr + row, (scale * loss).to(DTYPE))
        if COMPUTE_GRAD:
            # 3. ∂L/∂x_k = (w/B) · slope · (1[k = y] − softmax_k), chunk by chunk.
            coef = scale * slope
            g_row = grad_ptr + row * grad_stride
            for c0 in range(0, C, BLOCK_C):
                x = tl.load(x_row + c0 + cols, mask=c0 + cols < C, other=0.0).to(DTYPE)
                if HAS_ADJUST:
                    x += tl.load(adjust_ptr + c0 + cols, mask=c0 + cols < C, other=0.0).to(DTYPE)
                onehot = tl.where(c0 + cols == label, 1.0, 0.0)
                grad = coef * (onehot - tl.exp(x - lse))
                tl.store(g_row + c0 + cols, grad.to(grad_ptr.dtype.element_ty), mask=c0 + cols < C)


def _block_c(num_classes: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_C, num_warps): the whole row up to 4096 classes, else 4096-wide chunks (256 under
    the interpreter, so that its tests cover several chunks cheaply)."""
    cap = 256 if device.type == "cpu" else 4096
    block = min(cap, next_power_of_2(max(num_classes, 16)))
    warps = 1 if device.type == "cpu" else (4 if block <= 1024 else 8)
    return block, warps


def weighted_loss_triton(logits, labels, weights, logit_adjust, focal_gamma: float, compute_grad: bool, *,
                         block_sizes: tuple[int, int] | None = None):
    """The op ``rdr_fast::weighted_loss``: the weighted loss and its gradient.

    Arguments:
        logits: [B, C] floating. labels: [B] int64. weights: [B] (treated as constants).
        logit_adjust: [C] or None, added to the logits (LA's τ·log π).
        focal_gamma: γ of the focal loss; 0 gives CE.
        compute_grad: also return ∂L/∂logits.
        block_sizes: (BLOCK_C, num_warps); None: ``_block_c``'s choice for C and the device.
    Returns:
        (L = Σ_j w_j ℓ_j / B as a 0-d tensor in the compute dtype, ∂L/∂logits [B, C] in the
        logits' dtype, or an empty tensor when not ``compute_grad``).
    """
    batch, num_classes = logits.shape
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    device = logits.device
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    labels, weights = labels.contiguous(), weights.detach().contiguous()
    if logit_adjust is not None:
        logit_adjust = logit_adjust.contiguous()
    grad = torch.empty((batch, num_classes) if compute_grad else (0,), dtype=logits.dtype, device=device)
    if batch == 0:
        return torch.zeros((), dtype=dtype, device=device), grad
    row_loss = torch.empty(batch, dtype=dtype, device=device)
    adjust = logit_adjust if logit_adjust is not None else row_loss  # any pointer; not read
    block, warps = chosen_block_sizes(block_sizes, _block_c(num_classes, device))
    with on_device(device):
        launchable(_weighted_loss_kernel, device)[(batch,)](
            logits.detach(), logits.stride(0), labels, weights, adjust, row_loss, grad,
            grad.stride(0) if compute_grad else 0, batch, num_classes, float(focal_gamma),
            HAS_ADJUST=logit_adjust is not None, FOCAL=float(focal_gamma) != 0.0, COMPUTE_GRAD=bool(compute_grad),
            DTYPE=tl.float64 if dtype == torch.float64 else tl.float32, BLOCK_C=block, num_warps=warps)
    return row_loss.sum(), grad
