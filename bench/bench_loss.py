"""Weighted loss forward + backward: the unfused PyTorch expression
(F.cross_entropy(reduction="none") * w).mean() vs the fused op on the PyTorch path and in C++.

Run: pytest bench/ --benchmark-only --benchmark-group-by=group
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rdr_fast
from rdr_fast import torch_impl

SHAPES = [(256, 1000), (128, 100)]
HAS_CPP = rdr_fast.backends()["weighted_loss"]["cpu"] == "cpp"


class TorchPathLoss(torch.autograd.Function):
    """The PyTorch path's fused loss+gradient with the op's backward (rescale the saved grad)."""

    @staticmethod
    def forward(ctx, logits, labels, weights):
        loss, grad = torch_impl.weighted_loss_torch(logits, labels, weights, None, 0.0, True)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None


def unfused(logits, labels, weights):
    return (F.cross_entropy(logits, labels, reduction="none") * weights).mean()


def fused_torch(logits, labels, weights):
    return TorchPathLoss.apply(logits, labels, weights)


def fused_cpp(logits, labels, weights):
    if not HAS_CPP:
        pytest.skip("rdr_fast._C is not built")
    return torch.ops.rdr_fast.weighted_loss(logits, labels, weights, None, 0.0, True)[0]


IMPLS = {"unfused": unfused, "torch": fused_torch, "cpp": fused_cpp}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-C{}".format(*s))
def test_loss_forward_backward(benchmark, shape, impl):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*shape, generator=g).mul_(3).requires_grad_(True)
    labels = torch.randint(0, shape[1], (shape[0],), generator=g)
    weights = torch.rand(shape[0], generator=g) + 0.5
    benchmark.group = "loss/fwd+bwd/cpu/float32/B{}-C{}".format(*shape)
    benchmark.extra_info["backend"] = impl

    def step():
        logits.grad = None  # no accumulation pass: every provider writes a fresh gradient
        loss = IMPLS[impl](logits, labels, weights)
        loss.backward()
        return loss

    loss = step().detach()
    grad = logits.grad.clone()
    logits.grad = None
    unfused(logits, labels, weights).backward()
    torch.testing.assert_close(loss, unfused(logits, labels, weights).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, logits.grad, rtol=1e-5, atol=1e-7)
    benchmark(step)
