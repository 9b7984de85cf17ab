"""make_loaders back-ends (torch, gpu-resident, DALI) on small synthetic data, CPU only.

Train targets are the sample ids (0..N-1) so "label multiset equal" means "every
sample exactly once". DALI tests skip when nvidia.dali is not installed (CI installs it).
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from rdr_fast import train as train_cli
from rdr_fast.data import (LOADERS, LTDataset, TensorImageDataset, class_splits,
                           load_dataset, make_loaders, resolve_loader, sampling, set_epoch)

try:
    import nvidia.dali  # noqa: F401
    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason='needs nvidia.dali (pip install "rdr_fast[dali]")')
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CIFAR_NORM = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
KINDS = ["torch", "gpu", pytest.param("dali", marks=needs_dali)]


def tensor_ds(n_train=203, n_test=77, shape=(3, 32, 32), pad=4, flip=True, scale=255.0,
              norm=CIFAR_NORM, seed=0):
    """An LTDataset of random uint8 images; train targets are the sample ids."""
    g = torch.Generator().manual_seed(seed)
    hi = int(scale) + 1
    xtr = torch.randint(0, hi, (n_train, *shape), generator=g, dtype=torch.uint8)
    xte = torch.randint(0, hi, (n_test, *shape), generator=g, dtype=torch.uint8)
    yte = torch.randint(0, 10, (n_test,), generator=g)
    train = TensorImageDataset(xtr, torch.arange(n_train), *norm, scale=scale, pad=pad, flip=flip)
    test = TensorImageDataset(xte, yte, *norm, scale=scale)
    return LTDataset(name="synthetic", train=train, test=test, class_counts=[1] * 10,
                     splits=class_splits("synthetic", 10), in_channels=shape[0],
                     image_size=shape[-1], label_map={c: c for c in range(10)})


DATASETS = {   # CIFAR-like (pad 4), Fashion-MNIST-like (1 channel, pad 2), digits-like (0..16)
    "cifar": dict(),
    "fmnist": dict(shape=(1, 28, 28), pad=2, norm=((0.2860,), (0.3530,))),
    "digits": dict(shape=(1, 8, 8), pad=0, flip=False, scale=16.0, norm=((0.3053,), (0.3760,))),
}


@pytest.fixture(scope="module", params=list(DATASETS))
def ds(request):
    return tensor_ds(**DATASETS[request.param])


def one_pass(loader):
    xs, ys, sizes = [], [], []
    for x, y in loader:
        xs.append(x.clone())
        ys.append(y.clone())
        sizes.append(len(y))
    return torch.cat(xs), torch.cat(ys), sizes


def reference_items(dataset, idx):
    """dataset[i] (the torch path) for each i, stacked."""
    return torch.stack([dataset[int(i)][0] for i in idx])


# ----------------------------------------------------------------------------- every loader

@pytest.mark.parametrize("kind", KINDS)
def test_train_epoch_has_every_sample_once_with_right_types(ds, kind):
    train, test = make_loaders(ds, 64, seed=5, loader=kind)
    x, y, sizes = one_pass(train)
    n = len(ds.train)
    assert torch.equal(torch.sort(y).values, torch.arange(n))         # each sample exactly once
    assert len(train) == len(sizes) == -(-n // 64) and sizes[-1] == n % 64   # partial last batch
    c, h, w = ds.train.images.shape[1:]
    assert x.shape == (n, c, h, w) and x.dtype == torch.float32 and y.dtype == torch.int64
    # normalised with the dataset's constants: de-normalised pixels are integers in range
    mean = torch.tensor(ds.train.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.train.std).view(1, -1, 1, 1)
    raw = (x * std + mean) * ds.train.scale
    assert torch.allclose(raw, raw.round(), atol=2e-3) and raw.min() > -0.01
    assert raw.max() < ds.train.scale + 0.01


@pytest.mark.parametrize("kind", KINDS)
def test_test_loader_is_deterministic_complete_and_untransformed(ds, kind):
    _, test = make_loaders(ds, 32, seed=0, loader=kind)
    x1, y1, sizes = one_pass(test)
    x2, y2, _ = one_pass(test)
    assert torch.equal(y1, ds.test.targets) and sum(sizes) == len(ds.test) == len(x1)  # no padding
    assert len(test) == len(sizes) == -(-len(ds.test) // 32)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    torch.testing.assert_close(x1, reference_items(ds.test, range(len(ds.test))), atol=1e-5, rtol=0)


def test_epochs_equal_sized_and_same_order_across_loaders(ds):
    kinds = ["torch", "gpu"] + (["dali"] if HAVE_DALI else [])
    labels = {}
    for kind in kinds:
        train, _ = make_loaders(ds, 48, seed=2, loader=kind)
        set_epoch(train, 3)
        _, labels[kind], sizes = one_pass(train)
        labels[kind] = (labels[kind], sizes, len(train))
    first = labels[kinds[0]]
    for kind in kinds[1:]:
        assert torch.equal(labels[kind][0], first[0]), kind      # same (seed, epoch) order
        assert labels[kind][1:] == first[1:], kind                # same batch sizes and len()


@pytest.mark.parametrize("kind", KINDS)
def test_order_is_a_pure_function_of_seed_and_epoch(kind):
    ds = tensor_ds(n_train=100, n_test=10)
    a, _ = make_loaders(ds, 32, seed=1, loader=kind)
    _, e0, _ = one_pass(a)
    _, e1, _ = one_pass(a)                        # the next pass is epoch 1
    assert not torch.equal(e0, e1)
    b, _ = make_loaders(ds, 32, seed=1, loader=kind)
    b.set_epoch(1)                                # resume at epoch 1
    assert torch.equal(one_pass(b)[1], e1)
    c, _ = make_loaders(ds, 32, seed=2, loader=kind)
    assert not torch.equal(one_pass(c)[1], e0)


# ----------------------------------------------------------------------------- augmentation

def test_gpu_loader_augmentation_is_the_torch_paths(ds, monkeypatch):
    """Replay the plan's crop offsets and flips through TensorImageDataset.__getitem__
    (the torch path) and compare with the gpu-resident loader's batches."""
    loader, _ = make_loaders(ds, 64, seed=9, loader="gpu")
    loader.set_epoch(4)
    plan = loader.plan(4)
    x, y, _ = one_pass(loader)
    draws = iter(range(len(plan.idx)))
    state = {}

    def fake_randint(low, high, size, **kw):
        k = state["k"] = next(draws)
        assert (low, high) == (0, 2 * ds.train.pad + 1)
        return torch.stack([plan.top[k], plan.left[k]])

    def fake_rand(*a, **kw):
        return torch.tensor(0.0 if plan.flip[state["k"]] else 1.0)

    if ds.train.pad:
        monkeypatch.setattr(torch, "randint", fake_randint)
    else:
        state["k"] = 0
    monkeypatch.setattr(torch, "rand", fake_rand)
    ref = []
    for k, i in enumerate(plan.idx.tolist()):
        state["k"] = k
        ref.append(ds.train[i][0])
    monkeypatch.undo()
    torch.testing.assert_close(x, torch.stack(ref), atol=1e-5, rtol=0)
    assert torch.equal(y, plan.idx)


