"""Loader throughput on CIFAR-shaped data: images/second of one training epoch.

10k random uint8 images 3x32x32 (pad-4 random crop, flip, normalise), batch 128:
- torchvision: the usual CIFAR recipe, PIL images through RandomCrop(32, padding=4),
  RandomHorizontalFlip, ToTensor, Normalize in a DataLoader with W worker processes
  (the baseline);
- torch: rdr_fast's torch loader (TensorImageDataset, no PIL) with W workers;
- gpu: rdr_fast's gpu-resident loader, here on the CPU (batched torch ops);
- dali: rdr_fast's DALI in-memory pipeline, CPU-only, W threads.
Each loader gets one warm-up epoch (worker start-up, pipeline build), then timed epochs.
--augment autoaug / autoaug_cutout adds AutoAugment (CIFAR-10 policy) / and Cutout 16
to every loader: the baseline becomes the authors' recipe (GoodMorningPeter/RDR: PIL
AutoAugment after the flip, Cutout on the tensor), rdr_fast's loaders take
ds.train.with_augment(...).

Run:  python bench/bench_loaders.py [--workers 2] [--rounds 5] [--n 10000] [--device cuda]
      [--augment autoaug_cutout]
      (interleaves the loaders round by round, prints a markdown table), or
      pytest bench/bench_loaders.py --benchmark-only (a cpu and a cuda row per loader)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import pytest
import torch

from rdr_fast.data import LTDataset, TensorImageDataset, augment, class_splits, make_loaders
from conftest import CPU_AND_CUDA, SMOKE, rounds

CIFAR_NORM = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
WORKERS = min(2, os.cpu_count() or 1)


def cifar_like(n: int = 10_000, seed: int = 0) -> LTDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    train = TensorImageDataset(images, labels, *CIFAR_NORM, pad=4, flip=True)
    test = TensorImageDataset(images[:1000], labels[:1000], *CIFAR_NORM)
    return LTDataset(name="cifar_like", train=train, test=test, class_counts=[n // 10] * 10,
                     splits=class_splits("cifar_like", 10), in_channels=3, image_size=32,
                     label_map={c: c for c in range(10)})


class PILCifar(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10's item path: HWC uint8 -> PIL image -> transform."""

    def __init__(self, ds: LTDataset):
        from torchvision import transforms as T
        self.hwc = ds.train.images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = ds.train.targets.numpy()
        fmt = ds.train.image_format
        auto = [T.AutoAugment(T.AutoAugmentPolicy.CIFAR10, fill=augment.FILL)] if fmt.autoaugment != "none" else []
        cut = [augment.Cutout(fmt.cutout)] if fmt.cutout else []
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *auto,
                                    T.ToTensor(), *cut, T.Normalize(*CIFAR_NORM)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.hwc[i])), int(self.labels[i])


def build(kind: str, ds: LTDataset, workers: int, batch: int = 128, device=None):
    if kind == "torchvision":
        loader = torch.utils.data.DataLoader(PILCifar(ds), batch_size=batch, shuffle=True,
                                             num_workers=workers, persistent_workers=workers > 0,
                                             pin_memory=device is not None)
        return loader if device is None else ToDevice(loader, device)
    return make_loaders(ds, batch, seed=0, loader=kind, num_workers=workers, device=device)[0]


class ToDevice:
    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def __iter__(self):
        return ((x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
                for x, y in self.loader)


def epoch(loader) -> int:
    """One pass; every batch is complete on its device when this returns."""
    n, last = 0, None
    for x, y in loader:
        n += len(y)
        last = x
    if last is not None and last.is_cuda:
        torch.cuda.synchronize(last.device)
    return n


KINDS = ["torchvision", "torch", "gpu", "dali"]


def available(kind: str) -> bool:
    if kind != "dali":
        return True
    from rdr_fast.data.dali_loader import dali_available
    return dali_available()


# ----------------------------------------------------------------------------- pytest-benchmark

@pytest.fixture(scope="module")
def dataset():
    return cifar_like(512 if SMOKE else 10_000)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_loader_epoch(benchmark, dataset, device, kind):
    if not available(kind):
        pytest.skip("nvidia.dali is not installed")
    loader = build(kind, dataset, WORKERS, device=None if device == "cpu" else device)
    epoch(loader)                                              # warm-up
    benchmark.group = f"loader/{device}/cifar-{len(dataset.train)}/workers={WORKERS}"
    benchmark.extra_info.update(loader=kind, device=device, workers=WORKERS)
    n = benchmark.pedantic(epoch, args=(loader,), rounds=rounds(3, 3, device), iterations=1)
    assert n == len(dataset.train)
    benchmark.extra_info["images_per_s"] = n / benchmark.stats.stats.min


# ----------------------------------------------------------------------------- script

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default=None, help="where batches land, e.g. cuda (default: CPU)")
    parser.add_argument("--augment", default="basic", choices=("basic", "autoaug", "autoaug_cutout"))
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads of this process (the gpu loader on the CPU "
                             "runs small ops that lose to thread contention on a busy machine)")
    args = parser.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    ds = cifar_like(args.n)
    ds = dataclasses.replace(ds, train=ds.train.with_augment(args.augment))
    kinds = [k for k in KINDS if available(k)]
    loaders = {k: build(k, ds, args.workers, args.batch, args.device) for k in kinds}
    load_before = os.getloadavg()
    for k in kinds:
        epoch(loaders[k])                                      # warm-up
    times = {k: [] for k in kinds}
    for _ in range(args.rounds):                               # interleaved: load noise hits all
        for k in kinds:
            tic = time.perf_counter()
            assert epoch(loaders[k]) == args.n
            times[k].append(time.perf_counter() - tic)
    load_after = os.getloadavg()
    base = args.n / min(times["torchvision"])
    print(f"{args.n} images 3x32x32, batch {args.batch}, {args.workers} workers/threads, "
          f"{args.rounds} timed epochs each (interleaved); augment {args.augment}; "
          f"device {args.device or 'cpu'}; "
          f"torch threads {torch.get_num_threads()}; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print("\n| loader | best img/s | median img/s | best vs torchvision |\n|---|---|---|---|")
    for k in kinds:
        best, med = args.n / min(times[k]), args.n / statistics.median(times[k])
        print(f"| {k} | {best:,.0f} | {med:,.0f} | {best / base:.1f}x |")


if __name__ == "__main__":
    main()
