"""rdr_fast.analysis against the exact Hessian of tiny models (torch.autograd.functional.hessian
over the flat parameters, then eigvalsh)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from rdr_fast import analysis

NUM_CLASSES = 3


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, NUM_CLASSES)).double()


class TinyCNN(nn.Module):
    """Conv + BatchNorm + linear head; forward returns (features, logits) like rdr_fast's models."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.head = nn.Linear(2, NUM_CLASSES)

    def forward(self, x):
        features = F.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return features, self.head(features)


def tiny_cnn() -> nn.Module:
    model = TinyCNN().double()
    with torch.no_grad():  # running statistics that differ from a batch's own
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def ce(output, targets):
    return F.cross_entropy(output, targets)


def ce_of_logits(output, targets):
    return F.cross_entropy(output[1], targets)


MODELS = {"mlp": (tiny_mlp, (4,), ce), "cnn": (tiny_cnn, (1, 5, 5), ce_of_logits)}


def make_case(name: str, batches: int = 2, size: int = 12):
    build, shape, loss_fn = MODELS[name]
    torch.manual_seed(1)
    model = build()
    data = [(torch.randn(size, *shape, dtype=torch.float64), torch.randint(0, NUM_CLASSES, (size,)))
            for _ in range(batches)]
    return model, loss_fn, data


