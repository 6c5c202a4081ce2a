"""Video data sets: folders of clips and the embedded moving digits.

Both give ``(clip, label)`` with ``clip`` a (C, T, H, W) float tensor, normalised with the given
mean and std (ImageNet's by default), ready for the video models (which take (B, C, T, H, W)).
Both have ``classes``, ``class_to_idx``, ``targets`` and ``num_skipped``, like the image sets.

:class:`ClipFolder` reads ``root/{train,val}/<class>/<clip>``, where a clip is a folder of frame
images or a video file. :class:`MovingDigits` is made from scikit-learn's handwritten digits, so it
needs no download: each clip is a digit moving in a straight line across a black canvas; the label
is the digit or the direction of motion (which only the time axis can tell).

Temporal sampling: ``num_frames`` frames spread uniformly over the clip, the middle frame of each of
``num_frames`` equal segments (:func:`sample_indices`); deterministic, so a clip always gives the
same tensor. A clip with fewer frames than ``num_frames`` is an error (never silently repeated).

Multi-view testing (``condensevit eval --views 4x3``, as Video Swin is tested: temporal clips x
spatial crops, scores averaged): :func:`view_indices` gives the frames of each temporal view, the
single-view sampling at ``num_clips`` evenly spaced phases inside each segment (TSN / TSM's
multi-clip test; one clip is exactly :func:`sample_indices`); :func:`spatial_crops` resizes the
frames to cover the size, as for one view, and takes ``num_crops`` crops evenly spaced along the
longer side (one crop is the centre crop). :class:`MultiViewClips` wraps a clip data set to give
every view of a clip, (views, C, T, H, W).

Video files: animated GIFs are read with PIL (always available). Other formats need a decoder;
torchvision 0.24 and later no longer decode video (its ``read_video`` / ``VideoReader`` moved to
TorchCodec), so the first available of torchvision's ``read_video`` (older torchvision), TorchCodec
and PyAV is used (:func:`video_backends`), and a folder holding video files with none of them
installed fails when the data set is built, with the fix in the message.
"""
from __future__ import annotations

import math
import os
import re
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageSequence
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torch.utils.data import Dataset

from .folder import IMG_EXTENSIONS, find_classes, to_rgb

__all__ = [
    "ClipFolder", "MovingDigits", "sample_indices", "read_video", "video_backends", "load_clip", "normalise_clip",
    "parse_views", "view_indices", "crop_offsets", "spatial_crops", "MultiViewClips",
    "VIDEO_EXTENSIONS",
    "DIRECTIONS",
]

VIDEO_EXTENSIONS = (".gif", ".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg")
DIRECTIONS = {
    8: ("right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right"),
    4: ("right", "up", "left", "down"),
}
LABELS = ("digit", "direction")


# ------------------------------------------------------------------------------- shared helpers
def sample_indices(num_available: int, num_frames: int) -> list[int]:
    """Indices of ``num_frames`` frames spread uniformly over ``num_available``: the middle frame of
    each of ``num_frames`` equal segments (all frames, in order, when the counts are equal)."""
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames} must be at least 1")
    if num_available < num_frames:
        raise ValueError(f"{num_available} frames are fewer than the {num_frames} to sample")
    return [int((i + 0.5) * num_available / num_frames) for i in range(num_frames)]


def parse_views(views) -> tuple[int, int]:
    """``'4x3'`` (or ``(4, 3)``) -> (temporal clips, spatial crops); ValueError naming the form otherwise."""
    try:
        parts = tuple(int(v) for v in (views.lower().split("x") if isinstance(views, str) else views))
    except (TypeError, ValueError, AttributeError):
        parts = ()
    if len(parts) != 2 or min(parts) < 1:
        raise ValueError(f"views {views!r} must be CLIPSxCROPS with both at least 1, e.g. 4x3 (4 temporal clips x 3 "
                         "spatial crops, as Video Swin is tested) or 1x1 (one view)")
    return parts


