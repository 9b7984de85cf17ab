"""SAM and ASAM: the two-pass core of the SAM family."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ._criterion import first_pass_weights, second_pass
from ._foreach import global_norm, serial_on_cpu
from .batchnorm import frozen_bn_stats
from .wrapper import OptimizerWrapper


class SAM(OptimizerWrapper):
    """Exact SAM ("Sharpness-Aware Minimization for Efficiently Improving Generalization",
    arXiv:2010.01412), or ASAM ("ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks", arXiv:2102.11600) with ``adaptive=True``.

    Step: g = ∇L(w); e = ρ·g/(‖g‖ + 1e-12) (ASAM: e = ρ·T²g/(‖T g‖ + 1e-12) with
    T = |w| + η on parameters named "*weight*" and T = 1 on the others, the official
    SamsungLabs/ASAM code; without ``model`` T applies to every tensor); w ← w + e; g_SAM =
    ∇L(w + e) with BatchNorm statistics frozen; w ← saved w (bit-exact); base step with
    g_SAM (weight decay and momentum at w).

    Arguments:
        params, base_optimizer: see :class:`~rdr_fast.sam.wrapper.OptimizerWrapper`.
        rho: ρ ≥ 0. adaptive: ASAM. eta: ASAM's η.
        model: used to freeze BatchNorm in the second pass and to name ASAM's weights.
        freeze_bn: freeze BatchNorm running statistics in the second pass.

    ``step(closure)`` is davda54/sam's API: after your first forward/backward, ``closure``
    recomputes the loss and calls backward at w + e. ``step_batch`` does both passes.
    """

    eps = 1e-12

    def __init__(self, params, base_optimizer=torch.optim.SGD, *, rho: float = 0.05,
                 adaptive: bool = False, eta: float = 0.01, model: nn.Module | None = None,
                 freeze_bn: bool = True, **kwargs):
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta!r}")
        super().__init__(params, base_optimizer, rho, **kwargs)
        self.adaptive, self.eta = bool(adaptive), float(eta)
        self.model, self.freeze_bn = model, bool(freeze_bn)
        named = dict(model.named_parameters()) if model is not None else {}
        self._scaled_ids = {id(p) for n, p in named.items() if "weight" in n} if named else None
        self._backup: dict[torch.Tensor, torch.Tensor] = {}
        self._perturbed: tuple[list, list] | None = None

    def _params_with_grad(self):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        return params, [p.grad for p in params]

    def _buffers(self, params, store):
        """One persistent param-sized buffer per parameter, from ``store``."""
        missing = [p for p in params if p not in store]
        for p in missing:
            store[p] = torch.empty_like(p, memory_format=torch.preserve_format)
        return [store[p] for p in params]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        """w ← w + e(w) from the current ``.grad``, saving w. ``.grad`` holds e afterwards,
        or is set to None when ``zero_grad`` so that the second backward writes fresh
        gradients (accumulating into zeroed ones costs an extra add per parameter; on the
        bench CPU that made the second pass ~4 % slower than the first)."""
        params, grads = self._params_with_grad()
        if not params:
            raise RuntimeError("SAM.first_step: no parameter has a gradient; call backward first")
        backup = self._buffers(params, self._backup)
        with serial_on_cpu(params):
            if self.adaptive:
                scaled = [i for i, p in enumerate(params) if self._scaled_ids is None or id(p) in self._scaled_ids]
                t, sg = [backup[i] for i in scaled], [grads[i] for i in scaled]
                torch._foreach_copy_(t, [params[i] for i in scaled])   # backup is scratch for T
                torch._foreach_abs_(t)
                torch._foreach_add_(t, self.eta)                        # T = |w| + η
                torch._foreach_mul_(sg, t)                              # T g
            scale = self.rho / (global_norm(grads) + self.eps)
            if self.adaptive:
                torch._foreach_mul_(sg, t)                              # T² g
            torch._foreach_mul_(grads, scale)                           # e, in .grad
            torch._foreach_copy_(backup, params)
            torch._foreach_add_(params, grads)                          # w + e
        if zero_grad:
            self.zero_grad(set_to_none=True)
        self._perturbed = (params, backup)

    @torch.no_grad()
    def restore(self) -> None:
        """w ← the w saved by ``first_step``, bit for bit."""
        if self._perturbed is None:
            raise RuntimeError("restore() without a preceding first_step()")
        params, backup = self._perturbed
        with serial_on_cpu(params):
            torch._foreach_copy_(params, backup)
        self._perturbed = None

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w, then the base optimizer's step with the gradient now in ``.grad``."""
        self.restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def _sam_step(self, closure):
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure that recomputes the loss "
                             "and calls backward (the second pass)")
        self.first_step(zero_grad=True)
        with torch.enable_grad(), frozen_bn_stats(self.model, self.freeze_bn):
            loss = closure()
        self.second_step()
        return loss

    def step(self, closure=None):
        """The SAM update from the gradient already in ``.grad`` (first pass done by the
        caller); ``closure`` runs the second pass. Returns the closure's loss."""
        self.sam_steps += 1
        return self._sam_step(closure)

    def step_batch(self, forward, criterion, inputs, targets, first_pass_local=None) -> torch.Tensor:
        """Both passes on one batch; a reweighting criterion's weights (and its prototype
        update) come from the first pass only. ``first_pass_local`` is used only when the
        first-pass gradient builds nothing but the perturbation."""
        self.zero_grad(set_to_none=True)
        local = first_pass_local if first_pass_local and self.first_pass_only_perturbs() else contextlib.nullcontext
        with local():
            features, logits = forward(inputs)
            loss = criterion(features, logits, targets)     # weights + prototype update, once
            weights = first_pass_weights(criterion)
            loss.backward()

        self.step(second_pass(forward, criterion, inputs, targets, weights))
        return loss.detach()

    def first_pass_only_perturbs(self) -> bool:
        """True when this step's first-pass gradient is used for the perturbation alone
        (then it may stay per rank under DDP); variants that reuse it in the update say no."""
        return True

    def __repr__(self) -> str:
        extra = f"rho={self.rho}, adaptive={self.adaptive}, freeze_bn={self.freeze_bn}"
        return f"{type(self).__name__}({extra}, base={self.base_optimizer!r})"