def exact_hessian(model, loss_fn, batches, classes=None) -> torch.Tensor:
    """The Hessian of the sample-weighted mean loss, in eval mode, by autograd.functional."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    kept = [(x[torch.isin(t, torch.tensor(classes))], t[torch.isin(t, torch.tensor(classes))])
            if classes is not None else (x, t) for x, t in batches]
    total = sum(len(t) for _, t in kept)

    def loss_of(vector):
        params, start = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = vector[start:start + shape.numel()].view(shape)
            start += shape.numel()
        return sum(len(t) * loss_fn(functional_call(model, params, (x,)), t) for x, t in kept if len(t)) / total

    model.eval()
    hessian = torch.autograd.functional.hessian(loss_of, flat)
    model.train()
    return hessian


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_extreme_eigenvalues_match_the_exact_hessian(name, which):
    model, loss_fn, data = make_case(name)
    exact = torch.linalg.eigvalsh(exact_hessian(model, loss_fn, data))
    want = exact.flip(0)[:2] if which == "largest" else exact[:2]
    got = analysis.hessian_eigenvalues(model, loss_fn, data, k=2, which=which, iters=200, tol=1e-8, progress=False)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6 * exact.abs().max().item())


def test_eigenvectors_are_eigenvectors():
    model, loss_fn, data = make_case("mlp")
    hessian = exact_hessian(model, loss_fn, data)
    values, vectors = analysis.hessian_eigenvalues(model, loss_fn, data, k=1, iters=200, tol=1e-8,
                                                   return_vectors=True, progress=False)
    torch.testing.assert_close(hessian @ vectors[0], values[0] * vectors[0], rtol=1e-4, atol=1e-6)


def test_a_subset_of_classes_is_the_hessian_of_their_samples_only():
    model, loss_fn, data = make_case("mlp")
    exact = torch.linalg.eigvalsh(exact_hessian(model, loss_fn, data, classes=[2]))
    got = analysis.hessian_eigenvalues(model, loss_fn, data, k=1, iters=200, tol=1e-8, classes=[2], progress=False)
    torch.testing.assert_close(got[0], exact[-1], rtol=1e-3, atol=0)
    everything = torch.linalg.eigvalsh(exact_hessian(model, loss_fn, data))
    assert abs(everything[-1] - exact[-1]) > 1e-3 * abs(exact[-1])  # the restriction changes the answer


@pytest.mark.parametrize("name", MODELS)
def test_trace_is_within_three_standard_errors_of_the_exact_one(name):
    model, loss_fn, data = make_case(name)
    exact = torch.trace(exact_hessian(model, loss_fn, data)).item()
    for seed in (0, 1, 2):
        estimate, error = analysis.hessian_trace(model, loss_fn, data, samples=200, seed=seed, progress=False)
        assert error > 0
        assert abs(estimate - exact) <= 3 * error, (seed, estimate, exact, error)


@pytest.mark.parametrize("name", MODELS)
def test_density_integrates_to_one_and_its_extreme_nodes_are_the_extreme_eigenvalues(name):
    model, loss_fn, data = make_case(name)
    exact = torch.linalg.eigvalsh(exact_hessian(model, loss_fn, data))
    result = analysis.hessian_density(model, loss_fn, data, steps=40, runs=2, progress=False)
    step = (result.grid[1] - result.grid[0]).item()
    assert math.isclose((result.density.sum() * step).item(), 1.0, rel_tol=1e-9)
    assert (result.density >= 0).all()
    for nodes, weights in zip(result.nodes, result.weights):
        assert math.isclose(weights.sum().item(), 1.0, rel_tol=1e-9)
        spread = (exact[-1] - exact[0]).item()
        assert abs(nodes.max().item() - exact[-1].item()) <= 1e-3 * spread
        assert abs(nodes.min().item() - exact[0].item()) <= 1e-3 * spread


def test_results_are_deterministic_for_a_seed_and_differ_across_seeds():
    model, loss_fn, data = make_case("cnn")
    first = analysis.hessian_trace(model, loss_fn, data, samples=5, seed=3, progress=False)
    assert analysis.hessian_trace(model, loss_fn, data, samples=5, seed=3, progress=False) == first
    assert analysis.hessian_trace(model, loss_fn, data, samples=5, seed=4, progress=False) != first


def test_batchnorm_runs_in_eval_mode_and_training_flags_come_back():
    model, loss_fn, data = make_case("cnn")
    model.train()
    model.head.eval()  # a mixed state, restored module by module
    running = model.bn.running_mean.clone()
    analysis.hessian_eigenvalues(model, loss_fn, data, iters=5, progress=False)
    assert torch.equal(model.bn.running_mean, running)  # train-mode BatchNorm would have updated them
    assert model.training and model.bn.training and not model.head.training


def test_loss_along_a_direction_is_quadratic_near_the_point_and_restores_it():
    model, loss_fn, data = make_case("mlp")
    values, vectors = analysis.hessian_eigenvalues(model, loss_fn, data, iters=200, tol=1e-8,
                                                   return_vectors=True, progress=False)
    before = [p.detach().clone() for p in model.parameters()]
    eps = 1e-3
    losses = analysis.loss_along(model, loss_fn, data, vectors[0], torch.tensor([-eps, 0.0, eps]))
    curvature = (losses[0] - 2 * losses[1] + losses[2]) / eps ** 2
    torch.testing.assert_close(curvature, values[0], rtol=1e-3, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("call,message", [
    (lambda m, f, d: analysis.hessian_eigenvalues(m, f, d, k=0), "k must be an int >= 1"),
    (lambda m, f, d: analysis.hessian_eigenvalues(m, f, d, k=10_000), "k must be at most the number of parameters"),
    (lambda m, f, d: analysis.hessian_eigenvalues(m, f, d, which="top"), "which must be 'largest' or 'smallest'"),
    (lambda m, f, d: analysis.hessian_eigenvalues(m, f, d, tol=float("nan")), "tol must be a finite number in \\(0"),
    (lambda m, f, d: analysis.hessian_trace(m, f, d, samples=1), "samples must be an int >= 2"),
    (lambda m, f, d: analysis.hessian_density(m, f, d, runs=0), "runs must be an int >= 1"),
    (lambda m, f, d: analysis.hessian_trace(m, f, d, classes=[7]), "batches: no sample of classes [7]"),
    (lambda m, f, d: analysis.hessian_trace(m, f, []), "batches: no sample at all"),
    (lambda m, f, d: analysis.hessian_trace(m, lambda o, t: F.cross_entropy(o, t, reduction="none"), d),
     "loss_fn must return a scalar"),
])
def test_bad_arguments_are_refused_by_name(call, message):
    model, loss_fn, data = make_case("mlp")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call(model, loss_fn, data)


def test_a_model_without_trainable_parameters_is_refused():
    model, loss_fn, data = make_case("mlp")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="model: no parameter requires grad"):
        analysis.hessian_trace(model, loss_fn, data)


def _sharded_worker(rank, init_file, out_dir):
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model, loss_fn, data = make_case("cnn", batches=3, size=10)
    mine = data[rank::2]  # each rank its own shard: 2 batches and 1 batch
    result = {
        "eigenvalues": analysis.hessian_eigenvalues(model, loss_fn, mine, k=2, iters=200, tol=1e-8, progress=False),
        "trace": analysis.hessian_trace(model, loss_fn, mine, samples=5, progress=False),
    }
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_under_torch_distributed_each_rank_gets_the_hessian_of_all_shards(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sharded_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    model, loss_fn, data = make_case("cnn", batches=3, size=10)
    whole = {
        "eigenvalues": analysis.hessian_eigenvalues(model, loss_fn, data, k=2, iters=200, tol=1e-8, progress=False),
        "trace": analysis.hessian_trace(model, loss_fn, data, samples=5, progress=False),
    }
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(got["eigenvalues"], whole["eigenvalues"], rtol=1e-9, atol=1e-12)
        assert got["trace"] == pytest.approx(whole["trace"], rel=1e-9)


@pytest.mark.parametrize("name", MODELS)
def test_extremes_from_one_run_are_the_largest_and_smallest_eigenvalues(name):
    model, loss_fn, data = make_case(name)
    exact = torch.linalg.eigvalsh(exact_hessian(model, loss_fn, data))
    top, bottom = analysis.hessian_extremes(model, loss_fn, data, iters=200, tol=1e-8, progress=False)
    assert top == pytest.approx(exact[-1].item(), rel=1e-3)
    assert bottom == pytest.approx(exact[0].item(), rel=1e-3, abs=1e-6 * exact.abs().max().item())
