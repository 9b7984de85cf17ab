"""The user's own image datasets (--dataset folder / list), iNaturalist 2018 and OLTR
list files with a validation split, end to end through the CLI: class counts, order and
label map in summary.json, best.pt selected on the validation split, evaluate --split
val, both loaders; and every kind of bad data refused before training with one `error:`
line naming the file or class, exit status 2."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from rdr_fast import evaluate, run_io, train
from rdr_fast.data import DataNotFoundError, load_dataset
from rdr_fast.data.dali_loader import dali_available
from rdr_fast.data.oltr import INAT_NORM

needs_dali = pytest.mark.skipif(not dali_available(), reason='needs nvidia.dali (pip install "rdr_fast[dali]")')

# Uneven classes with spaces and non-ASCII letters in their names; "tie" and "ünï code"
# have equal counts and keep their sorted order (t < ü).
TRAIN = {"zebra fish": 8, "ünï code": 4, "tie": 4, "a b": 2}
ORDER = ["zebra fish", "tie", "ünï code", "a b"]
TEST = {"zebra fish": 3, "tie": 1, "ünï code": 2, "a b": 1}      # imbalanced test set
VAL = {"zebra fish": 2, "tie": 2, "ünï code": 2, "a b": 2}
FAST = ["--epochs", "1", "--batch-size", "6", "--image-size", "16", "--model", "small_cnn", "--loader", "torch",
        "--quiet"]


def write_image(path, k: int) -> None:
    """A small image of its own size; PNG and JPEG, RGB and grayscale, by file name and k."""
    rng = np.random.RandomState(k)
    img = Image.fromarray(rng.randint(0, 256, size=(14 + k % 5, 18, 3), dtype=np.uint8))
    (img.convert("L") if k % 3 == 2 else img).save(path)


def make_folder(root, splits=(("train", TRAIN), ("test", TEST), ("val", VAL))) -> str:
    """An ImageFolder tree root/<split>/<class>/<image>; returns root."""
    k = 0
    for split, counts in splits:
        for name, n in counts.items():
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(n):
                write_image(os.path.join(root, split, name, f"im {i}.{'png' if k % 2 else 'jpg'}"), k)
                k += 1
    return str(root)


def write_list(path, root, split, label) -> str:
    """The images of root/split as a list file, `label(class name)` on each line."""
    lines = []
    for name in sorted(os.listdir(os.path.join(root, split))):
        for image in sorted(os.listdir(os.path.join(root, split, name))):
            lines.append(f"{split}/{name}/{image}\t{label(name)}\n")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("".join(lines))
    return str(path)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("own") / "tree")


def train_run(out, *args):
    return train.main(["--out", str(out), *FAST, *args])


def summary_of(out) -> dict:
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as handle:
        return json.load(handle)


def metrics_of(out) -> list[dict]:
    with open(os.path.join(out, "metrics.csv")) as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------ training


def test_folder_counts_order_label_map_selection_on_val_and_resume(tree, tmp_path):
    out = tmp_path / "folder"
    straight = train_run(out, "--dataset", "folder", "--data-root", tree, "--epochs", "2")
    summary = summary_of(out)
    assert summary["class_counts"] == [TRAIN[c] for c in ORDER]
    assert summary["label_map"] == {c: i for i, c in enumerate(ORDER)}
    assert summary["best"]["selected_on"] == "val" and summary["skipped_images"] == []
    rows = metrics_of(out)
    assert {"acc_all", "acc_balanced", "val_acc_all", "val_acc_balanced"} <= set(rows[0])
    assert summary["best"]["val_acc_all"] == max(float(r["val_acc_all"]) for r in rows)
    checkpoint = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert checkpoint["identity"]["classes"] == ORDER and checkpoint["identity"]["image_size"] == 16
    with pytest.raises(run_io.CheckpointError, match="classes"):     # the data's classes changed since
        run_io.load_checkpoint(str(out), {"classes": ORDER[::-1]})
    run_io.load_checkpoint(str(out), {"added_later": 1})             # a key the checkpoint predates
    # best.pt on the val split reproduces the val metrics of the epoch it was selected at,
    # on the test split that epoch's test metrics.
    best = summary["best"]
    on_val = evaluate.main([str(out), "--split", "val", "--quiet"])
    on_test = evaluate.main([str(out), "--quiet"])
    assert on_val["epoch"] == best["epoch"] and on_val["split"] == "val"
    for key in ("acc_all", "acc_balanced", "nll"):
        assert on_val[key] == pytest.approx(best["val_" + key]) and on_test[key] == pytest.approx(best[key]), key
    # Stopped after its first epoch and resumed, the run ends as the straight one did, best on val included.
    first = train_run(tmp_path / "resumed", "--dataset", "folder", "--data-root", tree, "--epochs", "2",
                      "--stop-after", "1")
    assert not first["finished"]
    resumed = train.main(["--resume", str(tmp_path / "resumed"), "--quiet"])
    # json: the rows hold NaN (Many by count has no class here), which equals nothing
    strip = lambda rows: json.dumps([{k: v for k, v in r.items() if k != "epoch_seconds"} for r in rows])  # noqa: E731
    assert strip(resumed["history"]) == strip(straight["history"])
    assert strip([summary_of(tmp_path / "resumed")["best"]]) == strip([best])
    a, b = (torch.load(folder / "best.pt", weights_only=True) for folder in (out, tmp_path / "resumed"))
    assert a["epoch"] == b["epoch"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_validation_split_that_appeared_since_the_run_started_is_refused_on_resume(tmp_path):
    """A history without val columns cannot go on with them (nor the reverse): one line."""
    root = make_folder(tmp_path / "tree", splits=(("train", TRAIN), ("test", TEST)))
    out = tmp_path / "run"
    assert not train_run(out, "--dataset", "folder", "--data-root", root, "--epochs", "2", "--stop-after", "1")["finished"]
    make_folder(tmp_path / "tree", splits=(("val", VAL),))
    with pytest.raises(SystemExit) as exc:
        train.main(["--resume", str(out), "--quiet"])
    assert "belongs to another experiment" in str(exc.value) and "selected_on: checkpoint 'test' vs now 'val'" in str(exc.value)


def test_best_row_follows_the_validation_columns():
    history = [{"epoch": 1, "acc_all": 90.0, "val_acc_all": 10.0}, {"epoch": 2, "acc_all": 10.0, "val_acc_all": 90.0}]
    assert train.best_row(history)["epoch"] == 2
    assert train.best_row([{k: v for k, v in row.items() if k != "val_acc_all"} for row in history])["epoch"] == 1


def test_list_files_with_class_names_and_with_ids(tree, tmp_path):
    names = {s: write_list(tmp_path / f"{s}.txt", tree, s, lambda c: c) for s in ("train", "test")}
    out = tmp_path / "names"
    train_run(out, "--dataset", "list", "--data-root", tree, "--train-list", names["train"],
              "--test-list", names["test"])
    summary = summary_of(out)
    assert summary["label_map"] == {c: i for i, c in enumerate(ORDER)} and summary["best"]["selected_on"] == "test"
    ids = {c: 10 + 3 * i for i, c in enumerate(sorted(TRAIN))}       # "a b" 10, "tie" 13, "zebra fish" 19, ...
    lists = {s: write_list(tmp_path / f"{s}_ids.txt", tree, s, lambda c: ids[c]) for s in ("train", "test", "val")}
    out = tmp_path / "ids"
    train_run(out, "--dataset", "list", "--data-root", tree, "--train-list", lists["train"],
              "--test-list", lists["test"], "--val-list", lists["val"])
    summary = summary_of(out)
    assert summary["label_map"] == {str(ids[c]): i for i, c in enumerate(ORDER)}
    assert summary["class_counts"] == [TRAIN[c] for c in ORDER] and summary["best"]["selected_on"] == "val"
    ds = load_dataset("list", data_root=tree, train_list=lists["train"], test_list=lists["test"], image_size=16)
    assert ds.label_map == {ids[c]: i for i, c in enumerate(ORDER)} and ds.val is None
    assert np.bincount(ds.test.targets.numpy()).tolist() == [TEST[c] for c in ORDER]


def test_inat2018_lists_and_oltr_val_list(tree, tmp_path):
    lists = tmp_path / "lists" / "iNaturalist18"
    lists.mkdir(parents=True)
    ids = {c: i for i, c in enumerate(sorted(TRAIN))}
    for split, name in (("train", "train"), ("test", "val")):          # iNaturalist's val list is its test set
        text = open(write_list(tmp_path / "x.txt", tree, split, lambda c: ids[c]), encoding="utf-8").read()
        (lists / f"iNaturalist18_{name}.txt").write_text(text.replace("\t", " "), encoding="utf-8")
    ds = load_dataset("inat2018", data_root=str(tmp_path / "lists"), image_root=tree, image_size=16)
    assert len(ds.test) == sum(TEST.values()) and ds.val is None
    assert ds.train.image_format.mean == INAT_NORM[0] and ds.class_counts == [TRAIN[c] for c in ORDER]
    # The CLI's image root is its data root: the lists next to the images' folders.
    for name in os.listdir(lists):
        os.replace(lists / name, os.path.join(tree, name))
    try:
        out = tmp_path / "inat"
        train_run(out, "--dataset", "inat2018", "--data-root", tree)
        assert summary_of(out)["class_counts"] == ds.class_counts
        for split in ("train", "test", "val"):
            write_list(os.path.join(tree, f"ImageNet_LT_{split}.txt"), tree, split, lambda c: ids[c])
        out = tmp_path / "oltr"
        train_run(out, "--dataset", "imagenet_lt", "--data-root", tree)
        assert summary_of(out)["best"]["selected_on"] == "val" and "val_acc_all" in metrics_of(out)[0]
    finally:
        for name in os.listdir(tree):
            if name.endswith(".txt"):
                os.remove(os.path.join(tree, name))


@needs_dali
def test_dali_reads_unicode_paths_and_skips_bad_images(tmp_path):
    root = make_folder(tmp_path / "tree")
    bad = os.path.join(root, "train", "tie", "broken ü.png")
    with open(bad, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\nnot really a png")
    out = tmp_path / "dali"
    train_run(out, "--dataset", "folder", "--data-root", root, "--loader", "dali", "--skip-bad-images")
    summary = summary_of(out)
    assert summary["skipped_images"] == [bad] and summary["class_counts"] == [TRAIN[c] for c in ORDER]
    assert summary["best"]["selected_on"] == "val"


# ------------------------------------------------------------------------------ bad data


def corrupt(root):
    with open(os.path.join(root, "train", "a b", "broken.jpg"), "wb") as handle:
        handle.write(b"\xff\xd8\xff this is no JPEG")


def empty_class(root):
    os.makedirs(os.path.join(root, "train", "empty one"))


def unseen_test_class(root):
    os.makedirs(os.path.join(root, "test", "new class"))
    write_image(os.path.join(root, "test", "new class", "x.png"), 0)


def bad_line(root):
    write_list(os.path.join(root, "train.txt"), root, "train", lambda c: c)
    with open(os.path.join(root, "train.txt"), "a", encoding="utf-8") as handle:
        handle.write("just_a_path.png\n")


def foreign_label(root):
    write_list(os.path.join(root, "train.txt"), root, "train", lambda c: c)
    with open(os.path.join(root, "test.txt"), "w", encoding="utf-8") as handle:
        handle.write("test/tie/missing.jpg\tnot a class\n")   # the label is told first


def negative_id(root):
    for split in ("train", "test"):
        write_list(os.path.join(root, f"{split}.txt"), root, split, lambda c: -1 if c == "tie" else 1)


def missing_image(root):
    write_list(os.path.join(root, "train.txt"), root, "train", lambda c: c)
    os.remove(os.path.join(root, "train", "tie", sorted(os.listdir(os.path.join(root, "train", "tie")))[0]))


LISTS = "--dataset list --data-root {root} --train-list {root}/train.txt --test-list {root}/test.txt"
# (how the scene is spoiled, arguments, what the one error line must say)
BAD = [
    (corrupt, "--dataset folder --data-root {root}", ["1 of the 19 images", "train/a b/broken.jpg", "--skip-bad-images"]),
    (empty_class, "--dataset folder --data-root {root}", ["train/empty one", "holds no image"]),
    (unseen_test_class, "--dataset folder --data-root {root}", ["'new class'", "does not occur in the training set"]),
    (lambda root: os.rename(os.path.join(root, "train"), os.path.join(root, "t")),
     "--dataset folder --data-root {root}", ["{root}/train is not a folder"]),
    (lambda root: os.rename(os.path.join(root, "test"), os.path.join(root, "t")),
     "--dataset folder --data-root {root}", ["{root}/test is not a folder"]),
    (None, "--dataset folder --data-root {root}/test.txt", ["--data-root", "not an existing folder"]),
    (bad_line, LISTS, ["{root}/train.txt, line 19", "just_a_path.png"]),
    (foreign_label, LISTS, ["{root}/test.txt, line 1", "'not a class'"]),
    (negative_id, LISTS, ["{root}/train.txt, line", "label -1 is not a class id"]),
    (missing_image, LISTS, ["1 of the 18 images", "train/tie/im ", "do not exist"]),
    (None, LISTS, ["--train-list", "not an existing file"]),
    (None, "--dataset list --data-root {root} --test-list {root}/test.txt", ["--train-list", "required"]),
    (None, "--dataset folder --data-root {root} --train-list {root}/x", ["--train-list", "--dataset list only"]),
    (None, "--dataset inat2018 --data-root {root}", ["iNaturalist18_train.txt", "iNaturalist18_val.txt"]),
    (None, "--dataset folder --data-root {root} --image-size 4", ["--image-size", "[8, 1024]"]),
    (None, "--image-size 16", ["--image-size", "not digits_lt"]),
    (None, "--dataset folder", ["--data-root is required"]),
]


def tree_of(folder) -> set:
    return {os.path.join(d, n) for d, dirs, files in os.walk(folder) for n in dirs + files}


@pytest.mark.parametrize("spoil, args, needles", BAD, ids=[" ".join(row[2])[:40] for row in BAD])
def test_bad_data_is_refused_before_training(tmp_path, capsys, spoil, args, needles):
    root = make_folder(tmp_path / "tree", splits=(("train", TRAIN), ("test", TEST)))
    if spoil is not None:
        spoil(root)
    if not os.path.exists(os.path.join(root, "test.txt")) and os.path.isdir(os.path.join(root, "test")):
        write_list(os.path.join(root, "test.txt"), root, "test", lambda c: c)
    before = tree_of(tmp_path)
    argv = [a.replace("{root}", root) for a in args.split(" ")]
    with pytest.raises(SystemExit) as exit_:
        train.main([*argv, "--out", str(tmp_path / "run"), "--quiet"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle.replace("{root}", root) in err[0], err[0]
    assert tree_of(tmp_path) == before, "a refused run creates nothing"


def test_api_refuses_with_data_not_found(tmp_path):
    root = make_folder(tmp_path / "tree", splits=(("train", TRAIN), ("test", TEST)))
    corrupt(root)
    with pytest.raises(DataNotFoundError, match="cannot be read"):
        load_dataset("folder", data_root=root)
    ds = load_dataset("folder", data_root=root, image_size=16, skip_bad_images=True)
    assert ds.skipped_images == (os.path.join(root, "train", "a b", "broken.jpg"),)
    assert ds.class_counts == [TRAIN[c] for c in ORDER]
    x, y = ds.train[0]
    assert x.shape == (3, 16, 16) and isinstance(y, int)


def test_formats_dali_cannot_decode_go_to_the_torch_loader(tmp_path):
    from rdr_fast.data import resolve_loader
    root = make_folder(tmp_path / "tree", splits=(("train", TRAIN), ("test", TEST)))
    images = {f"train/{c}/{n}.gif": c for c in TRAIN for n in range(2)}
    for path in images:
        write_image(os.path.join(root, path), 1)   # GIF: Pillow reads it, DALI does not
    with open(os.path.join(root, "train.txt"), "w", encoding="utf-8") as handle:
        handle.write("".join(f"{path}\t{c}\n" for path, c in images.items()))
    write_list(os.path.join(root, "test.txt"), root, "test", lambda c: c)
    ds = load_dataset("list", data_root=root, train_list=os.path.join(root, "train.txt"),
                      test_list=os.path.join(root, "test.txt"), image_size=16)
    assert "GIF" in ds.train.formats and resolve_loader(ds, "auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="GIF"):
        resolve_loader(ds, "dali", "cpu")
    assert ds.train[0][0].shape == (3, 16, 16)


def test_default_models_and_batch_for_the_image_file_datasets(tree, tmp_path):
    from rdr_fast.models import default_model
    assert default_model("inat2018") == "resnet50"
    assert [default_model("folder", size) for size in (32, 64, 65, 224)] == ["resnet32"] * 2 + ["resnet50"] * 2
    common = ["--data-root", tree, "--out", str(tmp_path / "run")]
    small = train.configure(["--dataset", "folder", "--image-size", "48", *common])
    assert (small.model, small.image_size, small.batch_size) == ("resnet32", 48, 128)
    large = train.configure(["--dataset", "folder", *common])
    assert (large.model, large.image_size) == ("resnet50", 224)
    assert train.configure(["--dataset", "digits_lt", "--out", str(tmp_path / "run")]).image_size is None
