"""Triton kernels for ``rdr_fast::rdr_weights_and_update``: density ratios, weights and the
prototype update (docs/algorithm.md, "Density ratios", "Weights", "Prototype update").

Launch sequence, with no host synchronisation (nothing reads a tensor value on the host):

1. Grouping, with torch ops in the launcher: a stable sort of the labels gives each class
   a contiguous segment of the sorted batch; ``searchsorted`` over the running segment id
   gives the segment starts. The number of segments stays on the device: the grid is the
   static bound ``min(B, C)`` and programs past the last segment exit at once.
2. ``_rdr_segment_kernel``, one program per segment (= per class present in the batch):
   the class's ridge system solved by a blocked Cholesky inside the program, the
   log-weights ``γ·log(r·factor)`` written at the samples' original positions, then
   the momentum update of the class's prototype row and ``seen`` flag, in place. Classes
   own disjoint prototype rows, so no two programs touch the same state.
3. ``_normalize_kernel``, one program: weights ← exp(log w − max) scaled to batch mean 1.
   The power is taken in log space (on every backend): (r·factor)^γ itself overflows or
   underflows float64 at a large γ (γ = 50 does); the shifted exponentials do not.

Memory: the float64 sorted features [B, K], a float64 workspace [B, min(B, K)] for the
Cholesky factors (row i of a segment's factor lives in the workspace row of the segment's
i-th sample: a factor has min(b_c, K) ≤ b_c rows of min(b_c, K) ≤ min(B, K) columns), and
vectors of length B. Nothing grows with C beyond the prototype table.

Numerics (decision): the systems are built and solved in float64, like the reference and
the PyTorch path. With ridge 1e-5 they are ill-conditioned by design (condition number up
to about b_c/ridge on duplicate rows), and a float32 Gram matrix then loses up to 1e-2 of
relative accuracy, beyond the tests' float32 tolerance (1e-4) against the float64
reference. Float64 ``tl.dot`` runs on the H100/H200's float64 tensor cores (DMMA), and
the systems are small, so the cost is acceptable. Weights and prototypes are computed in
float64 too and rounded once when stored.
"""
from __future__ import annotations

import torch

