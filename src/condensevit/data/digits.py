"""The embedded ``digits`` set: scikit-learn's 1,797 real 8x8 handwritten digits, each scaled to a
random size and placed at a random position on a 64x64 black canvas, so most tokens are background
(the situation token condensing is made for). Everything is deterministic given the seed: the
rendering of image ``i`` depends only on (seed, i), and the stratified train/val split on the seed.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["DigitsDataset", "render_digits", "DIGITS_CANVAS"]

DIGITS_CANVAS = 64


@lru_cache(maxsize=4)
def render_digits(seed: int = 0, canvas: int = DIGITS_CANVAS, min_size: int = 16,
                  max_size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits rendered as (N, canvas, canvas) uint8 images (white ink on black) and their
    labels (N,). Digit ``i`` is scaled to a side drawn from [min_size, max_size] and placed at a
    position drawn from the whole canvas, both from a generator seeded with (seed, i)."""
    from sklearn.datasets import load_digits

    if not 8 <= min_size <= max_size <= canvas:
        raise ValueError(f"digit sizes must satisfy 8 <= min_size ({min_size}) <= max_size ({max_size}) "
                         f"<= canvas ({canvas})")
    bunch = load_digits()
    glyphs = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)  # sklearn's ink is 0..16
    images = np.zeros((len(glyphs), canvas, canvas), dtype=np.uint8)
    for i, glyph in enumerate(glyphs):
        rng = np.random.default_rng([seed, i])
        size = int(rng.integers(min_size, max_size + 1))
        top, left = (int(v) for v in rng.integers(0, canvas - size + 1, size=2))
        scaled = Image.fromarray(glyph).resize((size, size), Image.BICUBIC)
        images[i, top:top + size, left:left + size] = np.asarray(scaled)
    return images, bunch.target.astype(np.int64)


class DigitsDataset(Dataset):
    """One split of the embedded digits set; items are (RGB PIL image, label) like an ImageFolder.

    The split is stratified by class and fixed by ``seed`` (``val_fraction`` of each class goes
    to ``val``). ``transform`` is applied to the PIL image (timm's transforms work as they are).
    """

    classes = [str(d) for d in range(10)]

    def __init__(self, split: str = "train", transform=None, *, seed: int = 0, val_fraction: float = 0.2,
                 canvas: int = DIGITS_CANVAS, min_size: int = 16, max_size: int = 28):
        if split not in ("train", "val"):
            raise ValueError(f"digits split {split!r} must be 'train' or 'val'")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction {val_fraction} must lie strictly between 0 and 1")
        from sklearn.model_selection import train_test_split

        images, labels = render_digits(seed, canvas, min_size, max_size)
        train_idx, val_idx = train_test_split(
            np.arange(len(labels)), test_size=val_fraction, random_state=seed, stratify=labels)
        idx = np.sort(train_idx if split == "train" else val_idx)
        self.split = split
        self.images = images[idx]
        self.targets = labels[idx].tolist()
        self.transform = transform
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.num_skipped = 0  # nothing is ever unreadable here; same attribute as the folder set
        self.canvas = canvas

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index]).convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]

    def __repr__(self) -> str:
        return f"DigitsDataset(split={self.split!r}, images={len(self)}, canvas={self.canvas})"
