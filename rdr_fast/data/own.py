"""The user's own image datasets: an ImageFolder tree (`folder`) or list files (`list`),
built through rdr_fast.data.files like the published list-file benchmarks."""
from __future__ import annotations

import os

from .common import DataNotFoundError, LTDataset
from .files import Listing, file_lt_dataset, label_style, read_list

FOLDER_SPLITS = ("train", "test", "val")    # val/ is optional


def folder_listing(root: str, split: str, *, require_images: bool) -> Listing:
    """root/split/<class>/**/<image> through torchvision's ImageFolder helpers (the class
    folders, and the files with an image extension, torchvision.datasets.folder.IMG_EXTENSIONS).
    Labels are the class folder names. ``require_images``: an empty class folder is refused
    (the training split's; a test or val class may have no images)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise DataNotFoundError(f"{path} is not a folder: --dataset folder needs {root}/train/ and {root}/test/ "
                                "(and optionally val/), with one sub-folder of images per class")
    try:
        names, class_to_idx = find_classes(path)
    except FileNotFoundError:
        raise DataNotFoundError(f"{path} holds no class folder: put each class's images in "
                                f"{path}/<class name>/") from None
    items = make_dataset(path, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if require_images:
        filled = {c for _, c in items}
        empty = [n for n in names if class_to_idx[n] not in filled]
        if empty:
            raise DataNotFoundError(f"class folder {os.path.join(path, empty[0])} holds no image (a file ending in "
                                    f"{', '.join(IMG_EXTENSIONS)})" + (f"; {len(empty) - 1} more empty class folders"
                                                                        if len(empty) > 1 else ""))
    if not items:
        raise DataNotFoundError(f"{path} holds no image (a file ending in {', '.join(IMG_EXTENSIONS)})")
    return Listing(path, [p for p, _ in items], [names[c] for _, c in items])


def load_folder(data_root: str, **kw) -> LTDataset:
    """data_root/train, data_root/test and, when present, data_root/val as ImageFolder
    trees; class names are the labels."""
    root = data_root or ""
    splits = [folder_listing(root, s, require_images=s == "train") if s != "val" or os.path.isdir(
        os.path.join(root, s)) else None for s in FOLDER_SPLITS]
    return file_lt_dataset("folder", *splits, **kw)


def load_list(data_root: str, train_list: str, test_list: str, val_list: str | None = None, **kw) -> LTDataset:
    """List files of `relative/path label` lines, paths relative to data_root. Labels are
    class ids when every label of every list is an integer, class names otherwise."""
    for flag, path in (("train_list", train_list), ("test_list", test_list)):
        if not path:
            raise DataNotFoundError(f"--dataset list needs {flag} (--{flag.replace('_', '-')} FILE)")
    listings = [read_list(p) for p in (train_list, test_list)] + [read_list(val_list) if val_list else None]
    label_style(*(s for s in listings if s is not None))
    return file_lt_dataset("list", *listings, image_root=data_root, **kw)
