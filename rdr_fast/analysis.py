"""Sharpness of a trained model: the Hessian of its loss with respect to its parameters.

Three estimators, as in PyHessian (Yao et al., "PyHessian: Neural Networks Through the Lens
of the Hessian", arXiv 1912.07145), built on Hessian-vector products (Pearlmutter's trick:
the gradient of gᵀv, with g the gradient taken with ``create_graph=True``):

- ``hessian_eigenvalues``: the k largest or smallest eigenvalues, by Lanczos iteration with
  full re-orthogonalisation. Its extreme Ritz values converge to both ends of the spectrum,
  so the most negative eigenvalue needs no shifted second run (power iteration, PyHessian's
  method, finds the largest magnitude only).
- ``hessian_trace``: Hutchinson's estimator, the mean of vᵀHv over Rademacher vectors v,
  with its standard error.
- ``hessian_density``: the eigenvalue spectral density by stochastic Lanczos quadrature
  (Ghorbani et al., "An Investigation into Neural Net Optimization via Hessian Eigenvalue
  Density", arXiv 1901.10159): the Ritz values and weights of several Lanczos runs from
  Rademacher vectors, smoothed by Gaussians on a grid.

The loss is the mean over all samples of ``batches`` (an iterable of ``(inputs, targets)``)
of ``loss_fn(model(inputs), targets)``, which must return the batch mean; a model that
returns ``(features, logits)`` goes with a ``loss_fn`` that unpacks it. ``classes``
restricts every batch to the samples of those classes: the loss of one class or one
split, as in the RDR paper's sharpness study. The model is put in eval mode throughout
(BatchNorm uses its running statistics, dropout is off; the training flags are restored
afterwards), and the Hessian is taken with respect to the parameters that require grad.

Every function is deterministic for its ``seed`` (random vectors come from a CPU generator,
so they are the same on every device and every rank). Under torch.distributed each rank
passes its own shard of the data; the Hessian-vector products are summed over ranks, so
every rank gets the Hessian of the mean loss over all shards.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ._checks import check_count, check_range
from .distributed import all_reduce_

__all__ = ["hessian_eigenvalues", "hessian_extremes", "hessian_trace", "hessian_density", "SpectralDensity", "loss_along"]

LossFn = Callable[[object, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode for the duration, each module's training flag restored after."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.train(training)


class HessianOperator:
    """v ↦ H v for the mean loss over ``batches`` (restricted to ``classes``), on the flat
    vector of the parameters that require grad. With one batch, its gradient graph is kept
    between products (PyHessian does the same); with several, each product redoes the
    forward pass of every batch, so memory stays that of one batch."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: Iterable, classes=None):
        self.model, self.loss_fn = model, loss_fn
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model: no parameter requires grad, so there is no Hessian to take")
        self.device, self.dtype = self.params[0].device, self.params[0].dtype
        self.size = sum(p.numel() for p in self.params)
        self.batches = _restricted(batches, classes, self.device)
        self.total = all_reduce_(torch.tensor(float(sum(len(t) for _, t in self.batches)), device=self.device))
        if self.total.item() == 0:
            raise ValueError(f"batches: no sample of classes {sorted(classes)}" if classes is not None
                             else "batches: no sample at all")
        self._cached_grads = None  # the one batch's gradient graph, made at the first product

    def _grads(self, inputs, targets) -> list[torch.Tensor]:
        loss = self.loss_fn(self.model(inputs), targets)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar (the batch mean), got shape {tuple(loss.shape)}")
        return torch.autograd.grad(loss, self.params, create_graph=True)

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        pieces = self.unflatten(vector)
        product = torch.zeros(self.size, device=self.device, dtype=self.dtype)
        single = len(self.batches) == 1
        if single and self._cached_grads is None:
            self._cached_grads = self._grads(*self.batches[0])
        for inputs, targets in self.batches:
            grads = self._cached_grads if single else self._grads(inputs, targets)
            hv = torch.autograd.grad(grads, self.params, grad_outputs=pieces, retain_graph=single)
            product += len(targets) * torch.cat([h.reshape(-1) for h in hv])
        return all_reduce_(product) / self.total

    def loss(self) -> float:
        """The mean loss over the batches (all ranks)."""
        with torch.no_grad():
            total = sum(len(t) * self.loss_fn(self.model(x), t) for x, t in self.batches)
        return (all_reduce_(torch.as_tensor(total, device=self.device, dtype=self.dtype)) / self.total).item()

    def unflatten(self, vector: torch.Tensor) -> list[torch.Tensor]:
        """The flat vector as views shaped like the parameters."""
        pieces, start = [], 0
        for p in self.params:
            pieces.append(vector[start:start + p.numel()].view_as(p))
            start += p.numel()
        return pieces

    def random(self, generator: torch.Generator, kind: str, unit: bool = True) -> torch.Tensor:
        """A random vector, normal or Rademacher (±1 entries), scaled to norm 1 if ``unit``."""
        if kind == "normal":
            v = torch.randn(self.size, generator=generator, dtype=torch.float64)
        else:
            v = torch.randint(0, 2, (self.size,), generator=generator).to(torch.float64) * 2 - 1
        return (v / v.norm() if unit else v).to(self.device, self.dtype)


