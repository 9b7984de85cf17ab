"""``sam_k``: SAM every k steps, the base optimizer's plain step in between."""
from __future__ import annotations

import torch

from .core import SAM


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
