"""Caption data: images with several reference captions each.

Two sources (:func:`build_caption_dataset`):

* ``digit_scenes`` — embedded: 1-3 of scikit-learn's real handwritten digits (the glyphs of
  :mod:`condensevit.data.digits`) scaled to random sizes and placed without overlap at random
  positions on a black canvas (64x64 by default), each scene with 5 reference captions written from
  its layout in varied wording (which digits, how many, left/right/above/below, small/large).
  Fixed by the seed: the glyphs are split 80/10/10 into train/val/test pools (so the val and test
  scenes show handwriting the captioner never saw), and scene ``i`` of a split depends only on
  (seed, split, i).
* ``coco:ANN.json:IMG_DIR`` — the COCO captions format (``images`` with ``id`` and ``file_name``,
  ``annotations`` with ``image_id`` and ``caption``) plus the image folder; or Karpathy's
  ``dataset_coco.json`` (``images`` with ``filename``, ``filepath``, ``split``, ``sentences``) as
  ANN.json, whose splits are used (``restval`` counts as train). A COCO-format file takes its
  splits from ``split_file`` (Karpathy's ``dataset_coco.json``, or ``{"train": [...], "val": [...],
  "test": [...]}`` listing image ids or file names); without one, a seeded 90/5/5 split of the
  image ids.

Every set has ``references`` (one list of caption strings per image), ``image_ids``,
``num_skipped`` / ``skipped`` (images named by the captions file but missing or unreadable, skipped
unless ``strict``), ``image(i)`` (RGB PIL image) and ``__getitem__(i) -> (transform(image), i)``.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .tokenizer import normalize

__all__ = ["DigitScenes", "CocoCaptions", "build_caption_dataset", "CAPTION_SPLITS", "EMBEDDED_CAPTIONS",
           "scene_captions"]

CAPTION_SPLITS = ("train", "val", "test")
EMBEDDED_CAPTIONS = ("digit_scenes",)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
SCENE_COUNTS = {"train": 3000, "val": 500, "test": 500}


class _CaptionSet(Dataset):
    """Common part: a transform over images, indexed with the image index returned."""

    transform = None

    def __len__(self) -> int:
        return len(self.references)

    def __getitem__(self, index: int):
        img = self.image(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, index

    @property
    def num_captions(self) -> int:
        return sum(len(r) for r in self.references)


# ------------------------------------------------------------------------------- digit scenes

def _article(word: str) -> str:
    return "an" if word[0] in "aeiu" else "a"  # "a one", "an eight"


def _a(adj: str, word: str) -> str:
    """'a small seven', 'an eight', 'a large eight'."""
    phrase = f"{adj} {word}" if adj else word
    return f"{_article(phrase)} {phrase}"


def _where(cx: float, cy: float, canvas: int) -> str:
    col = "left" if cx < canvas / 3 else "right" if cx > 2 * canvas / 3 else ""
    row = "top" if cy < canvas / 3 else "bottom" if cy > 2 * canvas / 3 else ""
    if row and col:
        return f"in the {row} {col} corner"
    if row or col:
        return f"at the {row or col}"
    return "in the middle"


def scene_captions(layout: list[dict], canvas: int, rng: np.random.Generator, k: int = 5,
                   small: int = 17, large: int = 23) -> list[str]:
    """``k`` different captions of a scene, from its layout (dicts with ``digit``, ``x``, ``y``,
    ``size``, in pixels), in wording chosen by ``rng``. Sizes up to ``small`` px are called small,
    from ``large`` px large."""
    items = sorted(layout, key=lambda d: d["x"] + d["size"] / 2)  # left to right
    name = [DIGIT_WORDS[d["digit"]] for d in items]
    size = ["small" if d["size"] <= small else "large" if d["size"] >= large else "" for d in items]
    cx = [d["x"] + d["size"] / 2 for d in items]
    cy = [d["y"] + d["size"] / 2 for d in items]
    n = len(items)
    if n == 1:
        d, s, w = name[0], size[0], _where(cx[0], cy[0], canvas)
        options = [f"{_a(s, d)} {w}", f"a single {d} {w}", f"there is {_a(s, d)} {w}", f"the digit {d} {w}",
                   f"one {'handwritten' if not s else s + ' handwritten'} {d}", f"an image of {_a(s, d)}",
                   f"{_a('', d)} written {w}", f"only one digit , {_a(s, d)}"]
    elif n == 2:
        a, b = name
        horizontal = abs(cx[1] - cx[0]) >= abs(cy[1] - cy[0])
        if horizontal:
            rel = [f"{_a(size[0], a)} to the left of {_a(size[1], b)}",
                   f"{_a(size[1], b)} to the right of {_a(size[0], a)}"]
        else:
            top, bot = (0, 1) if cy[0] < cy[1] else (1, 0)
            rel = [f"{_a(size[top], name[top])} above {_a(size[bot], name[bot])}",
                   f"{_a(size[bot], name[bot])} below {_a(size[top], name[top])}"]
        options = rel + [f"two digits , {a} and {b}", f"there are two digits , {_a(size[0], a)} and {_a(size[1], b)}",
                         f"the digits {a} and {b} from left to right", f"{_a('', a)} and {_a('', b)}",
                         f"two handwritten digits : {a} on the left and {b} on the right"]
    else:
        a, b, c = name
        biggest = int(np.argmax([d["size"] for d in items]))
        top = int(np.argmin(cy))
        options = [f"three digits , {a} , {b} and {c}", f"{_a('', a)} , {_a('', b)} and {_a('', c)} from left to right",
                   f"{_a('', a)} on the left , {_a('', c)} on the right and {_a('', b)} in between",
                   f"three digits with {_a('', name[biggest])} the largest",
                   f"three handwritten digits with {_a('', name[top])} at the top",
                   f"the digits {a} , {b} and {c}", f"there are three digits : {a} , {b} , {c}"]
    pick = rng.choice(len(options), size=min(k, len(options)), replace=False)
    return [options[i] for i in sorted(pick)]


@lru_cache(maxsize=2)
def _glyph_pools(seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    glyphs = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)  # sklearn's ink is 0..16
    labels = bunch.target.astype(np.int64)
    idx = np.arange(len(labels))
    train, rest = train_test_split(idx, test_size=0.2, random_state=seed, stratify=labels)
    val, test = train_test_split(rest, test_size=0.5, random_state=seed, stratify=labels[rest])
    return glyphs, labels, {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


@lru_cache(maxsize=6)
def render_scenes(split: str, count: int, seed: int = 0, canvas: int = 64, min_size: int = 14,
                  max_size: int = 26) -> tuple[np.ndarray, tuple]:
    """(count, canvas, canvas) uint8 scenes (white ink on black) and their layouts (per scene a
    tuple of dicts ``digit``, ``glyph``, ``x``, ``y``, ``size``)."""
    glyphs, labels, pools = _glyph_pools(seed)
    pool = pools[split]
    code = CAPTION_SPLITS.index(split)
    images = np.zeros((count, canvas, canvas), dtype=np.uint8)
    layouts = []
    for i in range(count):
        rng = np.random.default_rng([seed, code, i])
        n = int(rng.integers(1, 4))
        boxes = []
        for _ in range(n):
            g = int(pool[rng.integers(len(pool))])
            size = int(rng.integers(min_size, max_size + 1))
            for _try in range(50):  # rejection sampling of a free spot (1 px gap); a crowded scene drops the digit
                x, y = (int(v) for v in rng.integers(0, canvas - size + 1, size=2))
                if all(x + size + 1 <= b["x"] or b["x"] + b["size"] + 1 <= x or y + size + 1 <= b["y"]
                       or b["y"] + b["size"] + 1 <= y for b in boxes):
                    boxes.append(dict(digit=int(labels[g]), glyph=g, x=x, y=y, size=size))
                    scaled = Image.fromarray(glyphs[g]).resize((size, size), Image.BICUBIC)
                    images[i, y:y + size, x:x + size] = np.asarray(scaled)
                    break
        layouts.append(tuple(boxes))
    return images, tuple(layouts)


class DigitScenes(_CaptionSet):
    """One split of the embedded digit scenes (see the module docstring); items (image, index).

    Args:
        split: 'train', 'val' or 'test'.
        count: scenes in the split (default 3000 / 500 / 500).
        seed: fixes glyph pools, scenes and captions.
        canvas: side of the square canvas in pixels (at least 64).
    """

    def __init__(self, split: str = "train", transform=None, *, count: int | None = None, seed: int = 0,
                 canvas: int = 64, captions_per_image: int = 5):
        if split not in CAPTION_SPLITS:
            raise ValueError(f"digit_scenes split {split!r} must be one of {CAPTION_SPLITS}")
        if canvas < 64:
            raise ValueError(f"digit_scenes canvas {canvas} must be at least 64 pixels (three digits must fit)")
        count = SCENE_COUNTS[split] if count is None else int(count)
        if count < 1:
            raise ValueError(f"digit_scenes count {count} must be at least 1")
        scale = canvas / 64
        self.images, self.layouts = render_scenes(split, count, seed, canvas, round(14 * scale), round(26 * scale))
        self.references = []
        for i, layout in enumerate(self.layouts):
            rng = np.random.default_rng([seed, 7, CAPTION_SPLITS.index(split), i])
            self.references.append(scene_captions(list(layout), canvas, rng, k=captions_per_image,
                                                  small=round(17 * scale), large=round(23 * scale)))
        self.image_ids = list(range(count))
        self.split, self.transform, self.canvas = split, transform, canvas
        self.num_skipped, self.skipped = 0, []
        self.name = "digit_scenes"

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")

    def __repr__(self) -> str:
        return f"DigitScenes(split={self.split!r}, images={len(self)}, canvas={self.canvas})"


# ---------------------------------------------------------------------------------------- COCO

def _load_json(path: str, what: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path!r} is not valid JSON ({e}); give the COCO captions JSON") from e


def _check_caption(caption, where: str, path: str) -> str:
    if not isinstance(caption, str):
        raise ValueError(f"{path}: {where} has a caption that is not a string ({type(caption).__name__}: "
                         f"{str(caption)[:40]!r}); fix or remove that annotation")
    if not normalize(caption):
        raise ValueError(f"{path}: {where} has an empty caption ({caption!r}); fix or remove that annotation")
    return caption


class CocoCaptions(_CaptionSet):
    """A split of a COCO-format captions file (or Karpathy's ``dataset_coco.json``) and its image
    folder; see the module docstring for the formats and splits.

    Raises:
        FileNotFoundError: the captions file or the image folder is missing.
        ValueError: malformed file, an annotation of an image the file does not list, a caption
            that is empty or not a string, an image with no captions, or (``strict``) a missing or
            unreadable image. Without ``strict`` those images are skipped and counted in
            ``num_skipped`` / ``skipped`` (path, reason).
    """

    def __init__(self, ann_file: str, image_dir: str, split: str = "train", transform=None, *,
                 split_file: str | None = None, strict: bool = False, seed: int = 0, check_images: bool = True):
        if split not in CAPTION_SPLITS:
            raise ValueError(f"split {split!r} must be one of {CAPTION_SPLITS}")
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"image folder not found: {image_dir!r}; give coco:ANN.json:IMG_DIR with the "
                                    "folder that holds the images")
        data = _load_json(ann_file, "captions file")
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ValueError(f"{ann_file}: no 'images' list; expected the COCO captions format (images, annotations) "
                             "or Karpathy's dataset_coco.json")
        if not data["images"]:
            raise ValueError(f"{ann_file}: the captions file has no images (its 'images' list is empty); give a COCO "
                             "captions file that lists the images and their annotations")
        karpathy = bool(data["images"]) and isinstance(data["images"][0], dict) and "sentences" in data["images"][0]
        entries = self._read_karpathy(data, ann_file) if karpathy else self._read_coco(data, ann_file)
        # entries: list of (image id, relative path, split or None, captions)
        if karpathy and split_file is None:
            chosen = [e for e in entries if e[2] == split]
        else:
            assign = _split_assignment(split_file, [(e[0], e[1]) for e in entries], seed)
            chosen = [e for e in entries if assign.get(e[0]) == split]
        self.image_ids, self.paths, self.references, self.skipped = [], [], [], []
        for image_id, rel, _, caps in chosen:
            path = os.path.join(image_dir, rel)
            if not os.path.isfile(path) and os.path.isfile(os.path.join(image_dir, os.path.basename(rel))):
                path = os.path.join(image_dir, os.path.basename(rel))
            reason = None
            if not os.path.isfile(path):
                reason = "missing"
            elif check_images:
                try:
                    with Image.open(path) as im:
                        im.verify()
                except Exception as e:  # noqa: BLE001  (any decoder failure means unreadable)
                    reason = f"unreadable ({type(e).__name__})"
            if reason:
                if strict:
                    raise ValueError(f"{ann_file}: image {image_id} ({path}) is {reason}; restore it, or drop --strict "
                                     "to skip such images")
                self.skipped.append((path, reason))
                continue
            self.image_ids.append(image_id)
            self.paths.append(path)
            self.references.append(caps)
        self.num_skipped = len(self.skipped)
        self.split, self.transform, self.strict = split, transform, strict
        self.name = f"coco:{ann_file}"

    @staticmethod
    def _read_coco(data: dict, path: str) -> list:
        if not isinstance(data.get("annotations"), list):
            raise ValueError(f"{path}: no 'annotations' list; a COCO captions file has images and annotations "
                             "(image_id, caption)")
        images = {}
        for k, im in enumerate(data["images"]):
            if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
                raise ValueError(f"{path}: images[{k}] needs an 'id' and a 'file_name'; fix the captions file")
            images[im["id"]] = im["file_name"]
        caps: dict = {i: [] for i in images}
        for k, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
                raise ValueError(f"{path}: annotations[{k}] needs an 'image_id' and a 'caption'; fix the captions file")
            if ann["image_id"] not in images:
                raise ValueError(f"{path}: annotations[{k}] (id {ann.get('id')}) names image {ann['image_id']!r}, "
                                 "which the file's 'images' do not list; add the image or remove the annotation")
            where = f"annotation {ann.get('id', k)} of image {ann['image_id']}"
            caps[ann["image_id"]].append(_check_caption(ann["caption"], where, path))
        out = []
        for image_id, rel in images.items():
            if not caps[image_id]:
                raise ValueError(f"{path}: image {image_id} ({rel}) has no captions; add captions for it or remove it "
                                 "from 'images'")
            out.append((image_id, rel, None, caps[image_id]))
        return out

    @staticmethod
    def _read_karpathy(data: dict, path: str) -> list:
        out = []
        for k, im in enumerate(data["images"]):
            if not isinstance(im, dict) or not isinstance(im.get("filename"), str):
                raise ValueError(f"{path}: images[{k}] has no 'filename'; fix the split file")
            image_id = im.get("cocoid", im.get("imgid", k))
            split = {"restval": "train"}.get(im.get("split"), im.get("split"))
            sents = im.get("sentences") or []
            if not sents:
                raise ValueError(f"{path}: image {image_id} ({im['filename']}) has no captions; add sentences for it "
                                 "or remove it")
            caps = [_check_caption(s.get("raw") if isinstance(s, dict) else s, f"image {image_id}", path)
                    for s in sents]
            rel = os.path.join(im.get("filepath") or "", im["filename"])
            out.append((image_id, rel, split, caps))
        return out

    def image(self, index: int) -> Image.Image:
        with Image.open(self.paths[index]) as im:
            return im.convert("RGB")

    def __repr__(self) -> str:
        return f"CocoCaptions(split={self.split!r}, images={len(self)}, skipped={self.num_skipped})"


def _split_assignment(split_file: str | None, entries: list, seed: int) -> dict:
    """image id -> split, from a split file or a seeded 90/5/5 split."""
    if split_file is None:
        ids = sorted((e[0] for e in entries), key=str)
        order = np.random.default_rng(seed).permutation(len(ids))
        n_eval = max(1, round(0.05 * len(ids))) if len(ids) >= 3 else 0
        out = {}
        for rank, j in enumerate(order):
            out[ids[j]] = "val" if rank < n_eval else "test" if rank < 2 * n_eval else "train"
        return out
    data = _load_json(split_file, "split file")
    by_name = {os.path.basename(rel): image_id for image_id, rel in entries}
    known = {image_id for image_id, _ in entries}
    out = {}
    if isinstance(data, dict) and isinstance(data.get("images"), list):  # Karpathy's dataset_coco.json
        for im in data["images"]:
            split = {"restval": "train"}.get(im.get("split"), im.get("split"))
            key = im.get("cocoid")
            key = key if key in known else by_name.get(im.get("filename"))
            if key is not None:
                out[key] = split
        return out
    if not isinstance(data, dict) or not any(s in data for s in CAPTION_SPLITS):
        raise ValueError(f"split file {split_file!r} must be Karpathy's dataset_coco.json or a JSON object "
                         '{"train": [...], "val": [...], "test": [...]} of image ids or file names')
    for split in CAPTION_SPLITS:
        for item in data.get(split) or []:
            key = item if item in known else by_name.get(os.path.basename(str(item)))
            if key is None:
                raise ValueError(f"split file {split_file!r}: {split} entry {item!r} is neither an image id nor a "
                                 "file name of the captions file")
            out[key] = split
    return out


def parse_caption_data(spec: str) -> tuple[str, dict]:
    """``digit_scenes`` -> ('digit_scenes', {}); ``coco:ANN.json:IMG_DIR`` -> ('coco', {ann_file, image_dir})."""
    spec = os.fspath(spec)
    if spec in EMBEDDED_CAPTIONS:
        return spec, {}
    if spec.startswith("coco:"):
        parts = spec[len("coco:"):].split(":", 1)
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"--data {spec!r} must be coco:ANN.json:IMG_DIR (the captions JSON and the image folder)")
        return "coco", dict(ann_file=parts[0], image_dir=parts[1])
    raise ValueError(f"unknown caption data {spec!r}; use digit_scenes (embedded) or coco:ANN.json:IMG_DIR")


def build_caption_dataset(spec: str, split: str, transform=None, *, seed: int = 0, strict: bool = False,
                          split_file: str | None = None, count: int | None = None) -> _CaptionSet:
    """The ``split`` ('train', 'val' or 'test') of ``digit_scenes`` or ``coco:ANN.json:IMG_DIR``.
    ``count`` sizes the embedded set's split (tests use small ones)."""
    kind, kw = parse_caption_data(spec)
    if kind == "digit_scenes":
        if split_file:
            raise ValueError("--split-file applies to coco: data; digit_scenes has fixed splits")
        return DigitScenes(split, transform, seed=seed, count=count)
    return CocoCaptions(kw["ann_file"], kw["image_dir"], split, transform, split_file=split_file, strict=strict,
                        seed=seed)
