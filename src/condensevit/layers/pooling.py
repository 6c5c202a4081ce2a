"""Window pooling: one token per window of a grid of windows laid over a token map.

Maps are (H, W) images or, for video, (T, H, W) space-time volumes: every function and module here
works on either (the geometry is per axis; the 2-D case is the STViT image form). The map is
padded to a multiple of the grid, split evenly on both sides (the extra row or column, if any, goes
after), and cut into equal windows; padding positions are masked out, so each
pooled token is a function of the real tokens of its window only. STViT's initial semantic-token
centres come from here (``WindowPool`` with a learned score, or plain average / max pooling).

Everything that depends on the geometry (which window each token belongs to) is computed once at
construction and kept in non-persistent buffers, so the forward pass has static shapes and no
data-dependent branching.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

__all__ = [
    "WindowGrid", "window_grid", "window_index", "window_membership_bias", "TokenScorer", "WindowPool", "POOL_MODES",
]

POOL_MODES = ("weighted", "avg", "max")


class WindowGrid(NamedTuple):
    """Geometry of a ``grid`` of windows over a ``feat_size`` token map ((H, W), or (T, H, W))."""
    feat_size: tuple[int, ...]      # (H, W) of the token map, or (T, H, W)
    grid: tuple[int, ...]           # windows along each axis
    padded_size: tuple[int, ...]    # sides after padding to a multiple of the grid
    window_size: tuple[int, ...]    # tokens per window along each axis, padding included
    pad_before: tuple[int, ...]     # padding before the first token along each axis


def _fits(size: int, g: int) -> bool:
    """Whether ``g`` windows over ``size`` tokens (padded evenly to a multiple of ``g``) each hold a token."""
    padded = math.ceil(size / g) * g
    window, pad = padded // g, padded - size
    return pad // 2 < window and pad - pad // 2 < window


def _ranges(values: list[int]) -> str:
    """[1, 2, 3, 5, 8] -> '1-3, 5 or 8'."""
    parts, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(v) if v == start else f"{start}-{v}")
            start = None
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def window_grid(feat_size: tuple[int, ...], grid: tuple[int, ...]) -> WindowGrid:
    """Pad ``feat_size`` to a multiple of ``grid`` (evenly on both sides) and size the windows.

    Raises ``ValueError`` when a window would hold padding only (a token map that does not split
    into the grid): it names the grids that fit the map and the map sizes that fit the grid.
    """
    feat_size, grid = tuple(int(s) for s in feat_size), tuple(int(g) for g in grid)
    if len(feat_size) != len(grid):
        raise ValueError(f"a grid of windows {grid} needs one entry per axis of the token map {feat_size}")
    if min(grid) < 1:
        raise ValueError(f"a grid of windows {grid} needs at least one window along each axis")
    padded = tuple(math.ceil(s / g) * g for s, g in zip(feat_size, grid))
    window = tuple(p // g for p, g in zip(padded, grid))
    pad_before = tuple((p - s) // 2 for p, s in zip(padded, feat_size))
    for s, g in zip(feat_size, grid):
        if _fits(s, g):
            continue
        grids = [k for k in range(1, s + 1) if _fits(s, k)]
        # map sizes that take g windows: the smallest few, then "n or more" once every size fits
        sizes = [n for n in range(g, g * g + 2 * g + 1) if _fits(n, g)]
        upto = next(n for n in range(sizes[-1], g - 1, -1) if not _fits(n - 1, g) or n == g)
        few = [n for n in sizes if n < upto]
        need = ", ".join(str(n) for n in few) + (", or " if few else "") + f"{upto} or more"
        fmt = "x".join
        k = max(k for k in grids if k <= g)
        fit = [k if (gi == g and si == s) else gi for si, gi in zip(feat_size, grid)]
        what = "is too small for" if s < g else "does not split into"
        raise ValueError(
            f"a token map of {fmt(map(str, feat_size))} {what} a {fmt(map(str, grid))} grid of windows: "
            f"{g} windows over {s} tokens would leave some holding padding only. {s} tokens take {_ranges(grids)} "
            f"windows; {g} windows need {need} tokens along each side. Pool fewer or more tokens (e.g. a "
            f"{fmt(map(str, fit))} grid: {math.prod(fit)} tokens), or use another image size")
    return WindowGrid(feat_size, grid, padded, window, pad_before)


def window_index(geometry: WindowGrid) -> tuple[Tensor, Tensor]:
    """Token indices of every window, ``(G, K)`` long, and their validity, ``(G, K)`` bool.

    ``G = prod(grid)`` windows in row-major order, ``K = prod(window_size)`` positions in
    row-major order inside the window. Padding positions point at token 0 and are marked invalid.
    """
    feat, grid, _, window, pad = geometry
    n = len(feat)
    cpu = torch.device("cpu")  # geometry is plain bookkeeping, even when building on another device
    index = torch.zeros((), dtype=torch.long, device=cpu)
    valid = torch.ones((), dtype=torch.bool, device=cpu)
    for axis, (size, g, w, b) in enumerate(zip(feat, grid, window, pad)):
        # coordinate along this axis of (window a, position k): a * w + k - b, laid out on the
        # (grid..., window...) axes so that windows and positions both come out row-major
        shape = [1] * (2 * n)
        shape[axis], shape[n + axis] = g, w
        coord = (torch.arange(g, device=cpu).view(g, 1) * w + torch.arange(w, device=cpu).view(1, w) - b)
        coord = coord.view(shape)
        valid = valid & (coord >= 0) & (coord < size)
        index = index * size + coord
    index = torch.where(valid, index, torch.zeros_like(index))
    G, K = math.prod(grid), math.prod(window)
    return index.reshape(G, K), valid.reshape(G, K)


def window_membership_bias(geometry: WindowGrid) -> Tensor:
    """Additive mask ``(G, H*W)``: 0 where the token lies in the window, -inf elsewhere."""
    index, valid = window_index(geometry)
    G, N = index.shape[0], math.prod(geometry.feat_size)
    member = torch.zeros(G, N, dtype=torch.bool, device=index.device)
    member[torch.arange(G, device=index.device).unsqueeze(1).expand_as(index)[valid], index[valid]] = True
    return torch.zeros(G, N, device=index.device).masked_fill(~member, float("-inf"))


def _placed(tensor: Tensor, device, dtype) -> Tensor:
    """A geometry tensor (built on the CPU) on ``device``; floating ones in ``dtype`` when given."""
    if dtype is not None and tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device=device)


class TokenScorer(nn.Module):
    """Scores every token of a map: 3x3 depthwise conv, LayerNorm, GELU, 1x1 conv to one channel.

    On a (T, H, W) video map the depthwise conv is 3x3x3 (the same scorer, over space and time).
    The last projection has no bias (a constant shift changes no softmax) and starts at zero, so a
    fresh scorer gives equal weights (average pooling) until training moves it.
    """

    def __init__(self, dim: int, feat_size: tuple[int, ...], *, norm_layer=nn.LayerNorm, act_layer=nn.GELU,
                 device=None, dtype=None):
        super().__init__()
        self.feat_size = tuple(feat_size)
        if len(self.feat_size) not in (2, 3):
            raise ValueError(f"feat_size {self.feat_size} must be (H, W) or (T, H, W)")
        dd = dict(device=device, dtype=dtype)
        conv = nn.Conv2d if len(self.feat_size) == 2 else nn.Conv3d
        self.conv = conv(dim, dim, kernel_size=3, padding=1, groups=dim, **dd)
        self.norm = norm_layer(dim, **dd)
        self.act = act_layer()
        self.proj = nn.Linear(dim, 1, bias=False, **dd)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, C) tokens, N = prod(feat_size) -> (B, N) scores."""
        B, N, C = x.shape
        # (B, N, C) seen as (B, C, *feat_size) is a channels-last view: no copy before the conv
        y = self.conv(x.view(B, *self.feat_size, C).movedim(-1, 1))
        y = y.movedim(1, -1).reshape(B, N, C)
        return self.proj(self.act(self.norm(y))).squeeze(-1)