def test_plan_draws_uniform_offsets_and_fair_flips():
    plan = sampling.train_plan(4000, 128, seed=0, epoch=0, pad=4, flip=True)
    for offsets in (plan.top, plan.left):
        counts = torch.bincount(offsets, minlength=9)
        assert len(counts) == 9 and counts.min() > 300           # 0..8 all likely (~444 each)
    assert 0.45 < plan.flip.float().mean() < 0.55
    still = sampling.train_plan(100, 10, seed=0, epoch=0, pad=0, flip=False)
    assert not still.flip.any() and not still.top.any() and not still.left.any()


@needs_dali
def test_dali_array_loader_equals_gpu_loader_batch_for_batch(ds):
    gpu, _ = make_loaders(ds, 50, seed=3, loader="gpu")
    dali, _ = make_loaders(ds, 50, seed=3, loader="dali", num_workers=2)
    for epoch in (0, 7):
        gpu.set_epoch(epoch)
        dali.set_epoch(epoch)
        for (xg, yg), (xd, yd) in zip(gpu, dali, strict=True):
            assert torch.equal(yg, yd)
            torch.testing.assert_close(xd, xg, atol=1e-5, rtol=0)


@needs_dali
def test_dali_loader_recovers_from_an_abandoned_pass():
    ds = tensor_ds(n_train=100, n_test=10)
    loader, _ = make_loaders(ds, 16, seed=0, loader="dali")
    next(iter(loader))                               # epoch 0, abandoned after one batch
    _, y1, _ = one_pass(loader)                      # epoch 1, complete
    ref, _ = make_loaders(ds, 16, seed=0, loader="gpu")
    ref.set_epoch(1)
    assert torch.equal(y1, one_pass(ref)[1])


