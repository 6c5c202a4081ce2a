"""Pictures of what the few tokens see.

``token_maps(model, images, **kw)`` returns the maps of a model as tensors shaped
(B, tokens, H_patches, W_patches) plus an "owner" map (B, H_patches, W_patches): which token
claims each patch. ``render(...)`` draws them over the image: a grid of small overlays per map kind
and one combined colour map. ``condensevit viz`` does both from the command line.

Video models (:mod:`condensevit.models.video`) take clips (B, C, T, H, W); their maps are
(B, tokens, T', H_patches, W_patches) over the tubelet grid and the owner map (B, T', H_patches,
W_patches). ``TokenMaps.time_slice(t)`` takes the maps of tubelet slice ``t`` (each map still a share
of the whole clip), which ``render`` draws over a frame of that slice (:func:`slice_frame`);
``condensevit viz --frame T'`` picks the slice (default the middle one), ``--image`` then being
``sample:moving_digits``, a folder of frame images or a video file.
"""
from __future__ import annotations

import argparse
import math
import os
import textwrap
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["TokenMaps", "token_maps", "load_image", "load_clip_input", "slice_frame", "render", "figure_size",
           "add_parser", "models_with_token_maps", "sample_image", "panel_title"]


@dataclass
class TokenMaps:
    """Maps of one batch. ``maps``: name -> (B, tokens, Hp, Wp), each token's map summing to 1 over
    the image tokens; ``owner``: (B, Hp, Wp) index of the token that claims each patch;
    ``owner_title`` says what claims means for this model. For a video model the maps are
    (B, tokens, T', Hp, Wp), each summing to 1 over all tubelets of the clip, and ``owner`` is
    (B, T', Hp, Wp)."""
    maps: dict[str, torch.Tensor]
    owner: torch.Tensor
    owner_title: str

    @property
    def is_video(self) -> bool:
        return self.owner.dim() == 4

    @property
    def num_time_slices(self) -> int:
        """T', the tubelet slices along time (1 for images)."""
        return int(self.owner.shape[1]) if self.is_video else 1

    def time_slice(self, t: int) -> "TokenMaps":
        """The maps of tubelet slice ``t`` (negative counts from the end) of video maps, as image maps
        (B, tokens, Hp, Wp) for :func:`render`; each map keeps its share of the whole clip (it sums to
        1 over the clip, not over the slice: a token that looks elsewhere in time is dark here)."""
        if not self.is_video:
            raise ValueError("these are image maps: they have no time axis to slice")
        n = self.num_time_slices
        if isinstance(t, bool) or not isinstance(t, int) or not -n <= t < n:
            raise ValueError(f"time slice {t!r} is out of range: the clip has {n} tubelet slices (0..{n - 1})")
        return TokenMaps(maps={k: v[:, :, t] for k, v in self.maps.items()}, owner=self.owner[:, t],
                         owner_title=self.owner_title)


def _unwrap(model):
    return getattr(model, "model", model)


def models_with_token_maps() -> list[str]:
    """Registered models that have condensed tokens to show (built on the meta device: no cost)."""
    import timm
    from .models import list_models
    out = []
    for name in list_models():
        with torch.device("meta"):
            m = timm.create_model(name)
        if hasattr(_unwrap(m), "token_maps"):
            out.append(name)
    return out


def token_maps(model, images: torch.Tensor, **kwargs) -> TokenMaps:
    """The token maps of ``model`` for ``images`` (B, C, H, W), or for clips (B, C, T, H, W) when
    ``model`` is a video model (the maps then have a T' axis), computed without gradients.

    Extra keyword arguments go to the model's ``token_maps`` (e.g. ``compressed_grid=(3, 3)`` for
    LookupViT, ``(t, h, w)`` for its video form, ``unit=1`` for STViT-R)."""
    m = _unwrap(model)
    if not hasattr(m, "token_maps"):
        raise ValueError(
            f"{type(m).__name__} has no condensed tokens to show; token maps exist for the STViT, STViT-R "
            f"and LookupViT families (`condensevit models` lists them)")
    was_training = m.training
    m.eval()
    try:
        with torch.no_grad():
            out = m.token_maps(images, **kwargs)
    finally:
        m.train(was_training)
    maps = {}
    rank = images.dim()  # (B, tokens, Hp, Wp) maps for images, (B, tokens, T', Hp, Wp) for clips
    for k, v in out.items():
        if torch.is_tensor(v) and v.dim() == rank and v.is_floating_point():
            # every token's map as a distribution over the image (or clip) tokens
            dims = tuple(range(2, rank))
            maps[k] = v / v.sum(dims, keepdim=True).clamp_min(1e-12)
    if not maps:
        shape = "(B, tokens, H, W)" if rank == 4 else "(B, tokens, T, H, W)"
        raise ValueError(f"{type(m).__name__}.token_maps returned no {shape} maps")
    owner = out.get("owner", out.get("scatter_argmax"))
    title = out.get("owner_title") or (
        "compressed token each patch reads most (scatter)" if "scatter_argmax" in out
        else "token whose map is largest at each patch")
    if owner is None:  # the token whose last map is largest at each patch
        owner = list(maps.values())[-1].argmax(1)
    return TokenMaps(maps=maps, owner=owner, owner_title=title)


