"""An ImageFolder tree (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``) with the checks a
user needs: a missing or empty folder, class folders that differ between train and val, and
unreadable images (skipped and counted, or an error with ``strict``) give one clear message.

Image headers are checked when the dataset is built (a thread pool opens each file without
decoding it, and checks that a PNG ends with its IEND chunk, which a truncated copy lacks); a file
that passes that check but fails to decode later is replaced by the next readable image with a
one-line warning naming it, or raises with ``strict``.

Images are read as 8-bit RGB by :func:`to_rgb`: 16-bit (and 32-bit) greyscale, which PIL would clip
to white, is scaled to 8 bits.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["ImageFolderDataset", "find_classes", "check_trainable_classes", "IMG_EXTENSIONS", "to_rgb", "open_rgb"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _split_dir(root: str, split: str) -> str:
    if not os.path.exists(root):
        raise FileNotFoundError(
            f"dataset folder not found: {root!r}; give 'digits' or a folder holding train/ and val/ "
            "with one sub-folder per class")
    if not os.path.isdir(root):
        raise ValueError(f"dataset path {root!r} is a file; give a folder holding train/ and val/")
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"dataset folder {root!r} has no {split}/ folder; expected {root}/train/<class>/... and "
            f"{root}/val/<class>/...")
    return path


def find_classes(split_dir: str) -> list[str]:
    """Sorted class-folder names of one split; an error when there are none."""
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"dataset folder {split_dir!r} is empty: expected one sub-folder per class")
    return classes


def check_trainable_classes(classes, data: str):
    """Raise a one-line ``ValueError`` when a training set has fewer than 2 classes: a classifier of
    one class reaches 100% without learning anything (reading such a folder is fine; training on it
    is refused)."""
    classes = list(classes)
    if len(classes) < 2:
        one = f"one class ({classes[0]})" if classes else "no classes"
        where = (f"{os.path.join(data, 'train')} and {os.path.join(data, 'val')}" if os.path.isdir(data)
                 else "its train and val splits")
        raise ValueError(f"--data {data} has {one}: classification needs at least 2 classes; give {where} one "
                         "sub-folder per class")


def _check_same_classes(root: str, train: list[str], val: list[str]):
    if train == val:
        return
    only_train = sorted(set(train) - set(val))
    only_val = sorted(set(val) - set(train))

    def show(names):
        return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "") if names else "none"

    raise ValueError(
        f"class folders differ between {root}/train ({len(train)} classes) and {root}/val ({len(val)} classes): "
        f"only in train: {show(only_train)}; only in val: {show(only_val)}; make both hold the same class folders")


_PNG_END = b"IEND\xaeB`\x82"   # the last chunk of every PNG: a truncated copy has lost it


def _probe(path: str) -> str | None:
    """None when PIL can read the header of ``path`` (and a PNG has its end), else the reason."""
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018  (the header is parsed on open; size proves it)
            fmt = im.format
        if fmt == "PNG":
            with open(path, "rb") as f:
                f.seek(max(os.path.getsize(path) - 1024, 0))
                if _PNG_END not in f.read():
                    return "truncated PNG (no IEND chunk at its end)"
        return None
    except Exception as e:  # noqa: BLE001  (PIL raises many kinds for bad files)
        return f"{type(e).__name__}: {str(e)[:120]}"


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of ``img``. 16-bit greyscale (PIL modes ``I;16*``, and ``I`` holding values
    above 255) is scaled by 255/65535 rather than clipped to white, as PIL's ``convert`` would;
    floating-point images in [0, 1] are scaled by 255."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        a = np.asarray(img, dtype=np.float64)
        top = float(a.max()) if a.size else 0.0
        if mode == "F" and top <= 1.0:
            a = a * 255.0
        elif mode.startswith("I;16") or top > 255:
            a = a * (255.0 / 65535.0)
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    return img if img.mode == "RGB" else img.convert("RGB")


def open_rgb(path: str) -> Image.Image:
    """The image at ``path`` decoded as 8-bit RGB (:func:`to_rgb`)."""
    with open(path, "rb") as f:
        with Image.open(f) as im:
            im.load()
            return to_rgb(im)


class ImageFolderDataset(Dataset):
    """One split of an ImageFolder tree. Classes are taken from ``train/`` (so indices agree
    between splits) and must be the same in ``val/``. ``num_skipped`` counts unreadable images."""

    def __init__(self, root: str, split: str = "train", transform=None, *, strict: bool = False,
                 check_images: bool = True, check_workers: int = 16):
        if split not in ("train", "val"):
            raise ValueError(f"split {split!r} must be 'train' or 'val'")
        root = os.fspath(root)
        split_dir = _split_dir(root, split)
        classes = find_classes(split_dir)
        other = "val" if split == "train" else "train"
        if os.path.isdir(os.path.join(root, other)):
            other_classes = find_classes(os.path.join(root, other))
            _check_same_classes(root, *((classes, other_classes) if split == "train" else (other_classes, classes)))
        elif split == "train":
            _split_dir(root, "val")  # training needs both splits: say so now, not after an epoch

        samples = []
        for ci, name in enumerate(classes):
            cdir = os.path.join(split_dir, name)
            files = []
            for dirpath, _, filenames in sorted(os.walk(cdir, followlinks=True)):
                files += [os.path.join(dirpath, f) for f in sorted(filenames)
                          if f.lower().endswith(IMG_EXTENSIONS)]
            if not files:
                raise ValueError(
                    f"class folder {cdir!r} holds no images (looked for {', '.join(IMG_EXTENSIONS)})")
            samples += [(f, ci) for f in files]

        bad = []
        if check_images:
            with ThreadPoolExecutor(max_workers=check_workers) as pool:
                reasons = list(pool.map(_probe, [p for p, _ in samples], chunksize=64))
            bad = [(p, r) for (p, _), r in zip(samples, reasons) if r is not None]
            if bad and strict:
                raise ValueError(
                    f"{len(bad)} unreadable image(s) in {split_dir!r}, first {bad[0][0]!r} ({bad[0][1]}); "
                    "remove them, or drop --strict to skip them")
            if bad:
                bad_paths = {p for p, _ in bad}
                samples = [s for s in samples if s[0] not in bad_paths]
        if not samples:
            raise ValueError(f"no readable images in {split_dir!r}")

        self.root, self.split, self.strict = root, split, strict
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.samples = samples
        self.targets = [t for _, t in samples]
        self.transform = transform
        self.skipped = bad              # (path, reason) of the images left out
        self.num_skipped = len(bad)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: str) -> Image.Image:
        return open_rgb(path)

    def __getitem__(self, index: int):
        for k in range(len(self.samples)):
            path, target = self.samples[(index + k) % len(self.samples)]
            try:
                img = self._load(path)
                break
            except Exception as e:  # noqa: BLE001
                if self.strict:
                    raise ValueError(f"unreadable image {path!r} ({type(e).__name__}: {e}); "
                                     "remove it, or drop --strict to skip it") from e
                # one line naming the file (from a loader worker too), not a Python warning
                print(f"condensevit: warning: skipping unreadable image {path!r} ({type(e).__name__}: {e}); "
                      "--strict makes this an error", file=sys.stderr, flush=True)
        else:  # pragma: no cover  (every image failed to decode)
            raise ValueError(f"no image of {self.root!r}/{self.split} could be decoded")
        if self.transform is not None:
            img = self.transform(img)
        return img, target

    def __repr__(self) -> str:
        return (f"ImageFolderDataset({self.root!r}, split={self.split!r}, images={len(self)}, "
                f"classes={len(self.classes)}, skipped={self.num_skipped})")