from ..constants import check_weight_mode
from ._utils import HAS_TRITON, chosen_block_sizes, launchable, next_power_of_2, on_device

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._utils import _ADD, _MAX

    @triton.jit
    def _rdr_segment_kernel(seg_ptr, order_ptr, slabel_ptr, z_ptr, proto_ptr, proto_stride0, proto_stride1,
                            seen_ptr, seen_stride, factor_ptr, w_ptr, ws_ptr, y_ptr, a_ptr, K, LD,
                            ridge: tl.float64, temperature: tl.float64, momentum: tl.float64,
                            SOLVE: tl.constexpr, WEIGHTS: tl.constexpr, UPDATE: tl.constexpr,
                            POW: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr):
        """Ratios, log-weights and the prototype update of one class (one segment).

        Pointers (B samples, C classes, K features, G = min(B, C) programs):
            seg_ptr: [G+1] int64, start of each segment in sorted order; B past the last one.
            order_ptr: [B] int64, original index of each sorted sample.
            slabel_ptr: [B] int64, sorted labels.
            z_ptr: [B, K] float64, features in sorted order, contiguous.
            proto_ptr: [C, K] prototypes (any float dtype) with strides proto_stride0/1;
                read (old P_c), then overwritten in place when UPDATE.
            seen_ptr: [C] uint8 (a view of the bool flags, stride seen_stride); set to 1
                when UPDATE.
            factor_ptr: [C] float64 class factors (N/n_c, CB's, or 1).
            w_ptr: [B] float64 out, log-weights γ·log(r·factor) in original order.
            ws_ptr: [B, LD] float64 workspace for the Cholesky factor, LD = min(B, K).
            y_ptr, a_ptr: [B] float64 workspaces for L⁻¹v and the solution (two buffers, so
                that no step overwrites what it reads).
        Scalars: seen_stride, K, LD; ridge (λ_c = ridge·‖X_c‖²/b_c, 1 when that is 0),
            temperature γ, momentum μ (the last three float64).
        Constexprs:
            SOLVE: compute density ratios (mode "density_ratio"); else r ≡ 1.
            WEIGHTS: write weights at all (False for mode "uniform": update only).
            UPDATE: momentum-update the prototype and set seen.
            POW: γ ≠ 1 (multiply the log-weights by the temperature).
            BS: block size of the Cholesky (rows/columns of a register tile), ≥ 16.
            BK: chunk of the inner (summed) dimension, ≥ 16.

        The system: A is X_c (b×K, the b_c ≤ K form) or X_cᵀ (K×b, the b_c > K form), both
        read from z_ptr by swapping strides, so that G = A Aᵀ + λI is m×m with
        m = min(b, K); the right-hand side is v = A P_c (first form) or P_c (second).
        """
        pid = tl.program_id(0)
        start = tl.load(seg_ptr + pid)
        end = tl.load(seg_ptr + pid + 1)
        if start < end:
            b = end - start
            c = tl.load(slabel_ptr + start)
            seen = tl.load(seen_ptr + c * seen_stride) != 0
            ri = tl.arange(0, BS)
            ci = tl.arange(0, BS)
            rk = tl.arange(0, BK)
            diag = ri[:, None] == ci[None, :]
            zseg = z_ptr + start * K
            lseg = ws_ptr + start * LD
            yseg = y_ptr + start
            aseg = a_ptr + start
            proto_row = proto_ptr + c * proto_stride0
            solve = seen & (SOLVE != 0)
            if WEIGHTS:
                if solve:
                    # 1. λ = ridge · trace(X Xᵀ) / b, and 1 for an all-zero block.
                    sq = tl.full((BS, BK), 0.0, tl.float64)
                    for i0 in range(0, b, BS):
                        rows = i0 + ri
                        for k0 in range(0, K, BK):
                            cols = k0 + rk
                            x = tl.load(zseg + rows[:, None] * K + cols[None, :],
                                        mask=(rows[:, None] < b) & (cols[None, :] < K), other=0.0)
                            sq += x * x
                    trace = tl.reduce(tl.reduce(sq, 1, _ADD), 0, _ADD)
                    lam = tl.where(trace > 0, ridge * trace / b, 1.0)
                    # A[i, k] = z[i*sa0 + k*sa1]: X_c when b ≤ K, X_cᵀ when b > K.
                    trans = b > K
                    m = tl.minimum(b, K)
                    n = tl.maximum(b, K)
                    sa0 = tl.where(trans, 1, K)
                    sa1 = tl.where(trans, K, 1)
                    nb = (m + BS - 1) // BS
                    # 2. Left-looking blocked Cholesky G = L Lᵀ in the workspace, each diagonal
                    #    block stored as its inverse (L_JJ itself is never needed again).
                    for jb in range(0, nb):
                        rj = jb * BS + ri
                        cj = jb * BS + ci
                        # 2a. diagonal block S = A_J A_Jᵀ − Σ_P L_JP L_JPᵀ + λI
                        s = tl.full((BS, BS), 0.0, tl.float64)
                        for k0 in range(0, n, BK):
                            kk = k0 + rk
                            a_j = tl.load(zseg + rj[:, None] * sa0 + kk[None, :] * sa1,
                                          mask=(rj[:, None] < m) & (kk[None, :] < n), other=0.0)
                            s += tl.dot(a_j, tl.trans(a_j))
                        for pb in range(0, jb):
                            pc = pb * BS + ci
                            l_jp = tl.load(lseg + rj[:, None] * LD + pc[None, :],
                                           mask=(rj[:, None] < m) & (pc[None, :] < m), other=0.0)
                            s -= tl.dot(l_jp, tl.trans(l_jp))
                        # padded rows/columns (≥ m) are zero: make them the identity
                        s = tl.where(diag, s + tl.where(rj < m, lam, 1.0)[:, None], s)
                        # 2b. in registers, one column per step: the Cholesky factor of S and,
                        #     by the same elimination applied to I, its inverse W = L_JJ⁻¹.
                        w_jj = tl.where(diag, 1.0, 0.0).to(tl.float64)
                        for j in range(0, BS):
                            col = tl.reduce(tl.where(ci[None, :] == j, s, 0.0), 1, _ADD)
                            d = tl.sqrt(tl.reduce(tl.where(ri == j, col, 0.0), 0, _ADD))
                            lcol = tl.where(ri > j, col / d, 0.0)  # L[i, j] for i > j
                            s -= lcol[:, None] * lcol[None, :]
                            xrow = tl.reduce(tl.where(ri[:, None] == j, w_jj, 0.0), 0, _ADD) / d
                            w_jj = tl.where(ri[:, None] == j, xrow[None, :], w_jj - lcol[:, None] * xrow[None, :])
                        tl.store(lseg + rj[:, None] * LD + cj[None, :], w_jj,
                                 mask=(rj[:, None] < m) & (cj[None, :] < m))
                        # 2c. panel below: L_IJ = (A_I A_Jᵀ − Σ_P L_IP L_JPᵀ) L_JJ⁻ᵀ
                        for ib in range(jb + 1, nb):
                            r_i = ib * BS + ri
                            t = tl.full((BS, BS), 0.0, tl.float64)
                            for k0 in range(0, n, BK):
                                kk = k0 + rk
                                a_i = tl.load(zseg + r_i[:, None] * sa0 + kk[None, :] * sa1,
                                              mask=(r_i[:, None] < m) & (kk[None, :] < n), other=0.0)
                                a_j = tl.load(zseg + rj[:, None] * sa0 + kk[None, :] * sa1,
                                              mask=(rj[:, None] < m) & (kk[None, :] < n), other=0.0)
                                t += tl.dot(a_i, tl.trans(a_j))
                            for pb in range(0, jb):
                                pc = pb * BS + ci
                                l_ip = tl.load(lseg + r_i[:, None] * LD + pc[None, :],
                                               mask=(r_i[:, None] < m) & (pc[None, :] < m), other=0.0)
                                l_jp = tl.load(lseg + rj[:, None] * LD + pc[None, :],
                                               mask=(rj[:, None] < m) & (pc[None, :] < m), other=0.0)
                                t -= tl.dot(l_ip, tl.trans(l_jp))
                            tl.store(lseg + r_i[:, None] * LD + cj[None, :], tl.dot(t, tl.trans(w_jj)),
                                     mask=(r_i[:, None] < m) & (cj[None, :] < m))
                        tl.debug_barrier()  # later block columns read this one
                    # 3. Forward substitution L y = v, block by block: y_J = L_JJ⁻¹ (v_J − Σ_P L_JP y_P).
                    for jb in range(0, nb):
                        rj = jb * BS + ri
                        cj = jb * BS + ci
                        if trans:
                            v = tl.load(proto_row + rj * proto_stride1, mask=rj < m, other=0.0).to(tl.float64)
                        else:
                            v = tl.full((BS,), 0.0, tl.float64)
                            for k0 in range(0, n, BK):
                                kk = k0 + rk
                                a_j = tl.load(zseg + rj[:, None] * K + kk[None, :],
                                              mask=(rj[:, None] < m) & (kk[None, :] < n), other=0.0)
                                p = tl.load(proto_row + kk * proto_stride1, mask=kk < n, other=0.0)
                                v += tl.reduce(a_j * p.to(tl.float64)[None, :], 1, _ADD)
                        for pb in range(0, jb):
                            pc = pb * BS + ci
                            l_jp = tl.load(lseg + rj[:, None] * LD + pc[None, :],
                                           mask=(rj[:, None] < m) & (pc[None, :] < m), other=0.0)
                            y_p = tl.load(yseg + pc, mask=pc < m, other=0.0)
                            v -= tl.reduce(l_jp * y_p[None, :], 1, _ADD)
                        w_jj = tl.load(lseg + rj[:, None] * LD + cj[None, :],
                                       mask=(rj[:, None] < m) & (cj[None, :] < m), other=0.0)
                        tl.store(yseg + rj, tl.reduce(w_jj * v[None, :], 1, _ADD), mask=rj < m)
                        tl.debug_barrier()
                    # 4. Back substitution Lᵀ a = y, last block first:
                    #    a_J = L_JJ⁻ᵀ (y_J − Σ_{P>J} L_PJᵀ a_P).
                    for tb in range(0, nb):
                        jb = nb - 1 - tb
                        cj = jb * BS + ci
                        g = tl.load(yseg + cj, mask=cj < m, other=0.0)
                        for pb in range(jb + 1, nb):
                            pr = pb * BS + ri
                            l_pj = tl.load(lseg + pr[:, None] * LD + cj[None, :],
                                           mask=(pr[:, None] < m) & (cj[None, :] < m), other=0.0)
                            a_p = tl.load(aseg + pr, mask=pr < m, other=0.0)
                            g -= tl.reduce(l_pj * a_p[:, None], 0, _ADD)
                        rj = jb * BS + ri
                        w_jj = tl.load(lseg + rj[:, None] * LD + cj[None, :],
                                       mask=(rj[:, None] < m) & (cj[None, :] < m), other=0.0)
                        tl.store(aseg + cj, tl.reduce(w_jj * g[:, None], 0, _ADD), mask=cj < m)
                        tl.debug_barrier()
                    # 5. Ratios r = b·a (first form) or b·X u (second form), stored in w_ptr.
                    for i0 in range(0, b, BS):
                        rows = i0 + ri
                        if trans:
                            r = tl.full((BS,), 0.0, tl.float64)
                            for k0 in range(0, K, BK):
                                cols = k0 + rk
                                x = tl.load(zseg + rows[:, None] * K + cols[None, :],
                                            mask=(rows[:, None] < b) & (cols[None, :] < K), other=0.0)
                                u = tl.load(aseg + cols, mask=cols < K, other=0.0)
                                r += tl.reduce(x * u[None, :], 1, _ADD)
                        else:
                            r = tl.load(aseg + rows, mask=rows < b, other=0.0)
                        idx = tl.load(order_ptr + start + rows, mask=rows < b, other=0)
                        tl.store(w_ptr + idx, r * b, mask=rows < b)
                else:
                    for i0 in range(0, b, BS):
                        rows = i0 + ri
                        idx = tl.load(order_ptr + start + rows, mask=rows < b, other=0)
                        tl.store(w_ptr + idx, tl.full((BS,), 1.0, tl.float64), mask=rows < b)
                tl.debug_barrier()
                # 6. log w = γ·log(max(r, floor) · factor), in place (each thread rereads its own stores).
                factor = tl.load(factor_ptr + c)
                for i0 in range(0, b, BS):
                    rows = i0 + ri
                    idx = tl.load(order_ptr + start + rows, mask=rows < b, other=0)
                    # RATIO_FLOOR of rdr_fast/constants.py, repeated (a kernel cannot read a Python
                    # global); a bare 1e-9 would be a float32 constant in Triton
                    floor = tl.full((BS,), 1e-9, tl.float64)
                    w = tl.log(tl.maximum(tl.load(w_ptr + idx, mask=rows < b, other=1.0), floor) * factor)
                    if POW:
                        w = temperature * w
                    tl.store(w_ptr + idx, w, mask=rows < b)
            if UPDATE:
                # 7. P_c ← μ P_c + (1 − μ) mean(X_c) if seen, else mean(X_c); seen ← 1.
                tl.debug_barrier()  # every read of the old P_c above is done
                for k0 in range(0, K, BK):
                    cols = k0 + rk
                    total = tl.full((BK,), 0.0, tl.float64)
                    for i0 in range(0, b, BS):
                        rows = i0 + ri
                        x = tl.load(zseg + rows[:, None] * K + cols[None, :],
                                    mask=(rows[:, None] < b) & (cols[None, :] < K), other=0.0)
                        total += tl.reduce(x, 0, _ADD)
                    mean = total / b
                    old = tl.load(proto_row + cols * proto_stride1, mask=cols < K, other=0.0).to(tl.float64)
                    new = tl.where(seen, momentum * old + (1.0 - momentum) * mean, mean)
                    tl.store(proto_row + cols * proto_stride1, new.to(proto_ptr.dtype.element_ty), mask=cols < K)
                tl.store(seen_ptr + c * seen_stride, 1)

    @triton.jit
    def _normalize_kernel(w_ptr, out_ptr, B, BLOCK: tl.constexpr):
        """out = exp(l − max l) · B / Σ exp(l − max l) (batch mean 1), one program.

        w_ptr: [B] float64 log-weights l; out_ptr: [B] weights in the compute dtype.
        BLOCK: chunk of the batch per step.
        """
        offs = tl.arange(0, BLOCK)
        peak = tl.full((BLOCK,), float("-inf"), tl.float64)
        for i0 in range(0, B, BLOCK):
            peak = tl.maximum(peak, tl.load(w_ptr + i0 + offs, mask=i0 + offs < B, other=float("-inf")))
        top = tl.reduce(peak, 0, _MAX)
        total = tl.full((BLOCK,), 0.0, tl.float64)
        for i0 in range(0, B, BLOCK):
            log_w = tl.load(w_ptr + i0 + offs, mask=i0 + offs < B, other=float("-inf"))
            total += tl.exp(log_w - top)
        scale = B / tl.reduce(total, 0, _ADD)
        for i0 in range(0, B, BLOCK):
            log_w = tl.load(w_ptr + i0 + offs, mask=i0 + offs < B, other=float("-inf"))
            tl.store(out_ptr + i0 + offs, (tl.exp(log_w - top) * scale).to(out_ptr.dtype.element_ty),
                     mask=i0 + offs < B)


