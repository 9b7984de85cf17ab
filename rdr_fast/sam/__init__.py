"""Sharpness-aware minimisation for rdr_fast (SPEC §4): SAM / ASAM, ImbSAM, CC-SAM,
RDR + SAM (paper Algorithm 2) and two cheaper variants, as optimizer wrappers.

    optimizer = sam.make_optimizer("sam", model, class_counts, lr=0.1, momentum=0.9,
                                   weight_decay=2e-4, rho=0.05)
    scheduler = CosineAnnealingLR(optimizer, T_max=epochs)   # attaches to the wrapper
    for x, y in loader:
        loss = sam.train_step(optimizer, model, criterion, x, y)   # one call per batch

``train_step`` also takes a plain optimizer (one pass), so a training loop has one path.
Every wrapper shares ``param_groups`` with its ``base_optimizer`` (schedulers see one set
of groups) and ``state_dict()`` holds the base optimizer's state (momentum buffers) plus
the wrapper's own (step counter, LookSAM's direction), so checkpoints resume exactly.

What one step costs (F+B = one forward and backward of the model) and keeps:

| name    | passes per step         | extra memory (param-sized) | reuses                          |
|---------|-------------------------|----------------------------|---------------------------------|
| sam     | 2 F+B                   | 1 (w, to restore exactly)  | —                               |
| asam    | 2 F+B                   | 1 (also scratch for T_w)   | —                               |
| imbsam  | 2 F + 3 B               | 2 (w, head gradient g_H)   | the first forward for both      |
|         |                         |                            | head and tail backward          |
| ccsam   | 1 F+B + B×B products    | 0                          | the backbone features: only the |
|         |                         |                            | classifier is perturbed         |
| sam_k   | 1 + 1/k F+B (mean)      | 1                          | nothing: k−1 of k steps are SGD |
| looksam | 1 + 1/k F+B (mean)      | 2 (w / scratch, ĝ_v)       | ĝ_v, the unit component of the  |
|         |                         |                            | SAM gradient orthogonal to g,   |
|         |                         |                            | from the last full SAM step     |

The perturbation, the global gradient norm and the restore are ``torch._foreach_*``
calls over the parameter list (one fused launch each on CUDA; no per-parameter Python
work beyond collecting ``.grad``); the norm is one ``_foreach_norm`` plus one
reduction, with no host synchronisation. ``e`` is built in place in ``.grad``, which is
then released (set to None) so the second backward writes fresh gradients instead of
accumulating into zeros; the only buffer is the copy of w that the restore copies back
bit for bit. On the CPU this elementwise work runs on one thread
(:func:`serial_on_cpu`): a few MB, where per-tensor OpenMP regions cost more than the work.

With RDR (``criterion`` an :class:`~rdr_fast.RDRLoss`): the criterion runs once, on the
first (unperturbed) pass: it computes the weights from the current prototypes and
updates the prototypes (``step`` +1). The second pass reuses exactly those weights,
``criterion.last_weights`` saved after the first pass, in :func:`reused_loss` — calling
the criterion again (even in eval mode) would recompute the weights from features at
the perturbed point. Weight decay and momentum act at the unperturbed point: the base
optimizer steps after the restore. BatchNorm running statistics are frozen during the
second pass by default (``freeze_bn``), the clean SAM of davda54/sam; the long-tail
codebases (ImbSAM, CC-SAM, DDC) update them in both passes (``freeze_bn=False``).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..distributed import average_
from ..losses import RDRLoss

VARIANTS = ("none", "sam", "asam", "imbsam", "ccsam", "sam_k", "looksam")
# Default ρ per variant: SAM's CIFAR value; ASAM's official CIFAR-10 value; for ccsam ρ is
# the official `noise_ratio` (shipped as 1e-6, which makes the perturbation vanish).
DEFAULT_RHO = {"sam": 0.05, "asam": 0.5, "imbsam": 0.05, "ccsam": 0.05, "sam_k": 0.05, "looksam": 0.05}


# ----------------------------------------------------------------------------- helpers

def disable_running_stats(model: nn.Module) -> None:
    """Stop every BatchNorm of ``model`` from updating its running statistics (it still
    normalises with batch statistics in train mode). Unlike davda54's momentum = 0 trick,
    this also leaves ``num_batches_tracked`` alone and works with ``momentum=None``."""
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            m.track_running_stats = False
            m._sam_frozen = True


def enable_running_stats(model: nn.Module) -> None:
    """Undo :func:`disable_running_stats`."""
    for m in model.modules():
        if getattr(m, "_sam_frozen", False):
            m.track_running_stats = True
            del m._sam_frozen


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module | None, enabled: bool = True):
    """Context in which ``model``'s BatchNorm running statistics do not change."""
    if model is None or not enabled:
        yield
        return
    disable_running_stats(model)
    try:
        yield
    finally:
        enable_running_stats(model)