def view_indices(num_available: int, num_frames: int, num_clips: int) -> list[list[int]]:
    """Frame indices of ``num_clips`` temporal views of a clip of ``num_available`` frames.

    Each view takes ``num_frames`` frames spread over the whole clip, one per equal segment, as
    :func:`sample_indices` does, at phase ``(k + 0.5) / num_clips`` of each segment for view ``k``
    (TSN / TSM's multi-clip test), so the views interleave in time; ``num_clips=1`` is
    :func:`sample_indices` itself. Views coincide when the clip has too few frames to tell them
    apart (fewer than ``num_frames * num_clips``)."""
    if num_clips < 1:
        raise ValueError(f"num_clips={num_clips} must be at least 1")
    sample_indices(num_available, num_frames)   # the same checks as one view
    return [[int((i + (k + 0.5) / num_clips) * num_available / num_frames) for i in range(num_frames)]
            for k in range(num_clips)]


def crop_offsets(length: int, crop: int, num_crops: int) -> list[int]:
    """Starts of ``num_crops`` crops of ``crop`` evenly spaced along ``length`` (first at 0, last at
    the end); one crop is centred (``(length - crop) // 2``, the single-view centre crop)."""
    if crop > length:
        raise ValueError(f"a crop of {crop} does not fit in {length}")
    if num_crops == 1:
        return [(length - crop) // 2]
    return [(length - crop) * k // (num_crops - 1) for k in range(num_crops)]


def spatial_crops(frames: Tensor, size, num_crops: int) -> list[Tensor]:
    """``num_crops`` spatial views of (T, C, H, W) float frames in [0, 1]: resized (aspect kept) to
    cover ``size`` (H, W), then cropped to it at :func:`crop_offsets` along the longer side (the
    other side is centred). One crop is the single-view resize and centre crop."""
    th, tw = _as_size(size)
    H, W = frames.shape[-2:]
    if (H, W) != (th, tw):
        scale = max(th / H, tw / W)
        h, w = max(th, round(H * scale)), max(tw, round(W * scale))
        frames = F.interpolate(frames, size=(h, w), mode="bilinear", align_corners=False,
                               antialias=True).clamp_(0.0, 1.0)
    h, w = frames.shape[-2:]
    along_h = h - th > w - tw
    tops = crop_offsets(h, th, num_crops) if along_h else crop_offsets(h, th, 1) * num_crops
    lefts = crop_offsets(w, tw, 1) * num_crops if along_h else crop_offsets(w, tw, num_crops)
    return [frames[..., t:t + th, l:l + tw] for t, l in zip(tops, lefts)]


def _as_size(size) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in pair):
        raise ValueError(f"size={size!r} must be a positive int or a pair (H, W) of them")
    return pair


def _normalise(frames: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(T, C, H, W) floats in [0, 1] -> normalised (C, T, H, W)."""
    C = frames.shape[1]
    mean = torch.as_tensor(mean, dtype=frames.dtype).view(1, -1, 1, 1).expand(1, C, 1, 1)
    std = torch.as_tensor(std, dtype=frames.dtype).view(1, -1, 1, 1).expand(1, C, 1, 1)
    return ((frames - mean) / std).permute(1, 0, 2, 3).contiguous()


def _check_norm(mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) not in (1, 3) or len(std) not in (1, 3) or min(std) <= 0:
        raise ValueError(f"mean {mean} and std {std} must hold 1 or 3 values, std positive")
    return mean, std


def _natural_key(name: str):
    """Sort key comparing runs of digits as numbers: frame_2 before frame_10."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


# ----------------------------------------------------------------------------------- decoding
def video_backends() -> list[str]:
    """Decoders available for video files other than GIF, in the order they are tried."""
    found = []
    try:
        import torchvision.io as tvio
        if hasattr(tvio, "read_video"):
            found.append("torchvision")
    except ImportError:  # pragma: no cover
        pass
    for name, module in (("torchcodec", "torchcodec.decoders"), ("pyav", "av")):
        try:
            __import__(module)
            found.append(name)
        except Exception:  # noqa: BLE001  (a broken install, e.g. TorchCodec without FFmpeg, raises others)
            pass
    return found


_NO_BACKEND = ("no video decoder is installed: this torchvision ({tv}) does not decode video (read_video and "
               "VideoReader moved to TorchCodec); install one (`pip install torchcodec`, which needs FFmpeg, or "
               "`pip install av`), or extract the frames into a folder per clip (e.g. `ffmpeg -i clip.mp4 "
               "clip/%05d.png`)")


def _no_backend_message() -> str:
    import torchvision
    return _NO_BACKEND.format(tv=torchvision.__version__)


def read_video(path: str) -> Tensor:
    """All frames of a video file as (N, 3, H, W) uint8 RGB.

    GIFs are read with PIL; other files with the first of :func:`video_backends`. Raises
    ``RuntimeError`` when no decoder is installed and ``ValueError`` when the file cannot be decoded.
    """
    try:
        if path.lower().endswith(".gif"):
            with Image.open(path) as im:
                frames = [np.asarray(to_rgb(f)) for f in ImageSequence.Iterator(im)]
            return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)
        backends = video_backends()
        if not backends:
            raise RuntimeError(f"cannot decode {path!r}: " + _no_backend_message())
        if backends[0] == "torchvision":
            import torchvision.io as tvio
            frames, _, _ = tvio.read_video(path, pts_unit="sec", output_format="TCHW")
            return frames
        if backends[0] == "torchcodec":
            from torchcodec.decoders import VideoDecoder
            return VideoDecoder(path, dimension_order="NCHW")[:]
        import av
        with av.open(path) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        if not frames:
            raise ValueError("no video frames")
        return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)
    except RuntimeError as e:
        if "no video decoder" in str(e):
            raise
        raise ValueError(f"unreadable video file {path!r} ({type(e).__name__}: {str(e)[:200]}); "
                         "re-encode it or remove it") from e
    except Exception as e:  # noqa: BLE001  (each decoder raises its own kinds)
        raise ValueError(f"unreadable video file {path!r} ({type(e).__name__}: {str(e)[:200]}); "
                         "re-encode it or remove it") from e


