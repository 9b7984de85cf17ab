"""rdr_fast.data against fixture files written in the real on-disk formats."""
from __future__ import annotations

import gzip
import os
import random

import numpy as np
import pytest
import torch

from rdr_fast.data import (DATASETS, DataNotFoundError, ImageFormat, SeededShuffleSampler,
                           add_symmetric_noise, class_splits, load_dataset, long_tail_counts,
                           make_loaders)
from rdr_fast.data.cifar import CIFAR_NORM
from rdr_fast.data.oltr import IMAGENET_NORM
from rdr_fast.data.small import FMNIST_DEBIAN_DIR, FMNIST_FILES, read_idx

# ----------------------------------------------------------------------------- fixtures
# cifar_root: tests/conftest.py


def _write_idx(path, arr, magic):
    raw = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    raw += arr.astype(np.uint8).tobytes()
    if str(path).endswith(".gz"):
        raw = gzip.compress(raw)
    with open(path, "wb") as f:
        f.write(raw)


@pytest.fixture
def fmnist_root(tmp_path):
    """Small Fashion-MNIST IDX files: train (30/class) gzip, test (5/class) plain."""
    rng = np.random.RandomState(7)
    for split, per, ext in (("train", 30, ".gz"), ("t10k", 5, "")):
        labels = np.repeat(np.arange(10), per)
        rng.shuffle(labels)
        images = rng.randint(0, 256, size=(len(labels), 28, 28))
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte{ext}", images, 0x0803)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte{ext}", labels, 0x0801)
    return tmp_path


OLTR_TRAIN_COUNTS = [2, 5, 1, 5, 3]   # original labels 0..4; 1 and 3 tie
OLTR_MAP = {1: 0, 3: 1, 4: 2, 0: 3, 2: 4}   # descending count, ties by original label


@pytest.fixture
def oltr_root(tmp_path):
    """ImageNet_LT / Places_LT list files + tiny JPEGs (40x30) under tmp_path/img."""
    from PIL import Image
    rng = np.random.RandomState(0)
    img_dir, lines = tmp_path / "img", {"train": [], "test": []}
    for split, counts in (("train", OLTR_TRAIN_COUNTS), ("test", [2] * 5)):
        for label, n in enumerate(counts):
            (img_dir / split / f"c{label}").mkdir(parents=True, exist_ok=True)
            for k in range(n):
                rel = f"{split}/c{label}/{k}.jpg"
                arr = rng.randint(0, 256, size=(30, 40, 3), dtype=np.uint8)
                Image.fromarray(arr).save(img_dir / rel, quality=90)
                lines[split].append(f"{rel} {label}\n")
    lists = tmp_path / "lists"
    (lists / "Places_LT").mkdir(parents=True)
    for split in ("train", "test"):
        (lists / f"ImageNet_LT_{split}.txt").write_text("".join(lines[split]))
        (lists / "Places_LT" / f"Places_LT_{split}.txt").write_text("".join(lines[split]))
    return lists, img_dir


def _assert_clear(err, *needles):
    """A DataNotFoundError message mentions every needle and chains no traceback."""
    msg = str(err.value)
    for n in needles:
        assert str(n) in msg, f"{n!r} not in {msg!r}"
    e = err.value
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)


# --------------------------------------------------------------------- profile and noise


def test_long_tail_counts_match_ldam_table():
    assert long_tail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert long_tail_counts(5000, 10, 10) == [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834,
                                              645, 500]
    assert long_tail_counts(5000, 10, 500) == [5000, 2506, 1256, 629, 315, 158, 79, 39, 19, 10]
    assert sum(long_tail_counts(5000, 10, 200)) == 11203
    totals = [sum(long_tail_counts(500, 100, f)) for f in (10, 100, 200, 500)]
    assert totals == [19573, 10847, 9502, 8155]
    assert long_tail_counts(500, 100, 100)[-3:] == [5, 5, 5]
    assert long_tail_counts(7, 1, 100) == [7]
    assert long_tail_counts(124, 10, 500)[-1] == 1                  # floor: no empty class
    with pytest.raises(ValueError):
        long_tail_counts(5000, 10, 0.01)


