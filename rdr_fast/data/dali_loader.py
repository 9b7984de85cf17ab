"""NVIDIA DALI loaders (optional: pip install "rdr_fast[dali]", i.e. nvidia-dali-cuda130).

Both read the split's ImageFormat (rdr_fast.data.image_format) for the normalisation and the
augmentation, which they reproduce with DALI ops:
DALIArrayLoader: kind "tensor" (CIFAR-LT, Fashion-MNIST-LT, digits) through
  external_source in batch mode. The callback serves the plan of rdr_fast.data.sampling
  (seeded order, crop offsets, flips: a pure function of (seed, epoch), whatever DALI
  prefetches); one fused crop_mirror_normalize does crop + flip + normalise on the
  pre-padded set, so batches equal the gpu-resident loader's. Partial last batch.
DALIFileLoader: kind "files" (ImageNet-LT, Places-LT) through readers.file with
  files= / labels= (the re-indexed labels). Train, augment "resized_crop_flip_jitter":
  decode with a random-resized crop (area 0.08-1, aspect 3/4-4/3), resize to the
  image format's size, colour twist (brightness/contrast/saturation uniform in [0.6, 1.4],
  ColorJitter(0.4, 0.4, 0.4)), flip p=0.5, normalise. Test (and augment "none"):
  decode, resize the shorter side to fmt.resize_shorter (256 for 224), centre crop,
  normalise. The reader is rebuilt each pass with the plan's order (random_shuffle
  off) and a pipeline seed derived from (seed, epoch), so the order and the random ops
  are pure in (seed, epoch) too; LastBatchPolicy.PARTIAL with pad_last_batch=True:
  every image counts exactly once and the last batch is short.

AutoAugment and Cutout (ImageFormat.autoaugment / cutout) come after the basic
augmentation, on HWC uint8: nvidia.dali.auto_aug.auto_augment with DALI's closest
policy (DALI_POLICIES: "reduced_cifar10" for torchvision's "cifar10", whose sub-policies
it shares but with 11 magnitude bins, unsigned colour factors in [0.1, 1.9], and
Solarize alone where torchvision pairs it with Invert; DALI's "image_net" has
other sub-policies than torchvision's ImageNet table), mid-grey fill, translations up to
TRANSLATE_REL of the side as in torchvision; then fn.erase with centred anchors, which clips
the box at the borders as Cutout does. The in-memory loader takes the Cutout centres
from the plan (the same holes as the torch and gpu loaders) and, with AutoAugment,
rebuilds its pipeline each pass with a seed derived from (seed, epoch), so DALI's own
AutoAugment draws are pure in (seed, epoch) too; DALI's AutoAugment takes 3-channel
images only (1-channel input corrupts memory in DALI 2.4), so grayscale sets are refused.

Without a GPU (or with a CPU device) the pipelines are CPU-only (device_id=None); on a
CUDA device the JPEGs are decoded with device="mixed" (nvJPEG / nvImageCodec) and the
augmentation runs on the GPU. Known deviations from torchvision for the JPEG path:
DALI applies brightness, contrast, saturation in a fixed order (torchvision randomises
it) and contrast pivots on mid-grey rather than the image's mean; resize/crop rounding
can differ by one pixel; the random-resized-crop fallback after 10 failed attempts
differs in detail.
"""
from __future__ import annotations

import numpy as np
import torch

from . import augment
from .sampling import EpochLoader
from .image_format import COLOR_JITTER, RESIZED_CROP_AREA, RESIZED_CROP_ASPECT

# torchvision's AutoAugment policy -> DALI's nearest (DALI has no plain CIFAR-10 policy).
DALI_POLICIES = {"cifar10": "reduced_cifar10", "imagenet": "image_net", "svhn": "svhn"}
TRANSLATE_REL = 150 / 331   # torchvision's largest AutoAugment shift, a fraction of the side

INSTALL_HINT = ('pip install "rdr_fast[dali]" (the nvidia-dali-cuda130 wheel; '
                'nvidia-dali-cuda120 for CUDA 12 drivers)')