# ------------------------------------------------------------------------------- one clip
def _frame_files(folder: str) -> list[str]:
    """The frame images of a clip folder, sorted by name with numbers compared as numbers."""
    names = sorted((f.name for f in os.scandir(folder)
                    if f.is_file() and not f.name.startswith(".") and f.name.lower().endswith(IMG_EXTENSIONS)),
                   key=_natural_key)
    return [os.path.join(folder, n) for n in names]


def _read_frame_files(clip: str, paths: Sequence[str]) -> Tensor:
    """Frame images as (T, 3, H, W) uint8; unreadable frames and mixed sizes are errors naming them."""
    frames = []
    for p in paths:
        try:
            with Image.open(p) as im:
                frames.append(np.asarray(to_rgb(im)))
        except Exception as e:  # noqa: BLE001  (PIL raises many kinds for bad files)
            raise ValueError(f"unreadable frame {p!r} in clip {clip!r} ({type(e).__name__}: {str(e)[:120]}); "
                             "replace or remove it (or the clip)") from e
        if frames[-1].shape != frames[0].shape:
            (h0, w0), (h1, w1) = frames[0].shape[:2], frames[-1].shape[:2]
            raise ValueError(
                f"frames of mixed sizes in clip {clip!r}: {os.path.basename(paths[0])!r} is {w0}x{h0}, "
                f"{os.path.basename(p)!r} is {w1}x{h1} (width x height); resize all frames of a clip to one size")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)


