"""make_loaders: picks a loader back-end for a dataset and device, and builds it."""
from __future__ import annotations

import os

import torch

from . import dali_loader
from .common import LTDataset
from .gpu_loader import GPUResidentLoader
from .sampling import check_shard
from .torch_loader import torch_eval_loader, torch_loaders

LOADERS = ("auto", "torch", "dali", "gpu")


def image_kind(dataset) -> str | None:
    """The dataset's ImageFormat kind ("tensor" or "files"); None for a dataset without a
    image format (any torch Dataset of normalised items), which only the torch loader takes."""
    fmt = getattr(dataset, "image_format", None)
    return None if fmt is None else fmt.kind


def _beyond_dali(ds) -> set:
    """The image formats (as Pillow names them) of the dataset's files that DALI cannot decode."""
    return set(getattr(ds.train, "formats", ())) - dali_loader.DALI_FORMATS


def resolve_loader(ds, loader: str = "auto", device=None) -> str:
    """The back-end `auto` means for this dataset and device: gpu-resident for
    in-memory tensor images on a CUDA device, DALI for image files when DALI is
    installed and decodes all their formats (``ds.train.formats``, where the builder
    found them), torch otherwise. Explicit choices are validated."""
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)}")
    kind = image_kind(ds.train)
    cuda = device is not None and torch.device(device).type == "cuda"
    if loader == "auto":
        if kind == "tensor" and cuda:
            return "gpu"
        if kind == "files" and dali_loader.dali_available() and not _beyond_dali(ds):
            return "dali"
        return "torch"
    if loader == "gpu" and kind != "tensor":
        raise ValueError(f"loader 'gpu' needs in-memory tensor images (digits_lt, fmnist_lt, "
                         f"cifar*_lt); {ds.name}'s train images are of kind {kind!r}: "
                         "use 'dali' or 'torch'")
    if loader == "dali" and _beyond_dali(ds):
        raise ValueError(f"loader 'dali' cannot decode the {', '.join(sorted(_beyond_dali(ds)))} images of "
                         f"{ds.name} (it decodes {', '.join(sorted(dali_loader.DALI_FORMATS))}): use 'torch'")
    if loader == "dali" and kind is None:
        raise ValueError(f"loader 'dali' needs an ImageFormat on the dataset (ds.train.image_format); "
                         f"{ds.name} has none: use 'torch'")
    if loader == "dali":
        dali_loader.check_autoaugment(ds.train.image_format)
    return loader


def default_threads(num_workers: int) -> int:
    """DALI CPU threads: num_workers when given, else up to 4 of this machine's cores."""
    return num_workers if num_workers > 0 else max(1, min(4, os.cpu_count() or 1))


def make_loaders(ds: LTDataset, batch_size: int, *, seed: int = 0, num_workers: int = 0,
                 loader: str = "auto", device=None, shard_id: int = 0, num_shards: int = 1,
                 val: bool = False):
    """(train_loader, test_loader) for `ds`, and with ``val=True`` a third, the
    validation loader (None where ds.val is None): iterables of (x float32 [B, C, H, W] on
    `device`, y int64 [B]) with len() and set_epoch(e); epoch e's order is a pure
    function of (seed, e) and each pass advances the epoch by one.

    loader: "torch" (DataLoader, num_workers processes), "gpu" (whole uint8 set on
      `device`, batched torch augmentation; in-memory datasets; CPU works too), "dali"
      (NVIDIA DALI, optional extra: pip install "rdr_fast[dali]"; CPU pipelines with
      num_workers threads, default up to 4, GPU/mixed decoding on a CUDA device), or
      "auto": gpu for in-memory datasets on a CUDA device, dali for image-file datasets
      when DALI is installed, torch otherwise (see resolve_loader).
    device: where batches land (None: CPU; the torch loader pins and copies).
    shard_id / num_shards: this process's share for multi-process training; batch_size
      is then the global batch (see rdr_fast.data.sampling for the convention).
    Every loader takes its transforms from the splits' ImageFormat (ds.train.image_format,
    ds.test.image_format: zero-padded random crop + flip p=0.5 for the in-memory sets,
    random-resized crop + flip + colour jitter for the image-file sets; the format's mean/std;
    deterministic test transforms; then AutoAugment / Cutout where the train format has
    them, see rdr_fast.data.augment) and shares the epoch order; train batches are not dropped (the last one is partial). The torch loader
    draws its augmentation from torch's global RNG (call torch.manual_seed) or, with
    workers, from a Generator seeded by `seed` (in-memory sets with AutoAugment or Cutout:
    from the plan of (seed, epoch), whatever num_workers); gpu and dali draw it from
    (seed, epoch).
    """
    check_shard(shard_id, num_shards)
    kind = resolve_loader(ds, loader, device)
    common = dict(seed=seed, shard_id=shard_id, num_shards=num_shards)
    if kind == "torch":
        train, test = torch_loaders(ds, batch_size, num_workers=num_workers, device=device, **common)
        common = dict(shard_id=shard_id, num_shards=num_shards, num_workers=num_workers, device=device)
        make_eval = lambda split: torch_eval_loader(split, batch_size, **common)  # noqa: E731
    else:
        if kind == "gpu":
            common.update(device=device if device is not None else "cpu")
            cls = GPUResidentLoader
        else:
            common.update(device=device, num_threads=default_threads(num_workers))
            cls = (dali_loader.DALIArrayLoader if image_kind(ds.train) == "tensor"
                   else dali_loader.DALIFileLoader)
        make_eval = lambda split: cls(split, batch_size, train=False, **common)  # noqa: E731
        train, test = cls(ds.train, batch_size, train=True, **common), make_eval(ds.test)
    if not val:
        return train, test
    return train, test, None if ds.val is None else make_eval(ds.val)


def set_epoch(loader, epoch: int) -> None:
    """Set the next pass's epoch on any loader (its own set_epoch, else its batch
    sampler's or sampler's): what train.py calls before each epoch."""
    for obj in (loader, getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
            return