# What DALI's image decoder reads, as Pillow names the formats (PPM: Pillow's name for
# PNM, .pgm / .ppm). Datasets holding any other format (GIF, ...) go to the torch loader.
DALI_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "PPM", "WEBP", "JPEG2000"})


class DALINotInstalledError(ImportError):
    """loader='dali' was asked for but nvidia.dali cannot be imported."""


def require_dali():
    """Import nvidia.dali lazily; a clear DALINotInstalledError if it is missing."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError as exc:
        raise DALINotInstalledError(
            f"the DALI loader needs NVIDIA DALI, which is not installed ({exc}). "
            f"Install it with: {INSTALL_HINT}, or choose --loader torch / gpu") from None
    return nvidia.dali


def dali_available() -> bool:
    try:
        require_dali()
    except DALINotInstalledError:
        return False
    return True


def raw_mean_std(fmt):
    """The image format's mean and std on raw pixel values, where crop_mirror_normalize works."""
    return [m * fmt.scale for m in fmt.mean], [s * fmt.scale for s in fmt.std]


def check_autoaugment(fmt) -> None:
    """ValueError naming the loader where DALI cannot run the format's AutoAugment."""
    if fmt.autoaugment != "none" and fmt.channels != 3:
        raise ValueError(f"loader 'dali' cannot apply AutoAugment to {fmt.channels}-channel images "
                         "(DALI's auto_augment takes RGB only): use loader 'gpu' or 'torch'")