def _restricted(batches, classes, device) -> list[tuple]:
    """The batches on ``device``, each cut to the samples of ``classes``; empty ones dropped."""
    wanted = None if classes is None else torch.as_tensor(sorted(set(int(c) for c in classes)))
    kept = []
    for inputs, targets in batches:
        targets = torch.as_tensor(targets)
        if wanted is not None:
            mask = torch.isin(targets, wanted.to(targets.device))
            inputs, targets = inputs[mask.to(inputs.device)], targets[mask]
        if len(targets):
            kept.append((inputs.to(device), targets.to(device)))
    return kept


@dataclass
class Lanczos:
    """The tridiagonal matrix T of a Lanczos run (alphas on the diagonal, betas beside it)
    and, when kept, its orthonormal basis Q (one row per step)."""
    alphas: list
    betas: list
    basis: torch.Tensor | None

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor]:
        """T's eigenvalues (ascending) and eigenvectors, in float64."""
        m = len(self.alphas)
        t = torch.diag(torch.tensor(self.alphas, dtype=torch.float64))
        if m > 1:
            off = torch.tensor(self.betas[:m - 1], dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        return torch.linalg.eigh(t)


def _lanczos(operator: HessianOperator, start: torch.Tensor, steps: int, converged=None, bar=None) -> Lanczos:
    """``steps`` Lanczos steps from the unit vector ``start``, with full re-orthogonalisation
    (twice: classical Gram-Schmidt loses orthogonality in float32). Stops early when the
    Krylov space is invariant (β ≈ 0: T's eigenvalues are then exact eigenvalues of H) or
    when ``converged(run)`` says so."""
    steps = min(steps, operator.size)
    basis = torch.empty(steps, operator.size, device=start.device, dtype=start.dtype)
    alphas, betas = [], []
    q = start
    for j in range(steps):
        basis[j] = q
        w = operator(q)
        alphas.append(torch.dot(w, q).item())
        for _ in range(2):
            w = w - basis[:j + 1].T @ (basis[:j + 1] @ w)
        beta = w.norm().item()
        betas.append(beta)
        if bar is not None:
            bar.update(1)
        run = Lanczos(alphas, betas, basis[:j + 1])
        scale = max(abs(a) for a in alphas) + abs(beta)
        if beta <= 1e-10 * max(scale, 1e-30) or (converged is not None and converged(run)):
            return run
        q = w / beta
    return Lanczos(alphas, betas, basis)


def _progress(total: int, desc: str, progress: bool | None):
    """tqdm on stderr; ``progress=None`` shows it only on a terminal."""
    return tqdm(total=total, desc=desc, disable=None if progress is None else not progress, leave=False)


def hessian_eigenvalues(model: nn.Module, loss_fn: LossFn, batches: Iterable, k: int = 1, which: str = "largest",
                        iters: int = 100, tol: float = 1e-4, seed: int = 0, classes=None,
                        return_vectors: bool = False, progress: bool | None = None):
    """The ``k`` largest (most positive) or smallest (most negative) Hessian eigenvalues, as a
    1-D float64 tensor in that order (largest first, or smallest first).

    Lanczos runs for at most ``iters`` products (and at most the number of parameters, where
    it becomes exact); it stops once each wanted Ritz value θ has the residual bound
    |β·s_last| ≤ tol·max(|θ|, 1e-12) (Parlett, The Symmetric Eigenvalue Problem, §13.2).
    With ``return_vectors``, also the unit eigenvectors as a [k, P] tensor over the flat
    parameters (the order of ``model.parameters()`` that require grad).
    """
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    check_count("k", k, 1)
    check_count("iters", iters, 1)
    check_range("tol", tol, 0.0, math.inf, low_open=True)
    with eval_mode(model):
        operator = HessianOperator(model, loss_fn, batches, classes)
        if k > operator.size:
            raise ValueError(f"k must be at most the number of parameters ({operator.size}), got {k}")

        def wanted(values, vectors):
            index = torch.arange(len(values) - 1, len(values) - 1 - k, -1) if which == "largest" else torch.arange(k)
            return values[index], vectors[:, index]

        def converged(run: Lanczos) -> bool:
            if len(run.alphas) < k:
                return False
            values, vectors = wanted(*run.ritz())
            residual = (run.betas[-1] * vectors[-1]).abs()
            return bool((residual <= tol * values.abs().clamp_min(1e-12)).all())

        generator = torch.Generator().manual_seed(seed)
        with _progress(min(iters, operator.size), "Hessian eigenvalues", progress) as bar:
            run = _lanczos(operator, operator.random(generator, "normal"), iters, converged, bar)
        values, vectors = wanted(*run.ritz())
        if not return_vectors:
            return values
        eigvecs = vectors.T.to(run.basis.dtype) @ run.basis
        return values, eigvecs / eigvecs.norm(dim=1, keepdim=True)


def hessian_extremes(model: nn.Module, loss_fn: LossFn, batches: Iterable, iters: int = 100, tol: float = 1e-4,
                     seed: int = 0, classes=None, progress: bool | None = None) -> tuple[float, float]:
    """(λ_max, λ_min) from one Lanczos run: its Ritz values converge to both ends of the
    spectrum at once, each to the residual bound of ``hessian_eigenvalues``."""
    check_count("iters", iters, 1)
    check_range("tol", tol, 0.0, math.inf, low_open=True)
    with eval_mode(model):
        operator = HessianOperator(model, loss_fn, batches, classes)

        def converged(run: Lanczos) -> bool:
            values, vectors = run.ritz()
            residual = (run.betas[-1] * vectors[-1, [0, -1]]).abs()
            return bool((residual <= tol * values[[0, -1]].abs().clamp_min(1e-12)).all())

        generator = torch.Generator().manual_seed(seed)
        with _progress(min(iters, operator.size), "Hessian extremes", progress) as bar:
            values, _ = _lanczos(operator, operator.random(generator, "normal"), iters, converged, bar).ritz()
    return values[-1].item(), values[0].item()


def hessian_trace(model: nn.Module, loss_fn: LossFn, batches: Iterable, samples: int = 100, seed: int = 0,
                  classes=None, progress: bool | None = None) -> tuple[float, float]:
    """Hutchinson's estimate of trace(H) from ``samples`` Rademacher vectors v (E[vᵀHv] =
    trace H), and its standard error (sample standard deviation / √samples)."""
    check_count("samples", samples, 2)
    with eval_mode(model):
        operator = HessianOperator(model, loss_fn, batches, classes)
        generator = torch.Generator().manual_seed(seed)
        values = []
        with _progress(samples, "Hessian trace", progress) as bar:
            for _ in range(samples):
                v = operator.random(generator, "rademacher", unit=False)
                values.append(torch.dot(v, operator(v)).item())
                bar.update(1)
    values = torch.tensor(values, dtype=torch.float64)
    return values.mean().item(), (values.std() / math.sqrt(samples)).item()


@dataclass
class SpectralDensity:
    """A smoothed eigenvalue density (``density`` on ``grid``, integrating to 1) and the
    quadrature behind it: one row of Ritz values (``nodes``) and weights per Lanczos run."""
    grid: torch.Tensor
    density: torch.Tensor
    nodes: list
    weights: list


def hessian_density(model: nn.Module, loss_fn: LossFn, batches: Iterable, steps: int = 90, runs: int = 1,
                    seed: int = 0, classes=None, bins: int = 10_000, sigma_squared: float = 1e-5,
                    progress: bool | None = None) -> SpectralDensity:
    """The spectral density of H by stochastic Lanczos quadrature: ``runs`` Lanczos runs of
    ``steps`` products from Rademacher vectors. Run r gives nodes θ (T's eigenvalues) and
    weights τ (the squared first components of T's eigenvectors, summing to 1); each node
    becomes a Gaussian of variance ``sigma_squared``·max(1, θ_max − θ_min), and the runs
    are averaged on a grid from θ_min − 0.01 to θ_max + 0.01 (PyHessian's smoothing)."""
    check_count("steps", steps, 1)
    check_count("runs", runs, 1)
    check_count("bins", bins, 2)
    check_range("sigma_squared", sigma_squared, 0.0, math.inf, low_open=True)
    nodes, weights = [], []
    with eval_mode(model):
        operator = HessianOperator(model, loss_fn, batches, classes)
        generator = torch.Generator().manual_seed(seed)
        with _progress(runs * min(steps, operator.size), "Hessian density", progress) as bar:
            for _ in range(runs):
                values, vectors = _lanczos(operator, operator.random(generator, "rademacher"), steps, bar=bar).ritz()
                nodes.append(values)
                weights.append(vectors[0] ** 2)
    low = min(n.min().item() for n in nodes) - 0.01
    high = max(n.max().item() for n in nodes) + 0.01
    grid = torch.linspace(low, high, bins, dtype=torch.float64)
    variance = sigma_squared * max(1.0, high - low - 0.02)
    density = torch.zeros_like(grid)
    for values, tau in zip(nodes, weights):
        gauss = torch.exp(-(grid[:, None] - values[None, :]) ** 2 / (2 * variance)) / math.sqrt(2 * math.pi * variance)
        density += gauss @ tau / runs
    density /= density.sum() * (grid[1] - grid[0])
    return SpectralDensity(grid, density, nodes, weights)


def loss_along(model: nn.Module, loss_fn: LossFn, batches: Iterable, direction: torch.Tensor,
               epsilons: torch.Tensor, classes=None) -> torch.Tensor:
    """The mean loss at θ + ε·d for each ε of ``epsilons``, with d the flat ``direction``
    (e.g. the top eigenvector) over the parameters that require grad; θ is restored after."""
    with eval_mode(model):
        operator = HessianOperator(model, loss_fn, batches, classes)
        if direction.numel() != operator.size:
            raise ValueError(f"direction must have {operator.size} entries (the parameters), got {direction.numel()}")
        kept = [p.detach().clone() for p in operator.params]
        losses = []
        try:
            for eps in epsilons.tolist():
                with torch.no_grad():
                    for p, base, d in zip(operator.params, kept, operator.unflatten(direction.to(kept[0]))):
                        p.copy_(base + eps * d)
                losses.append(operator.loss())
        finally:
            with torch.no_grad():
                for p, base in zip(operator.params, kept):
                    p.copy_(base)
    return torch.tensor(losses, dtype=torch.float64)