class FormatOnly(torch.utils.data.Dataset):
    """Not a TensorImageDataset: just what the loaders read (images, targets, fmt)."""

    def __init__(self, images, targets, fmt):
        self.images, self.targets, self.image_format = images, targets, fmt

    def __len__(self):
        return len(self.targets)


def format_only(ds, **changes):
    """ds with both splits as FormatOnly, their formats changed by `changes`."""
    from dataclasses import replace
    split = lambda d: FormatOnly(d.images, d.targets, replace(d.image_format, **changes))  # noqa: E731
    return LTDataset(name="format_only", train=split(ds.train), test=split(ds.test),
                     class_counts=ds.class_counts, splits=ds.splits, in_channels=ds.in_channels,
                     image_size=ds.image_size, label_map=ds.label_map)


@pytest.mark.parametrize("kind", ["gpu", pytest.param("dali", marks=needs_dali)])
def test_loaders_follow_the_image_format_not_the_dataset_class(kind):
    ds = tensor_ds(n_train=60, n_test=10, pad=2)
    same, _ = make_loaders(format_only(ds), 16, seed=1, loader=kind)
    ref, _ = make_loaders(ds, 16, seed=1, loader=kind)
    assert torch.equal(one_pass(same)[0], one_pass(ref)[0])
    # a fmt without augmentation: every train item is just its normalised image
    still, _ = make_loaders(format_only(ds, augment="none", pad=0, flip=False), 16, seed=1,
                            loader=kind)
    x, y, _ = one_pass(still)
    mean = torch.tensor(ds.train.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.train.std).view(1, -1, 1, 1)
    expect = (ds.train.images[y].float() / 255 - mean) / std          # targets are sample ids
    torch.testing.assert_close(x, expect, atol=1e-5, rtol=0)
    assert resolve_loader(format_only(ds), "auto", "cuda") == "gpu"


def test_datasets_without_an_image_format_take_the_torch_loader():
    ds = tensor_ds(n_train=20, n_test=5)
    plain = torch.utils.data.TensorDataset(torch.zeros(20, 3, 4, 4), torch.arange(20))
    bare = LTDataset(name="bare", train=plain, test=plain, class_counts=[2] * 10,
                     splits=ds.splits, in_channels=3, image_size=4, label_map=ds.label_map)
    assert resolve_loader(bare, "auto", "cuda") == "torch"
    for kind in ("gpu", "dali"):
        with pytest.raises(ValueError, match=f"loader '{kind}' needs"):
            make_loaders(bare, 4, loader=kind)
    train, _ = make_loaders(bare, 8, seed=0)
    assert torch.equal(torch.sort(one_pass(train)[1]).values, torch.arange(20))


# ----------------------------------------------------------------------------- sharding

@pytest.mark.parametrize("kind", KINDS)
def test_shards_split_each_global_batch(kind):
    ds = tensor_ds(n_train=130, n_test=41)
    single, single_test = make_loaders(ds, 32, seed=4, loader=kind)
    ref_steps = [y for _, y in single]
    shards = [make_loaders(ds, 32, seed=4, loader=kind, shard_id=r, num_shards=2) for r in range(2)]
    parts = [[y for _, y in tr] for tr, _ in shards]
    assert len(parts[0]) == len(parts[1]) == len(shards[0][0])        # equal steps per shard
    # 130 = 4 x 32 + 2: the last global batch (2 samples) still gives each shard one
    assert len(ref_steps) == len(parts[0]) == 5
    for step, ref in enumerate(ref_steps):                            # shard 0 + shard 1 = global
        assert torch.equal(torch.cat([parts[0][step], parts[1][step]]), ref)
    tests = [one_pass(te)[1] for _, te in shards]
    assert torch.equal(torch.cat(tests), ds.test.targets)             # disjoint, complete


