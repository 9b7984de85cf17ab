"""AutoAugment and Cutout on uint8 image batches, driven by per-sample random draws.

The draws (which sub-policy, which of its two ops apply, their signs, the Cutout centre)
are made up front (`draw`), from an epoch generator in the loaders' sampling plans or
from torch's global RNG for a dataset indexed directly; `apply` then transforms a batch
with them. The same draws give the same images on every loader that uses this module
(torch items one at a time, the gpu-resident loader in batches), on any device up to
float rounding inside the geometric ops.

AutoAugment ("AutoAugment: Learning Augmentation Strategies from Data", arXiv:1805.09501)
uses torchvision's policy tables, magnitude bins and image ops
(torchvision.transforms.v2.AutoAugment), with mid-grey fill (FILL) as the authors of RDR
(GoodMorningPeter/RDR, utils/autoaug.py) and DALI do; torchvision's default is black.
One op is applied to all samples that drew it with the same magnitude at once.

Cutout ("Improved Regularization of Convolutional Neural Networks with Cutout",
arXiv:1708.04552), as GoodMorningPeter/RDR applies it: one hole whose centre (y, x) is
uniform over the whole image, the box [y - L//2, y + L//2) x [x - L//2, x + L//2)
clipped at the borders (not shifted), zero fill on raw pixels (RDR cuts after ToTensor,
before Normalize, so the hole is black).
"""
from __future__ import annotations

import functools

import torch

FILL = 128          # geometric ops fill uncovered pixels with mid-grey
NUM_BINS = 10       # torchvision's magnitude bins


@functools.lru_cache(maxsize=None)
def _autoaugment(policy: str):
    from torchvision.transforms import v2
    return v2.AutoAugment(v2.AutoAugmentPolicy(policy), fill=FILL)


@functools.lru_cache(maxsize=None)
def sub_policies(policy: str, height: int, width: int):
    """torchvision's sub-policies of `policy` ("cifar10", "imagenet", "svhn") for images
    of height x width: per sub-policy, two (op name, probability, magnitude, signed)."""
    aa = _autoaugment(policy)
    table = []
    for pair in aa._policies:
        ops = []
        for name, prob, index in pair:
            magnitudes, signed = aa._AUGMENTATION_SPACE[name]
            values = magnitudes(NUM_BINS, height, width)
            ops.append((name, prob, 0.0 if values is None else float(values[index]),
                        signed and values is not None))
        table.append(tuple(ops))
    return tuple(table)


def needs_draws(fmt) -> bool:
    """Whether the image format's train augmentation has AutoAugment or Cutout."""
    return fmt.autoaugment != "none" or fmt.cutout > 0


def plan_draws(fmt):
    """What the loaders give sampling.EpochLoader as augment_draws: draw for `fmt`, or
    None when the format has neither AutoAugment nor Cutout."""
    return functools.partial(draw, fmt) if needs_draws(fmt) else None


def draw(fmt, n: int, generator: torch.Generator | None = None) -> dict:
    """Per-sample draws for n samples of `fmt` (CPU tensors with leading dim n):
    policy int64 [n] (the sub-policy), apply bool [n, 2] (op k runs iff u_k <= p_k, as in
    torchvision), negate bool [n, 2] (a signed op's magnitude is negated, p = 0.5);
    cutout int64 [n, 2] (the hole's centre y, x). Empty for a format without either."""
    out = {}
    if fmt.autoaugment != "none":
        table = sub_policies(fmt.autoaugment, *fmt.size)
        probs = torch.tensor([[op[1] for op in pair] for pair in table])
        policy = torch.randint(len(table), (n,), generator=generator)
        out["policy"] = policy
        out["apply"] = torch.rand(n, 2, generator=generator) <= probs[policy]
        out["negate"] = torch.rand(n, 2, generator=generator) <= 0.5
    if fmt.cutout:
        h, w = fmt.size
        out["cutout"] = torch.stack([torch.randint(h, (n,), generator=generator),
                                     torch.randint(w, (n,), generator=generator)], 1)
    return out


def autoaugment(x: torch.Tensor, policy: str, choice, apply, negate) -> torch.Tensor:
    """x uint8 [B, C, H, W] (C = 1 or 3) -> AutoAugment `policy` with the given draws
    (see `draw`): each sample's first op, then its second."""
    aa = _autoaugment(policy)
    table = sub_policies(policy, *x.shape[-2:])
    choice, apply, negate = (torch.as_tensor(t).tolist() for t in (choice, apply, negate))
    x = x.clone()
    for stage in (0, 1):
        groups = {}                                # (op, magnitude) -> rows
        for row, (k, on, neg) in enumerate(zip(choice, apply, negate)):
            if on[stage]:
                name, _, magnitude, signed = table[k][stage]
                groups.setdefault((name, -magnitude if signed and neg[stage] else magnitude),
                                  []).append(row)
        for (name, magnitude), rows in groups.items():
            rows = torch.tensor(rows, device=x.device)
            x[rows] = aa._apply_image_or_video_transform(x[rows], name, magnitude,
                                                         interpolation=aa.interpolation,
                                                         fill=aa._fill)
    return x


def cutout(x: torch.Tensor, centres, length: int) -> torch.Tensor:
    """x [B, C, H, W], centres int [B, 2] (y, x) -> x with each sample's box
    [y - length//2, y + length//2) x [x - length//2, x + length//2), clipped to the
    image, set to zero in every channel."""
    h, w = x.shape[-2:]
    centres = torch.as_tensor(centres, device=x.device)
    half = length // 2
    rows = torch.arange(h, device=x.device) - centres[:, :1]          # [B, H]: row - y
    cols = torch.arange(w, device=x.device) - centres[:, 1:]          # [B, W]: col - x
    inside = ((rows >= -half) & (rows < half))[:, :, None] & ((cols >= -half) & (cols < half))[:, None, :]
    return x.masked_fill(inside[:, None], 0)


def apply(x: torch.Tensor, fmt, draws: dict) -> torch.Tensor:
    """x uint8 [B, C, H, W] after the basic augmentation -> AutoAugment, then Cutout, as
    `fmt` asks, with `draws` (see `draw`) for these B samples."""
    if fmt.autoaugment != "none":
        x = autoaugment(x, fmt.autoaugment, draws["policy"], draws["apply"], draws["negate"])
    if fmt.cutout:
        x = cutout(x, draws["cutout"], fmt.cutout)
    return x


class Cutout:
    """Cutout as a torchvision transform of one image tensor [C, H, W] (any dtype, e.g.
    after ToTensor), centre drawn from torch's global RNG (the file datasets' torch path)."""

    def __init__(self, length: int):
        self.length = int(length)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        centre = torch.stack([torch.randint(h, ()), torch.randint(w, ())])[None]
        return cutout(img[None], centre, self.length)[0]

    def __repr__(self) -> str:
        return f"Cutout(length={self.length})"
