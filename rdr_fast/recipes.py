"""Training recipes of `python -m rdr_fast.train --recipe NAME` and the learning-rate
schedule they use (docs/recipes.md).

A recipe fills the settings a run leaves unset (None in train.Config): explicit flags,
and a resumed run's config.json, always win. Two recipes:

- ``paper``: the protocol the paper's text states ("Revive Re-weighting in Imbalanced
  Learning by Density Ratio Estimation", NeurIPS 2024): cosine schedule, weight decay
  2e-4, RDR warm-up over the first 5 of 200 epochs, crop + flip.
- ``official``: the protocol of the authors' released code, GoodMorningPeter/RDR, whose
  schedule is kaidic/LDAM-DRW's: a 5-epoch linear lr warm-up, lr x0.01 from epoch 160
  and x0.0001 from epoch 180, weight decay 1e-4, RDR weights deferred to epoch 160 (the
  prototypes update from the start), crop + flip + AutoAugment + Cutout.

Epoch counts are those of a 200-epoch run and scale with ``--epochs``.
"""
from __future__ import annotations

import math

import torch

RECIPE_EPOCHS = 200      # the run length the epoch counts below are given for
RECIPES = {
    "paper": {"lr_schedule": "cosine", "lr_warmup_epochs": 0, "weight_decay": 2e-4,
              "warmup_epochs": 5, "augment": "basic"},
    "official": {"lr_schedule": "step", "lr_warmup_epochs": 5, "weight_decay": 1e-4,
                 "warmup_epochs": 160, "augment": "autoaug_cutout"},
}
EPOCH_COUNTS = ("lr_warmup_epochs", "warmup_epochs")   # scaled by epochs / RECIPE_EPOCHS
LR_SCHEDULES = ("cosine", "step")
STEP_MILESTONES = (160, 180)     # LDAM-DRW's, of 200 epochs: lr x0.01 from the first, x0.0001 from the second
STEP_FACTORS = (1.0, 0.01, 1e-4)


def recipe_settings(recipe: str, epochs: int) -> dict:
    """The recipe's settings for a run of ``epochs`` epochs (its epoch counts scaled,
    fractions kept: the RDR warm-up is counted in steps)."""
    return {name: value * epochs / RECIPE_EPOCHS if name in EPOCH_COUNTS else value
            for name, value in RECIPES[recipe].items()}


def step_milestones(epochs: int) -> tuple[int, int]:
    """The step schedule's milestones for a run of ``epochs`` epochs: 160/200 and 180/200
    of it, each rounded to the nearest epoch, halves up (160 and 180 for 200 epochs, 8 and
    9 for 10, 2 and 3 for 3). Integer arithmetic, so no float rounding decides."""
    return tuple((m * epochs + RECIPE_EPOCHS // 2) // RECIPE_EPOCHS for m in STEP_MILESTONES)


def lr_at(epoch: int, *, epochs: int, schedule: str = "cosine", warmup_epochs: float = 0.0,
          milestones: tuple[int, int] | None = None) -> float:
    """The learning-rate multiplier of the 0-based ``epoch``: the schedule's decay times
    the linear warm-up ramp min(1, (epoch + 1) / warmup_epochs).

    cosine: (1 + cos(π·epoch/epochs)) / 2, from 1 down towards 0. step (kaidic/LDAM-DRW's
    adjust_learning_rate): 1 before milestones[0], 0.01 from it, 0.0001 from milestones[1].
    With a 5-epoch warm-up and milestones (160, 180) over 200 epochs: epochs 0-4 at 0.2,
    0.4, ..., 1.0, epochs 5-159 at 1, 160-179 at 0.01, 180-199 at 0.0001, as LDAM-DRW's.
    Under cosine the ramp multiplies the cosine of the same epoch (the cosine is not
    shifted to start after the warm-up).
    """
    ramp = min(1.0, (epoch + 1) / warmup_epochs) if warmup_epochs > 0 else 1.0
    if schedule == "cosine":
        decay = (1 + math.cos(math.pi * epoch / epochs)) / 2
    elif schedule == "step":
        decay = STEP_FACTORS[sum(epoch >= m for m in milestones)]
    else:
        raise ValueError(f"schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    return ramp * decay


def lr_scheduler(optimizer, *, epochs: int, schedule: str, warmup_epochs: float,
                 milestones: tuple[int, int] | None) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-epoch scheduler of lr_at (step it once after each epoch); its state_dict
    resumes it exactly."""
    if schedule == "cosine" and warmup_epochs == 0:
        # torch's own cosine, whose recursive update differs from lr_at's closed form in
        # the last bits: the paper recipe's runs stay those of earlier versions float for
        # float, and their checkpoints' scheduler state still loads.
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_at(
        epoch, epochs=epochs, schedule=schedule, warmup_epochs=warmup_epochs, milestones=milestones))
