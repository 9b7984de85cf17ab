"""load_dataset(augment=...): AutoAugment and Cutout on every loader, CPU only.

Cutout is checked against a direct transcription of GoodMorningPeter/RDR's Cutout,
AutoAugment against torchvision's own AutoAugment image by image, and each loader for
batches that are a function of (seed, epoch) alone.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from rdr_fast.data import ImageFormat, LTDataset, TensorImageDataset, load_dataset, make_loaders, resolve_loader
from rdr_fast.data import augment
from rdr_fast.data.files import torchvision_transform
from rdr_fast.data.sampling import SeededShuffleSampler
from test_loaders import CIFAR_NORM, HAVE_DALI, needs_cuda, needs_dali, one_pass, places_lt, tensor_ds

FMNIST = dict(shape=(1, 28, 28), pad=2, norm=((0.2860,), (0.3530,)))


def with_augment(ds: LTDataset, augment_name: str) -> LTDataset:
    return dataclasses.replace(ds, train=ds.train.with_augment(augment_name))


def cutout_only(ds: LTDataset, length: int) -> LTDataset:
    """ds with Cutout and no AutoAugment in the train format (load_dataset has no such
    value; it isolates Cutout on loaders whose AutoAugment differs)."""
    t = ds.train
    train = TensorImageDataset(t.images, t.targets, t.mean, t.std, pad=t.pad, flip=t.flip, cutout=length)
    return dataclasses.replace(ds, train=train)


def authors_cutout(img: np.ndarray, y: int, x: int, length: int) -> np.ndarray:
    """GoodMorningPeter/RDR utils/autoaug.py Cutout for one hole at centre (y, x)."""
    h, w = img.shape[-2:]
    mask = np.ones((h, w), np.float32)
    y1, y2 = np.clip(y - length // 2, 0, h), np.clip(y + length // 2, 0, h)
    x1, x2 = np.clip(x - length // 2, 0, w), np.clip(x + length // 2, 0, w)
    mask[y1:y2, x1:x2] = 0.
    return img * mask[None]


# ----------------------------------------------------------------------------- Cutout

@pytest.mark.parametrize("shape,length", [((3, 32, 32), 16), ((1, 28, 28), 14), ((2, 9, 13), 5), ((3, 6, 6), 6)])
def test_cutout_is_the_authors_on_random_inputs(shape, length):
    g = torch.Generator().manual_seed(length)
    x = torch.rand(40, *shape, generator=g, dtype=torch.float64) + 0.5       # no zeros before
    centres = torch.stack([torch.randint(shape[1], (40,), generator=g), torch.randint(shape[2], (40,), generator=g)], 1)
    centres[:4] = torch.tensor([[0, 0], [shape[1] - 1, shape[2] - 1], [0, shape[2] - 1], [shape[1] // 2, 0]])
    got = augment.cutout(x, centres, length)
    want = np.stack([authors_cutout(x[i].numpy(), int(y), int(c), length) for i, (y, c) in enumerate(centres)])
    np.testing.assert_array_equal(got.numpy(), want)
    assert (got == 0).any() and (got == x).any()


def test_cutout_transform_draws_the_centre_over_the_whole_image():
    img = torch.rand(3, 12, 10, dtype=torch.float64) + 0.5
    cut = augment.Cutout(6)
    for seed in range(30):
        torch.manual_seed(seed)
        got = cut(img)
        torch.manual_seed(seed)
        y, x = int(torch.randint(12, ())), int(torch.randint(10, ()))
        np.testing.assert_array_equal(got.numpy(), authors_cutout(img.numpy(), y, x, 6))


# ----------------------------------------------------------------------------- AutoAugment

def torchvision_draws(policy: str, height: int, width: int, seed: int) -> dict:
    """The draws torchvision's AutoAugment.forward makes from torch's global RNG after
    manual_seed(seed): a sub-policy, then per op a coin and, for an applied signed op, a sign."""
    table = augment.sub_policies(policy, height, width)
    torch.manual_seed(seed)
    k = int(torch.randint(len(table), ()))
    apply, negate = [], []
    for _, prob, _, signed in table[k]:
        on = bool(torch.rand(()) <= prob)
        apply.append(on)
        negate.append(bool(on and signed and torch.rand(()) <= 0.5))
    return dict(policy=[k], apply=[apply], negate=[negate])


@pytest.mark.parametrize("policy,shape", [("cifar10", (3, 32, 32)), ("cifar10", (1, 28, 28)), ("imagenet", (3, 24, 20))])
def test_batched_autoaugment_is_torchvisions_image_by_image(policy, shape):
    n = 96
    x = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    reference = v2.AutoAugment(v2.AutoAugmentPolicy(policy), fill=augment.FILL)
    want = []
    for i in range(n):
        torch.manual_seed(i)
        want.append(reference(x[i]))
    draws = [torchvision_draws(policy, *shape[1:], seed=i) for i in range(n)]
    merged = {k: sum((d[k] for d in draws), []) for k in draws[0]}
    got = augment.autoaugment(x, policy, merged["policy"], merged["apply"], merged["negate"])
    assert got.dtype == torch.uint8 and got.shape == x.shape
    torch.testing.assert_close(got, torch.stack(want), rtol=0, atol=0)
    assert sum(any(a) for a in merged["apply"]) > n // 2            # most images went through an op


@pytest.mark.parametrize("params", [dict(), FMNIST], ids=["rgb", "gray"])
def test_autoaug_changes_images_but_keeps_shape_dtype_and_range(params):
    ds = tensor_ds(n_train=64, **params)
    fmt = ds.train.with_augment("autoaug").image_format
    x = ds.train.images
    draws = augment.draw(fmt, len(x), torch.Generator().manual_seed(0))
    y = augment.apply(x, fmt, draws)
    assert y.dtype == torch.uint8 and y.shape == x.shape
    changed = (y != x).flatten(1).any(1)
    assert changed.float().mean() > 0.5
    assert not (changed & ~draws["apply"].any(1)).any()              # nothing changes without an op
    batch, _ = next(iter(make_loaders(with_augment(ds, "autoaug_cutout"), 64, loader="gpu")[0]))
    a, b = fmt.affine()
    assert (batch >= b - 1e-5).all() and (batch <= 255 * a + b + 1e-5).all()


def test_draws_follow_the_policy_probabilities():
    fmt = tensor_ds(n_train=4).train.with_augment("autoaug_cutout").image_format
    d = augment.draw(fmt, 20000, torch.Generator().manual_seed(0))
    table = augment.sub_policies("cifar10", 32, 32)
    p = torch.tensor([[op[1] for op in pair] for pair in table])[d["policy"]]
    assert abs(d["apply"].float().mean() - p.mean()) < 0.01
    assert abs(d["negate"].float().mean() - 0.5) < 0.01
    assert torch.bincount(d["policy"], minlength=25).min() > 600
    assert set(d["cutout"][:, 0].tolist()) == set(range(32)) == set(d["cutout"][:, 1].tolist())


# ----------------------------------------------------------------------------- loaders

def epoch_batches(ds, kind, epoch, **kw):
    loader, _ = make_loaders(ds, 32, seed=5, loader=kind, **kw)
    loader.set_epoch(epoch)
    return one_pass(loader)


@pytest.mark.parametrize("params", [dict(), FMNIST], ids=["rgb", "gray"])
def test_torch_and_gpu_loaders_agree_and_depend_on_seed_and_epoch_only(params):
    ds = with_augment(tensor_ds(n_train=70, **params), "autoaug_cutout")
    x, y, sizes = epoch_batches(ds, "gpu", 1)
    assert sizes == [32, 32, 6] and sorted(y.tolist()) == list(range(70))
    for kind, kw in (("gpu", {}), ("torch", {}), ("torch", dict(num_workers=1))):
        x2, y2, _ = epoch_batches(ds, kind, 1, **kw)
        assert torch.equal(y, y2)
        torch.testing.assert_close(x, x2, rtol=0, atol=1e-5)   # equal up to normalisation rounding
    x0, y0, _ = epoch_batches(ds, "gpu", 0)
    assert not torch.equal(y0, y)


@needs_dali
def test_dali_array_loader_is_pure_in_seed_and_epoch():
    ds = with_augment(tensor_ds(n_train=40), "autoaug_cutout")
    first, again = epoch_batches(ds, "dali", 1), epoch_batches(ds, "dali", 1)
    torch.testing.assert_close(first[0], again[0], rtol=0, atol=0)
    assert torch.equal(first[1], again[1])
    gpu = epoch_batches(ds, "gpu", 1)
    assert torch.equal(gpu[1], first[1]) and first[0].shape == gpu[0].shape
    assert not torch.allclose(gpu[0], first[0])        # DALI's own AutoAugment draws differ


@pytest.mark.gpu
@needs_cuda
def test_cuda_loaders_match_the_cpu_ones():
    ds = with_augment(tensor_ds(n_train=96), "autoaug_cutout")
    cpu = epoch_batches(ds, "gpu", 1)
    cuda = epoch_batches(ds, "gpu", 1, device="cuda")
    assert torch.equal(cpu[1], cuda[1].cpu())
    # geometric ops may round a sampling coordinate the other way on another device
    assert ((cuda[0].cpu() - cpu[0]).abs() > 1e-4).float().mean() < 0.01
    torch_cuda = epoch_batches(ds, "torch", 1, device="cuda")
    torch.testing.assert_close(torch_cuda[0].cpu(), cpu[0], rtol=0, atol=1e-5)
    if HAVE_DALI:
        first, again = epoch_batches(ds, "dali", 1, device="cuda"), epoch_batches(ds, "dali", 1, device="cuda")
        torch.testing.assert_close(first[0], again[0], rtol=0, atol=0)
        assert torch.equal(first[1].cpu(), cpu[1])


@needs_dali
def test_dali_cutout_makes_the_same_holes_as_the_other_loaders():
    ds = cutout_only(tensor_ds(n_train=40), 16)
    dali, gpu = epoch_batches(ds, "dali", 2), epoch_batches(ds, "gpu", 2)
    torch.testing.assert_close(dali[0], gpu[0], rtol=0, atol=1e-5)
    assert (gpu[0] == ds.train.image_format.affine()[1].view(1, -1, 1, 1)).all(1).any()


def test_dali_refuses_autoaugment_on_grayscale():
    ds = with_augment(tensor_ds(n_train=8, **FMNIST), "autoaug")
    with pytest.raises(ValueError, match="loader 'dali'.*1-channel"):
        resolve_loader(ds, "dali")
    assert resolve_loader(ds, "auto", "cpu") == "torch"


@needs_dali
def test_file_datasets_take_the_imagenet_policy_on_torch_and_dali(tmp_path):
    ds = with_augment(places_lt(tmp_path), "autoaug_cutout")
    fmt = ds.train.image_format
    assert (fmt.autoaugment, fmt.cutout) == ("imagenet", 16)
    names = [type(t).__name__ for t in ds.train.transform.transforms]
    assert names.index("ColorJitter") < names.index("AutoAugment") < names.index("ToTensor") \
        < names.index("Cutout") < names.index("Normalize")
    torch.manual_seed(0)
    x, _ = ds.train[0]
    assert x.shape == (3, 32, 32)
    first, again = epoch_batches(ds, "dali", 1), epoch_batches(ds, "dali", 1)
    assert first[0].shape == (10, 3, 32, 32)
    torch.testing.assert_close(first[0], again[0], rtol=0, atol=0)
    plain = epoch_batches(dataclasses.replace(ds, train=ds.train.without_augmentation()), "dali", 1)
    assert plain[0].shape == first[0].shape


# ----------------------------------------------------------------------------- basic and bad values

def old_item(dataset, i):
    """TensorImageDataset.__getitem__ before AutoAugment existed (crop + flip, global RNG)."""
    img = dataset.images[i]
    if dataset.pad:
        h, w = img.shape[-2:]
        img = torch.nn.functional.pad(img, (dataset.pad,) * 4)
        top, left = torch.randint(0, 2 * dataset.pad + 1, (2,)).tolist()
        img = img[:, top:top + h, left:left + w]
    if dataset.flip and torch.rand(()) < 0.5:
        img = img.flip(-1)
    a, b = dataset.image_format.affine()
    return img.float() * a + b


def test_basic_is_the_augmentation_from_before():
    ds = tensor_ds(n_train=20)
    basic = ds.train.with_augment("basic")
    assert basic.image_format == ds.train.image_format
    assert (basic.image_format.autoaugment, basic.image_format.cutout) == ("none", 0)
    torch.manual_seed(3)
    got = torch.stack([basic[i][0] for i in range(20)])
    torch.manual_seed(3)
    want = torch.stack([old_item(basic, i) for i in range(20)])
    assert torch.equal(got, want)
    train, _ = make_loaders(ds, 8, seed=0, loader="torch")
    assert isinstance(train.sampler, SeededShuffleSampler)       # DataLoader's own batching, as before
    fmt = ImageFormat(kind="files", size=(32, 32), channels=3, mean=CIFAR_NORM[0], std=CIFAR_NORM[1],
                      augment="resized_crop_flip_jitter")
    assert [type(t).__name__ for t in torchvision_transform(fmt).transforms] == [
        "RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "ToTensor", "Normalize"]


def test_analysis_items_drop_autoaugment_and_cutout(tmp_path):
    plain = with_augment(tensor_ds(n_train=5), "autoaug_cutout").train.without_augmentation()
    assert (plain.image_format.augment, plain.image_format.autoaugment, plain.image_format.cutout) == ("none", "none", 0)
    files = with_augment(places_lt(tmp_path), "autoaug_cutout").train.without_augmentation()
    assert (files.image_format.autoaugment, files.image_format.cutout) == ("none", 0)


def test_load_dataset_sets_the_train_format_and_refuses_bad_values():
    ds = load_dataset("digits_lt")
    assert ds.train.image_format.autoaugment == "none"
    with pytest.raises(ValueError, match="augment must be one of basic, autoaug, autoaug_cutout"):
        load_dataset("digits_lt", augment="randaug")
    with pytest.raises(ValueError, match="digits_lt: augment='autoaug' needs a train augmentation of 8-bit"):
        load_dataset("digits_lt", augment="autoaug")
    with pytest.raises(ValueError, match="augment='autoaug_cutout' needs train_transform=True"):
        load_dataset("digits_lt", augment="autoaug_cutout", train_transform=False)
    fmt = tensor_ds(n_train=4, **FMNIST).train.with_augment("autoaug_cutout").image_format
    assert (fmt.autoaugment, fmt.cutout) == ("cifar10", 14)
    good = dict(kind="tensor", size=(32, 32), channels=1, mean=(0.5,), std=(0.5,), augment="crop_flip", pad=4)
    for bad, match in ((dict(autoaugment="cifar100"), "autoaugment must be one of"),
                       (dict(cutout=33), r"cutout must be in \[0, 32\]"),
                       (dict(cutout=-1), "cutout must be"),
                       (dict(autoaugment="cifar10", scale=16.0), "8-bit"),
                       (dict(cutout=8, augment="none", pad=0), "8-bit")):
        with pytest.raises(ValueError, match=match):
            ImageFormat(**{**good, **bad})