def _resize_cover(frames: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize (T, C, H, W) floats to cover ``size`` with the aspect kept, then centre-crop to it."""
    H, W = frames.shape[-2:]
    th, tw = size
    if (H, W) != (th, tw):
        scale = max(th / H, tw / W)
        h, w = max(th, round(H * scale)), max(tw, round(W * scale))
        frames = F.interpolate(frames, size=(h, w), mode="bilinear", align_corners=False,
                               antialias=True).clamp_(0.0, 1.0)
        top, left = (h - th) // 2, (w - tw) // 2
        frames = frames[..., top:top + th, left:left + tw]
    return frames


def load_clip(path: str | os.PathLike, num_frames: int, size) -> Tensor:
    """One clip, a folder of frame images or a video file, as ClipFolder reads it: ``num_frames``
    frames sampled uniformly (:func:`sample_indices`), resized to cover ``size`` (int or (H, W)) and
    centre-cropped, as (T, 3, H, W) floats in [0, 1] (not normalised; :func:`normalise_clip` does that).

    Errors, each naming the path: not found, a file that is not a video (:data:`VIDEO_EXTENSIONS`),
    a folder without frames, fewer frames than ``num_frames``, unreadable frames or files.
    """
    path = os.fspath(path)
    size = _as_size(size)
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames={num_frames!r} must be a positive int")
    if os.path.isdir(path):
        paths = _frame_files(path)
        if not paths:
            raise ValueError(f"clip folder {path!r} holds no frames (looked for {', '.join(IMG_EXTENSIONS)})")
        if len(paths) < num_frames:
            raise ValueError(f"clip folder {path!r} has {len(paths)} frames, fewer than the {num_frames} the model "
                             "takes; give a longer clip or build the model with fewer frames (num_frames)")
        frames = _read_frame_files(path, [paths[i] for i in sample_indices(len(paths), num_frames)])
    elif os.path.isfile(path):
        if not path.lower().endswith(VIDEO_EXTENSIONS):
            raise ValueError(f"{path!r} is not a clip: give a folder of frame images or a video file "
                             f"({', '.join(VIDEO_EXTENSIONS)})")
        frames = read_video(path)
        if frames.shape[0] < num_frames:
            raise ValueError(f"video {path!r} has {frames.shape[0]} frames, fewer than the {num_frames} the model "
                             "takes; give a longer clip or build the model with fewer frames (num_frames)")
        frames = frames[sample_indices(frames.shape[0], num_frames)]
    else:
        raise FileNotFoundError(f"clip not found: {path!r}; give a folder of frame images or a video file")
    return _resize_cover(frames.float() / 255.0, size)


def normalise_clip(frames: Tensor, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                   std: Sequence[float] = IMAGENET_DEFAULT_STD) -> Tensor:
    """(T, C, H, W) floats in [0, 1] -> the normalised (C, T, H, W) clip the models take."""
    mean, std = _check_norm(mean, std)
    return _normalise(frames, mean, std)


# --------------------------------------------------------------------------------- ClipFolder
class ClipFolder(Dataset):
    """One split of ``root/{train,val}/<class>/<clip>``; items are ((C, T, H, W) clip, label).

    A clip is a folder of frame images (sorted by name, numbers compared as numbers: ``frame_2``
    before ``frame_10``) or a video file (:data:`VIDEO_EXTENSIONS`). ``num_frames`` frames are
    sampled uniformly (:func:`sample_indices`); each is resized so that it covers ``size`` (an int
    for a square, or (H, W)) with its aspect kept, centre-cropped to ``size``, scaled to [0, 1] and
    normalised with ``mean`` / ``std``. ``transform``, if given, is applied to the final tensor.

    Errors, each naming the folder or file and the fix: a missing root or split folder, no class
    folders, a class folder without clips, a clip folder without frames, a clip with fewer than
    ``num_frames`` frames (frame folders are counted when the data set is built; with
    ``short_clips='skip'`` they are left out and counted in ``num_skipped`` instead), frames of
    mixed sizes within a clip, unreadable frames or files, and video files with no decoder installed.
    Classes are taken from ``train/`` and must be the same in ``val/``.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", num_frames: int = 16, size=224, *,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                 transform: Callable[[Tensor], Tensor] | None = None, short_clips: str = "error"):
        if split not in ("train", "val"):
            raise ValueError(f"split {split!r} must be 'train' or 'val'")
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames={num_frames!r} must be a positive int")
        if short_clips not in ("error", "skip"):
            raise ValueError(f"short_clips={short_clips!r} must be 'error' or 'skip'")
        self.size = _as_size(size)
        self.mean, self.std = _check_norm(mean, std)
        root = os.fspath(root)
        split_dir = self._split_dir(root, split)
        classes = find_classes(split_dir)
        other = os.path.join(root, "val" if split == "train" else "train")
        if os.path.isdir(other):
            other_classes = find_classes(other)
            if other_classes != classes:
                raise ValueError(
                    f"class folders differ between {root}/train and {root}/val: only in {split}: "
                    f"{sorted(set(classes) - set(other_classes))[:5]}, only in the other: "
                    f"{sorted(set(other_classes) - set(classes))[:5]}; make both hold the same class folders")

        samples, skipped, needs_decoder = [], [], []
        for ci, name in enumerate(classes):
            cdir = os.path.join(split_dir, name)
            clips = 0
            for entry in sorted(os.scandir(cdir), key=lambda e: _natural_key(e.name)):
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    frames = _frame_files(entry.path)
                    if not frames:
                        raise ValueError(f"clip folder {entry.path!r} holds no frames (looked for "
                                         f"{', '.join(IMG_EXTENSIONS)}); remove it or extract its frames")
                    if len(frames) < num_frames:
                        reason = f"{len(frames)} frames, fewer than num_frames={num_frames}"
                        if short_clips == "error":
                            raise ValueError(
                                f"clip folder {entry.path!r} has {reason}; sample fewer frames (num_frames <= "
                                f"{len(frames)}), remove the clip, or pass short_clips='skip' to leave such clips out")
                        skipped.append((entry.path, reason))
                        clips += 1
                        continue
                    samples.append(((entry.path, tuple(frames)), ci))
                elif entry.name.lower().endswith(VIDEO_EXTENSIONS):
                    samples.append(((entry.path, None), ci))
                    if not entry.name.lower().endswith(".gif"):
                        needs_decoder.append(entry.path)
                else:
                    continue
                clips += 1
            if not clips:
                raise ValueError(f"class folder {cdir!r} holds no clips: expected one folder of frames or one "
                                 f"video file ({', '.join(VIDEO_EXTENSIONS)}) per clip")
        if needs_decoder and not video_backends():
            raise RuntimeError(f"{len(needs_decoder)} video file(s) in {split_dir!r}, first {needs_decoder[0]!r}, "
                               "but " + _no_backend_message())
        if not samples:
            raise ValueError(f"no clip in {split_dir!r} has at least num_frames={num_frames} frames")

        self.root, self.split, self.num_frames = root, split, num_frames
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.samples = [(path, t) for (path, _), t in samples]
        self._frames = [frames for (_, frames), _ in samples]
        self.targets = [t for _, t in samples]
        self.transform = transform
        self.skipped = skipped
        self.num_skipped = len(skipped)

    @staticmethod
    def _split_dir(root: str, split: str) -> str:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"clip folder not found: {root!r}; give a folder holding train/ and val/ "
                                    "with one sub-folder per class and one clip per entry")
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"clip folder {root!r} has no {split}/ folder; expected "
                                    f"{root}/{split}/<class>/<clip>")
        return path

    def __len__(self) -> int:
        return len(self.samples)

    def _read_frames(self, clip: str, paths: Sequence[str]) -> Tensor:
        """The sampled frame images of a frame folder as (T, 3, H, W) uint8."""
        return _read_frame_files(clip, paths)

    def load(self, index: int) -> Tensor:
        """The sampled, resized frames of clip ``index`` as (T, 3, H, W) floats in [0, 1] (not normalised)."""
        clip, _ = self.samples[index]
        paths = self._frames[index]
        if paths is not None:
            frames = self._read_frames(clip, [paths[i] for i in sample_indices(len(paths), self.num_frames)])
        else:
            frames = read_video(clip)
            if frames.shape[0] < self.num_frames:
                raise ValueError(f"video {clip!r} has {frames.shape[0]} frames, fewer than num_frames="
                                 f"{self.num_frames}; sample fewer frames or remove the clip")
            frames = frames[sample_indices(frames.shape[0], self.num_frames)]
        return self._resize(frames.float() / 255.0)

    def _resize(self, frames: Tensor) -> Tensor:
        """Resize (T, C, H, W) to cover ``size`` with the aspect kept, then centre-crop to it."""
        return _resize_cover(frames, self.size)

    def load_views(self, index: int, num_clips: int, num_crops: int) -> list[Tensor]:
        """The ``num_clips x num_crops`` views of clip ``index`` (clip-major), each (T, 3, H, W) floats
        in [0, 1], not normalised: :func:`view_indices` in time, :func:`spatial_crops` in space.
        Each frame is read once."""
        clip, _ = self.samples[index]
        paths = self._frames[index]
        available = len(paths) if paths is not None else None
        if paths is None:
            frames = read_video(clip)
            available = frames.shape[0]
            if available < self.num_frames:
                raise ValueError(f"video {clip!r} has {available} frames, fewer than num_frames="
                                 f"{self.num_frames}; sample fewer frames or remove the clip")
        views = view_indices(available, self.num_frames, num_clips)
        if paths is not None:
            wanted = sorted({i for v in views for i in v})
            read = self._read_frames(clip, [paths[i] for i in wanted])
            frames = read.new_zeros(available, *read.shape[1:])
            frames[wanted] = read
        out = []
        for v in views:
            out += spatial_crops(frames[v].float() / 255.0, self.size, num_crops)
        return out

    def __getitem__(self, index: int):
        clip = _normalise(self.load(index), self.mean, self.std)
        if self.transform is not None:
            clip = self.transform(clip)
        return clip, self.targets[index]

    def __repr__(self) -> str:
        return (f"ClipFolder({self.root!r}, split={self.split!r}, clips={len(self)}, classes={len(self.classes)}, "
                f"num_frames={self.num_frames}, size={self.size}, skipped={self.num_skipped})")


