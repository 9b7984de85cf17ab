"""The published long-tailed list files: ImageNet-LT and Places-LT (OLTR, Liu et al. 2019,
"Large-Scale Long-Tailed Recognition in an Open World", arXiv:1904.05160) and
iNaturalist 2018 (the lists of facebookresearch/classifier-balancing). JPEGs read lazily
through rdr_fast.data.files."""
from __future__ import annotations

import os

from .common import DataNotFoundError, LTDataset, fix_hint
from .files import IMAGENET_NORM, file_lt_dataset, label_style, read_list

# name -> (file prefix, the split serving as test set, the optional validation split).
# iNaturalist 2018 has no test list: its val list is the test set, as the field reports it.
LISTS = {"imagenet_lt": ("ImageNet_LT", "test", "val"), "places_lt": ("Places_LT", "test", "val"),
         "inat2018": ("iNaturalist18", "val", None)}
INAT_NORM = ((0.466, 0.471, 0.380), (0.195, 0.194, 0.192))   # classifier-balancing's iNaturalist statistics
NORMS = {"imagenet_lt": IMAGENET_NORM, "places_lt": IMAGENET_NORM, "inat2018": INAT_NORM}

__all__ = ["IMAGENET_NORM", "INAT_NORM", "LISTS", "load_oltr_lt"]


def find_lists(name: str, data_root):
    """(train, test, val or None) list paths in data_root or data_root/<Prefix>."""
    prefix, test_split, val_split = LISTS[name]
    wanted = [f"{prefix}_train.txt", f"{prefix}_{test_split}.txt"]
    if not data_root:
        raise DataNotFoundError(f"{name} needs its list files {', '.join(wanted)}, but no data "
                                "root was given. " + fix_hint(name))
    dirs = [data_root, os.path.join(data_root, prefix)]
    for d in dirs:
        if all(os.path.isfile(os.path.join(d, w)) for w in wanted):
            val = val_split and os.path.join(d, f"{prefix}_{val_split}.txt")
            return (*[os.path.join(d, w) for w in wanted], val if val and os.path.isfile(val) else None)
    raise DataNotFoundError(f"{name}: looked for {', '.join(wanted)} in {', '.join(dirs)}; "
                            "not found. " + fix_hint(name))


def load_oltr_lt(name, data_root, *, noise_ratio, seed, train_transform, image_root=None,
                 image_size=224, skip_bad_images=False) -> LTDataset:
    """ImageNet-LT / Places-LT / iNaturalist 2018 from their list files (integer labels),
    images under image_root (default data_root). The val list, where there is one
    (<Prefix>_val.txt next to the others), is the validation split. imb_factor does not
    apply: the lists are long-tailed already."""
    train, test, val = (read_list(p, ids_only=True) if p else None for p in find_lists(name, data_root))
    label_style(*(s for s in (train, test, val) if s is not None))   # ids (ids_only), none negative
    try:
        return file_lt_dataset(name, train, test, val, image_root=image_root or data_root, norm=NORMS[name],
                               image_size=image_size, train_transform=train_transform, noise_ratio=noise_ratio,
                               seed=seed, skip_bad_images=skip_bad_images)
    except DataNotFoundError as e:
        raise DataNotFoundError(f"{name}: {e}. " + fix_hint(name)) from None
