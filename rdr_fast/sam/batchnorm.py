"""Freezing BatchNorm running statistics, for SAM's second (perturbed) pass.

Frozen by default (``freeze_bn=True``), the clean SAM of davda54/sam: the statistics then
only see the unperturbed weights. The long-tail codebases (cool-xuan/Imbalanced_SAM,
zzpustc/CC-SAM, wang22ti/DDC) update them in both passes (``freeze_bn=False``).
"""
from __future__ import annotations

import contextlib

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


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