def load_image(path_or_array, size: tuple[int, int], mean, std) -> tuple[torch.Tensor, np.ndarray]:
    """An image file (or HxW / HxWx3 array) at ``size`` (H, W): the normalised tensor (1, 3, H, W)
    for the model and the RGB array for drawing. The image is scaled to cover ``size`` and
    centre-cropped (as timm's evaluation transform does), so its aspect ratio is kept, never
    squashed; 16-bit greyscale is scaled to 8 bits (:func:`condensevit.data.folder.to_rgb`)."""
    from PIL import Image, UnidentifiedImageError

    from .data.folder import to_rgb
    if isinstance(path_or_array, np.ndarray):
        img = Image.fromarray(path_or_array)
    else:
        path = os.fspath(path_or_array)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image not found: {path!r}")
        try:
            img = Image.open(path)
            img.load()
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image {path!r} ({e}); give a PNG, JPEG or other PIL-readable file") from e
    img = to_rgb(img)
    H, W = size
    scale = max(H / img.height, W / img.width)
    rw, rh = max(W, round(img.width * scale)), max(H, round(img.height * scale))
    img = img.resize((rw, rh), Image.BICUBIC)
    left, top = (rw - W) // 2, (rh - H) // 2
    img = img.crop((left, top, left + W, top + H))
    rgb = np.asarray(img)
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x.unsqueeze(0), rgb


def _is_clip_spec(spec, gif_is_clip: bool = False) -> bool:
    """Whether ``--image`` names a clip: sample:moving_digits[:N], a folder, or a video file (a GIF
    only with ``gif_is_clip``: PIL also reads it as an image)."""
    if isinstance(spec, np.ndarray):
        return spec.ndim == 4
    from .data.video import VIDEO_EXTENSIONS
    text = os.fspath(spec)
    if text.startswith("sample:"):
        return text.split(":", 2)[1].startswith("moving_digits")
    lower = text.lower()
    return os.path.isdir(text) or (lower.endswith(VIDEO_EXTENSIONS) and (gif_is_clip or not lower.endswith(".gif")))


def _check_frame_folder(spec, name: str, video: bool):
    """A folder given as ``--image`` is a clip's frames: one without frame images is named as such
    (not as "a clip" an image model cannot take)."""
    if not (isinstance(spec, str) and os.path.isdir(spec)):
        return
    from .data import IMG_EXTENSIONS
    if any(f.lower().endswith(IMG_EXTENSIONS) for f in os.listdir(spec)):
        return
    want = ("a folder of the clip's frame images, a video file or sample:moving_digits" if video else
            "an image file or sample:china / sample:digit (a folder is read as a clip's frames)")
    raise ValueError(f"--image {spec!r} is a folder without frames (no {', '.join(IMG_EXTENSIONS)} files in it); "
                     f"{name} takes {'clips' if video else 'images'}: give {want}")


