"""Window pooling: one token per window of a grid of windows laid over a token map.

The map (H, W) is padded to a multiple of the grid, split evenly on both sides (the extra row or
column, if any, goes after), and cut into equal windows; padding positions are masked out, so each
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
    """Geometry of a ``grid`` of windows over a ``feat_size`` token map."""
    feat_size: tuple[int, int]      # (H, W) of the token map
    grid: tuple[int, int]           # windows along (H, W)
    padded_size: tuple[int, int]    # (H, W) after padding to a multiple of the grid
    window_size: tuple[int, int]    # tokens per window along (H, W), padding included
    pad_before: tuple[int, int]     # padding rows above / columns to the left


def window_grid(feat_size: tuple[int, int], grid: tuple[int, int]) -> WindowGrid:
    """Pad ``feat_size`` to a multiple of ``grid`` (evenly on both sides) and size the windows.

    Raises ``ValueError`` when a window would hold padding only (a token map too small for the grid).
    """
    feat_size, grid = tuple(int(s) for s in feat_size), tuple(int(g) for g in grid)
    padded = tuple(math.ceil(s / g) * g for s, g in zip(feat_size, grid))
    window = tuple(p // g for p, g in zip(padded, grid))
    pad_before = tuple((p - s) // 2 for p, s in zip(padded, feat_size))
    for s, p, w, b, g in zip(feat_size, padded, window, pad_before, grid):
        if b >= w or (p - s - b) >= w:
            raise ValueError(
                f"a token map of {feat_size[0]}x{feat_size[1]} is too small for a {grid[0]}x{grid[1]} "
                f"grid of windows (some windows would hold padding only); use a larger image or "
                f"fewer pooled tokens (at least {g} tokens are needed along each side)")
    return WindowGrid(feat_size, grid, padded, window, pad_before)


def window_index(geometry: WindowGrid) -> tuple[Tensor, Tensor]:
    """Token indices of every window, ``(G, K)`` long, and their validity, ``(G, K)`` bool.

    ``G = grid_h * grid_w`` windows in row-major order, ``K = window_h * window_w`` positions in
    row-major order inside the window. Padding positions point at token 0 and are marked invalid.
    """
    (H, W), (gh, gw), _, (wh, ww), (ph, pw) = geometry
    cpu = torch.device("cpu")  # geometry is plain bookkeeping, even when building on another device
    rows = torch.arange(gh, device=cpu).view(gh, 1, 1, 1) * wh + torch.arange(wh, device=cpu).view(1, 1, wh, 1) - ph
    cols = torch.arange(gw, device=cpu).view(1, gw, 1, 1) * ww + torch.arange(ww, device=cpu).view(1, 1, 1, ww) - pw
    rows, cols = torch.broadcast_tensors(rows, cols)          # (gh, gw, wh, ww)
    valid = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
    index = torch.where(valid, rows * W + cols, torch.zeros_like(rows))
    return index.reshape(gh * gw, wh * ww), valid.reshape(gh * gw, wh * ww)


def window_membership_bias(geometry: WindowGrid) -> Tensor:
    """Additive mask ``(G, H*W)``: 0 where the token lies in the window, -inf elsewhere."""
    index, valid = window_index(geometry)
    G, N = index.shape[0], geometry.feat_size[0] * geometry.feat_size[1]
    member = torch.zeros(G, N, dtype=torch.bool, device=index.device)
    member[torch.arange(G, device=index.device).unsqueeze(1).expand_as(index)[valid], index[valid]] = True
    return torch.zeros(G, N, device=index.device).masked_fill(~member, float("-inf"))


class TokenScorer(nn.Module):
    """Scores every token of a map: 3x3 depthwise conv, LayerNorm, GELU, 1x1 conv to one channel.

    The last projection has no bias (a constant shift changes no softmax) and starts at zero, so a
    fresh scorer gives equal weights (average pooling) until training moves it.
    """

    def __init__(self, dim: int, feat_size: tuple[int, int], *, norm_layer=nn.LayerNorm, act_layer=nn.GELU):
        super().__init__()
        self.feat_size = tuple(feat_size)
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm = norm_layer(dim)
        self.act = act_layer()
        self.proj = nn.Linear(dim, 1, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H*W, C) tokens -> (B, H*W) scores."""
        B, N, C = x.shape
        H, W = self.feat_size
        # (B, H*W, C) seen as (B, C, H, W) is a channels-last view: no copy before the conv
        y = self.conv(x.view(B, H, W, C).permute(0, 3, 1, 2))
        y = y.permute(0, 2, 3, 1).reshape(B, N, C)
        return self.proj(self.act(self.norm(y))).squeeze(-1)


class WindowPool(nn.Module):
    """One token per window of a ``grid`` over a (B, H*W, C) token map.

    Modes: ``'weighted'`` (a :class:`TokenScorer` and a softmax inside each window, padding masked
    out, give the weights of a weighted average), ``'avg'`` (mean of the window's real tokens),
    ``'max'`` (channel-wise maximum over the window's real tokens).
    """

    def __init__(
            self,
            dim: int,
            feat_size: tuple[int, int],
            grid: tuple[int, int],
            mode: str = "weighted",
            *,
            norm_layer=nn.LayerNorm,
            act_layer=nn.GELU,
    ):
        super().__init__()
        if mode not in POOL_MODES:
            raise ValueError(f"pooling mode {mode!r} is not one of {POOL_MODES}; pick one of them")
        self.mode = mode
        self.geometry = window_grid(feat_size, grid)
        self.num_windows = self.geometry.grid[0] * self.geometry.grid[1]
        self.score = TokenScorer(dim, feat_size, norm_layer=norm_layer, act_layer=act_layer) \
            if mode == "weighted" else None
        device = torch.empty(0).device   # the device being built on (a `with torch.device(...)` block)
        for name, tensor in self._geometry_buffers().items():
            self.register_buffer(name, tensor.to(device), persistent=False)

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
            setattr(self, name, tensor.to(getattr(self, name).device))

    @property
    def window_size(self) -> tuple[int, int]:
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
        if self.mode == "weighted":
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
        """(B, H*W, C) -> (B, G, C) pooled tokens (and their (B, G, H*W) weights when asked)."""
        if self.mode == "max":
            out = (x[:, self.window_tokens] + self.window_pad_bias).amax(2)
            return (out, self.weights(x)) if return_weights else out
        w = self.weights(x)
        out = w @ x
        return (out, w) if return_weights else out
