"""Datasets and transforms: the embedded ``digits`` set and ImageFolder trees, with timm's transforms.

``build_dataset('digits' | PATH, split)`` returns a dataset of (image, label) with ``classes``,
``targets`` and ``num_skipped``. The name ``digits`` always means the embedded set; write
``./digits`` for a folder of that name.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .digits import DIGITS_CANVAS, DigitsDataset, render_digits
from .folder import IMG_EXTENSIONS, ImageFolderDataset, find_classes

__all__ = [
    "build_dataset", "build_transform", "AugmentConfig", "default_augment", "SeededAugmentation",
    "DigitsDataset", "ImageFolderDataset", "render_digits", "find_classes", "IMG_EXTENSIONS",
    "model_input_size",
]

EMBEDDED = ("digits",)


def build_dataset(name_or_path: str, split: str = "train", transform=None, *, strict: bool = False,
                  seed: int = 0, check_images: bool = True) -> Dataset:
    """The ``split`` ('train' or 'val') of the embedded set ``name_or_path`` or of an ImageFolder tree.

    ``seed`` fixes the digits set's rendering and split (and nothing for folders); ``strict`` turns
    skipped unreadable images into an error.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split {split!r} must be 'train' or 'val'")
    if name_or_path == "digits":
        return DigitsDataset(split, transform, seed=seed)
    return ImageFolderDataset(name_or_path, split, transform, strict=strict, check_images=check_images)


@dataclass
class AugmentConfig:
    """Training augmentation (timm's ``create_transform`` arguments); None fields take the
    dataset's default from :func:`default_augment`."""
    aa: str | None = None           # RandAugment spec such as 'rand-m9-mstd0.5-inc1', or 'none'
    hflip: float | None = None
    scale: tuple[float, float] | None = None
    color_jitter: float | None = None
    re_prob: float = 0.0            # random erasing
    crop_pct: float | None = None   # evaluation resize ratio before the centre crop


def default_augment(name_or_path: str) -> AugmentConfig:
    """The augmentation that suits a dataset: DeiT's for natural images; for the digits no flip
    (a flipped 2 is not a 2), mild crops (the digit is small and may sit near an edge) and no
    evaluation crop."""
    if name_or_path == "digits":
        return AugmentConfig(aa="rand-m6-mstd0.5-inc1", hflip=0.0, scale=(0.6, 1.0), color_jitter=0.0,
                             crop_pct=1.0)
    return AugmentConfig(aa="rand-m9-mstd0.5-inc1", hflip=0.5, scale=(0.08, 1.0), color_jitter=0.3,
                         crop_pct=None)


def model_input_size(model) -> tuple[int, int, int]:
    """(C, H, W) the model was built for. timm keeps the pretrained config's size (224) even when a
    model is built with ``img_size=64``, so the patch embedding is asked first."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans = int((cfg.get("input_size") or (3,))[0])
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) == 2:
            return (chans, int(size[0]), int(size[1]))
    if cfg.get("input_size"):
        return tuple(int(s) for s in cfg["input_size"])
    return (3, 224, 224)


def build_transform(name_or_path: str, is_training: bool, input_size, *, data_config: dict | None = None,
                    augment: AugmentConfig | None = None):
    """timm's transform for a dataset at ``input_size`` (C, H, W); mean, std and interpolation come
    from ``data_config`` (timm's ``resolve_data_config`` of the model) when given."""
    from timm.data import create_transform

    cfg = dict(data_config or {})
    default = default_augment(name_or_path)
    aug = augment or default

    def pick(field):
        value = getattr(aug, field)
        return getattr(default, field) if value is None else value

    aa = pick("aa")
    aa = None if aa in (None, "", "none", "None") else aa
    kwargs = dict(
        input_size=tuple(input_size),
        interpolation=cfg.get("interpolation", "bilinear"),
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
    )
    if is_training:
        return create_transform(is_training=True, auto_augment=aa, hflip=pick("hflip"), scale=tuple(pick("scale")),
                                color_jitter=pick("color_jitter"), re_prob=aug.re_prob, **kwargs)
    crop_pct = pick("crop_pct")
    if crop_pct is None:
        crop_pct = cfg.get("crop_pct", 0.875)
    return create_transform(is_training=False, crop_pct=crop_pct, **kwargs)


class SeededAugmentation(Dataset):
    """Makes the random augmentation of item ``i`` a function of (seed, epoch, i) alone, so a run
    resumed in the middle of an epoch, or with other worker counts, sees the same images.

    The python, numpy and torch generators are seeded for the item and restored afterwards, so
    the caller's random streams (dropout, mixup) are untouched. Call :meth:`set_epoch` before each
    epoch's iterator is created (workers copy the dataset then).
    """

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # classes, targets, num_skipped, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int):
        s = np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(2)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            random.seed(int(s[0]))
            np.random.seed(int(s[1]))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(s[0]) ^ int(s[1]))
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