@contextlib.contextmanager
def serial_on_cpu(tensors):
    """Run the enclosed foreach work on one thread when ``tensors`` live on the CPU.

    SAM's elementwise work is a few MB; with 2+ intra-op threads every tensor above the
    32768-element grain opens an OpenMP region, and on a busy machine each region waits
    for a descheduled worker (measured on 2 shared cores: 50–200 ms per ResNet-32 SAM step
    instead of ~1.5 ms). One thread does the same work in about a millisecond."""
    if not tensors or tensors[0].device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def global_norm(tensors) -> torch.Tensor:
    """‖concat(tensors)‖₂ as a 0-d tensor: one ``_foreach_norm`` and one reduction, no sync."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


def first_pass_weights(criterion):
    """The weights the criterion's last (first-pass) call used, or None for a criterion
    without state (its second-pass loss is then just a second call)."""
    return criterion.last_weights if isinstance(criterion, RDRLoss) else None


def reused_loss(criterion, features, logits, targets, weights) -> torch.Tensor:
    """The second-pass loss L = (1/B) Σ w_j ℓ_j(logits) with the *given* weights (RDR+SAM,
    paper Algorithm 2): the RDRLoss's base loss (ce / focal / la) through the fused op,
    no density ratios and no prototype update. ``weights`` None: ``criterion(...)``."""
    if weights is None:
        return criterion(features, logits, targets)
    return criterion.loss_from_weights(logits, targets, weights)


def _autocast_forward(forward, amp: bool):
    """forward(x) -> (features, logits), under bf16 autocast when ``amp`` (then cast back to
    float32); without amp the model's own dtype is kept (float64 tests)."""
    def run(x):
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
            features, logits = forward(x)
        return (features.float(), logits.float()) if amp else (features, logits)
    return run


def second_pass(forward, criterion, inputs, targets, weights):
    """The closure of the perturbed pass: forward at w + e, the loss with the first pass's
    weights (reused_loss), backward; returns that loss."""
    def run():
        features, logits = forward(inputs)
        loss = reused_loss(criterion, features, logits, targets, weights)
        loss.backward()
        return loss
    return run


def rdr_first_pass(optimizer, forward, criterion, inputs, targets):
    """The unperturbed pass of ImbSAM / CC-SAM: (features, logits, loss, weights), with the
    RDR weights and the prototype update computed once, here."""
    if not isinstance(criterion, RDRLoss):
        raise TypeError(f"{type(optimizer).__name__}.step_batch needs an RDRLoss criterion "
                        "(reweight='none' for plain CE)")
    features, logits = forward(inputs)
    loss = criterion(features, logits, targets)
    return features, logits, loss, criterion.last_weights


