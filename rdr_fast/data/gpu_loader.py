"""The gpu-resident loader: the whole uint8 set on one device, augmented in batches."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import augment
from .sampling import EpochLoader


class GPUResidentLoader(EpochLoader):
    """The whole uint8 set on `device` (CUDA or CPU), augmented in batches with torch ops.

    dataset: images uint8 [N, C, H, W], targets int64 [N] and an ImageFormat of kind
    "tensor" (`dataset.image_format`), which sets the augmentation and the normalisation.
    Train, augment "crop_flip": zero padding by fmt.pad (done once), per-image integer
    crop offsets in 0..2*pad and horizontal flips (if fmt.flip) as one gather per
    batch, then float and normalise ((x / scale - mean) / std) — torchvision's
    RandomCrop(H, padding=pad) + RandomHorizontalFlip() + Normalize. With fmt.autoaugment
    or fmt.cutout, rdr_fast.data.augment then transforms each batch on the device with
    the plan's draws (one op call per distinct (op, magnitude) in the batch, a Python
    loop over its samples to group them), as the torch loader's items do one at a time.
    Test: normalise only. One small plan transfer per epoch.
    """

    def __init__(self, dataset, batch_size, *, seed=0, train=True, device="cpu",
                 shard_id=0, num_shards=1):
        fmt = dataset.image_format
        super().__init__(len(dataset), batch_size, seed=seed, train=train, pad=fmt.pad,
                         flip=fmt.flip, augment_draws=augment.plan_draws(fmt),
                         shard_id=shard_id, num_shards=num_shards)
        self.fmt = fmt
        self.device = torch.device(device)
        images = dataset.images.to(self.device)
        self.channels, self.height, self.width = images.shape[1:]
        self.images = F.pad(images, (self.pad,) * 4) if self.pad else images
        self.targets = dataset.targets.to(self.device)
        self.a, self.b = (t.to(self.device) for t in fmt.affine())   # x * a + b normalises
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
        plan = self.next_plan()
        dev = self.device
        idx = plan.idx.to(dev, non_blocking=True)
        crop_flip = self.train and (self.pad or self.flip)
        if crop_flip:
            top, left, flip = (t.to(dev, non_blocking=True) for t in (plan.top, plan.left, plan.flip))
        for lo, hi in plan.steps:
            if self.train:
                rows = idx[lo:hi]
                x = self.images.index_select(0, rows)
                y = self.targets.index_select(0, rows)
            else:                                   # test: contiguous, no copy before float
                s, e = int(plan.idx[lo]), int(plan.idx[hi - 1]) + 1
                x, y = self.images[s:e], self.targets[s:e]
            if crop_flip:
                x = self._augment(x, top[lo:hi], left[lo:hi], flip[lo:hi])
            if plan.draws:
                x = augment.apply(x, self.fmt, {k: t[lo:hi] for k, t in plan.draws.items()})
            yield torch.addcmul(self.b, x.float(), self.a), y
