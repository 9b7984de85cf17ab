"""Loader back-ends behind rdr_fast.data.make_loaders: torch, gpu-resident, DALI.

Every loader is an iterable of (x float32 [B, C, H, W] on the device, y int64 [B]) with
len() = steps per pass and set_epoch(e). Each pass uses the current epoch and then
increments it (SeededShuffleSampler's convention), so successive passes differ while
epoch e's sample order depends only on (seed, e); call set_epoch(e) to resume at e.

The sample order of epoch e is the torch loader's: randperm(N) from a Generator seeded
with seed * 1_000_003 + e. The gpu and DALI in-memory loaders also draw their crop
offsets and flips from that generator (after the permutation), per position in the
epoch, so for a given (seed, epoch) they produce the same batches (bit for bit up to
float rounding of the normalisation), on any device and any number of shards.

Sharding (shard_id / num_shards, the convention of rdr_fast.distributed): batch_size
is the global batch; global batch t is perm[t*B:(t+1)*B] and shard r takes its
contiguous share of it, so N shards see exactly the samples one process sees, step for
step; a final global batch smaller than num_shards is dropped so every shard takes the
same number of steps. Test sets are cut into contiguous, disjoint shards, no padding,
batches of max(1, B // num_shards).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

LOADERS = ("auto", "torch", "dali", "gpu")


# ----------------------------------------------------------------------------- plans

def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """SeededShuffleSampler's generator for (seed, epoch)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))


def _shard_range(total: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    return total * shard_id // num_shards, total * (shard_id + 1) // num_shards


def _check_shard(shard_id: int, num_shards: int) -> None:
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"need 0 <= shard_id < num_shards, got shard_id={shard_id}, "
                         f"num_shards={num_shards}")


class Plan:
    """One pass of one shard: sample indices in visiting order plus, per sample, the
    crop offsets (top, left in 0..2*pad) and the flip flag; steps[k] = (lo, hi) into
    those arrays. All CPU tensors (int64, bool)."""

    def __init__(self, idx, top, left, flip, steps):
        self.idx, self.top, self.left, self.flip, self.steps = idx, top, left, flip, steps

    def __len__(self) -> int:
        return len(self.steps)


def train_steps(n: int, batch_size: int, shard_id: int = 0, num_shards: int = 1) -> list:
    """[(lo, hi)] into the epoch permutation: this shard's part of each global batch."""
    steps = []
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        if size < num_shards:          # a shard would get nothing: drop it on every shard
            continue
        lo, hi = _shard_range(size, shard_id, num_shards)
        steps.append((start + lo, start + hi))
    return steps


def train_plan(n, batch_size, seed, epoch, *, pad=0, flip=False, shard_id=0, num_shards=1) -> Plan:
    g = epoch_generator(seed, epoch)
    perm = torch.randperm(n, generator=g)            # == SeededShuffleSampler's order
    offsets = (torch.randint(0, 2 * pad + 1, (n, 2), generator=g) if pad
               else torch.full((n, 2), 0, dtype=torch.int64))
    flips = torch.rand(n, generator=g) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    steps = train_steps(n, batch_size, shard_id, num_shards)
    if num_shards == 1:
        rows, local = torch.arange(n), steps
    else:                                            # keep only this shard's positions
        rows = torch.cat([torch.arange(lo, hi) for lo, hi in steps]) if steps else \
            torch.zeros(0, dtype=torch.int64)
        sizes = [hi - lo for lo, hi in steps]
        ends = np.cumsum(sizes).tolist()
        local = [(e - s, e) for s, e in zip(sizes, ends)]
    return Plan(perm[rows], offsets[rows, 0], offsets[rows, 1], flips[rows], local)


