"""Datasets and transforms: the embedded ``digits`` set and ImageFolder trees, with timm's transforms,
and the video sets (:mod:`condensevit.data.video`): the embedded moving digits and folders of clips.

``build_dataset(NAME | PATH, split)`` returns a dataset of (image, label) or, for video data,
((C, T, H, W) clip, label), with ``classes``, ``targets`` and ``num_skipped``. Names:

* ``digits``: the embedded images (scikit-learn's handwritten digits);
* ``moving_digits`` / ``moving_digits_direction``: the embedded clips of a moving digit, labelled
  by the digit / by the direction of motion (:class:`~condensevit.data.video.MovingDigits`);
* ``PATH``: an ImageFolder tree (``PATH/{train,val}/<class>/<image>``) or a folder of clips
  (``PATH/{train,val}/<class>/<clip>``, a clip being a folder of frames or a video file), told
  apart by the first class folder holding either: image files directly in it mean images,
  sub-folders or video files mean clips (:func:`is_video_data`);
* ``clips:PATH`` / ``images:PATH``: the folder read as clips / as images, whatever it holds (an
  ImageFolder tree whose class folders hold only sub-folders of images needs ``images:``).

A name always means the embedded set; write ``./digits`` for a folder of that name. Video sets are
decoded, sampled, resized and normalised by the data set itself (no transform, no augmentation in
this version); :func:`build_dataset` sizes them with ``input_size=(C, T, H, W)``.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset

from .digits import DIGITS_CANVAS, DigitsDataset, render_digits
from .folder import IMG_EXTENSIONS, ImageFolderDataset, check_trainable_classes, find_classes
from .video import VIDEO_EXTENSIONS, ClipFolder, MovingDigits, load_clip, normalise_clip

__all__ = [
    "build_dataset", "build_transform", "AugmentConfig", "default_augment", "SeededAugmentation",
    "DigitsDataset", "ImageFolderDataset", "render_digits", "find_classes", "check_trainable_classes", "IMG_EXTENSIONS",
    "model_input_size", "is_video_data", "ClipFolder", "MovingDigits", "load_clip", "normalise_clip",
    "VIDEO_EXTENSIONS", "VIDEO_DATASETS", "EMBEDDED",
]

VIDEO_DATASETS = {"moving_digits": "digit", "moving_digits_direction": "direction"}   # name -> label
EMBEDDED = ("digits", *VIDEO_DATASETS)
CLIPS_PREFIX, IMAGES_PREFIX = "clips:", "images:"
DEFAULT_VIDEO_SIZE = {"moving_digits": (3, 16, 64, 64), "folder": (3, 16, 224, 224)}   # (C, T, H, W)


def _looks_like_clips(root: str) -> bool:
    """Whether the folder tree ``root`` holds clips: the first class folder (of train/, else val/)
    holding image files or clips decides; image files directly in it mean an ImageFolder tree,
    sub-folders or video files mean clips."""
    for split in ("train", "val"):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            continue
        try:
            classes = sorted(e.path for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
            for cdir in classes:
                clips = False
                for e in os.scandir(cdir):
                    if e.name.startswith("."):
                        continue
                    name = e.name.lower()
                    if e.is_file() and name.endswith(IMG_EXTENSIONS):
                        return False
                    if e.is_dir() or (e.is_file() and name.endswith(VIDEO_EXTENSIONS)):
                        clips = True
                if clips:
                    return True
        except OSError:
            return False
        return False
    return False


def is_video_data(name_or_path) -> bool:
    """Whether ``build_dataset(name_or_path)`` gives clips (C, T, H, W) rather than images: the
    embedded ``moving_digits`` sets, ``clips:PATH``, and folders whose class folders hold clips
    (sub-folders of frames or video files) rather than images. A path that does not exist is not
    video (building it then says what is missing)."""
    name = os.fspath(name_or_path)
    if name in VIDEO_DATASETS or name.startswith(CLIPS_PREFIX):
        return True
    if name == "digits" or name.startswith(IMAGES_PREFIX):
        return False
    return _looks_like_clips(name)


def _video_size(input_size, default) -> tuple[int, int, int, int]:
    size = tuple(default if input_size is None else input_size)
    if len(size) != 4 or any(isinstance(s, bool) or int(s) != s or s < 1 for s in size):
        raise ValueError(f"input_size {tuple(size)} of video data must be (C, T, H, W), e.g. (3, 16, 224, 224); "
                         "a video model's input_size says it")
    size = tuple(int(s) for s in size)
    if size[0] != 3:
        raise ValueError(f"input_size {size} asks for {size[0]} channels; the video sets give RGB clips (3)")
    return size


def _build_video_dataset(name: str, split: str, transform, *, strict: bool, seed: int, input_size,
                         data_config: dict | None) -> Dataset:
    cfg = dict(data_config or {})
    norm = dict(mean=tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), std=tuple(cfg.get("std", IMAGENET_DEFAULT_STD)))
    if name in VIDEO_DATASETS:
        _, T, H, W = _video_size(input_size, DEFAULT_VIDEO_SIZE["moving_digits"])
        if H != W:
            raise ValueError(f"{name} clips are square but the input size is {H}x{W}; build the model with a square "
                             "img_size")
        if H < 9:
            raise ValueError(f"{name} needs frames of at least 9x9 pixels, not {H}x{W}; build the model with a larger "
                             "img_size")
        if T < 2:
            raise ValueError(f"{name} needs at least 2 frames per clip (motion needs two), not {T}; build the model "
                             "with num_frames >= 2")
        # the default digit sides (16-24 px) fit canvases from 25 px; smaller canvases get smaller digits
        digit = {} if H >= 25 else dict(digit_size=(8, max(8, H // 2)))
        return MovingDigits(split, num_frames=T, size=H, label=VIDEO_DATASETS[name], seed=seed, transform=transform,
                            **digit, **norm)
    root = name[len(CLIPS_PREFIX):] if name.startswith(CLIPS_PREFIX) else name
    _, T, H, W = _video_size(input_size, DEFAULT_VIDEO_SIZE["folder"])
    return ClipFolder(root, split, num_frames=T, size=(H, W), transform=transform,
                      short_clips="error" if strict else "skip", **norm)


def build_dataset(name_or_path: str, split: str = "train", transform=None, *, strict: bool = False,
                  seed: int = 0, check_images: bool = True, input_size=None,
                  data_config: dict | None = None) -> Dataset:
    """The ``split`` ('train' or 'val') of an embedded set, an ImageFolder tree or a folder of clips
    (the names are in the module's docstring; :func:`is_video_data` tells which give clips).

    ``seed`` fixes the embedded sets' rendering and split (and nothing for folders); ``strict`` turns
    skipped unreadable images, and clips with fewer frames than asked, into an error.

    Video sets only: ``input_size`` (C, T, H, W), a video model's ``input_size``, gives the frames
    sampled per clip and their size (default 16 frames of 64x64 for the moving digits, 16 of
    224x224 for folders); ``data_config`` (timm's ``resolve_data_config`` of the model) the mean
    and std (default ImageNet's); ``transform`` then applies to the normalised clip tensor. Image
    sets ignore both (their size and normalisation come with the transform, :func:`build_transform`).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split {split!r} must be 'train' or 'val'")
    name = os.fspath(name_or_path)
    if name == "digits":
        return DigitsDataset(split, transform, seed=seed)
    if is_video_data(name):
        return _build_video_dataset(name, split, transform, strict=strict, seed=seed, input_size=input_size,
                                    data_config=data_config)
    if name.startswith(IMAGES_PREFIX):
        name = name[len(IMAGES_PREFIX):]
    return ImageFolderDataset(name, split, transform, strict=strict, check_images=check_images)


@dataclass
class AugmentConfig:
    """Training augmentation (timm's ``create_transform`` arguments); None fields take the
    dataset's default from :func:`default_augment`."""
    aa: str | None = None           # RandAugment spec such as 'rand-m9-mstd0.5-inc1', or 'none'
    hflip: float | None = None
    scale: tuple[float, float] | None = None
    color_jitter: float | None = None
    re_prob: float = 0.0            # random erasing
    re_mode: str = "pixel"          # its fill: per-pixel normal noise (DeiT, timm's train.py), rand or const
    re_count: int = 1
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


def model_input_size(model) -> tuple[int, ...]:
    """(C, H, W) the model was built for, or (C, T, H, W) for a video model (one with a 4-tuple
    ``input_size``, as :mod:`condensevit.models.video`'s have). timm keeps the pretrained config's
    size (224) even when a model is built with ``img_size=64``, so the patch embedding is asked first."""
    own = getattr(model, "input_size", None)
    if isinstance(own, (tuple, list)) and len(own) == 4:
        return tuple(int(s) for s in own)
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

    if len(tuple(input_size)) != 3:
        raise ValueError(f"input_size {tuple(input_size)} is not an image size (C, H, W); video sets read, size and "
                         "normalise their clips themselves (build_dataset(..., input_size=(C, T, H, W)))")
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
                                color_jitter=pick("color_jitter"), re_prob=aug.re_prob, re_mode=aug.re_mode,
                                re_count=aug.re_count, **kwargs)
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

    def __getitem__(self, index):
        # (key, index): the augmentation drawn for `key` (repeated augmentation gives each copy of an
        # image its own key, see condensevit.train.repeat_aug), the image at `index`
        key, index = index if isinstance(index, tuple) else (index, index)
        s = np.random.SeedSequence([self.seed, self.epoch, int(key)]).generate_state(2)
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