def load_clip_input(spec, input_size, mean, std) -> tuple[torch.Tensor, np.ndarray]:
    """A clip for a video model of ``input_size`` (C, T, H, W): the normalised tensor (1, C, T, H, W)
    and the RGB frames (T, H, W, 3) uint8 for drawing.

    ``spec``: ``sample:moving_digits`` (clip 0 of the moving digits' val split, made at the model's
    size) or ``sample:moving_digits:N`` (clip N), a folder of frame images, a video file, or a
    (T, H, W, 3) uint8 array. Frames are sampled and sized as :class:`~condensevit.data.video.ClipFolder`
    does."""
    from .data.video import MovingDigits, load_clip, normalise_clip
    _, T, H, W = (int(s) for s in input_size)
    if isinstance(spec, np.ndarray):
        if spec.ndim != 4 or spec.shape[-1] != 3 or spec.shape[0] < T:
            raise ValueError(f"a clip array must be (T, H, W, 3) uint8 with at least {T} frames, not {spec.shape}")
        from .data.video import _resize_cover, sample_indices
        frames = torch.from_numpy(np.ascontiguousarray(spec[sample_indices(spec.shape[0], T)])).permute(0, 3, 1, 2)
        frames = _resize_cover(frames.float() / 255.0, (H, W))
    elif os.fspath(spec).startswith("sample:"):
        parts = os.fspath(spec).split(":")
        if parts[1] not in ("moving_digits", "moving_digits_direction") or len(parts) > 3:
            raise ValueError(f"no sample clip {spec!r}; use sample:moving_digits or sample:moving_digits:N (clip N)")
        if H != W:
            raise ValueError(f"moving digits are square but the model takes {H}x{W} frames; give a clip folder or "
                             "video file, or build the model with a square img_size")
        if H < 9 or T < 2:
            raise ValueError(f"moving digits need at least 2 frames of 9x9 pixels; the model takes {T} of {H}x{W}")
        digit = {} if H >= 25 else dict(digit_size=(8, max(8, H // 2)))
        ds = MovingDigits("val", num_frames=T, size=H, **digit)
        try:
            index = int(parts[2]) if len(parts) == 3 else 0
        except ValueError:
            raise ValueError(f"sample clip {spec!r}: the clip index must be a number") from None
        if not 0 <= index < len(ds):
            raise ValueError(f"sample clip {spec!r}: the index must lie in 0..{len(ds) - 1}")
        frames = torch.from_numpy(ds.frames(index)).float().div_(255.0).unsqueeze(1).expand(-1, 3, -1, -1)
    else:
        frames = load_clip(spec, T, (H, W))
    x = normalise_clip(frames, mean, std).unsqueeze(0)
    rgb = (frames.permute(0, 2, 3, 1) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    return x, rgb


def slice_frame(t: int, num_slices: int, num_frames: int) -> int:
    """The frame drawn under tubelet slice ``t`` of ``num_slices``: the middle of the slice's
    ``num_frames / num_slices`` frames (the earlier of the two middle ones for an even count)."""
    per = num_frames // num_slices
    return (t % num_slices) * per + (per - 1) // 2


def _upsample(m: torch.Tensor, size) -> np.ndarray:
    """(..., Hp, Wp) -> (..., H, W) by nearest, so patch borders stay visible."""
    lead = m.shape[:-2]
    up = F.interpolate(m.reshape(-1, 1, *m.shape[-2:]).float(), size=size, mode="nearest")
    return up.reshape(*lead, *size).cpu().numpy()


_TITLES = {
    # STViT (Chang et al. 2023, sec. 3.2): the semantic token generation module (STGM)
    "center_pool": "initial cluster centres:\nintra-window pooling weights",
    # LookupViT (Koner et al. 2024, sec. 3): multi-head bidirectional cross-attention (MHBC)
    "gather": "MHBC gather: compressed tokens\nattending to lookup tokens",
    "scatter": "MHBC scatter: lookup tokens\nattending to compressed tokens",
    # STViT-R (the authors' code): a dumbbell unit of stage 3
    "semantic": "semantic tokens attending\nto image tokens",
    "recovery": "recovery: image tokens\nattending to semantic tokens",
}


def panel_title(name: str, names: list[str] | tuple[str, ...] = ()) -> str:
    """The title of a map kind in the papers' terms (``blocks.4`` of STViT is the first STGM layer)."""
    if name in _TITLES:
        return _TITLES[name]
    if name.startswith("blocks."):
        layers = sorted((k for k in names if k.startswith("blocks.")), key=lambda k: int(k.split(".")[1]))
        i = layers.index(name) + 1 if name in layers else None
        where = f"STGM layer {i}" if i else "STGM layer"
        query = "semantic tokens" if i != 2 else "semantic tokens + global centres"
        return f"{where} (layer {int(name.split('.')[1]) + 1}):\n{query} attending to image tokens"
    return name


def figure_size(n_kinds: int, n_tokens: int, max_tokens: int = 16, dpi: int = 100,
                aspect: float = 1.0) -> tuple[int, int]:
    """Pixel size (width, height) of the figure ``render`` draws; ``aspect`` is the image's H / W."""
    n = min(n_tokens, max_tokens)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    width_in = 4.0 + (1.1 * cols + 0.3) * n_kinds + 0.2
    height_in = max(4.0 * aspect, 1.1 * aspect * rows + 0.3) + 0.7 + 0.6  # + title lines and a colour bar
    return int(round(width_in * dpi)), int(round(height_in * dpi))


def render(rgb: np.ndarray, tm: TokenMaps, path: str, index: int = 0, max_tokens: int = 16,
           title: str = "", dpi: int = 100) -> tuple[int, int]:
    """Draw the maps of batch element ``index`` over ``rgb`` (H, W, 3) and write a PNG.

    Left: which token claims each patch. Then, for each kind of map (titled in the papers' terms),
    each token's map over the image at the image's own aspect ratio, on one colour scale per kind
    (the share of the token's attention that falls on each patch; its colour bar below). Returns
    the (width, height) in pixels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors, gridspec

    H, W = rgb.shape[:2]
    kinds = list(tm.maps.items())
    names = [k for k, _ in kinds]
    n_tokens = max(v.shape[1] for _, v in kinds)
    n = min(n_tokens, max_tokens)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    size_px = figure_size(len(kinds), n_tokens, max_tokens, dpi, aspect=H / W)
    fig = plt.figure(figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi)
    height_in = size_px[1] / dpi  # margins in inches: room for the titles above, the colour bars' labels below
    outer = gridspec.GridSpec(1, 1 + len(kinds), figure=fig, left=0.01, right=0.99, top=1 - 0.15 / height_in,
                              bottom=0.5 / height_in, width_ratios=[4.0] + [1.1 * cols + 0.3] * len(kinds),
                              wspace=0.06)
    # the combined "which token owns this patch" map
    ax = fig.add_subplot(outer[0])
    owner = tm.owner[index]
    n_owner = int(owner.max().item()) + 1 if owner.numel() else 1
    cmap = plt.get_cmap("tab20")
    colours = np.array([cmap(i % 20)[:3] for i in range(max(n_owner, 1))])
    own_up = _upsample(owner.unsqueeze(0), (H, W))[0].astype(int)
    ax.imshow(rgb)
    ax.imshow(colours[own_up], alpha=0.5)
    for t in np.unique(own_up):
        ys, xs = np.nonzero(own_up == t)
        ax.text(xs.mean(), ys.mean(), str(t), color="white", fontsize=7, ha="center", va="center",
                bbox=dict(boxstyle="round,pad=0.1", fc="black", alpha=0.4, lw=0))
    ax.set_title(f"{title}\n{tm.owner_title}" if title else tm.owner_title, fontsize=8)
    ax.axis("off")
    gray = rgb.mean(-1, keepdims=True).repeat(3, -1) / 255.0
    heat_cmap = plt.get_cmap("inferno")
    for k, (name, maps) in enumerate(kinds):
        inner = gridspec.GridSpecFromSubplotSpec(rows + 2, cols, subplot_spec=outer[1 + k],
                                                 height_ratios=[0.35] + [1] * rows + [0.12], hspace=0.25,
                                                 wspace=0.05)
        head = fig.add_subplot(inner[0, :])
        more = f" (first {n} of {maps.shape[1]})" if maps.shape[1] > n else ""
        width_chars = max(16, int((1.1 * cols + 0.3) * 13))  # ~13 characters per inch at 7 pt
        text = "\n".join(textwrap.fill(line, width_chars) for line in f"{panel_title(name, names)}{more}".split("\n"))
        head.text(0.5, 0.0, text, ha="center", va="bottom", fontsize=7)
        head.axis("off")
        up = _upsample(maps[index, :n], (H, W))
        # one scale per kind: the maps are shares of each token's attention (they sum to 1 over the
        # patches), so colours compare across the tokens of a panel
        vmax = max(float(maps[index, :n].max()), 1e-12)
        norm = colors.Normalize(vmin=0.0, vmax=vmax)
        for t in range(min(n, maps.shape[1])):
            a = fig.add_subplot(inner[1 + t // cols, t % cols])
            a.imshow(0.45 * gray)
            a.imshow(up[t], cmap=heat_cmap, norm=norm, alpha=0.75)
            a.set_title(f"token {t}", fontsize=6, pad=1)
            a.axis("off")
        cax = fig.add_subplot(inner[rows + 1, :])
        bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=heat_cmap), cax=cax, orientation="horizontal")
        bar.ax.tick_params(labelsize=6, length=2, pad=1)
        bar.set_label("share of the token's attention per patch", fontsize=6, labelpad=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return size_px


def _parse_size(text: str) -> tuple[int, int]:
    parts = [int(p) for p in text.lower().replace(",", "x").split("x") if p]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise ValueError(f"size {text!r} must be HxW, e.g. 224x224")
    return parts[0], parts[1]


def _parse_grid(text: str, video: bool) -> tuple[int, ...]:
    """--grid: HxW for images, TxHxW for video models (LookupViT's compressed grid)."""
    try:
        parts = tuple(int(p) for p in text.lower().replace(",", "x").split("x") if p)
    except ValueError:
        parts = ()
    want, example = (3, "TxHxW, e.g. 2x3x3") if video else (2, "HxW, e.g. 3x3")
    if len(parts) != want or min(parts) < 1:
        kind = "a video model's" if video else "the"
        raise ValueError(f"--grid {text!r}: {kind} compressed grid is {example}, at least one token along each axis")
    return parts


SAMPLE_IMAGES = "sample:china, sample:flower (scikit-learn's photographs), sample:digit[:N] (the N-th validation digit)"


def sample_image(spec: str) -> np.ndarray:
    """A built-in image as an (H, W, 3) uint8 array: ``sample:china`` / ``sample:flower``
    (scikit-learn's photographs, 427x640) or ``sample:digit[:N]`` (``sample:digits[:N]`` too): the
    N-th (default 0) validation image of the embedded digits set, a 64x64 canvas."""
    parts = spec.split(":")
    name = parts[1] if len(parts) > 1 else ""
    if name in ("digit", "digits"):
        from .data import DigitsDataset
        val = DigitsDataset("val")
        try:
            index = int(parts[2]) if len(parts) == 3 else 0
        except ValueError:
            index = -1
        if len(parts) > 3 or not 0 <= index < len(val):
            raise ValueError(f"sample image {spec!r}: write sample:digit or sample:digit:N with N in 0..{len(val) - 1}")
        return np.repeat(val.images[index][..., None], 3, axis=-1)
    name = (name or "china").removesuffix(".jpg")
    if name not in ("china", "flower") or len(parts) > 2:
        raise ValueError(f"no sample image {spec!r}; the built-in images are {SAMPLE_IMAGES}")
    from sklearn.datasets import load_sample_image
    return load_sample_image(name + ".jpg")


def _model_label(args, model) -> str:
    if args.model:
        return args.model
    cfg = getattr(_unwrap(model), "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(_unwrap(model)).__name__


def _cmd_viz(args) -> int:
    import timm
    from .bench import parse_kwargs
    from . import models as _  # noqa: F401  (registers the models)
    from .bench import _check_model_name
    from .data import model_input_size
    from .outputs import check_figure_file
    check_figure_file(args.out, "--out")  # before any model is built
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1 (got {args.max_tokens})")
    if args.model:
        _check_model_name(args.model)
    elif not args.checkpoint:
        raise ValueError("no model given; pass --model NAME, or --checkpoint of a training run (it records its model)")
    kwargs = parse_kwargs(args.model_kwargs or [])
    if args.size:
        kwargs.setdefault("img_size", _parse_size(args.size))
    if args.checkpoint:
        from .train.checkpoint import load_model_for_inference
        model = load_model_for_inference(args.model, args.checkpoint, **kwargs)
    else:
        model = timm.create_model(args.model, **kwargs)
    name = _model_label(args, model)
    m = _unwrap(model)
    if not hasattr(m, "token_maps"):
        raise ValueError(f"{name} has no condensed tokens to show; pick one of: "
                         + ", ".join(models_with_token_maps()))
    cfg = m.pretrained_cfg
    input_size = tuple(model_input_size(m))
    video = len(input_size) == 4
    if args.size:
        input_size = (*input_size[:-2], *_parse_size(args.size))
    mean, std = cfg.get("mean", (0.5,) * 3), cfg.get("std", (0.5,) * 3)
    _check_frame_folder(args.image, name, video)
    is_clip = _is_clip_spec(args.image, gif_is_clip=video)
    if video and not is_clip:
        raise ValueError(f"{name} takes clips (C, T, H, W) but {args.image!r} is an image; give sample:moving_digits, "
                         "a folder of frame images or a video file")
    if not video and is_clip:
        raise ValueError(f"{name} takes images (C, H, W) but {args.image!r} is a clip; give an image file or "
                         "sample:china / sample:digit, or a video model (stvit_video_*, lookupvit_video_*)")
    if not video and args.frame is not None:
        raise ValueError(f"--frame picks a tubelet slice of a video model's maps; {name} takes images")
    if video:
        x, frames = load_clip_input(args.image, input_size, mean, std)
    else:
        x, rgb = load_image(sample_image(args.image) if args.image.startswith("sample:") else args.image,
                            input_size[-2:], mean, std)
    map_kwargs = {}
    if args.grid:
        map_kwargs["compressed_grid"] = _parse_grid(args.grid, video)
    if args.unit is not None:
        map_kwargs["unit"] = args.unit
    tm = token_maps(model, x, **map_kwargs)
    title = name + (f" ({os.path.basename(args.checkpoint)})" if args.checkpoint else " (untrained)")
    shapes = ", ".join(f"{k} {tuple(v.shape[1:])}" for k, v in tm.maps.items())
    where = ""
    if video:
        n = tm.num_time_slices
        t = n // 2 if args.frame is None else args.frame
        if not 0 <= t < n:
            raise ValueError(f"--frame {t} is out of range: the maps have {n} tubelet slices (0..{n - 1})")
        f = slice_frame(t, n, input_size[1])
        tm, rgb = tm.time_slice(t), frames[f]
        title += f", t'={t}/{n}, frame {f}"
        where = f" at tubelet slice {t} of {n} (frame {f} of {input_size[1]})"
    w, h = render(rgb, tm, args.out, max_tokens=args.max_tokens, title=title)
    print(f"wrote {args.out} ({w}x{h} px){where}: {shapes}")
    return 0


def add_parser(sub: argparse._SubParsersAction):
    from .cli import HelpFormatter
    p = sub.add_parser(
        "viz", formatter_class=HelpFormatter, help="draw what the few tokens see (token maps) over an image or a frame of a clip",
        description="STViT: each semantic token's initial pooling and its attention in the token generation "
                    "layers; STViT-R: the per-window semantic tokens of one stage-3 unit; LookupViT: each "
                    "compressed token's gather attention and which compressed token each patch reads most. "
                    "Video models: the same maps over one tubelet slice (--frame), drawn on a frame of it.")
    p.add_argument("--model", default=None,
                   help="model name (required unless --checkpoint is a training output, which records it)")
    p.add_argument("--checkpoint", default=None, help="weights to load (training output or a pretrained file)")
    p.add_argument("--image", required=True,
                   help="an image file, or a built-in image: sample:china / sample:flower (scikit-learn's "
                        "photographs), sample:digit[:N] (a validation digit); for video models a clip: "
                        "sample:moving_digits[:N], a folder of frame images or a video file")
    p.add_argument("--out", required=True, help="figure to write; its extension names the format (.png, .pdf, .svg, ...)")
    p.add_argument("--size", default=None, help="HxW to run the model at (default: its input size)")
    p.add_argument("--frame", type=int, default=None,
                   help="video models: the tubelet slice T' to draw (default: the middle one)")
    p.add_argument("--grid", default=None, help="LookupViT: compressed grid HxW (TxHxW for video) for this picture")
    p.add_argument("--unit", type=int, default=None, help="STViT-R: which stage-3 unit to show")
    p.add_argument("--max-tokens", type=int, default=16, help="small overlays per map kind")
    p.add_argument("--model-kwargs", nargs="*", default=None, metavar="KEY=VALUE",
                   help="model constructor arguments (with --checkpoint: on top of those it records)")
    p.set_defaults(func=_cmd_viz)