def test_plan(n, batch_size, *, shard_id=0, num_shards=1) -> Plan:
    """Fixed order; contiguous shard; batches of max(1, batch_size // num_shards)."""
    lo, hi = _shard_range(n, shard_id, num_shards)
    per = max(1, batch_size // num_shards)
    m = hi - lo
    zeros = torch.zeros(m, dtype=torch.int64)
    return Plan(torch.arange(lo, hi), zeros, zeros, torch.zeros(m, dtype=torch.bool),
                [(s, min(m, s + per)) for s in range(0, m, per)])


class EpochLoader:
    """Base: epoch bookkeeping shared by the gpu and DALI loaders."""

    def __init__(self, n, batch_size, *, seed=0, train=True, pad=0, flip=False,
                 shard_id=0, num_shards=1):
        _check_shard(shard_id, num_shards)
        self.n, self.batch_size, self.seed, self.train = n, int(batch_size), int(seed), train
        self.pad, self.flip = (int(pad), bool(flip)) if train else (0, False)
        self.shard_id, self.num_shards = shard_id, num_shards
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def plan(self, epoch=None) -> Plan:
        if not self.train:
            return test_plan(self.n, self.batch_size, shard_id=self.shard_id,
                             num_shards=self.num_shards)
        return train_plan(self.n, self.batch_size, self.seed,
                          self.epoch if epoch is None else epoch, pad=self.pad, flip=self.flip,
                          shard_id=self.shard_id, num_shards=self.num_shards)

    def _next_plan(self) -> Plan:
        plan = self.plan()
        if self.train:
            self.epoch += 1
        return plan

    @property
    def max_batch(self) -> int:
        if self.train:
            return -(-self.batch_size // self.num_shards)
        return max(1, self.batch_size // self.num_shards)

    def __len__(self) -> int:
        if self.train:
            return len(train_steps(self.n, self.batch_size, self.shard_id, self.num_shards))
        return len(self.plan())


# ----------------------------------------------------------------------------- gpu-resident

class GPUResidentLoader(EpochLoader):
    """The whole uint8 set on `device` (CUDA or CPU), augmented in batches with torch ops.

    Train: zero padding by `pad` (done once), per-image integer crop offsets in
    0..2*pad and horizontal flips as one gather per batch, then float and normalise
    ((x / scale - mean) / std, the dataset's own constants) — torchvision's
    RandomCrop(H, padding=pad) + RandomHorizontalFlip() + Normalize. Test: normalise
    only. No per-sample Python; one small plan transfer per epoch.
    """

    def __init__(self, dataset, batch_size, *, seed=0, train=True, device="cpu",
                 shard_id=0, num_shards=1):
        super().__init__(len(dataset), batch_size, seed=seed, train=train,
                         pad=getattr(dataset, "pad", 0), flip=getattr(dataset, "flip", False),
                         shard_id=shard_id, num_shards=num_shards)
        self.device = torch.device(device)
        images = dataset.images.to(self.device)
        self.channels, self.height, self.width = images.shape[1:]
        self.images = F.pad(images, (self.pad,) * 4) if self.pad else images
        self.targets = dataset.targets.to(self.device)
        self.a = dataset._a.to(self.device)          # 1 / (scale * std), [C, 1, 1]
        self.b = dataset._b.to(self.device)          # -mean / std
        h, w, p = self.height, self.width, self.pad
        self._rows = torch.arange(h, device=self.device)
        self._cols = torch.arange(w, device=self.device)
        self._wp, self._hwp = w + 2 * p, (h + 2 * p) * (w + 2 * p)

    def _augment(self, x, top, left, flip):
        """x uint8 [b, C, H+2p, W+2p] -> crops [b, C, H, W] (flipped where flip)."""
        b, c = x.shape[:2]
        rows = top[:, None] + self._rows                                     # [b, H]
        cols = torch.where(flip[:, None], (self.width - 1) - self._cols, self._cols) + left[:, None]
        lin = (rows[:, :, None] * self._wp + cols[:, None, :]).view(b, 1, -1)
        return x.reshape(b, c, self._hwp).gather(2, lin.expand(b, c, lin.shape[-1])).view(
            b, c, self.height, self.width)

    def __iter__(self):
        plan = self._next_plan()
        dev = self.device
        idx = plan.idx.to(dev, non_blocking=True)
        augment = self.train and (self.pad or self.flip)
        if augment:
            top, left, flip = (t.to(dev, non_blocking=True) for t in (plan.top, plan.left, plan.flip))
        for lo, hi in plan.steps:
            if self.train:
                rows = idx[lo:hi]
                x = self.images.index_select(0, rows)
                y = self.targets.index_select(0, rows)
            else:                                   # test: contiguous, no copy before float
                s, e = int(plan.idx[lo]), int(plan.idx[hi - 1]) + 1
                x, y = self.images[s:e], self.targets[s:e]
            if augment:
                x = self._augment(x, top[lo:hi], left[lo:hi], flip[lo:hi])
            yield torch.addcmul(self.b, x.float(), self.a), y


# ----------------------------------------------------------------------------- torch

class TorchLoader(torch.utils.data.DataLoader):
    """torch DataLoader with set_epoch(e) and an optional device move of each batch
    (pinned memory, non-blocking copy). Still a DataLoader: .sampler.set_epoch works."""

    def __init__(self, *args, device=None, **kwargs):
        super().__init__(*args, **kwargs)
        dev = torch.device(device) if device is not None else None
        self._device = dev if dev is not None and dev.type != "cpu" else None

    def set_epoch(self, epoch: int) -> None:
        for obj in (self.batch_sampler, self.sampler):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
                return

    def __iter__(self):
        it = super().__iter__()
        if self._device is None:
            return it
        return ((x.to(self._device, non_blocking=True), y.to(self._device, non_blocking=True))
                for x, y in it)


class ShardBatchSampler(torch.utils.data.Sampler):
    """Batches of train_plan / test_plan as index lists (the torch loader's sharded path)."""

    def __init__(self, plan_source: EpochLoader):
        self.src = plan_source

    def set_epoch(self, epoch: int) -> None:
        self.src.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.src)

    def __iter__(self):
        plan = self.src._next_plan()
        for lo, hi in plan.steps:
            yield plan.idx[lo:hi].tolist()


def torch_loaders(ds, batch_size, *, seed, num_workers, device, shard_id, num_shards):
    from . import SeededShuffleSampler
    common = dict(num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                  persistent_workers=num_workers > 0, device=device)
    gen = torch.Generator().manual_seed(seed)
    if num_shards == 1:
        train = TorchLoader(ds.train, batch_size=batch_size,
                            sampler=SeededShuffleSampler(len(ds.train), seed), drop_last=False,
                            generator=gen, **common)
        test = TorchLoader(ds.test, batch_size=batch_size, shuffle=False, **common)
        return train, test
    _check_shard(shard_id, num_shards)
    tr = EpochLoader(len(ds.train), batch_size, seed=seed, shard_id=shard_id, num_shards=num_shards)
    te = EpochLoader(len(ds.test), batch_size, train=False, shard_id=shard_id, num_shards=num_shards)
    train = TorchLoader(ds.train, batch_sampler=ShardBatchSampler(tr), generator=gen, **common)
    test = TorchLoader(ds.test, batch_sampler=ShardBatchSampler(te), **common)
    return train, test


# ----------------------------------------------------------------------------- factory

def is_in_memory(dataset) -> bool:
    from ._common import TensorImageDataset
    return isinstance(dataset, TensorImageDataset)


def is_file_list(dataset) -> bool:
    from ._oltr import ListImageDataset
    return isinstance(dataset, ListImageDataset)


def resolve_loader(ds, loader: str = "auto", device=None) -> str:
    """The back-end `auto` means for this dataset and device: gpu-resident for
    in-memory tensor datasets on a CUDA device, DALI for JPEG list datasets when
    DALI is installed, torch otherwise. Explicit choices are validated."""
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)}")
    cuda = device is not None and torch.device(device).type == "cuda"
    if loader == "auto":
        if is_in_memory(ds.train) and cuda:
            return "gpu"
        if is_file_list(ds.train):
            from ._dali import dali_available
            if dali_available():
                return "dali"
        return "torch"
    if loader == "gpu" and not is_in_memory(ds.train):
        raise ValueError(f"loader 'gpu' needs an in-memory tensor dataset (digits_lt, fmnist_lt, "
                         f"cifar*_lt); {ds.name} reads image files: use 'dali' or 'torch'")
    if loader == "dali" and not (is_in_memory(ds.train) or is_file_list(ds.train)):
        raise ValueError(f"loader 'dali' does not support {type(ds.train).__name__}")
    return loader


