"""``looksam``: LookSAM, a full SAM step every k steps and its direction reused in between."""
from __future__ import annotations

import torch

from ._foreach import global_norm, serial_on_cpu
from .batchnorm import frozen_bn_stats
from .sam_k import SAMEveryK


class LookSAM(SAMEveryK):
    """``looksam`` ("Towards Efficient and Scalable Sharpness-Aware Minimization",
    arXiv:2203.02714; global norms as in MarlonBecker/MSAM's LookSAM).

    Every k-th step (0, k, 2k, ...): g = ∇L(w), g_s = ∇L(w + ρg/‖g‖), store
    ĝ_v = g_v/‖g_v‖ with g_v = g_s − (⟨g_s, g⟩/‖g‖²)·g, update with g_s. Other steps: one
    pass, update with g + α·‖g‖·ĝ_v. Cost 1 + 1/k F+B on average; the other steps add one
    norm and three foreach ops. ⟨g_s, g⟩ is (‖g_s + g‖² − ‖g_s − g‖²)/4 (foreach norms, no
    per-tensor reductions); ĝ_v is saved in ``state_dict``.
    """

    def __init__(self, params, base_optimizer=torch.optim.SGD, *, k: int = 5, alpha: float = 0.7, **kwargs):
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha!r}")
        super().__init__(params, base_optimizer, k=k, **kwargs)
        self.alpha = float(alpha)
        self._direction: dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def _refresh_direction(self, params, grads, v, g_norm) -> None:
        """v holds g, ``grads`` g_s: v ← unit(g_s − ⟨g_s, g⟩/‖g‖²·g)."""
        scratch = self._buffers(params, self._backup)   # free again after the restore
        with serial_on_cpu(params):
            torch._foreach_copy_(scratch, v)
            torch._foreach_add_(scratch, grads)
            plus = global_norm(scratch)                       # ‖g + g_s‖
            torch._foreach_copy_(scratch, v)
            torch._foreach_sub_(scratch, grads)
            minus = global_norm(scratch)                      # ‖g − g_s‖
            coef = (plus * plus - minus * minus) / (4 * (g_norm * g_norm + self.eps))
            torch._foreach_mul_(v, -coef)
            torch._foreach_add_(v, grads)
            torch._foreach_div_(v, global_norm(v) + self.eps)

    def step(self, closure=None):
        sam_now = self.is_sam_step()
        self.sam_steps += 1
        params, grads = self._params_with_grad()
        v = self._buffers(params, self._direction)
        if sam_now:
            if closure is None:
                raise ValueError("LookSAM.step needs a closure on every k-th step")
            with serial_on_cpu(params):
                torch._foreach_copy_(v, grads)                # keep g (e is built in .grad)
                g_norm = global_norm(grads)
            self.first_step(zero_grad=True)
            with torch.enable_grad(), frozen_bn_stats(self.model, self.freeze_bn):
                loss = closure()
            self.restore()
            g_sam = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            self._refresh_direction(params, g_sam, v, g_norm)
            self.base_optimizer.step()
            return loss
        with torch.no_grad(), serial_on_cpu(params):
            scratch = self._buffers(params, self._backup)
            torch._foreach_copy_(scratch, v)
            torch._foreach_mul_(scratch, self.alpha * global_norm(grads))
            torch._foreach_add_(grads, scratch)                # g + α‖g‖ĝ_v
        self.base_optimizer.step()
        return None

    def first_pass_only_perturbs(self) -> bool:
        return False   # g also builds the stored direction ĝ_v, which must agree across ranks

    def _extra_state(self) -> dict:
        direction = [self._direction.get(p) for p in self._all_params()]
        return {**super()._extra_state(), "direction": direction}

    def _load_extra_state(self, state: dict) -> None:
        super()._load_extra_state(state)
        self._direction = {p: d.to(p.device, p.dtype).clone() for p, d in
                           zip(self._all_params(), state["direction"]) if d is not None}
