"""Window primitives on channels-last token maps (B, H, W, C).

Non-overlapping windows (Swin): :func:`window_partition` / :func:`window_reverse`, with
:func:`pad_to_multiple` for maps whose sides are not multiples of the window, and
:func:`shifted_window_mask` for the shifted-window blocks.

Overlapping neighbourhoods (a k x k patch of a map around each window, as STViT-R's semantic
tokens see the image): :func:`neighbourhood_index` builds, once per map size, the indices of every
neighbourhood into the flattened map; :func:`gather_neighbourhoods` then gathers any per-token
tensor (typically keys and values, projected once per token) into (B, windows, k*k, ...).
Positions outside the map point at one extra "pad" slot appended after the map's tokens, so the
caller decides what padding is (for example the projection of a zero token).
:func:`window_neighbourhood_index` is the same idea for maps of any rank (images or space-time
volumes) with every neighbourhood kept inside the map, so no pad slot is needed.

Every function is shape-generic: sizes may be ints or symbolic sizes (torch.fx, ``torch.export`` /
``torch.compile(dynamic=True)``), and masks and indices are built with tensor arithmetic only, never
with a Python branch on a size (:mod:`condensevit.layers.tracing`).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .tracing import known_zero

__all__ = [
    "round_up", "window_partition", "window_reverse", "pad_to_multiple", "shifted_window_mask",
    "neighbourhood_index", "gather_neighbourhoods", "window_neighbourhood_index",
]


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``. Written as a ceiling division times the
    multiple so that a symbolic size (torch.export with dynamic height/width) stays a simple
    ``multiple * floor((n + multiple - 1) / multiple)`` that later divisions by ``multiple`` cancel;
    ``n + (-n) % multiple`` is the same number but makes the symbolic-shape engine crawl."""
    return (n + multiple - 1) // multiple * multiple


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """(B, H, W, C) -> (B * windows, window_size**2, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, C)


def window_reverse(windows: Tensor, window_size: int, H: int, W: int) -> Tensor:
    """(B * windows, window_size**2, C) -> (B, H, W, C); the inverse of :func:`window_partition`."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window_size, W // window_size, window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def pad_to_multiple(x: Tensor, multiple: int, value: float = 0.0) -> Tuple[Tensor, int, int]:
    """Pad a (B, H, W, C) map at the bottom and right to multiples of ``multiple``.

    Returns the padded map and the padding added (pad_bottom, pad_right)."""
    H, W = x.shape[1], x.shape[2]
    pad_b, pad_r = round_up(H, multiple) - H, round_up(W, multiple) - W
    if not (known_zero(pad_b) and known_zero(pad_r)):   # eager: no copy when nothing is padded
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b), value=value)
    return x, pad_b, pad_r


def shifted_window_mask(H: int, W: int, window_size: int, shift_size: int, device: Optional[torch.device] = None,
                        value: float = -100.0) -> Tensor:
    """Additive mask (windows, N, N) of shifted-window attention on a cyclically rolled (H, W) map
    (sides multiples of ``window_size``): tokens that were not neighbours before the roll get
    ``value`` (Swin's -100)."""
    # Swin's three bands per axis ([0, -window), [-window, -shift), [-shift, end)) as arithmetic, so the
    # mask is built the same way for an int or a symbolic size
    rows = torch.arange(H, device=device)
    cols = torch.arange(W, device=device)
    band_r = (rows >= H - window_size).long() + (rows >= H - shift_size).long()
    band_c = (cols >= W - window_size).long() + (cols >= W - shift_size).long()
    region = (band_r[:, None] * 3 + band_c[None, :]).float()
    region = window_partition(region.view(1, H, W, 1), window_size).squeeze(-1)  # (windows, N)
    diff = region.unsqueeze(1) - region.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, value)


def neighbourhood_index(
        height: int,
        width: int,
        grid: Tuple[int, int],
        kernel: int,
        stride: int,
        offset: int = 0,
        device: Optional[torch.device] = None,
) -> Tuple[Tensor, Tensor]:
    """Indices of overlapping k x k neighbourhoods of a (height, width) map.

    Window (i, j) of a ``grid`` = (rows, cols) of windows covers map rows
    ``i * stride - offset ... + kernel`` and the same for columns. Returns
    ``index`` (windows, kernel**2) into the map flattened row-major, where positions outside the
    map point at ``height * width`` (one pad slot appended by :func:`gather_neighbourhoods`), and
    ``rows``, ``cols`` (windows, kernel**2): the map coordinates of each position (which may lie
    outside the map), for building masks.
    """
    rows_n, cols_n = grid
    k = torch.arange(kernel, device=device)
    r = (torch.arange(rows_n, device=device) * stride - offset)[:, None] + k       # (rows_n, kernel)
    c = (torch.arange(cols_n, device=device) * stride - offset)[:, None] + k       # (cols_n, kernel)
    rows = r[:, None, :, None].expand(rows_n, cols_n, kernel, kernel).reshape(rows_n * cols_n, -1)
    cols = c[None, :, None, :].expand(rows_n, cols_n, kernel, kernel).reshape(rows_n * cols_n, -1)
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    # outside positions -> the pad slot height * width (tensor arithmetic: a symbolic size stays symbolic and
    # every exporter translates it)
    index = torch.where(inside, rows * width + cols, torch.zeros_like(rows) + height * width)
    return index, torch.stack((rows, cols))


def gather_neighbourhoods(tokens: Tensor, index: Tensor, pad: Tensor) -> Tensor:
    """Gather (B, N, ...) per-token tensors into (B, windows, K, ...) neighbourhoods.

    ``index`` (windows, K) comes from :func:`neighbourhood_index` (value N = the pad slot);
    ``pad``, broadcastable to (B, 1, ...), is what a position outside the map holds."""
    pad = pad.to(tokens.dtype).expand(tokens[:, :1].shape)
    return torch.cat([tokens, pad], dim=1)[:, index]


def window_neighbourhood_index(
        size: tuple[int, ...],
        window: tuple[int, ...],
        kernel: tuple[int, ...],
        device=None,
) -> Tensor:
    """Indices of an enlarged neighbourhood around every window of a map of any rank.

    The map (``size``: (H, W), or (T, H, W) for video) is cut into windows of ``window`` tokens
    (the last window of an axis may reach past the map: ``ceil(size / window)`` windows per axis).
    Each window's neighbourhood is a ``kernel`` block centred on the window and shifted to lie
    inside the map (a kernel longer than the map is cut to the map). With a 14x14 map, 7x7 windows
    and a 10x10 kernel this is the released STViT-R classifier's 10x10 stride-4 neighbourhoods.

    Returns ``index`` (windows, prod(kernel)) into the map flattened row-major (last axis fastest),
    windows in row-major order; every entry points at a real token.
    """
    if not len(size) == len(window) == len(kernel):
        raise ValueError(f"size {size}, window {window} and kernel {kernel} need one entry per axis")
    index = None
    rank = len(size)
    stride = 1
    for d in reversed(range(rank)):
        L, w, k = int(size[d]), int(window[d]), min(int(kernel[d]), int(size[d]))
        n = -(-L // w)
        start = (torch.arange(n, device=device) * w - (k - w) // 2).clamp(0, L - k)
        coords = (start[:, None] + torch.arange(k, device=device)) * stride     # (windows along d, k)
        shape = [1] * (2 * rank)
        shape[d], shape[rank + d] = n, k
        coords = coords.view(shape)
        index = coords if index is None else index + coords
        stride *= L
    windows = index.shape[:rank]
    return index.reshape(math.prod(windows), -1)