def autoaugment_and_cutout(x, fmt, centre):
    """DALI graph: HWC uint8 `x` -> AutoAugment (if fmt.autoaugment), then Cutout (if
    fmt.cutout) around `centre` (float [2]: y, x per sample)."""
    from nvidia.dali import fn
    from nvidia.dali.auto_aug import auto_augment
    if fmt.autoaugment != "none":
        x = auto_augment.auto_augment(x, policy_name=DALI_POLICIES[fmt.autoaugment],
                                      shape=list(fmt.size), max_translate_rel=TRANSLATE_REL,
                                      fill_value=augment.FILL)
    side = 2 * (fmt.cutout // 2)          # Cutout's box is [c - L//2, c + L//2)
    if side:
        x = fn.erase(x, anchor=centre, shape=[float(side)] * 2, axis_names="HW",
                     centered_anchor=True, fill_value=0)
    return x


def _device_id(device):
    """(device_id for the pipeline, on_gpu) for a torch device string."""
    if device is None:
        return None, False
    dev = torch.device(device)
    if dev.type != "cuda":
        return None, False
    return (dev.index if dev.index is not None else torch.cuda.current_device()), True


def _pipeline_seed(seed: int, epoch: int, shard_id: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + int(shard_id) * 104_729) % (2 ** 31 - 1)


class _DALILoader(EpochLoader):
    def __init__(self, n, batch_size, *, device, num_threads, **kw):
        require_dali()
        super().__init__(n, batch_size, **kw)
        self.device_id, self.on_gpu = _device_id(device)
        self.num_threads = int(num_threads)

    @staticmethod
    def _batches(iterator):
        for out in iterator:
            yield out[0]["x"], out[0]["y"].reshape(-1).long()


class DALIArrayLoader(_DALILoader):
    """In-memory uint8 [N, C, H, W] images (`images`, `targets` and an ImageFormat of kind
    "tensor" as `image_format`) through DALI, augmented as it says."""

    def __init__(self, dataset, batch_size, *, seed=0, train=True, device=None, num_threads=2,
                 shard_id=0, num_shards=1):
        fmt = dataset.image_format
        if train:
            check_autoaugment(fmt)
        super().__init__(len(dataset), batch_size, seed=seed, train=train, device=device,
                         num_threads=num_threads, pad=fmt.pad, flip=fmt.flip,
                         augment_draws=augment.plan_draws(fmt), shard_id=shard_id,
                         num_shards=num_shards)
        self.fmt = fmt
        self.extra = train and augment.needs_draws(fmt)       # AutoAugment / Cutout stage
        self.reseed_each_pass = train and fmt.autoaugment != "none"
        images = dataset.images
        self.height, self.width = fmt.size
        if self.pad:
            images = torch.nn.functional.pad(images, (self.pad,) * 4)
        self.images = np.ascontiguousarray(images.numpy())              # [N, C, H+2p, W+2p]
        self.targets = dataset.targets.numpy().astype(np.int64)
        self.mean, self.std = raw_mean_std(fmt)
        self._pipe = self._iter = None
        self._feeds = {}            # DALI epoch index -> this pass's plan (numpy)
        self._dali_epoch = -1       # DALI epoch index of the pass being served
        self._clean = False         # the last pass ran to its end (reset is allowed)

    def _feed(self, plan):
        span = 2 * self.pad
        pos = (lambda t: (t.numpy() / span).astype(np.float32)) if span else \
            (lambda t: np.full(len(t), 0.5, dtype=np.float32))
        centre = plan.draws.get("cutout", torch.zeros(len(plan.idx), 2)).numpy().astype(np.float32)
        return dict(idx=plan.idx.numpy(), y=pos(plan.top), x=pos(plan.left),
                    mirror=plan.flip.numpy().astype(np.int32), centre=centre, steps=plan.steps)

    def _source(self, info):
        """external_source callback: batch `info.iteration` of DALI epoch `info.epoch_idx`."""
        feed = self._feeds[info.epoch_idx]
        if info.iteration >= len(feed["steps"]):
            raise StopIteration
        lo, hi = feed["steps"][info.iteration]
        idx = feed["idx"][lo:hi]
        return (self.images[idx], self.targets[idx], feed["y"][lo:hi], feed["x"][lo:hi],
                feed["mirror"][lo:hi], feed["centre"][lo:hi])

    def _build(self, epoch):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        @pipeline_def(enable_conditionals=self.extra)
        def graph():
            x, y, pos_y, pos_x, mirror, centre = fn.external_source(
                source=self._source, num_outputs=6, batch=True, batch_info=True,
                layout=["CHW", "", "", "", "", ""])
            if self.on_gpu:
                x, y = x.gpu(), y.gpu()           # centre stays an argument input (CPU)
            crop = dict(crop=(self.height, self.width), crop_pos_x=pos_x, crop_pos_y=pos_y,
                        mirror=mirror)
            if self.extra:      # crop + flip to HWC uint8, AutoAugment / Cutout, normalise
                x = fn.crop_mirror_normalize(x, **crop, dtype=types.UINT8, output_layout="HWC")
                x = autoaugment_and_cutout(x, self.fmt, centre)
                crop = {}
            x = fn.crop_mirror_normalize(x, **crop, mean=self.mean, std=self.std,
                                         dtype=types.FLOAT, output_layout="CHW")
            return x, y

        self._pipe = graph(batch_size=self.max_batch, num_threads=self.num_threads,
                           device_id=self.device_id, seed=_pipeline_seed(self.seed, epoch, self.shard_id),
                           prefetch_queue_depth=2)
        self._pipe.build()
        self._iter = DALIGenericIterator([self._pipe], ["x", "y"], auto_reset=False,
                                         prepare_first_batch=False)
        self._feeds, self._dali_epoch, self._clean = {}, -1, True

    def __iter__(self):
        epoch = self.epoch
        plan = self.next_plan()
        # Abandoned mid-pass: start afresh. With AutoAugment, every pass: DALI's own draws
        # then come from this epoch's seed, not from how many passes ran before.
        if self._iter is None or not self._clean or self.reseed_each_pass:
            self._iter = self._pipe = None
            self._build(epoch)
        self._clean = False
        # The feed must be registered before the pipeline prefetches this pass, i.e.
        # before the reset that starts DALI's next epoch (the first pass needs none).
        self._dali_epoch += 1
        self._feeds = {self._dali_epoch: self._feed(plan)}
        if self._dali_epoch > 0:
            self._iter.reset()
        yield from self._batches(self._iter)
        self._clean = True


class DALIFileLoader(_DALILoader):
    """Image files (`paths`, `targets` and an ImageFormat of kind "files" as `image_format`) through
    DALI's file reader and image decoder, augmented as the format says."""

    def __init__(self, dataset, batch_size, *, seed=0, train=True, device=None, num_threads=2,
                 shard_id=0, num_shards=1):
        fmt = dataset.image_format
        super().__init__(len(dataset), batch_size, seed=seed, train=train, device=device,
                         num_threads=num_threads, shard_id=shard_id, num_shards=num_shards)
        if train and num_shards > 1 and batch_size % num_shards:
            raise ValueError(f"the DALI file loader needs batch_size ({batch_size}) divisible "
                             f"by num_shards ({num_shards}) so that every shard's reader "
                             "batches line up with the global batches")
        self.augment = train and fmt.augment == "resized_crop_flip_jitter"
        if self.augment:
            check_autoaugment(fmt)
        self.fmt = fmt
        self.paths = list(dataset.paths)
        self.targets = dataset.targets.numpy().astype(np.int64)
        self.size, self.resize_shorter = fmt.size, fmt.resize_shorter
        self.mean, self.std = raw_mean_std(fmt)

    def _pipeline(self, files, labels, seed):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali import math as dmath
        decode_dev = "mixed" if self.on_gpu else "cpu"
        size = self.size

        @pipeline_def(enable_conditionals=self.augment and augment.needs_draws(self.fmt))
        def graph():
            jpegs, y = fn.readers.file(files=files, labels=labels, random_shuffle=False,
                                       pad_last_batch=True, name="Reader")
            if self.augment:
                img = fn.decoders.image_random_crop(
                    jpegs, device=decode_dev, output_type=types.RGB,
                    random_area=list(RESIZED_CROP_AREA),
                    random_aspect_ratio=list(RESIZED_CROP_ASPECT), num_attempts=10)
                img = fn.resize(img, resize_x=size[1], resize_y=size[0])
                jitter = dict(range=[1 - COLOR_JITTER, 1 + COLOR_JITTER])
                img = fn.color_twist(img, brightness=fn.random.uniform(**jitter),
                                     contrast=fn.random.uniform(**jitter),
                                     saturation=fn.random.uniform(**jitter))
                if augment.needs_draws(self.fmt):
                    centre = fn.stack(*(dmath.floor(fn.random.uniform(range=[0, side]))
                                        for side in size))
                    img = autoaugment_and_cutout(img, self.fmt, centre)
                x = fn.crop_mirror_normalize(img, mirror=fn.random.coin_flip(probability=0.5),
                                             mean=self.mean, std=self.std, dtype=types.FLOAT,
                                             output_layout="CHW")
            else:
                img = fn.decoders.image(jpegs, device=decode_dev, output_type=types.RGB)
                img = fn.resize(img, resize_shorter=self.resize_shorter)
                x = fn.crop_mirror_normalize(img, crop=size, mean=self.mean,
                                             std=self.std, dtype=types.FLOAT, output_layout="CHW")
            return x, (y.gpu() if self.on_gpu else y)

        return graph(batch_size=self.max_batch, num_threads=self.num_threads,
                     device_id=self.device_id, seed=seed)

    def __iter__(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
        epoch = self.epoch
        plan = self.next_plan()
        if not plan.steps:
            return
        idx = plan.idx.numpy()
        files = [self.paths[i] for i in idx]
        labels = self.targets[idx].astype(np.int32).tolist()
        pipe = self._pipeline(files, labels, _pipeline_seed(self.seed, epoch, self.shard_id))
        it = DALIGenericIterator([pipe], ["x", "y"], reader_name="Reader",
                                 last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)
        yield from self._batches(it)

