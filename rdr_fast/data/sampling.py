"""The sample order of every loader, and how it is cut into shards.

Every loader is an iterable of (x float32 [B, C, H, W] on the device, y int64 [B]) with
len() = steps per pass and set_epoch(e). Each pass uses the current epoch and then
increments it (SeededShuffleSampler's convention), so successive passes differ while
epoch e's sample order depends only on (seed, e); call set_epoch(e) to resume at e.

The sample order of epoch e is the torch loader's: randperm(N) from a Generator seeded
with seed * 1_000_003 + e. The gpu and DALI in-memory loaders also draw their crop
offsets and flips from that generator (after the permutation), per position in the
epoch, so for a given (seed, epoch) they produce the same batches (bit for bit up to
float rounding of the normalisation), on any device and any number of shards. A format
with AutoAugment or Cutout adds that augmentation's draws (rdr_fast.data.augment.draw)
after the flips; the torch loader then serves its items from the plan too, so those
three loaders agree on the crops, flips and Cutout holes, and the torch and gpu
loaders on the AutoAugment ops as well.

Sharding (shard_id / num_shards, the convention of rdr_fast.distributed): batch_size
is the global batch; global batch t is perm[t*B:(t+1)*B] and shard r takes its
contiguous share of it, so N shards see exactly the samples one process sees, step for
step; a final global batch smaller than num_shards is dropped so every shard takes the
same number of steps. Test sets are cut into contiguous, disjoint shards, no padding,
batches of max(1, B // num_shards).
"""
from __future__ import annotations

import numpy as np
import torch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of epoch `epoch`: its sample order, then (gpu and DALI loaders) its
    crop offsets and flips."""
    # Large odd multiplier: distinct (seed, epoch) pairs map to distinct generator seeds.
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))


class SeededShuffleSampler(torch.utils.data.Sampler):
    """Shuffles 0..n-1 with a torch.Generator seeded by (seed, epoch).

    Each pass uses epoch `self.epoch` and then increments it, so successive epochs differ
    while epoch e's order depends only on (seed, e), not on how many loaders or
    iterators were created before. To resume at epoch e call set_epoch(e) first.
    """

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = epoch_generator(self.seed, self.epoch)
        self.epoch += 1
        return iter(torch.randperm(self.n, generator=g).tolist())


def shard_range(total: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """[lo, hi): shard `shard_id`'s contiguous share of `total` items; the shares'
    sizes differ by at most one."""
    return total * shard_id // num_shards, total * (shard_id + 1) // num_shards


def check_shard(shard_id: int, num_shards: int) -> None:
    """ValueError naming both arguments unless 0 <= shard_id < num_shards."""
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"need 0 <= shard_id < num_shards, got shard_id={shard_id}, "
                         f"num_shards={num_shards}")


class Plan:
    """One pass of one shard: sample indices in visiting order plus, per sample, the
    crop offsets (top, left in 0..2*pad), the flip flag and `draws` (a dict of the
    augmentation's further per-sample tensors, leading dim = len(idx)); steps[k] =
    (lo, hi) into those arrays. All CPU tensors (int64, bool)."""

    def __init__(self, idx, top, left, flip, steps, draws=None):
        self.idx, self.top, self.left, self.flip, self.steps = idx, top, left, flip, steps
        self.draws = draws or {}

    def __len__(self) -> int:
        return len(self.steps)

    def draws_at(self, k: int) -> dict:
        """Position k's draws as plain Python values (what a DataLoader worker receives):
        top, left, flip and each entry of `draws` as a one-sample list."""
        out = dict(top=int(self.top[k]), left=int(self.left[k]), flip=bool(self.flip[k]))
        out.update({name: t[k:k + 1].tolist() for name, t in self.draws.items()})
        return out


def train_steps(n: int, batch_size: int, shard_id: int = 0, num_shards: int = 1) -> list:
    """[(lo, hi)] into the epoch permutation: this shard's part of each global batch."""
    steps = []
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        if size < num_shards:          # a shard would get nothing: drop it on every shard
            continue
        lo, hi = shard_range(size, shard_id, num_shards)
        steps.append((start + lo, start + hi))
    return steps


def train_plan(n, batch_size, seed, epoch, *, pad=0, flip=False, augment_draws=None,
               shard_id=0, num_shards=1) -> Plan:
    """Epoch `epoch` of this shard: the epoch generator's permutation, then per position
    its crop offsets in 0..2*pad and its flip, then augment_draws(n, generator) (a dict
    of per-position tensors) if given, drawn in that order for all n positions (so
    every shard and device sees the same draws)."""
    g = epoch_generator(seed, epoch)
    perm = torch.randperm(n, generator=g)            # == SeededShuffleSampler's order
    offsets = (torch.randint(0, 2 * pad + 1, (n, 2), generator=g) if pad
               else torch.full((n, 2), 0, dtype=torch.int64))
    flips = torch.rand(n, generator=g) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    draws = augment_draws(n, g) if augment_draws else {}
    steps = train_steps(n, batch_size, shard_id, num_shards)
    if num_shards == 1:
        rows, local = torch.arange(n), steps
    else:                                            # keep only this shard's positions
        rows = torch.cat([torch.arange(lo, hi) for lo, hi in steps]) if steps else \
            torch.zeros(0, dtype=torch.int64)
        sizes = [hi - lo for lo, hi in steps]
        ends = np.cumsum(sizes).tolist()
        local = [(e - s, e) for s, e in zip(sizes, ends)]
    return Plan(perm[rows], offsets[rows, 0], offsets[rows, 1], flips[rows], local,
                {name: t[rows] for name, t in draws.items()})


def test_plan(n, batch_size, *, shard_id=0, num_shards=1) -> Plan:
    """Fixed order; contiguous shard; batches of max(1, batch_size // num_shards)."""
    lo, hi = shard_range(n, shard_id, num_shards)
    per = max(1, batch_size // num_shards)
    m = hi - lo
    zeros = torch.zeros(m, dtype=torch.int64)
    return Plan(torch.arange(lo, hi), zeros, zeros, torch.zeros(m, dtype=torch.bool),
                [(s, min(m, s + per)) for s in range(0, m, per)])


class EpochLoader:
    """Base: epoch bookkeeping shared by the gpu and DALI loaders and the torch loader's
    sharded batch sampler. Train passes follow train_plan, test passes test_plan."""

    def __init__(self, n, batch_size, *, seed=0, train=True, pad=0, flip=False,
                 augment_draws=None, shard_id=0, num_shards=1):
        check_shard(shard_id, num_shards)
        self.n, self.batch_size, self.seed, self.train = n, int(batch_size), int(seed), train
        self.pad, self.flip = (int(pad), bool(flip)) if train else (0, False)
        self.augment_draws = augment_draws if train else None
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
                          augment_draws=self.augment_draws, shard_id=self.shard_id, num_shards=self.num_shards)

    def next_plan(self) -> Plan:
        """The plan of the pass that starts now; a train loader then moves to the next epoch."""
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