def ldam_step_profile(img_max, cls_num, imb_factor):
    """kaidic/LDAM-DRW's get_img_num_per_cls for imb_type 'step', its imb_factor being 1/IF."""
    return [int(img_max)] * (cls_num // 2) + [int(img_max * imb_factor)] * (cls_num // 2)


def test_step_profile_matches_ldam():
    for n_max, classes in ((5000, 10), (500, 100)):
        for factor in (10, 50, 100):
            assert long_tail_counts(n_max, classes, factor, "step") == ldam_step_profile(n_max, classes, 1 / factor)
    assert long_tail_counts(5000, 10, 100, "step") == [5000] * 5 + [50] * 5
    assert long_tail_counts(500, 100, 100, "step") == [500] * 50 + [5] * 50
    assert long_tail_counts(5, 3, 2, "step") == [5, 2, 2]         # odd C: the middle class joins the tail
    assert long_tail_counts(124, 10, 500, "step")[-1] == 1        # floor: no empty class
    with pytest.raises(ValueError, match="imb_type"):
        long_tail_counts(5000, 10, 100, "linear")


def test_step_profile_through_load_dataset(cifar_root):
    root, _, _ = cifar_root
    for name, classes in (("cifar10_lt", 10), ("cifar100_lt", 100)):
        ds = load_dataset(name, data_root=str(root), imb_factor=10, imb_type="step")
        assert ds.class_counts == [20] * (classes // 2) + [2] * (classes // 2)
        assert np.bincount(ds.train.targets.numpy(), minlength=classes).tolist() == ds.class_counts
    assert load_dataset("digits_lt", imb_factor=10, imb_type="step").class_counts == [124] * 5 + [12] * 5
    with pytest.raises(ValueError, match="imb_type"):
        load_dataset("imagenet_lt", data_root=str(root), imb_type="step")


def test_symmetric_noise_exact_count_other_class_and_deterministic():
    labels = np.repeat(np.arange(10), [300, 200, 150, 100, 80, 60, 40, 30, 20, 20])
    noisy, flipped = add_symmetric_noise(labels, 0.05, 10, seed=0)
    n = int(0.05 * len(labels))
    assert len(flipped) == n and np.all(np.diff(flipped) > 0)
    assert (noisy != labels).sum() == n and np.all(noisy[flipped] != labels[flipped])
    assert noisy.min() >= 0 and noisy.max() < 10
    again, flipped2 = add_symmetric_noise(labels, 0.05, 10, seed=0)
    assert np.array_equal(again, noisy) and np.array_equal(flipped, flipped2)
    other, _ = add_symmetric_noise(labels, 0.05, 10, seed=1)
    assert not np.array_equal(other, noisy)
    # draw for draw the RoLT recipe (global random module), without touching our state
    state = random.getstate()
    random.seed(0)
    idx = list(range(len(labels)))
    random.shuffle(idx)
    noise_idx = set(idx[:n])
    ref = [(random.randint(1, 9) + y) % 10 if i in noise_idx else y for i, y in enumerate(labels)]
    random.setstate(state)
    assert np.array_equal(noisy, ref)
    assert np.array_equal(add_symmetric_noise(labels, 0.0, 10, 0)[0], labels)
    with pytest.raises(ValueError):
        add_symmetric_noise(labels, 1.0, 10, 0)


def test_noise_count_cifar10_if100_is_620():
    labels = np.repeat(np.arange(10), long_tail_counts(5000, 10, 100))
    assert len(add_symmetric_noise(labels, 0.05, 10, 0)[1]) == 620


def test_class_splits():
    assert class_splits("cifar10_lt", 10) == {"many": (0, 3), "medium": (3, 7), "few": (7, 10)}
    assert class_splits("cifar100_lt", 100)["medium"] == (35, 69)
    assert class_splits("imagenet_lt", 1000)["few"] == (835, 1000)
    assert class_splits("places_lt", 365)["many"] == (0, 131)
    assert class_splits("digits_lt", 10) == class_splits("cifar10_lt", 10)
    assert class_splits("places_lt", 5) == {"many": (0, 1), "medium": (1, 4), "few": (4, 5)}
    assert class_splits("x", 100) == {"many": (0, 33), "medium": (33, 67), "few": (67, 100)}


# ------------------------------------------------------------------------------ CIFAR


def test_cifar10_ldam_subset_bit_for_bit(cifar_root):
    root, data, labels = cifar_root
    state = np.random.get_state()
    ds = load_dataset("cifar10_lt", data_root=str(root), imb_factor=10, seed=0)
    assert np.array_equal(np.random.get_state()[1], state[1])   # global RNG untouched
    counts = long_tail_counts(20, 10, 10)
    assert ds.class_counts == counts and counts == [20, 15, 11, 9, 7, 5, 4, 3, 2, 2]
    assert np.bincount(ds.train.targets.numpy(), minlength=10).tolist() == counts
    # LDAM-DRW gen_imbalanced_data, verbatim order of operations
    np.random.seed(0)
    expect = []
    for c, n in zip(np.unique(labels), counts):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        expect.append(data[idx[:n]])
    np.random.set_state(state)
    assert np.array_equal(ds.train.images.reshape(len(ds.train), -1).numpy(), np.vstack(expect))
    assert ds.splits == {"many": (0, 3), "medium": (3, 7), "few": (7, 10)}
    assert ds.label_map == {c: c for c in range(10)}
    assert (ds.in_channels, ds.image_size, ds.num_classes) == (3, 32, 10)
    assert np.bincount(ds.test.targets.numpy()).tolist() == [10] * 10   # balanced test


def test_cifar100_uses_fine_labels(cifar_root):
    root, _, _ = cifar_root
    ds = load_dataset("cifar100_lt", data_root=str(root), imb_factor=10)
    assert ds.class_counts == long_tail_counts(20, 100, 10)
    assert np.bincount(ds.test.targets.numpy()).tolist() == [5] * 100
    assert ds.splits["few"] == (69, 100)


def test_cifar_items_and_augmentation(cifar_root):
    root, _, _ = cifar_root
    ds = load_dataset("cifar10_lt", data_root=str(root), imb_factor=10)
    mean = torch.tensor(CIFAR_NORM[0]).view(3, 1, 1)
    std = torch.tensor(CIFAR_NORM[1]).view(3, 1, 1)
    x, y = ds.test[3]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and type(y) is int
    assert torch.allclose(x, (ds.test.images[3].float() / 255 - mean) / std, atol=1e-5)
    torch.manual_seed(0)
    for i in range(0, len(ds.train), 7):
        x, y = ds.train[i]
        assert x.shape == (3, 32, 32) and y == int(ds.train.targets[i])
        raw = torch.round((x * std + mean) * 255)
        padded = torch.nn.functional.pad(ds.train.images[i].float(), (4, 4, 4, 4))
        crops = [c for t in range(9) for l in range(9)
                 for c in (padded[:, t:t + 32, l:l + 32], padded[:, t:t + 32, l:l + 32].flip(-1))]
        assert any(torch.equal(raw, c) for c in crops)   # a zero-padded crop, maybe flipped
    plain = load_dataset("cifar10_lt", data_root=str(root), imb_factor=10, train_transform=False)
    expect = (plain.train.images[0].float() / 255 - mean) / std
    assert torch.allclose(plain.train[0][0], expect, atol=1e-5)      # no augmentation


def test_cifar_noise(cifar_root):
    root, _, _ = cifar_root
    clean = load_dataset("cifar10_lt", data_root=str(root), imb_factor=10)
    ds = load_dataset("cifar10_lt", data_root=str(root), imb_factor=10, noise_ratio=0.2)
    n = len(ds.train)
    assert (ds.train.targets != ds.train.clean_targets).sum() == int(0.2 * n)
    assert torch.equal(ds.train.clean_targets, clean.train.targets)
    assert ds.class_counts == np.bincount(ds.train.targets.numpy(), minlength=10).tolist()
    assert ds.class_counts != clean.class_counts and sum(ds.class_counts) == n
    again = load_dataset("cifar10_lt", data_root=str(root), imb_factor=10, noise_ratio=0.2)
    assert torch.equal(again.train.targets, ds.train.targets)
    assert torch.equal(ds.test.targets, clean.test.targets)   # test set stays clean


def test_cifar_errors(cifar_root, tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("cifar10_lt", data_root=str(tmp_path / "nowhere"))
    _assert_clear(err, "data_batch_1", "test_batch", tmp_path / "nowhere", "--data-root",
                  "--download")
    root = tmp_path / "c"
    (root / "cifar-100-python").mkdir(parents=True)
    (root / "cifar-100-python" / "train").write_bytes(b"")
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("cifar100_lt", data_root=str(root))
    _assert_clear(err, "missing test", "cifar-100-python", "--download")
    (root / "cifar-100-python" / "test").write_bytes(b"not a pickle at all")
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("cifar100_lt", data_root=str(root))
    _assert_clear(err, os.path.join(str(root), "cifar-100-python", "train"), "corrupt")


# ----------------------------------------------------------------------- Fashion-MNIST


def test_fmnist_from_idx_files(fmnist_root):
    ds = load_dataset("fmnist_lt", data_root=str(fmnist_root), imb_factor=10)
    assert ds.class_counts == long_tail_counts(30, 10, 10)
    assert np.bincount(ds.train.targets.numpy()).tolist() == ds.class_counts
    assert np.bincount(ds.test.targets.numpy()).tolist() == [5] * 10
    x, y = ds.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and type(y) is int
    assert (ds.in_channels, ds.image_size) == (1, 28)
    raw = read_idx(str(fmnist_root / "t10k-images-idx3-ubyte"), 0x0803)
    assert raw.shape == (50, 28, 28) and raw.dtype == np.uint8
    assert torch.equal(ds.test.images[:, 0], torch.from_numpy(raw.copy()))


def test_fmnist_torchvision_raw_layout(fmnist_root, tmp_path):
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in fmnist_root.iterdir():
        if f.is_file():
            (raw / f.name).write_bytes(f.read_bytes())
    ds = load_dataset("fmnist_lt", data_root=str(tmp_path / "root"), imb_factor=10)
    assert len(ds.test) == 50


def test_fmnist_errors(fmnist_root, tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("fmnist_lt", data_root=str(tmp_path / "empty"))
    _assert_clear(err, "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte", tmp_path / "empty",
                  "apt-get install -y dataset-fashion-mnist", "--data-root")
    bad = fmnist_root / "t10k-labels-idx1-ubyte"
    good = bad.read_bytes()
    bad.write_bytes(b"\x00\x00\x08\x03" + good[4:])   # wrong magic
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("fmnist_lt", data_root=str(fmnist_root))
    _assert_clear(err, str(bad), "magic")
    bad.write_bytes(good[:-3])                         # truncated data
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("fmnist_lt", data_root=str(fmnist_root))
    _assert_clear(err, str(bad), "corrupt")
    gz = fmnist_root / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:100])              # truncated gzip stream
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("fmnist_lt", data_root=str(fmnist_root))
    _assert_clear(err, str(gz))


@pytest.mark.skipif(not all(os.path.isfile(os.path.join(FMNIST_DEBIAN_DIR, s + ".gz"))
                            for s, _ in FMNIST_FILES.values()),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fmnist_real_debian_files():
    ds = load_dataset("fmnist_lt", imb_factor=100)
    assert ds.class_counts == long_tail_counts(6000, 10, 100)
    assert ds.class_counts[0] == 6000 and ds.class_counts[-1] == 60
    assert np.bincount(ds.test.targets.numpy()).tolist() == [1000] * 10
    x, _ = ds.test[0]
    assert x.shape == (1, 28, 28) and abs(float(ds.test.images.float().mean()) / 255 - 0.286) < 0.01


# ------------------------------------------------------------------------------ digits


def test_digits_lt():
    ds = load_dataset("digits_lt", imb_factor=100)
    assert ds.class_counts == long_tail_counts(124, 10, 100) == [124, 74, 44, 26, 16, 9, 5, 3, 2, 1]
    assert np.bincount(ds.train.targets.numpy()).tolist() == ds.class_counts
    assert np.bincount(ds.test.targets.numpy()).tolist() == [50] * 10
    x, y = ds.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and type(y) is int
    assert ds.splits == class_splits("cifar10_lt", 10)
    other = load_dataset("digits_lt", imb_factor=100, seed=1)
    assert torch.equal(other.test.images, ds.test.images)            # split fixed
    assert not torch.equal(other.train.images, ds.train.images)      # subset seeded
    noisy = load_dataset("digits_lt", imb_factor=10, noise_ratio=0.05)
    assert (noisy.train.targets != noisy.train.clean_targets).sum() == int(0.05 * len(noisy.train))


# --------------------------------------------------------------------- ImageNet / Places


def test_oltr_reindex_and_items(oltr_root):
    lists, img = oltr_root
    ds = load_dataset("imagenet_lt", data_root=str(lists), image_root=str(img), image_size=32)
    assert ds.label_map == OLTR_MAP
    assert ds.class_counts == [5, 5, 3, 2, 1]
    assert ds.splits == {"many": (0, 1), "medium": (1, 4), "few": (4, 5)}
    orig = [int(os.path.basename(os.path.dirname(p))[1:]) for p in ds.test.paths]
    assert ds.test.targets.tolist() == [OLTR_MAP[o] for o in orig]
    assert np.bincount(ds.test.targets.numpy()).tolist() == [2] * 5
    for split in (ds.train, ds.test):
        x, y = split[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and type(y) is int
    assert (ds.in_channels, ds.image_size) == (3, 32)
    places = load_dataset("places_lt", data_root=str(lists), image_root=str(img), image_size=32,
                          noise_ratio=0.25)
    n = len(places.train)
    assert (places.train.targets != places.train.clean_targets).sum() == int(0.25 * n)
    assert places.class_counts == np.bincount(places.train.targets.numpy(), minlength=5).tolist()


def test_oltr_errors(oltr_root, tmp_path):
    lists, img = oltr_root
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("imagenet_lt")
    _assert_clear(err, "ImageNet_LT_train.txt", "--data-root")
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("places_lt", data_root=str(tmp_path / "nope"))
    _assert_clear(err, "Places_LT_train.txt", "Places_LT_test.txt", tmp_path / "nope",
                  "--data-root")
    with pytest.raises(DataNotFoundError) as err:   # images not under data_root itself
        load_dataset("imagenet_lt", data_root=str(lists))
    _assert_clear(err, os.path.join(str(lists), "train/c0/0.jpg"), "--data-root")
    with pytest.raises(DataNotFoundError):
        load_dataset("imagenet_lt", data_root=str(lists), download=True)
    ds = load_dataset("imagenet_lt", data_root=str(lists), image_root=str(img), image_size=32)
    os.remove(ds.train.paths[3])
    with pytest.raises(DataNotFoundError) as err:
        ds.train[3]
    _assert_clear(err, ds.train.paths[3])
    lst = lists / "ImageNet_LT_test.txt"
    lst.write_text(lst.read_text() + "val/broken_line_without_label\n")
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("imagenet_lt", data_root=str(lists), image_root=str(img))
    _assert_clear(err, str(lst), "line 11")


# ------------------------------------------------------------------------- image formats


def test_builders_describe_their_images(cifar_root, fmnist_root, oltr_root):
    root, _, _ = cifar_root
    cifar = load_dataset("cifar10_lt", data_root=str(root), imb_factor=10)
    assert cifar.train.image_format == ImageFormat("tensor", (32, 32), 3, *CIFAR_NORM, augment="crop_flip",
                                         pad=4, flip=True)
    assert cifar.test.image_format == ImageFormat("tensor", (32, 32), 3, *CIFAR_NORM)
    plain = load_dataset("cifar10_lt", data_root=str(root), imb_factor=10, train_transform=False)
    assert plain.train.image_format == plain.test.image_format
    fmnist = load_dataset("fmnist_lt", data_root=str(fmnist_root), imb_factor=10)
    assert (fmnist.train.image_format.size, fmnist.train.image_format.channels) == ((28, 28), 1)
    assert (fmnist.train.image_format.augment, fmnist.train.image_format.pad, fmnist.train.image_format.flip) == (
        "crop_flip", 2, True)
    digits = load_dataset("digits_lt", imb_factor=10).train.image_format
    assert (digits.size, digits.scale, digits.augment) == ((8, 8), 16.0, "none")
    lists, img = oltr_root
    oltr = load_dataset("imagenet_lt", data_root=str(lists), image_root=str(img), image_size=32)
    assert oltr.train.image_format == ImageFormat("files", (32, 32), 3, *IMAGENET_NORM,
                                        augment="resized_crop_flip_jitter")
    assert oltr.test.image_format.augment == "none" and oltr.test.image_format.resize_shorter == 37   # 32*256/224
    assert load_dataset("places_lt", data_root=str(lists), image_root=str(img),
                        train_transform=False).train.image_format.augment == "none"


@pytest.mark.parametrize("bad, match", [
    (dict(kind="jpeg"), "kind must be one of"),
    (dict(augment="autoaugment"), "augment must be one of"),
    (dict(augment="resized_crop_flip_jitter"), "needs kind 'files'"),
    (dict(kind="files", augment="crop_flip", pad=4), "needs kind 'tensor'"),
    (dict(pad=4), "pad and flip belong to augment 'crop_flip'"),
    (dict(augment="crop_flip", pad=-1), "pad must be >= 0"),
    (dict(mean=(0.5, 0.5)), "one value per channel"),
])
def test_image_format_rejects_inconsistent_fields(bad, match):
    fields = dict(kind="tensor", size=(8, 8), channels=1, mean=(0.5,), std=(0.25,))
    with pytest.raises(ValueError, match=match):
        ImageFormat(**{**fields, **bad})
    fmt = ImageFormat(**fields, scale=16.0)
    a, b = fmt.affine()
    raw = torch.arange(17.0).view(1, 1, 17)
    assert torch.allclose(raw * a + b, (raw / 16 - 0.5) / 0.25)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="cifar10_lt"):
        load_dataset("mnist_lt")
    assert DATASETS == ("digits_lt", "fmnist_lt", "cifar10_lt", "cifar100_lt", "imagenet_lt",
                        "places_lt", "inat2018", "folder", "list")


def test_data_modules_import_each_other_without_cycles():
    """Relative imports inside rdr_fast.data (also those inside functions) form no cycle."""
    import ast
    import pathlib

    import rdr_fast.data
    folder = pathlib.Path(rdr_fast.data.__file__).parent
    deps = {}
    for path in folder.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names |= {node.module} if node.module else {a.name for a in node.names}
        deps[path.stem] = names & {p.stem for p in folder.glob("*.py")}
    assert deps["factory"] >= {"gpu_loader", "torch_loader", "dali_loader"}   # the scan works

    def reaches(start, target, seen=()):
        return any(d == target or (d not in seen and reaches(d, target, (*seen, d)))
                   for d in deps[start])

    assert [m for m in deps if reaches(m, m)] == []


# ----------------------------------------------------------------------------- loaders


def _epoch(loader):
    return torch.cat([y for _, y in loader])


def test_make_loaders_deterministic_and_resumable():
    ds = load_dataset("digits_lt", imb_factor=10)
    train, test = make_loaders(ds, 64, seed=3)
    assert sum(len(y) for _, y in train) == len(ds.train)            # drop_last=False
    e1 = _epoch(train)                                                # epoch 1 (0 was above)
    assert torch.equal(torch.sort(e1).values, torch.sort(ds.train.targets).values)
    train2, _ = make_loaders(ds, 64, seed=3)
    e0 = _epoch(train2)
    assert torch.equal(_epoch(train2), e1) and not torch.equal(e0, e1)
    resumed, _ = make_loaders(ds, 64, seed=3)
    resumed.sampler.set_epoch(1)
    assert torch.equal(_epoch(resumed), e1)
    other, _ = make_loaders(ds, 64, seed=4)
    assert not torch.equal(_epoch(other), e0)
    assert torch.equal(_epoch(test), ds.test.targets)                 # test: fixed order
    s = SeededShuffleSampler(10, seed=0)
    assert sorted(s) == list(range(10)) and len(s) == 10