# ------------------------------------------------------------------------------- MovingDigits
class MovingDigits(Dataset):
    """Scikit-learn's 1,797 handwritten digits, each moving in a straight line across a black canvas.

    Clip ``i`` (of the whole set, before the split) depends only on ``(seed, i)``: its digit is
    ``load_digits()`` image ``i``, scaled to a side drawn from ``digit_size`` (bicubic); its
    direction is one of ``num_directions`` (8: every 45 degrees, 4: right / up / left / down, image
    up being up), dealt out evenly over the set by a seeded permutation, so the directions are
    balanced and independent of the digits. The digit moves at constant velocity and stays inside
    the canvas for the whole clip (it neither bounces nor wraps, so the direction holds in every
    frame and the whole glyph is always visible): its path covers between half and all of the room
    along its direction, from a start point drawn so that the path fits; positions are rounded to
    whole pixels.

    ``label='digit'`` (10 classes) or ``'direction'`` (``num_directions`` classes, named in
    :data:`DIRECTIONS`). The train / val split is stratified by that label and seeded. Items are
    ((3, num_frames, size, size) normalised float clip, label); :meth:`frames` gives the raw
    (num_frames, size, size) uint8 frames.
    """

    def __init__(self, split: str = "train", num_frames: int = 16, size: int = 64, label: str = "digit",
                 seed: int = 0, *, num_directions: int = 8, digit_size: tuple[int, int] = (16, 24),
                 val_fraction: float = 0.2, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, transform: Callable[[Tensor], Tensor] | None = None):
        if split not in ("train", "val"):
            raise ValueError(f"split {split!r} must be 'train' or 'val'")
        if label not in LABELS:
            raise ValueError(f"label={label!r} must be one of {LABELS}")
        if num_directions not in DIRECTIONS:
            raise ValueError(f"num_directions={num_directions!r} must be 4 or 8")
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 2:
            raise ValueError(f"num_frames={num_frames!r} must be an int of at least 2 (motion needs two frames)")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction {val_fraction} must lie strictly between 0 and 1")
        if isinstance(size, bool) or not isinstance(size, int) or size < 9:
            raise ValueError(f"size={size!r} must be an int of at least 9 (the canvas side in pixels)")
        lo, hi = (int(s) for s in digit_size)
        if not 8 <= lo <= hi < size:
            raise ValueError(f"digit_size={tuple(digit_size)} must satisfy 8 <= min <= max < size ({size}), so the "
                             "digit has room to move; use a larger size or smaller digits")
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        self._glyphs = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)   # sklearn's ink is 0..16
        n = len(self._glyphs)
        self._digits = bunch.target.astype(np.int64)
        # a generator of its own (three entropy words: never one of the clips' (seed, i) streams)
        self._directions = np.random.default_rng([seed, n, num_directions]).permutation(np.arange(n) % num_directions)
        labels = self._digits if label == "digit" else self._directions
        train_idx, val_idx = train_test_split(np.arange(n), test_size=val_fraction, random_state=seed,
                                              stratify=labels)
        self.indices = np.sort(train_idx if split == "train" else val_idx)
        self.split, self.label, self.seed = split, label, seed
        self.num_frames, self.size, self.num_directions = num_frames, int(size), num_directions
        self.digit_size = (lo, hi)
        self.mean, self.std = _check_norm(mean, std)
        self.transform = transform
        self.classes = [str(d) for d in range(10)] if label == "digit" else list(DIRECTIONS[num_directions])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = labels[self.indices].tolist()
        self.digits = self._digits[self.indices].tolist()
        self.directions = self._directions[self.indices].tolist()
        self.num_skipped = 0

    def __len__(self) -> int:
        return len(self.indices)

    def path(self, index: int) -> dict:
        """Geometry of clip ``index``: digit side, direction, start (top, left) and velocity (px/frame)."""
        i = int(self.indices[index])
        rng = np.random.default_rng([self.seed, i])
        side = int(rng.integers(self.digit_size[0], self.digit_size[1] + 1))
        angle = 2 * math.pi * int(self._directions[i]) / self.num_directions
        dx, dy = round(math.cos(angle), 12), -round(math.sin(angle), 12)   # image rows grow downwards
        room = self.size - side
        travel = rng.uniform(0.5, 1.0) * room / max(abs(dx), abs(dy))
        start = []
        for d in (dy, dx):                                               # (top, left)
            span = d * travel
            start.append(rng.uniform(max(0.0, -span), min(room, room - span)))
        steps = self.num_frames - 1
        return dict(side=side, direction=int(self._directions[i]), digit=int(self._digits[i]),
                    start=(start[0], start[1]), velocity=(dy * travel / steps, dx * travel / steps))

    def frames(self, index: int) -> np.ndarray:
        """The clip's (num_frames, size, size) uint8 frames, white ink on black."""
        g = self.path(index)
        side = g["side"]
        glyph = np.asarray(Image.fromarray(self._glyphs[int(self.indices[index])]).resize((side, side), Image.BICUBIC))
        out = np.zeros((self.num_frames, self.size, self.size), dtype=np.uint8)
        for t in range(self.num_frames):
            top = min(max(round(g["start"][0] + t * g["velocity"][0]), 0), self.size - side)
            left = min(max(round(g["start"][1] + t * g["velocity"][1]), 0), self.size - side)
            out[t, top:top + side, left:left + side] = glyph
        return out

    def load_views(self, index: int, num_clips: int, num_crops: int) -> list[Tensor]:
        """Multi-view testing's views of clip ``index``, (T, 3, size, size) floats in [0, 1]: a moving
        digit is exactly ``num_frames`` frames of the model's size, so every view is the clip itself."""
        frames = torch.from_numpy(self.frames(index)).float().div_(255.0).unsqueeze(1).expand(-1, 3, -1, -1)
        out = []
        for v in view_indices(self.num_frames, self.num_frames, num_clips):
            out += spatial_crops(frames[v], self.size, num_crops)
        return out

    def __getitem__(self, index: int):
        frames = torch.from_numpy(self.frames(index)).float().div_(255.0)
        clip = _normalise(frames.unsqueeze(1).expand(-1, 3, -1, -1), self.mean, self.std)
        if self.transform is not None:
            clip = self.transform(clip)
        return clip, self.targets[index]

    def __repr__(self) -> str:
        return (f"MovingDigits(split={self.split!r}, clips={len(self)}, label={self.label!r}, "
                f"num_frames={self.num_frames}, size={self.size}, seed={self.seed})")


