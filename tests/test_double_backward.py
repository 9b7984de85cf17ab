"""Double backward through the fused loss: gradgradcheck on every backend, and Hessian-vector
products of RDRLoss equal to those of the same loss written with plain torch ops."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp

import rdr_fast
from conftest import CPU_AND_CUDA

GRADGRAD = """
import torch, rdr_fast
device = {device!r}
assert rdr_fast.backends()["weighted_loss"]["cpu"] == {impl!r}, rdr_fast.backends()
torch.manual_seed(0)
z = torch.randn(7, 5, dtype=torch.float64, device=device, requires_grad=True)
y = torch.tensor([0, 1, 2, 3, 4, 0, 2], device=device)
w = torch.rand(7, dtype=torch.float64, device=device) + 0.1
adjust = torch.randn(5, dtype=torch.float64, device=device)
for gamma, a in [(0.0, None), (0.0, adjust), (2.0, None), (0.5, adjust)]:
    f = lambda z: torch.ops.rdr_fast.weighted_loss(z, y, w, a, gamma, True)[0]
    assert torch.autograd.gradcheck(f, (z,)) and torch.autograd.gradgradcheck(f, (z,)), (gamma, a)
print("ok")
"""


def test_gradgradcheck_of_the_loss_op_with_the_cpp_kernels():
    exec(GRADGRAD.format(device="cpu", impl="cpp"), {})  # this process runs the C++ kernels (CI builds them)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_gradgradcheck_of_the_loss_op_on_the_python_backends(impl):
    # The backend is chosen at import: a process of its own.
    done = subprocess.run([sys.executable, "-c", GRADGRAD.format(device="cpu", impl=impl)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "RDR_FAST_IMPL": impl})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gradgradcheck_of_the_loss_op_on_cuda():
    exec(GRADGRAD.format(device="cuda", impl=rdr_fast.backends()["weighted_loss"]["cpu"]), {})


class Tiny(torch.nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.body, self.head = torch.nn.Linear(6, 4), torch.nn.Linear(4, num_classes)

    def forward(self, x):
        features = torch.tanh(self.body(x))
        return features, self.head(features)


def plain_loss(logits, targets, weights, base, counts, tau=1.0, gamma=1.0):
    """Σ w ℓ / B with ℓ written in plain torch: the loss RDRLoss computes, weights given."""
    if base == "la":
        prior = torch.tensor(counts, dtype=logits.dtype) / sum(counts)
        logits = logits + tau * prior.log()
    log_pt = F.log_softmax(logits, dim=1).gather(1, targets[:, None])[:, 0]
    per_sample = -log_pt if base != "focal" else -(1 - log_pt.exp()) ** gamma * log_pt
    return (weights * per_sample).sum() / len(targets)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("base", ["ce", "focal", "la"])
def test_hessian_vector_products_of_rdrloss_equal_plain_torch(base, device):
    counts = [30, 12, 5]
    torch.manual_seed(0)
    model = Tiny(len(counts)).double().to(device)
    crit = rdr_fast.RDRLoss(counts, feat_dim=4, base=base, focal_gamma=2.0).double().to(device)
    x, y = torch.randn(16, 6, dtype=torch.float64, device=device), torch.randint(0, 3, (16,), device=device)
    crit(*model(x), y)  # one training step: prototypes set, so the weights are density ratios
    crit.eval()
    crit(*model(x), y)
    weights = crit.last_weights.clone()
    assert weights.std() > 0.01  # not all ones: the weights take part in the comparison

    params = {name: p.detach() for name, p in model.named_parameters()}
    vector = {name: torch.randn_like(p) for name, p in params.items()}
    loss = crit(*model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    hvp = torch.autograd.grad(grads, list(model.parameters()), grad_outputs=list(vector.values()))

    def reference(p):
        return plain_loss(functional_call(model, p, (x,))[1], y, weights, base, counts, gamma=2.0)
    _, want = jvp(grad(reference), (params,), (vector,))
    for got, name in zip(hvp, params):
        torch.testing.assert_close(got, want[name], rtol=1e-9, atol=1e-12)


def test_a_first_order_backward_returns_the_gradient_the_forward_computed():
    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y, w = torch.tensor([0, 1, 2, 3, 0]), torch.rand(5, dtype=torch.float64)
    loss, grad_from_forward = torch.ops.rdr_fast.weighted_loss(z, y, w, None, 0.0, True)
    loss.backward()
    assert torch.equal(z.grad, grad_from_forward)  # the saved gradient itself, not a recomputation


def test_an_in_place_edit_of_the_logits_after_the_forward_leaves_backward_working():
    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    logits = z * 1.0
    y, w = torch.tensor([0, 1, 2, 3, 0]), torch.rand(5, dtype=torch.float64)
    loss, _ = torch.ops.rdr_fast.weighted_loss(logits, y, w, None, 0.0, True)
    with torch.no_grad():
        logits.add_(1.0)  # a saved-tensor version check would refuse the backward now
    loss.backward()
    assert torch.isfinite(z.grad).all()
