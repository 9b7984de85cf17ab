"""The torch loader: a DataLoader over the dataset's own items (its per-item transform)."""
from __future__ import annotations

import torch

from . import augment
from .sampling import EpochLoader, SeededShuffleSampler


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
    """Batches of train_plan / test_plan as index lists (the torch loader's sharded path),
    or with with_draws as lists of (index, that position's draws) items, which a
    TensorImageDataset augments with the plan's draws instead of its own."""

    def __init__(self, plan_source: EpochLoader, with_draws: bool = False):
        self.src, self.with_draws = plan_source, with_draws

    def set_epoch(self, epoch: int) -> None:
        self.src.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.src)

    def __iter__(self):
        plan = self.src.next_plan()
        for lo, hi in plan.steps:
            if self.with_draws:
                yield [(int(plan.idx[k]), plan.draws_at(k)) for k in range(lo, hi)]
            else:
                yield plan.idx[lo:hi].tolist()


def _common(num_workers, device):
    return dict(num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                persistent_workers=num_workers > 0, device=device)


def torch_loaders(ds, batch_size, *, seed, num_workers, device, shard_id, num_shards):
    """(train, test) TorchLoaders; one shard (the usual case) keeps DataLoader's own
    batching over a SeededShuffleSampler, several shards batch by the sampling plans. An
    in-memory train set with AutoAugment or Cutout is always served by its plan, every
    item with the plan's draws: its batches are then a function of (seed, epoch) alone,
    whatever num_workers, and equal the gpu loader's."""
    common = _common(num_workers, device)
    gen = torch.Generator().manual_seed(seed)
    test = torch_eval_loader(ds.test, batch_size, num_workers=num_workers, device=device,
                             shard_id=shard_id, num_shards=num_shards)
    fmt = getattr(ds.train, "image_format", None)
    planned = fmt is not None and fmt.kind == "tensor" and augment.needs_draws(fmt)
    if num_shards == 1 and not planned:
        train = TorchLoader(ds.train, batch_size=batch_size,
                            sampler=SeededShuffleSampler(len(ds.train), seed), drop_last=False,
                            generator=gen, **common)
        return train, test
    draws = dict(pad=fmt.pad, flip=fmt.flip, augment_draws=augment.plan_draws(fmt)) if planned else {}
    tr = EpochLoader(len(ds.train), batch_size, seed=seed, shard_id=shard_id, num_shards=num_shards, **draws)
    train = TorchLoader(ds.train, batch_sampler=ShardBatchSampler(tr, with_draws=planned),
                        generator=gen, **common)
    return train, test


def torch_eval_loader(dataset, batch_size, *, num_workers, device, shard_id, num_shards):
    """A TorchLoader over an evaluation split (test or val) in order: this shard's slice."""
    common = _common(num_workers, device)
    if num_shards == 1:
        return TorchLoader(dataset, batch_size=batch_size, shuffle=False, **common)
    plans = EpochLoader(len(dataset), batch_size, train=False, shard_id=shard_id, num_shards=num_shards)
    return TorchLoader(dataset, batch_sampler=ShardBatchSampler(plans), **common)
