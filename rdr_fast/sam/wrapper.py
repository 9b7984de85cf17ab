"""The base of every SAM-family optimizer: a wrapper around a base optimizer."""
from __future__ import annotations

import torch


class OptimizerWrapper(torch.optim.Optimizer):
    """An optimizer that takes its steps through ``base_optimizer``.

    Both share ``param_groups`` (an LR scheduler attached to the wrapper drives the base
    optimizer), and ``state_dict()`` holds the base optimizer's state (momentum buffers)
    plus the wrapper's own (its step counter and whatever ``_extra_state`` adds), so a
    checkpoint resumes exactly.

    Arguments:
        params: parameters or groups; None when ``base_optimizer`` is an instance.
        base_optimizer: an optimizer class (built on the same groups with ``**kwargs``) or
            an optimizer instance to wrap.
        rho: the perturbation radius ρ ≥ 0.

    Subclasses implement ``step(closure=None)`` and ``step_batch(forward, criterion,
    inputs, targets, first_pass_local=None)``, the whole step on one batch, which
    :func:`rdr_fast.training.train_step` calls.
    """

    def __init__(self, params, base_optimizer, rho: float, **kwargs):
        if not (isinstance(rho, (int, float)) and rho >= 0):
            raise ValueError(f"rho must be a number >= 0, got {rho!r}")
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
        self.rho = float(rho)
        self.sam_steps = 0  # steps taken, for the every-k variants

    def step_batch(self, forward, criterion, inputs, targets, first_pass_local=None) -> torch.Tensor:
        """One step on a batch: every forward and backward pass the method needs, then the
        base step; returns the loss at the unperturbed weights, detached.

        Arguments:
            forward: callable x -> (features [B, K], logits [B, C]).
            criterion: callable (features, logits, targets) -> loss; a
                :class:`~rdr_fast.sam.ReweightingCriterion` has its weights reused.
            first_pass_local: a context manager (DDP's ``no_sync``) under which gradients
                that only build the perturbation may stay per rank.
        """
        raise NotImplementedError

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
