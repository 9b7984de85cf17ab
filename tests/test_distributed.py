"""torch.distributed on CPU (gloo, 2 processes): synced prototypes, global BatchNorm,
and the training CLI under torchrun against a single process."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rdr_fast
from rdr_fast import distributed, reference
from rdr_fast.data.sampling import shard_range

WORLD = 2
COUNTS = [40, 20, 10, 5, 2]


def global_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    labels = torch.randint(0, len(COUNTS), (24,), generator=g)
    return torch.randn(24, 8, generator=g, dtype=torch.float64), torch.randn(24, 5, generator=g,
                                                                             dtype=torch.float64), labels


def shard(total, rank):
    """Rank's contiguous slice of a global batch, cut by rdr_fast.data's own sharding."""
    return shard_range(total, rank, WORLD)


def _init(rank, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


def _prototype_worker(rank, init_file, out_dir):
    _init(rank, init_file)
    crit = rdr_fast.RDRLoss(COUNTS, 8).double()
    for step in range(4):
        feats, logits, labels = global_batch(step)
        lo, hi = shard(len(labels), rank)
        crit(feats[lo:hi], logits[lo:hi], labels[lo:hi])
    torch.save({"prototypes": crit.prototypes, "seen": crit.seen}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def _batchnorm_worker(rank, init_file, out_dir):
    _init(rank, init_file)
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    lo, hi = shard(8, rank)
    bn = distributed.convert_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), "cpu").double()
    part = x[lo:hi].clone().requires_grad_(True)
    out = bn(part)
    (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    torch.save({"out": out.detach(), "grad": part.grad, "running_var": bn[0].running_var},
               os.path.join(out_dir, f"bn{rank}.pt"))
    dist.destroy_process_group()


def spawn(worker, tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f, weights_only=False) for f in sorted(os.listdir(tmp_path)) if f.endswith(".pt")]


def test_prototypes_identical_across_ranks_and_equal_single_process(tmp_path):
    ranks = spawn(_prototype_worker, tmp_path)
    assert torch.equal(ranks[0]["prototypes"], ranks[1]["prototypes"])
    protos, seen = torch.zeros(5, 8, dtype=torch.float64), torch.zeros(5, dtype=torch.bool)
    for step in range(4):
        feats, _, labels = global_batch(step)
        protos, seen = reference.update_prototypes_ref(protos, seen, feats, labels)
    torch.testing.assert_close(ranks[0]["prototypes"], protos, rtol=1e-12, atol=1e-12)
    assert torch.equal(ranks[0]["seen"], seen)


def test_global_prototype_update_without_a_process_group_is_the_local_update():
    protos = torch.randn(5, 8, dtype=torch.float64)
    seen = torch.tensor([True, False, True, False, True])
    feats, _, labels = global_batch(0)
    expected_protos, expected_seen = reference.update_prototypes_ref(protos, seen, feats, labels, momentum=0.8)
    distributed.update_prototypes_global_(protos, seen, feats, labels, 0.8)
    torch.testing.assert_close(protos, expected_protos, rtol=1e-12, atol=1e-12)
    assert torch.equal(seen, expected_seen)


def test_global_batchnorm_equals_batchnorm_on_the_whole_batch(tmp_path):
    ranks = spawn(_batchnorm_worker, tmp_path)
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    bn = torch.nn.BatchNorm2d(3).double()
    out = bn(x)
    (out * torch.cat([torch.arange(out[:4].numel()), torch.arange(out[4:].numel())]).view_as(out)).sum().backward()
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out.detach())
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), x.grad)
    torch.testing.assert_close(ranks[0]["running_var"], bn.running_var)


def run_cli(tmp_path, name, nproc, *extra):
    out = str(tmp_path / name)
    args = ["-m", "rdr_fast.train", "--epochs", "2", "--batch-size", "64", "--reweight", "none", "--quiet",
            "--out", out, *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    else:
        cmd = [sys.executable, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(out, "metrics.csv")) as handle:
        return list(csv.DictReader(handle)), done.stdout, out


def assert_same_metrics(rows_a, rows_b):
    assert len(rows_a) == len(rows_b)
    for a, b in zip(rows_a, rows_b):
        for key in ("train_loss", "acc_all", "acc_top5", "acc_index_many", "acc_index_few", "acc_count_medium",
                    "acc_balanced", "acc_worst_class", "ece", "nll"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-4), key


@pytest.mark.slow
def test_torchrun_two_processes_match_one_and_resume_with_other_world_size(tmp_path):
    single, _, _ = run_cli(tmp_path, "one", 1)
    double, stdout, _ = run_cli(tmp_path, "two", 2)
    assert stdout.count("after 2 epochs") == 1, "exactly one rank prints the summary"
    assert_same_metrics(single, double)
    _, _, out = run_cli(tmp_path, "switch", 2, "--stop-after", "1")
    resume = subprocess.run([sys.executable, "-m", "rdr_fast.train", "--resume", out, "--quiet"],
                            capture_output=True, text=True, timeout=600)
    assert resume.returncode == 0, resume.stderr[-3000:]
    with open(os.path.join(out, "metrics.csv")) as handle:
        assert_same_metrics(single, list(csv.DictReader(handle)))


def _sam_worker(rank, init_file, out_dir):
    from rdr_fast.sam import make_optimizer
    from rdr_fast.training import train_step
    _init(rank, init_file)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5)).double()

    class Split(torch.nn.Module):  # (features, logits), as rdr_fast models return
        def __init__(self):
            super().__init__()
            self.body, self.fc = model[:2], model[2]

        def forward(self, x):
            features = self.body(x)
            return features, self.fc(features)
    net = Split()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    results = {}
    for variant in ("sam", "asam", "sam_k", "looksam", "imbsam", "ccsam"):
        opt = make_optimizer(variant, net, COUNTS, lr=0.1, rho=0.05, k=2)
        crit = rdr_fast.RDRLoss(COUNTS, 6).double()
        for step in range(3):
            feats, _, labels = global_batch(step)
            lo, hi = shard(len(labels), rank)
            train_step(opt, ddp, crit, feats[lo:hi, :8], labels[lo:hi])
        results[variant] = [p.detach().clone() for p in net.parameters()]
    torch.save(results, os.path.join(out_dir, f"sam{rank}.pt"))
    dist.destroy_process_group()


def test_sam_variants_keep_ranks_identical_under_ddp(tmp_path):
    ranks = spawn(_sam_worker, tmp_path)
    for variant, params in ranks[0].items():
        for a, b in zip(params, ranks[1][variant]):
            assert torch.equal(a, b), variant


@pytest.mark.parametrize("momentum", [0.1, None])
def test_global_batchnorm_equals_batchnorm_in_one_process(momentum):
    """Without a process group GlobalBatchNorm is nn.BatchNorm2d: output, input gradient
    and running statistics (momentum=None: the cumulative average) over a few steps."""
    torch.manual_seed(0)
    ours, theirs = distributed.GlobalBatchNorm(3, momentum=momentum).double(), torch.nn.BatchNorm2d(3, momentum=momentum).double()
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2 + 1
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = ours(xa), theirs(xb)
        torch.testing.assert_close(ya, yb)
        (ya * torch.arange(ya.numel(), dtype=ya.dtype).view_as(ya)).sum().backward()
        (yb * torch.arange(yb.numel(), dtype=yb.dtype).view_as(yb)).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), msg=name)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))
