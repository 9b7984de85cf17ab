"""Sharpness-aware minimisation for rdr_fast: SAM / ASAM, ImbSAM, CC-SAM, RDR + SAM
(Algorithm 2 of "Revive Re-weighting in Imbalanced Learning by Density Ratio
Estimation") and two cheaper variants, as optimizer wrappers. The maths, with the
choices made where the papers and their code differ: docs/algorithm.md, "SAM family".

    optimizer = sam.make_optimizer("sam", model, class_counts, lr=0.1, momentum=0.9,
                                   weight_decay=2e-4, rho=0.05)
    scheduler = CosineAnnealingLR(optimizer, T_max=epochs)   # attaches to the wrapper
    for x, y in loader:
        loss = rdr_fast.training.train_step(optimizer, model, criterion, x, y)   # one call per batch

``train_step`` also takes a plain optimizer (one pass), so a training loop has one path;
a SAM-family wrapper runs its own passes in ``step_batch``. Every wrapper
(:class:`OptimizerWrapper`) shares ``param_groups`` with its ``base_optimizer``
(schedulers see one set of groups) and ``state_dict()`` holds the base optimizer's state
(momentum buffers) plus the wrapper's own (step counter, LookSAM's direction), so
checkpoints resume exactly.

Where each piece lives: ``core`` (SAM / ASAM: first step, restore, second step),
``sam_k``, ``looksam``, ``imbsam``, ``ccsam`` (one variant each), ``wrapper`` (the base
shared by SAM and CC-SAM), ``batchnorm`` (freezing BatchNorm running statistics),
``_foreach`` (the global norm, one CPU thread for the foreach work) and
``_criterion`` (what the optimizers need from a criterion).

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
bit for bit. On the CPU this elementwise work runs on one thread (``serial_on_cpu``): a
few MB, where per-tensor OpenMP regions cost more than the work.

With a reweighting criterion (:class:`ReweightingCriterion`, e.g. an
:class:`~rdr_fast.RDRLoss`): the criterion runs once, on the first (unperturbed) pass:
it computes the weights from the current prototypes and updates the prototypes
(``step`` +1). The second pass reuses exactly those weights, ``criterion.last_weights``
saved after the first pass, through ``criterion.loss_from_weights`` — calling the
criterion again (even in eval mode) would recompute the weights from features at the
perturbed point. Weight decay and momentum act at the unperturbed point: the base
optimizer steps after the restore. BatchNorm running statistics are frozen during the
second pass by default (``freeze_bn``), the clean SAM of davda54/sam; the long-tail
codebases (ImbSAM, CC-SAM, DDC) update them in both passes (``freeze_bn=False``).
"""
from __future__ import annotations

import torch
from torch import nn

from ._criterion import ReweightingCriterion, first_pass_weights, reused_loss
from .batchnorm import disable_running_stats, enable_running_stats, frozen_bn_stats
from .ccsam import CCSAM
from .core import SAM
from .imbsam import ImbSAM
from .looksam import LookSAM
from .sam_k import SAMEveryK
from .wrapper import OptimizerWrapper

VARIANTS = ("none", "sam", "asam", "imbsam", "ccsam", "sam_k", "looksam")
# Default ρ per variant: SAM's CIFAR value; ASAM's official CIFAR-10 value; for ccsam ρ is
# the official `noise_ratio` (shipped as 1e-6, which makes the perturbation vanish).
DEFAULT_RHO = {"sam": 0.05, "asam": 0.5, "imbsam": 0.05, "ccsam": 0.05, "sam_k": 0.05, "looksam": 0.05}


def make_optimizer(name: str, model: nn.Module, class_counts=None, *, lr: float, momentum: float = 0.9,
                   weight_decay: float = 0.0, rho: float | None = None, k: int = 5, alpha: float = 0.7,
                   tail_threshold: float = 20, flat_ratio: float = 0.5, freeze_bn: bool = True,
                   eta: float = 0.01) -> torch.optim.Optimizer:
    """SGD (``name="none"``) or the SAM variant ``name`` (one of VARIANTS) over
    ``model.parameters()``, with SGD(lr, momentum, weight_decay) as the base optimizer.
    ``rho`` None takes DEFAULT_RHO[name]; k / alpha: sam_k and looksam; tail_threshold:
    imbsam; flat_ratio: ccsam (classifier ``model.fc``); class_counts: imbsam, ccsam;
    freeze_bn: the two-pass variants (ccsam has one pass); eta: asam."""
    if name not in VARIANTS:
        raise ValueError(f"sam variant must be one of {VARIANTS}, got {name!r}")
    sgd = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "none":
        return torch.optim.SGD(model.parameters(), **sgd)
    if name in ("imbsam", "ccsam") and class_counts is None:
        raise ValueError(f"{name} needs class_counts")
    rho = DEFAULT_RHO[name] if rho is None else rho
    params = model.parameters()
    if name == "ccsam":
        return CCSAM(params, torch.optim.SGD, classifier=model.fc, class_counts=class_counts, rho=rho,
                     flat_ratio=flat_ratio, **sgd)
    common = dict(rho=rho, model=model, freeze_bn=freeze_bn, **sgd)
    if name in ("sam", "asam"):
        return SAM(params, torch.optim.SGD, adaptive=name == "asam", eta=eta, **common)
    if name == "sam_k":
        return SAMEveryK(params, torch.optim.SGD, k=k, **common)
    if name == "looksam":
        return LookSAM(params, torch.optim.SGD, k=k, alpha=alpha, **common)
    return ImbSAM(params, torch.optim.SGD, class_counts=class_counts, tail_threshold=tail_threshold, **common)


__all__ = ["VARIANTS", "DEFAULT_RHO", "make_optimizer", "OptimizerWrapper", "SAM", "SAMEveryK", "LookSAM",
           "ImbSAM", "CCSAM", "ReweightingCriterion", "first_pass_weights", "reused_loss",
           "disable_running_stats", "enable_running_stats", "frozen_bn_stats"]