def _segments(labels: torch.Tensor, programs: int):
    """Sorted order, sorted labels and segment starts [programs+1] (B past the last)."""
    sorted_labels, order = torch.sort(labels, stable=True)
    is_new = torch.ones_like(sorted_labels, dtype=torch.bool)
    is_new[1:] = sorted_labels[1:] != sorted_labels[:-1]
    segment = torch.cumsum(is_new, 0)  # 1-based segment id of each sorted sample
    starts = torch.searchsorted(segment, torch.arange(1, programs + 2, device=labels.device))
    return order, sorted_labels, starts


def _block_sizes(device: torch.device) -> tuple[int, int, int]:
    """(BS, BK, num_warps). BS = 16 everywhere: most classes of a long-tailed batch have
    b_c ≤ 16, so one register tile covers them, and the sequential steps of a diagonal block
    are BS. On a GPU, BK = 32 and 4 warps compile for sm_90 without spills (254 registers);
    not yet tuned on a device (bench/gpu_suite.py times alternatives through the launcher's
    ``block_sizes``)."""
    return (16, 16, 1) if device.type == "cpu" else (16, 32, 4)


def rdr_weights_and_update_triton(features, labels, prototypes, seen, class_factors, ridge: float,
                                  temperature: float, momentum: float, mode: str, update: bool, *,
                                  block_sizes: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The op ``rdr_fast::rdr_weights_and_update``: density ratios, weights and the prototype
    update (docs/algorithm.md, "Density ratios", "Weights", "Prototype update").

    Arguments:
        features: [B, K] floating (any dtype; upcast to float64 inside).
        labels: [B] int64 in [0, C).
        prototypes: [C, K] floating, updated in place when ``update``.
        seen: [C] bool, updated in place when ``update``.
        class_factors: [C] the per-class factor (N/n_c, CB's, or 1).
        mode: "density_ratio", "class_factor" (r ≡ 1) or "uniform" (w ≡ 1); see
            rdr_fast.constants.WEIGHT_MODES.
        block_sizes: (BS, BK, num_warps) of the segment kernel; None: ``_block_sizes``'s
            choice for the device.
    Returns:
        weights [B] in the compute dtype (float64 for float64 features, else float32),
        batch mean 1; ones when ``mode`` is "uniform".
    """
    check_weight_mode(mode)
    uniform = mode == "uniform"
    batch, dim = features.shape
    out_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    device = features.device
    if batch == 0 or (uniform and not update):
        return torch.ones(batch, dtype=out_dtype, device=device)
    programs = min(batch, prototypes.shape[0])
    order, sorted_labels, starts = _segments(labels, programs)
    z = features.detach().index_select(0, order).to(torch.float64).contiguous()
    log_weights = torch.empty(batch, dtype=torch.float64, device=device)
    ld = min(batch, dim)
    solve = mode == "density_ratio"
    workspace = torch.empty((batch, ld) if solve else (1, 1), dtype=torch.float64, device=device)
    vec = torch.empty(2, batch if solve else 1, dtype=torch.float64, device=device)
    factors = class_factors.to(device=device, dtype=torch.float64).contiguous()
    seen_u8 = seen.view(torch.uint8)
    bs, bk, warps = chosen_block_sizes(block_sizes, _block_sizes(device))
    with on_device(device):
        launchable(_rdr_segment_kernel, device)[(programs,)](
            starts, order, sorted_labels, z, prototypes, prototypes.stride(0), prototypes.stride(1), seen_u8,
            seen_u8.stride(0), factors, log_weights, workspace, vec[0], vec[1], dim, ld, float(ridge),
            float(temperature), float(momentum),
            SOLVE=solve, WEIGHTS=not uniform, UPDATE=bool(update), POW=float(temperature) != 1.0, BS=bs, BK=bk,
            num_warps=warps)
    if uniform:
        return torch.ones(batch, dtype=out_dtype, device=device)
    weights = torch.empty(batch, dtype=out_dtype, device=device)
    block = min(1024, next_power_of_2(batch))
    with on_device(device):
        launchable(_normalize_kernel, device)[(1,)](log_weights, weights, batch, BLOCK=block,
                                                   num_warps=4 if device.type != "cpu" else 1)
    return weights