def train_step(optimizer, forward, criterion, inputs, targets, amp: bool = False) -> torch.Tensor:
    """One training step on a batch with any optimizer; returns the loss at the unperturbed
    weights (detached). A SAM-family wrapper runs its own passes; any other optimizer
    gets forward → criterion → zero_grad → backward → step.

    Arguments:
        forward: callable x -> (features [B, K], logits [B, C]) (a model, maybe compiled).
        criterion: an RDRLoss, or any callable (features, logits, targets) -> loss.
        amp: bf16 autocast for the forward passes.
    """
    run = _autocast_forward(forward, amp)
    if isinstance(optimizer, SAM):
        # Under DDP the first (ascent) pass may skip the gradient all-reduce (m-sharpness:
        # each rank perturbs with its own gradient); only the second pass is averaged.
        local = forward.no_sync if isinstance(forward, nn.parallel.DistributedDataParallel) else None
        return optimizer.step_batch(run, criterion, inputs, targets, first_pass_local=local)
    features, logits = run(inputs)
    loss = criterion(features, logits, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


# ----------------------------------------------------------------------------- SAM / ASAM

class SAM(torch.optim.Optimizer):
    """Exact SAM (Foret et al. 2021), or ASAM (Kwon et al. 2021) with ``adaptive=True``.

    Step: g = ∇L(w); e = ρ·g/(‖g‖ + 1e-12) (ASAM: e = ρ·T²g/(‖T g‖ + 1e-12) with
    T = |w| + η on parameters named "*weight*" and T = 1 on the others, the official
    SamsungLabs code; without ``model`` T applies to every tensor); w ← w + e; g_SAM =
    ∇L(w + e) with BatchNorm statistics frozen; w ← saved w (bit-exact); base step with
    g_SAM (weight decay and momentum at w).

    Arguments:
        params: parameters or groups; None when ``base_optimizer`` is an instance.
        base_optimizer: an optimizer class (built on the same groups with ``**kwargs``) or
            an optimizer instance to wrap.
        rho: ρ ≥ 0. adaptive: ASAM. eta: ASAM's η.
        model: used to freeze BatchNorm in the second pass and to name ASAM's weights.
        freeze_bn: freeze BatchNorm running statistics in the second pass.

    ``step(closure)`` is davda54's API: after your first forward/backward, ``closure``
    recomputes the loss and calls backward at w + e. ``step_batch`` does both passes.
    """

    eps = 1e-12

    def __init__(self, params, base_optimizer=torch.optim.SGD, *, rho: float = 0.05,
                 adaptive: bool = False, eta: float = 0.01, model: nn.Module | None = None,
                 freeze_bn: bool = True, **kwargs):
        if not (isinstance(rho, (int, float)) and rho >= 0):
            raise ValueError(f"rho must be a number >= 0, got {rho!r}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta!r}")
        if isinstance(base_optimizer, torch.optim.Optimizer):
            if params is not None or kwargs:
                raise ValueError("pass params=None and no optimizer kwargs when wrapping an optimizer instance")
            super().__init__(base_optimizer.param_groups, dict(base_optimizer.defaults))
            self.base_optimizer = base_optimizer
        else:
            super().__init__(params, dict(kwargs))
            self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.rho, self.adaptive, self.eta = float(rho), bool(adaptive), float(eta)
        self.model, self.freeze_bn = model, bool(freeze_bn)
        named = dict(model.named_parameters()) if model is not None else {}
        self._scaled_ids = {id(p) for n, p in named.items() if "weight" in n} if named else None
        self._backup: dict[torch.Tensor, torch.Tensor] = {}
        self._perturbed: tuple[list, list] | None = None
        self.sam_steps = 0  # steps taken, for the every-k variants

    # --- the fused two-step ---------------------------------------------------------

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
        """Both passes on one batch (RDR+SAM per Algorithm 2 when ``criterion`` is an
        RDRLoss); returns the first-pass loss, detached. ``first_pass_local``: a context
        manager (DDP's ``no_sync``) under which the first pass's gradient stays per rank,
        used only when that gradient builds nothing but the perturbation."""
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

    # --- state --------------------------------------------------------------------------

    def _all_params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _extra_state(self) -> dict:
        return {"sam_steps": self.sam_steps}

    def _load_extra_state(self, state: dict) -> None:
        self.sam_steps = int(state["sam_steps"])

    def state_dict(self) -> dict:
        """{"base": the base optimizer's state_dict (momentum buffers, groups), "sam": the
        wrapper's own state}."""
        return {"base": self.base_optimizer.state_dict(), "sam": self._extra_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != {"base", "sam"}:
            raise ValueError(f"{type(self).__name__}.load_state_dict expects the {{'base', 'sam'}} dict its "
                             "state_dict() returns (is this a plain optimizer's state?)")
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups   # load replaced the group dicts
        self._load_extra_state(state_dict["sam"])

    def __repr__(self) -> str:
        extra = f"rho={self.rho}, adaptive={self.adaptive}, freeze_bn={self.freeze_bn}"
        return f"{type(self).__name__}({extra}, base={self.base_optimizer!r})"


# ----------------------------------------------------------------------------- cheaper variants

class SAMEveryK(SAM):
    """``sam_k``: a full SAM step on steps 0, k, 2k, ... and a plain base step otherwise
    (Composer's "interval", phase shifted to the first step of each cycle). Cost per step
    1 + 1/k F+B on average; between SAM steps nothing is reused."""

    def __init__(self, params, base_optimizer=torch.optim.SGD, *, k: int = 5, **kwargs):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        super().__init__(params, base_optimizer, **kwargs)
        self.k = k

    def is_sam_step(self) -> bool:
        """Whether the next step is a full SAM step (needs the second pass)."""
        return self.sam_steps % self.k == 0

    def first_pass_only_perturbs(self) -> bool:
        return self.is_sam_step()   # a plain step's gradient is the update itself

    def step(self, closure=None):
        sam_now = self.is_sam_step()
        self.sam_steps += 1
        if sam_now:
            return self._sam_step(closure)
        self.base_optimizer.step()
        return None


class LookSAM(SAMEveryK):
    """``looksam`` (Liu et al. 2022; global norms as in MarlonBecker/MSAM's LookSAM).

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


# ----------------------------------------------------------------------------- ImbSAM

class ImbSAM(SAM):
    """ImbSAM (Zhou et al. ICCV 2023, official cool-xuan/Imbalanced_SAM step): SAM on the
    tail classes' loss only, plain gradient for the head.

    Tail T = {c : n_c < tail_threshold} (official ``eta`` = 20). With per-sample losses ℓ
    (RDR-weighted when the criterion reweights): L_H = Σ_{head} w ℓ / B, backward (graph
    kept), g_H saved; L_T = 2·Σ_{tail} w ℓ / B (the official factor 2), backward;
    e = ρ·g_T/(‖g_T‖ + 1e-16); L_T at w + e, backward; restore; grad ← ∇L_T(w+e) + g_H;
    base step. A batch without tail samples has e = 0: an SGD step on L_H. Cost 2 F + 3 B.
    """

    eps = 1e-16

    def __init__(self, params, base_optimizer=torch.optim.SGD, *, class_counts, tail_threshold: float = 20,
                 **kwargs):
        super().__init__(params, base_optimizer, **kwargs)
        counts = torch.as_tensor(class_counts)
        self.tail_threshold = tail_threshold
        self.register_tail(counts < tail_threshold)
        self._head_grad: dict[torch.Tensor, torch.Tensor] = {}

    def register_tail(self, is_tail: torch.Tensor) -> None:
        """Set the tail classes from a [C] bool mask."""
        self.is_tail = is_tail.to(torch.bool)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        self.restore()
        params, grads = self._params_with_grad()
        with serial_on_cpu(params):
            torch._foreach_add_(grads, self._buffers(params, self._head_grad))   # + g_H
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step_batch(self, forward, criterion, inputs, targets, first_pass_local=None) -> torch.Tensor:
        """Under DDP (``first_pass_local`` is its no_sync) the first pass and both of its
        backward passes run unsynchronised — DDP's hooks fire once per forward — and the
        head gradient, which enters the update, is then averaged over ranks in one
        all-reduce; the tail gradient only builds the perturbation and stays per rank,
        like SAM's first pass."""
        self.zero_grad(set_to_none=True)
        with (first_pass_local or contextlib.nullcontext)():
            features, logits, loss, weights = rdr_first_pass(self, forward, criterion, inputs, targets)
            tail = self.is_tail.to(targets.device)[targets]
            head_w = torch.where(tail, torch.zeros_like(weights), weights)
            tail_w = torch.where(tail, 2 * weights, torch.zeros_like(weights))
            reused_loss(criterion, features, logits, targets, head_w).backward(retain_graph=True)
            with torch.no_grad():
                params, grads = self._params_with_grad()
                head = self._buffers(params, self._head_grad)
                with serial_on_cpu(params):
                    torch._foreach_copy_(head, grads)
            self.zero_grad(set_to_none=True)                  # the tail backward writes fresh grads
            reused_loss(criterion, features, logits, targets, tail_w).backward()
        if first_pass_local is not None:
            average_(head)

        self.step(second_pass(forward, criterion, inputs, targets, tail_w))
        return loss.detach()


# ----------------------------------------------------------------------------- CC-SAM

class CCSAM(SAM):
    """CC-SAM stage 1 (Zhou et al. CVPR 2023, official zzpustc/CC-SAM ``train``): each class
    c in the batch perturbs only the classifier (W, b), by its own radius, and scores its
    own samples with the perturbed classifier; one forward and one backward.

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
    """

    def __init__(self, params, base_optimizer=torch.optim.SGD, *, classifier: nn.Linear, class_counts,
                 flat_ratio: float = 0.5, **kwargs):
        if not isinstance(classifier, nn.Linear):
            raise TypeError(f"classifier must be an nn.Linear, got {type(classifier).__name__}")
        if not 0.0 <= flat_ratio <= 1.0:
            raise ValueError(f"flat_ratio must be in [0, 1], got {flat_ratio!r}")
        super().__init__(params, base_optimizer, **kwargs)
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
        # first_pass_local is ignored: CC-SAM has a single backward.
        self.zero_grad(set_to_none=True)
        features, logits, loss, weights = rdr_first_pass(self, forward, criterion, inputs, targets)
        # ∂L/∂logits_j = (w_j/B)·∂ℓ_j/∂logits_j, so B times it is d_j.
        logit_grads = torch.autograd.grad(loss, logits, retain_graph=True)[0] * logits.shape[0]
        shifted = logits + self.perturbation(features, logit_grads, targets)
        flat = reused_loss(criterion, features, shifted, targets, weights)
        ((1 - self.flat_ratio) * loss + self.flat_ratio * flat).backward()
        self.step()
        return loss.detach()


# ----------------------------------------------------------------------------- factory

def make_optimizer(name: str, model: nn.Module, class_counts=None, *, lr: float, momentum: float = 0.9,
                   weight_decay: float = 0.0, rho: float | None = None, k: int = 5, alpha: float = 0.7,
                   tail_threshold: float = 20, flat_ratio: float = 0.5, freeze_bn: bool = True,
                   eta: float = 0.01) -> torch.optim.Optimizer:
    """SGD (``name="none"``) or the SAM variant ``name`` (one of VARIANTS) over
    ``model.parameters()``, with SGD(lr, momentum, weight_decay) as the base optimizer.
    ``rho`` None takes DEFAULT_RHO[name]; k / alpha: sam_k and looksam; tail_threshold:
    imbsam; flat_ratio: ccsam (classifier ``model.fc``); class_counts: imbsam, ccsam."""
    if name not in VARIANTS:
        raise ValueError(f"sam variant must be one of {VARIANTS}, got {name!r}")
    sgd = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "none":
        return torch.optim.SGD(model.parameters(), **sgd)
    if name in ("imbsam", "ccsam") and class_counts is None:
        raise ValueError(f"{name} needs class_counts")
    common = dict(rho=DEFAULT_RHO[name] if rho is None else rho, model=model, freeze_bn=freeze_bn, **sgd)
    params = model.parameters()
    if name in ("sam", "asam"):
        return SAM(params, torch.optim.SGD, adaptive=name == "asam", eta=eta, **common)
    if name == "sam_k":
        return SAMEveryK(params, torch.optim.SGD, k=k, **common)
    if name == "looksam":
        return LookSAM(params, torch.optim.SGD, k=k, alpha=alpha, **common)
    if name == "imbsam":
        return ImbSAM(params, torch.optim.SGD, class_counts=class_counts, tail_threshold=tail_threshold, **common)
    return CCSAM(params, torch.optim.SGD, classifier=model.fc, class_counts=class_counts, flat_ratio=flat_ratio,
                 **common)