# ------------------------------------------------------------------------------- multi-view testing
class MultiViewClips(Dataset):
    """Every view of each clip of a clip data set (:class:`ClipFolder` or :class:`MovingDigits`):
    items are ((num_clips * num_crops, C, T, H, W) normalised views, clip-major, label). The data
    set's ``transform`` applies to each view. ``classes``, ``targets`` and ``num_skipped`` are the
    data set's."""

    def __init__(self, dataset: Dataset, num_clips: int, num_crops: int):
        if not hasattr(dataset, "load_views"):
            raise ValueError(f"{type(dataset).__name__} gives no views; multi-view testing needs clips (ClipFolder, "
                             "MovingDigits)")
        self.dataset, self.num_clips, self.num_crops = dataset, int(num_clips), int(num_crops)
        self.classes, self.class_to_idx = dataset.classes, dataset.class_to_idx
        self.targets = dataset.targets
        self.num_skipped = getattr(dataset, "num_skipped", 0)
        self.skipped = getattr(dataset, "skipped", [])

    @property
    def num_views(self) -> int:
        return self.num_clips * self.num_crops

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        ds = self.dataset
        views = []
        for frames in ds.load_views(index, self.num_clips, self.num_crops):
            clip = _normalise(frames, ds.mean, ds.std)
            views.append(ds.transform(clip) if ds.transform is not None else clip)
        return torch.stack(views), ds.targets[index]

    def __repr__(self) -> str:
        return f"MultiViewClips({self.dataset!r}, views={self.num_clips}x{self.num_crops})"
