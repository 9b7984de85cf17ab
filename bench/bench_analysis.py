"""The sharpness estimators of rdr_fast.analysis on one split, as `python -m rdr_fast.analyze`
runs them: Fashion-MNIST-LT's (IF 100) Few split, per device.

The model is a freshly initialised ``small_cnn`` (10 classes, 1×28×28 inputs; the cost of a
Hessian-vector product does not depend on the weights), the data random images with the
Few split's training counts (166, 100, 60 images of classes 7, 8, 9: 326 in all), in
batches of 256 as analyze makes them (``--num-batches 2`` holds the whole split). Losses:
``rdr`` is the run's RDRLoss (reweight="rdr", prototypes set by one training-mode call),
``ce`` plain cross-entropy. Rows, one group per device:

- ``hvp``: one Hessian-vector product over the split (each product redoes the forward
  pass of both batches);
- ``extremes``: hessian_extremes, λ_max and λ_min from one Lanczos run of ITERS steps
  (tol 0, so every row runs all of them, as a trained model's spectrum does);
- ``trace``: hessian_trace, Hutchinson with TRACE_SAMPLES vectors;
- ``density``: hessian_density, DENSITY_RUNS SLQ runs of DENSITY_STEPS steps (analyze
  draws it for the trained loss only).

analyze of one split is ``extremes`` + ``trace`` for both losses; its ``--classes few``
run adds each Few class on its own, spectrum.png (``density``) and landscape.png (one
more Lanczos run). The defaults are the settings of docs/results.md's sharpness study
(``--iters 60``, 50 trace vectors, 3 × 60 density steps).

Run: pytest bench/bench_analysis.py --benchmark-only --benchmark-group-by=group
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rdr_fast import RDRLoss, analysis
from rdr_fast.models import build_model
from conftest import CPU_AND_CUDA, SMOKE, rounds, timed

COUNTS = [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]  # fmnist_lt, IF 100
FEW = (7, 10)
BATCH = 256
ITERS, TRACE_SAMPLES, DENSITY_STEPS, DENSITY_RUNS = (3, 2, 3, 1) if SMOKE else (60, 50, 60, 3)


def few_split_batches(device: str, seed: int = 0) -> list:
    """The Few split's samples (random images, the split's class counts) in batches of BATCH."""
    g = torch.Generator().manual_seed(seed)
    counts = [4, 3, 2] if SMOKE else COUNTS[FEW[0]:FEW[1]]
    labels = torch.cat([torch.full((n,), c) for c, n in zip(range(*FEW), counts)])
    images = torch.randn(len(labels), 1, 28, 28, generator=g)
    return [(images[i:i + BATCH].to(device), labels[i:i + BATCH].to(device)) for i in range(0, len(labels), BATCH)]


def model_and_losses(device: str, batches: list):
    torch.manual_seed(0)
    model = build_model("small_cnn", len(COUNTS), in_channels=1).to(device)
    criterion = RDRLoss(COUNTS, model.feat_dim, reweight="rdr").to(device)
    inputs, targets = batches[0]
    with torch.no_grad():
        criterion(*model(inputs), targets)  # training mode: the Few classes' prototypes are set
    criterion.eval()
    losses = {"rdr": lambda out, y: criterion(out[0], out[1], y),
              "ce": lambda out, y: F.cross_entropy(out[1], y)}
    return model.eval(), losses


ESTIMATORS = {
    "hvp": lambda model, fn, batches: analysis.HessianOperator(model, fn, batches)(
        torch.ones(sum(p.numel() for p in model.parameters()), device=batches[0][0].device)).sum(),
    "extremes": lambda model, fn, batches: analysis.hessian_extremes(model, fn, batches, iters=ITERS, tol=1e-300,
                                                                     progress=False),
    "trace": lambda model, fn, batches: analysis.hessian_trace(model, fn, batches, samples=TRACE_SAMPLES,
                                                               progress=False),
    "density": lambda model, fn, batches: analysis.hessian_density(model, fn, batches, steps=DENSITY_STEPS,
                                                                   runs=DENSITY_RUNS, progress=False),
}
ROWS = [(e, loss) for e in ("hvp", "extremes", "trace") for loss in ("rdr", "ce")] + [("density", "rdr")]


@pytest.mark.parametrize("estimator,loss", ROWS, ids=[f"{e}-{loss}" for e, loss in ROWS])
@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_sharpness_of_the_few_split(benchmark, device, estimator, loss):
    batches = few_split_batches(device)
    model, losses = model_and_losses(device, batches)
    benchmark.group = f"analysis/{device}/small_cnn/fmnist_lt-few"
    benchmark.extra_info.update(method=f"{estimator} {loss}", device=device, samples=sum(len(y) for _, y in batches),
                                iters=ITERS, trace_samples=TRACE_SAMPLES, density=f"{DENSITY_RUNS}x{DENSITY_STEPS}")

    run = timed(lambda: ESTIMATORS[estimator](model, losses[loss], batches), device)
    many = estimator == "hvp"  # one product is cheap; a whole estimator lasts seconds on a CPU
    out = benchmark.pedantic(run, rounds=rounds(20 if many else 1, 20 if many else 3, device), iterations=1,
                             warmup_rounds=0 if SMOKE or (device == "cpu" and not many) else 1)
    values = out.density if estimator == "density" else torch.as_tensor(out)
    assert torch.isfinite(values).all()
