"""Pictures of what the few tokens see.

``token_maps(model, images, **kw)`` returns the maps of a model as tensors shaped
(B, tokens, H_patches, W_patches) plus an "owner" map (B, H_patches, W_patches): which token
claims each patch. ``render(...)`` draws them over the image: a grid of small overlays per map kind
and one combined colour map. ``condensevit viz`` does both from the command line.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["TokenMaps", "token_maps", "load_image", "render", "add_parser", "models_with_token_maps"]


@dataclass
class TokenMaps:
    """Maps of one batch. ``maps``: name -> (B, tokens, Hp, Wp), each token's map summing to 1 over
    the image tokens; ``owner``: (B, Hp, Wp) index of the token that claims each patch;
    ``owner_title`` says what claims means for this model."""
    maps: dict[str, torch.Tensor]
    owner: torch.Tensor
    owner_title: str


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
    """The token maps of ``model`` for ``images`` (B, C, H, W), computed without gradients.

    Extra keyword arguments go to the model's ``token_maps`` (e.g. ``compressed_grid=(3, 3)`` for
    LookupViT, ``unit=1`` for STViT-R)."""
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
    for k, v in out.items():
        if torch.is_tensor(v) and v.dim() == 4 and v.is_floating_point():
            # every token's map as a distribution over the image tokens
            maps[k] = v / v.sum((-2, -1), keepdim=True).clamp_min(1e-12)
    if not maps:
        raise ValueError(f"{type(m).__name__}.token_maps returned no (B, tokens, H, W) maps")
    owner = out.get("owner", out.get("scatter_argmax"))
    title = out.get("owner_title") or (
        "compressed token each patch reads most (scatter)" if "scatter_argmax" in out
        else "token whose map is largest at each patch")
    if owner is None:  # the token whose last map is largest at each patch
        owner = list(maps.values())[-1].argmax(1)
    return TokenMaps(maps=maps, owner=owner, owner_title=title)


def load_image(path_or_array, size: tuple[int, int], mean, std) -> tuple[torch.Tensor, np.ndarray]:
    """An image file (or HxWx3 uint8 array) resized to ``size`` (H, W): the normalised tensor
    (1, 3, H, W) for the model and the RGB array for drawing."""
    from PIL import Image, UnidentifiedImageError
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
    img = img.convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
    rgb = np.asarray(img)
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x.unsqueeze(0), rgb


def _upsample(m: torch.Tensor, size) -> np.ndarray:
    """(..., Hp, Wp) -> (..., H, W) by nearest, so patch borders stay visible."""
    lead = m.shape[:-2]
    up = F.interpolate(m.reshape(-1, 1, *m.shape[-2:]).float(), size=size, mode="nearest")
    return up.reshape(*lead, *size).cpu().numpy()


def figure_size(n_kinds: int, n_tokens: int, max_tokens: int = 16, dpi: int = 100,
                aspect: float = 1.0) -> tuple[int, int]:
    """Pixel size (width, height) of the figure ``render`` draws; ``aspect`` is the image's H / W."""
    n = min(n_tokens, max_tokens)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    width_in = 4.0 + (1.1 * cols + 0.3) * n_kinds + 0.2
    height_in = max(4.0 * aspect, 1.1 * aspect * rows + 0.3) + 0.7
    return int(round(width_in * dpi)), int(round(height_in * dpi))