def test_sharding_arguments_are_checked():
    ds = tensor_ds(n_train=20, n_test=5)
    for kind in ("torch", "gpu"):
        with pytest.raises(ValueError, match="shard_id"):
            make_loaders(ds, 8, loader=kind, shard_id=2, num_shards=2)
        with pytest.raises(ValueError, match="shard_id"):
            make_loaders(ds, 8, loader=kind, shard_id=1, num_shards=1)


# ----------------------------------------------------------------------------- choice of loader

def test_auto_picks_gpu_on_cuda_for_in_memory_data_and_torch_on_cpu():
    ds = tensor_ds(n_train=20, n_test=5)
    assert resolve_loader(ds, "auto", "cuda") == "gpu"
    assert resolve_loader(ds, "auto", "cpu") == resolve_loader(ds, "auto", None) == "torch"
    assert set(LOADERS) == {"auto", "torch", "dali", "gpu"}
    with pytest.raises(ValueError, match="unknown loader"):
        resolve_loader(ds, "fast")
    train, _ = make_loaders(ds, 8)
    assert isinstance(train, torch.utils.data.DataLoader)              # backward compatible
    train.sampler.set_epoch(2)
    assert train.sampler.epoch == 2


def test_missing_dali_gives_the_install_command(monkeypatch, tmp_path):
    for mod in [m for m in sys.modules if m == "nvidia.dali" or m.startswith("nvidia.dali.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)              # import now fails
    from rdr_fast.data.dali_loader import DALINotInstalledError, dali_available
    assert not dali_available()
    ds = tensor_ds(n_train=20, n_test=5)
    with pytest.raises(DALINotInstalledError, match=r'pip install "rdr_fast\[dali\]"') as info:
        make_loaders(ds, 8, loader="dali")
    assert isinstance(info.value, ImportError) and "nvidia-dali-cuda130" in str(info.value)
    jpeg_ds = places_lt(tmp_path)
    assert resolve_loader(jpeg_ds, "auto", "cpu") == "torch"           # auto falls back
    with pytest.raises(SystemExit, match="rdr_fast\\[dali\\]"):
        train_cli.main(["--loader", "dali", "--epochs", "1", "--quiet", "--out", str(tmp_path / "r")])


def test_gpu_loader_rejects_file_datasets(tmp_path):
    with pytest.raises(ValueError, match="in-memory"):
        make_loaders(places_lt(tmp_path), 4, loader="gpu")


# ----------------------------------------------------------------------------- JPEG lists

def places_lt(root, sizes=((37, 50), (64, 40), (45, 45), (80, 33)), per_class=(5, 3, 2)):
    """A tiny Places-LT: smooth RGB/grey JPEGs of assorted sizes, OLTR list files
    (train sorted by class, class 2 listed first so re-indexing matters)."""
    from PIL import Image
    rng = np.random.RandomState(0)
    lines = {"train": [], "test": []}
    k = 0
    for split, counts in (("train", per_class), ("test", (3, 3, 3))):
        for label in (2, 0, 1):
            for _ in range(counts[label]):
                h, w = sizes[k % len(sizes)]
                yy, xx = np.mgrid[0:h, 0:w]
                img = np.stack([(xx * 255 // w), (yy * 255 // h),
                                np.full((h, w), rng.randint(256))], -1).astype(np.uint8)
                rel = f"{split}/c{label}/{k:03d}.jpg"
                os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
                im = Image.fromarray(img)
                (im.convert("L") if k % 5 == 4 else im).save(os.path.join(root, rel), quality=95)
                lines[split].append(f"{rel} {label}")
                k += 1
    for split in lines:
        with open(os.path.join(root, f"Places_LT_{split}.txt"), "w") as f:
            f.write("\n".join(lines[split]) + "\n")
    return load_dataset("places_lt", data_root=str(root), image_size=32)


@needs_dali
def test_dali_jpeg_pipeline_on_a_list_file(tmp_path):
    ds = places_lt(tmp_path)
    assert resolve_loader(ds, "auto", "cpu") == "dali"
    train, test = make_loaders(ds, 4, seed=0, loader="dali", num_workers=2)
    n = len(ds.train)
    x, y, sizes = one_pass(train)
    assert x.shape == (n, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(torch.sort(y).values, torch.sort(ds.train.targets).values)
    assert sizes == [4, 4, 2] and len(train) == 3
    assert ds.class_counts == [5, 3, 2] and torch.isfinite(x).all()
    # the order is the torch loader's for the same (seed, epoch); pixels repeat with the epoch
    torch_train, _ = make_loaders(ds, 4, seed=0, loader="torch")
    torch_train.set_epoch(1)
    train.set_epoch(1)
    x1, y1, _ = one_pass(train)
    assert torch.equal(y1, one_pass(torch_train)[1])
    train.set_epoch(1)
    assert torch.equal(one_pass(train)[0], x1)
    # test: fixed order, each image exactly once (9 = 4 + 4 + 1, padding trimmed), close to
    # torchvision's Resize + CenterCrop on these smooth images
    xt, yt, sizes = one_pass(test)
    assert torch.equal(yt, ds.test.targets) and sizes == [4, 4, 1] and len(test) == 3
    assert torch.equal(one_pass(test)[0], xt)
    ref = reference_items(ds.test, range(len(ds.test)))
    assert (xt - ref).abs().mean() < 0.1


@needs_dali
def test_dali_file_loader_shards(tmp_path):
    ds = places_lt(tmp_path)
    single, _ = make_loaders(ds, 4, seed=1, loader="dali")
    ref = [y for _, y in single]
    shards = [make_loaders(ds, 4, seed=1, loader="dali", shard_id=r, num_shards=2) for r in range(2)]
    parts = [[y.clone() for _, y in tr] for tr, _ in shards]
    assert len(parts[0]) == len(parts[1]) == len(ref)
    for step, r in enumerate(ref):
        assert torch.equal(torch.cat([parts[0][step], parts[1][step]]), r)
    assert torch.equal(torch.cat([one_pass(te)[1] for _, te in shards]), ds.test.targets)
    with pytest.raises(ValueError, match="divisible"):
        make_loaders(ds, 5, loader="dali", num_shards=2)


# ----------------------------------------------------------------------------- CUDA (GPU suite)

@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gpu", pytest.param("dali", marks=needs_dali)])
def test_cuda_loaders_match_the_cpu_gpu_loader(kind):
    ds = tensor_ds()
    ref, ref_test = make_loaders(ds, 64, seed=0, loader="gpu", device="cpu")
    dev, dev_test = make_loaders(ds, 64, seed=0, loader=kind, device="cuda")
    for (xr, yr), (xd, yd) in zip(ref, dev, strict=True):
        assert xd.device.type == "cuda" and yd.device.type == "cuda"
        torch.testing.assert_close(xd.cpu(), xr, atol=1e-5, rtol=0)
        assert torch.equal(yd.cpu(), yr)
    torch.testing.assert_close(one_pass(dev_test)[0].cpu(), one_pass(ref_test)[0], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- CLI

def test_cli_loader_flag_runs_and_resumes_exactly(tmp_path):
    kind = "dali" if HAVE_DALI else "gpu"
    fast = ["--epochs", "2", "--batch-size", "64", "--quiet", "--loader", kind]
    straight = train_cli.main(["--out", str(tmp_path / "a"), *fast])
    first = train_cli.main(["--out", str(tmp_path / "b"), *fast, "--stop-after", "1"])
    assert straight["finished"] and not first["finished"]
    resumed = train_cli.main(["--resume", str(tmp_path / "b")])
    assert resumed["finished"]
    drop = {"epoch_seconds"}
    assert ([{k: v for k, v in row.items() if k not in drop} for row in resumed["history"]]
            == [{k: v for k, v in row.items() if k not in drop} for row in straight["history"]])