def default_threads(num_workers: int) -> int:
    """DALI CPU threads: num_workers when given, else up to 4 of this machine's cores."""
    return num_workers if num_workers > 0 else max(1, min(4, os.cpu_count() or 1))


def build_loaders(ds, batch_size, *, seed=0, num_workers=0, loader="auto", device=None,
                  shard_id=0, num_shards=1):
    kind = resolve_loader(ds, loader, device)
    common = dict(seed=seed, shard_id=shard_id, num_shards=num_shards)
    if kind == "torch":
        return torch_loaders(ds, batch_size, num_workers=num_workers, device=device, **common)
    if kind == "gpu":
        dev = device if device is not None else "cpu"
        return (GPUResidentLoader(ds.train, batch_size, train=True, device=dev, **common),
                GPUResidentLoader(ds.test, batch_size, train=False, device=dev, **common))
    from . import _dali
    threads = default_threads(num_workers)
    if is_in_memory(ds.train):
        cls, extra = _dali.DALIArrayLoader, {}
    else:
        cls, extra = _dali.DALIFileLoader, {"image_size": ds.image_size}
    return (cls(ds.train, batch_size, train=True, device=device, num_threads=threads, **extra, **common),
            cls(ds.test, batch_size, train=False, device=device, num_threads=threads, **extra, **common))


def set_epoch(loader, epoch: int) -> None:
    """Loader-agnostic set_epoch: the loader's own, else its batch sampler's or sampler's."""
    for obj in (loader, getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
            return