def render(rgb: np.ndarray, tm: TokenMaps, path: str, index: int = 0, max_tokens: int = 16,
           title: str = "", dpi: int = 100) -> tuple[int, int]:
    """Draw the maps of batch element ``index`` over ``rgb`` (H, W, 3) and write a PNG.

    Returns the (width, height) in pixels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import gridspec

    H, W = rgb.shape[:2]
    kinds = list(tm.maps.items())
    n_tokens = max(v.shape[1] for _, v in kinds)
    n = min(n_tokens, max_tokens)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    size_px = figure_size(len(kinds), n_tokens, max_tokens, dpi, aspect=H / W)
    fig = plt.figure(figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi)
    outer = gridspec.GridSpec(1, 1 + len(kinds), figure=fig, left=0.01, right=0.99, top=0.9, bottom=0.02,
                              width_ratios=[4.0] + [1.1 * cols + 0.3] * len(kinds), wspace=0.06)
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
    for k, (name, maps) in enumerate(kinds):
        inner = gridspec.GridSpecFromSubplotSpec(rows + 1, cols, subplot_spec=outer[1 + k],
                                                 height_ratios=[0.2] + [1] * rows, hspace=0.2, wspace=0.05)
        head = fig.add_subplot(inner[0, :])
        more = f" (first {n} of {maps.shape[1]})" if maps.shape[1] > n else ""
        head.text(0.5, 0.0, f"{name}{more}", ha="center", va="bottom", fontsize=8)
        head.axis("off")
        up = _upsample(maps[index, :n], (H, W))
        for t in range(min(n, maps.shape[1])):
            a = fig.add_subplot(inner[1 + t // cols, t % cols])
            heat = up[t] / max(float(up[t].max()), 1e-12)
            a.imshow(0.45 * gray)
            a.imshow(heat, cmap="inferno", alpha=0.75, vmin=0, vmax=1)
            a.set_title(str(t), fontsize=6, pad=1)
            a.axis("off")
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


def _sample_image(spec: str) -> np.ndarray:
    from sklearn.datasets import load_sample_image
    name = spec.split(":", 1)[1] or "china.jpg"
    name = name if name.endswith(".jpg") else name + ".jpg"
    try:
        return load_sample_image(name)
    except (AttributeError, FileNotFoundError, KeyError) as e:
        raise ValueError(f"no sample image {name!r}; scikit-learn ships sample:china and sample:flower") from e


def _cmd_viz(args) -> int:
    import timm
    from .bench import parse_kwargs
    from . import models as _  # noqa: F401  (registers the models)
    from .bench import _check_model_name
    _check_model_name(args.model)
    kwargs = parse_kwargs(args.model_kwargs or [])
    if args.size:
        kwargs.setdefault("img_size", _parse_size(args.size))
    if args.checkpoint:
        from .train.checkpoint import load_model_for_inference
        model = load_model_for_inference(args.model, args.checkpoint, **kwargs)
    else:
        model = timm.create_model(args.model, **kwargs)
    m = _unwrap(model)
    if not hasattr(m, "token_maps"):
        raise ValueError(f"{args.model} has no condensed tokens to show; pick one of: "
                         + ", ".join(models_with_token_maps()))
    cfg = m.pretrained_cfg
    size = _parse_size(args.size) if args.size else tuple(cfg.get("input_size", (3, 224, 224))[-2:])
    img = _sample_image(args.image) if args.image.startswith("sample:") else args.image
    x, rgb = load_image(img, size, cfg.get("mean", (0.5,) * 3), cfg.get("std", (0.5,) * 3))
    map_kwargs = {}
    if args.grid:
        map_kwargs["compressed_grid"] = _parse_size(args.grid)
    if args.unit is not None:
        map_kwargs["unit"] = args.unit
    tm = token_maps(model, x, **map_kwargs)
    title = args.model + (f" ({os.path.basename(args.checkpoint)})" if args.checkpoint else " (untrained)")
    w, h = render(rgb, tm, args.out, max_tokens=args.max_tokens, title=title)
    print(f"wrote {args.out} ({w}x{h} px): " + ", ".join(f"{k} {tuple(v.shape[1:])}" for k, v in tm.maps.items()))
    return 0


def add_parser(sub: argparse._SubParsersAction):
    p = sub.add_parser(
        "viz", help="draw what the few tokens see (token maps) over an image",
        description="STViT: each semantic token's initial pooling and its attention in the token generation "
                    "layers; STViT-R: the per-window semantic tokens of one stage-3 unit; LookupViT: each "
                    "compressed token's gather attention and which compressed token each patch reads most.")
    p.add_argument("--model", required=True)
    p.add_argument("--checkpoint", default=None, help="weights to load (training output or a pretrained file)")
    p.add_argument("--image", required=True,
                   help="an image file, or sample:china / sample:flower (scikit-learn's photographs)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--size", default=None, help="HxW to run the model at (default: its input size)")
    p.add_argument("--grid", default=None, help="LookupViT: compressed grid HxW for this picture")
    p.add_argument("--unit", type=int, default=None, help="STViT-R: which stage-3 unit to show")
    p.add_argument("--max-tokens", type=int, default=16, help="small overlays per map kind")
    p.add_argument("--model-kwargs", nargs="*", default=None, metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_viz)