class WindowPool(nn.Module):
    """One token per window of a ``grid`` over a (B, H*W, C) token map (or (B, T*H*W, C) for video).

    Modes: ``'weighted'`` (a :class:`TokenScorer` and a softmax inside each window, padding masked
    out, give the weights of a weighted average), ``'avg'`` (mean of the window's real tokens),
    ``'max'`` (channel-wise maximum over the window's real tokens).
    """
    # construction-time bookkeeping that TorchScript need not type (forward reads the buffers only)
    __jit_ignored_attributes__ = ["geometry"]
    __jit_unused_properties__ = ["window_size"]

    def __init__(
            self,
            dim: int,
            feat_size: tuple[int, ...],
            grid: tuple[int, ...],
            mode: str = "weighted",
            *,
            norm_layer=nn.LayerNorm,
            act_layer=nn.GELU,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if mode not in POOL_MODES:
            raise ValueError(f"pooling mode {mode!r} is not one of {POOL_MODES}; pick one of them")
        self.mode = mode
        self.geometry = window_grid(feat_size, grid)
        self.num_windows = math.prod(self.geometry.grid)
        self.score = TokenScorer(dim, feat_size, norm_layer=norm_layer, act_layer=act_layer, device=device,
                                 dtype=dtype) if mode == "weighted" else None
        if device is None:
            device = torch.empty(0).device   # the device being built on (a `with torch.device(...)` block)
        for name, tensor in self._geometry_buffers().items():
            self.register_buffer(name, _placed(tensor, device, dtype), persistent=False)

    def _geometry_buffers(self) -> dict[str, Tensor]:
        bias = window_membership_bias(self.geometry)                        # (G, N)
        index, valid = window_index(self.geometry)                          # (G, K)
        return dict(
            # weighted: softmax(score + bias) over all tokens = softmax inside each window
            window_bias=bias,
            # avg: the same with equal scores, fixed once
            avg_weights=bias.softmax(-1),
            # max: the tokens of each window, padding pointing at token 0 and masked by -inf
            window_tokens=index,
            window_pad_bias=torch.zeros(index.shape, device=index.device)
            .masked_fill(~valid, float("-inf")).unsqueeze(-1),
        )

    def init_non_persistent_buffers(self) -> None:
        """Recompute the geometry buffers in place (after ``to_empty`` from the meta device; timm's
        ``reinit_non_persistent_buffers`` calls this)."""
        for name, tensor in self._geometry_buffers().items():
            old = getattr(self, name)
            setattr(self, name, _placed(tensor, old.device, old.dtype))

    @property
    def window_size(self) -> tuple[int, ...]:
        return self.geometry.window_size

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"mode={self.mode!r}, feat_size={g.feat_size}, grid={g.grid}, padded_size={g.padded_size}, "
                f"window_size={g.window_size}")

    def weights(self, x: Tensor) -> Tensor:
        """Pooling weights (B, G, H*W) of a (B, H*W, C) map: each row sums to 1 over its window.

        For ``'max'`` the weight of a token is the share of channels whose maximum it holds.
        """
        B = x.shape[0]
        if self.score is not None:   # 'weighted' (TorchScript resolves this check statically)
            return (self.score(x).unsqueeze(1) + self.window_bias).softmax(-1)
        if self.mode == "avg":
            return self.avg_weights.expand(B, -1, -1)
        G, K = self.window_tokens.shape
        winner = (x[:, self.window_tokens] + self.window_pad_bias).argmax(2)   # (B, G, C)
        share = torch.zeros(B, G, K, dtype=x.dtype, device=x.device)
        share.scatter_add_(2, winner, torch.full_like(winner, 1.0 / x.shape[-1], dtype=x.dtype))
        dense = torch.zeros(B, G, x.shape[1], dtype=x.dtype, device=x.device)
        return dense.scatter_add_(2, self.window_tokens.expand(B, -1, -1), share)

    def forward(self, x: Tensor, return_weights: bool = False):
        """(B, H*W, C) -> (B, G, C) pooled tokens (and their (B, G, H*W) weights when asked, eager mode)."""
        if self.mode == "max":
            out = (x[:, self.window_tokens] + self.window_pad_bias).amax(2)
        else:
            out = self.weights(x) @ x
        if return_weights and not torch.jit.is_scripting():
            return out, self.weights(x)
        return out
