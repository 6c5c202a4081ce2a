"""STViT-R on Swin: "Making Vision Transformers Efficient from A Token Sparsification View"
(Chang et al., CVPR 2023), the local form with token recovery.

Two forms, one architecture:

* **classification** (``stvit_r_swin_{tiny,small,base}_patch4_window7_224``), as in
  changsn/STViT-R: fixed 224x224 input, LayerNorm + average pool + linear head;
* **dense backbone** (``stvit_r_det_swin_{tiny,small,base}_patch4_window7``), as in
  changsn/STViT-R-Object-Detection: any input size (padded to multiples of 4, then of the
  window), four NCHW feature maps with per-stage output norms ``norm0..norm3``.

The network is a Swin transformer with a LeViT-style convolutional stem and a third stage built of
6-block **dumbbell units**. In each unit, image tokens ``x`` (a map of the stage-3 grid) and
semantic tokens ``s`` (3x3 per 7x7 window, laid out as a grid three sevenths the size) take turns:

====  ==========================================================  ===================================
step  classification                                              dense backbone
====  ==========================================================  ===================================
0     Swin window attention on ``x`` (no shift)                   same, padded to multiples of 7
1     ``s`` = 3x3 max pool of each window; ``s`` attends to the   ``s`` attends to a 14x14 image
      window's 10x10 image neighbourhood (stride 4) and to the    neighbourhood (centred), with an
      window's own pooled tokens; no attention residual           attention residual
2     ``s`` (+ learned global centres, first unit, optional)      ``s`` attends to a 21x21 image
      attends to all of [s, x]                                    neighbourhood of its window
3     self-attention of ``s`` inside each window's 3x3 tokens     same
4     self-attention of all ``s``                                 same
5     recovery: ``x`` attends to all ``s``, residual on ``x``     recovery: each 7x7 window of ``x``
                                                                  attends to a 27x27 patch of the
                                                                  semantic grid
====  ==========================================================  ===================================

Semantic-token blocks carry LayerScale; Swin blocks do not. Module and parameter names follow the
authors' checkpoints (``layers.2.blocks.7.attn.kv.weight`` ...), so their files load unchanged
(:func:`checkpoint_filter_fn` only drops rebuilt buffers and renames ``semantic_token2`` to
``global_centers``).

**Efficiency.** The released code unfolds overlapping image (or semantic) neighbourhoods first and
then applies LayerNorm and the key/value projection to every copy. Here each token is normalised
and projected once, and the projected keys/values are gathered into neighbourhoods by a
precomputed index (``layers/windows.py``): the same function at a fraction of the cost
(the dense backbone drops below Swin's cost instead of rising above it).

**Padding in the dense backbone, as released.** Positions outside the map (and the zero tokens that
pad the map to a multiple of 7) hold a zero token, i.e. LayerNorm's bias after normalisation.
The released additive mask (-1000) always covers positions beyond the border, but inside the
padded map it only covers the *intersection* of the padded rows and the padded columns, and when
neither rows nor columns are padded it covers everything (a constant, so nothing is masked and
border padding is attended to). The released weights were trained this way, so it is the default
(``padding_mask='released'``); ``'full'`` masks exactly the positions that are not image /
semantic tokens, ``'none'`` masks nothing.
"""

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_function
from timm.models._manipulate import reinit_non_persistent_buffers
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..layers.attention import CrossAttention, attend, merge_heads, split_heads
from ..layers.tracing import building_graph, check_image_layout, known_zero, shape_str
from ..layers.windows import (
    gather_neighbourhoods, neighbourhood_index, pad_to_multiple, round_up, shifted_window_mask, window_partition,
    window_reverse,
)
from ._builder import (CheckpointError, as_positive_ints, build, complete_state_dict, new_classifier,
                       unwrap_state_dict)

__all__ = ["STViTR", "checkpoint_filter_fn"]

_MASK_VALUE = -1000.0  # the released code's additive mask value
_PADDING_MASKS = ("released", "full", "none")


# --------------------------------------------------------------------------------------------
# Swin parts: stem, window attention, blocks, patch merging
# --------------------------------------------------------------------------------------------

class ConvBN(nn.Sequential):
    """Convolution without bias followed by BatchNorm (names ``c``, ``bn`` as released)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 2, padding: int = 1,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.add_module("c", nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, bias=False, **dd))
        self.add_module("bn", nn.BatchNorm2d(out_chs, **dd))


class ConvStem(nn.Module):
    """LeViT-style stem: two 3x3 stride-2 convolutions with BatchNorm and Hardswish. Returns a
    channels-last map (B, H/4, W/4, C). With ``pad`` the input is zero-padded (bottom/right) to
    a multiple of 4 first, as the dense backbone does."""

    def __init__(self, in_chans: int, embed_dim: int, pad: bool, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.pad = pad
        self.proj = nn.Sequential(
            ConvBN(in_chans, embed_dim // 2, **dd), nn.Hardswish(), ConvBN(embed_dim // 2, embed_dim, **dd),
            nn.Hardswish())

    def forward(self, x: Tensor) -> Tensor:
        if self.pad:
            pad_b, pad_r = round_up(x.shape[-2], 4) - x.shape[-2], round_up(x.shape[-1], 4) - x.shape[-1]
            if not (known_zero(pad_b) and known_zero(pad_r)):   # eager: no copy when nothing is padded
                x = F.pad(x, (0, pad_r, 0, pad_b))
        return self.proj(x).permute(0, 2, 3, 1)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with Swin's relative position bias (fused)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.window_size = window_size
        self.attn_drop = attn_drop
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads, **dd))
        self.register_buffer("relative_position_index", self._relative_position_index(device), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def _relative_position_index(self, device=None) -> Tensor:
        ws = self.window_size
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
        return (rel[..., 0] * (2 * ws - 1) + rel[..., 1]).to(device)

    def init_weights(self) -> None:
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def init_non_persistent_buffers(self) -> None:
        """Recompute the index (after ``to_empty``; timm's ``reinit_non_persistent_buffers`` calls this)."""
        self.relative_position_index = self._relative_position_index(self.relative_position_index.device)

    def relative_position_bias(self) -> Tensor:
        """(1, heads, N, N)."""
        N = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: Tensor, shift_mask: Optional[Tensor] = None) -> Tensor:
        """``x`` (B * windows, N, C); ``shift_mask`` (windows, 1, N, N) or None."""
        B_, N, C = x.shape
        q, k, v = self.qkv(x).view(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        mask = self.relative_position_bias().to(q.dtype)
        if shift_mask is not None:
            # CPU and GPU kernels are fastest with a dense 4-d mask (a 3-d or 5-d one falls back to math)
            mask = (mask + shift_mask.to(q.dtype)).repeat(B_ // shift_mask.shape[0], 1, 1, 1)
        out, _ = attend(q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(merge_heads(out)))


class SwinBlock(nn.Module):
    """Swin transformer block on a channels-last map (B, H, W, C); pads the normalised map to
    multiples of the window (zeros) when needed, as the released dense code does."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift_size: int = 0,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias, attn_drop, proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)

    def forward(self, x: Tensor, shift_mask: Optional[Tensor] = None) -> Tensor:
        B, H, W, C = x.shape
        ws, shift = self.window_size, self.shift_size
        y, pad_b, pad_r = pad_to_multiple(self.norm1(x), ws)
        Hp, Wp = H + pad_b, W + pad_r
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        y = window_reverse(self.attn(window_partition(y, ws), shift_mask if shift else None), ws, Hp, Wp)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        y = y[:, :H, :W]   # drop the padding (a view: free when there is none)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens concatenated (Swin's order), LayerNorm, linear 4C -> 2C. Odd sides
    are zero-padded."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, device=device, dtype=dtype)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        x, _, _ = pad_to_multiple(x, 2)
        H, W = x.shape[1], x.shape[2]
        # channel order [x(0::2, 0::2), x(1::2, 0::2), x(0::2, 1::2), x(1::2, 1::2)]
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * C)
        return self.reduction(self.norm(x))


_CACHE_SIZES = 16  # map sizes whose masks / indices are kept (multi-scale training sees a few dozen)


def _cached(cache: dict, key, make):
    """``cache[key]``, made on first use; the oldest entry goes when more than a few sizes are kept.

    Eager mode only: graph builders (torch.fx, dynamo, TorchScript) build the tensors in the graph
    from the (possibly symbolic) sizes instead (:func:`condensevit.layers.tracing.building_graph`)."""
    if key not in cache:
        if len(cache) >= _CACHE_SIZES:
            cache.pop(next(iter(cache)))
        cache[key] = make()
    return cache[key]


class SwinStage(nn.Module):
    """Swin blocks (alternately shifted) and an optional patch merging at the end (the released
    layout: the merging belongs to the stage it follows). ``resolution`` (classification form):
    a map no larger than the window is one unshifted window, as in Swin's classifier."""
    __jit_ignored_attributes__ = ["_masks"]   # the eager-mode cache; TorchScript builds masks in the graph

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 qkv_bias: bool, proj_drop: float, attn_drop: float, drop_path: list[float],
                 downsample: bool, resolution: tuple[int, int] | None = None, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        shift = window_size // 2
        if resolution is not None and min(resolution) <= window_size:
            window_size, shift = min(resolution), 0
        self.window_size, self.shift_size = window_size, shift
        self.blocks = nn.ModuleList([
            SwinBlock(dim, num_heads, window_size, shift if i % 2 else 0, mlp_ratio, qkv_bias,
                      proj_drop, attn_drop, drop_path[i], **dd)
            for i in range(depth)])
        self.downsample = PatchMerging(dim, **dd) if downsample else None
        self.grad_checkpointing = False
        self._masks: dict = {}

    def shift_mask(self, H: int, W: int, x: Tensor) -> Optional[Tensor]:
        """(windows, 1, N, N) mask of the shifted blocks for an (H, W) map, cached by size in eager
        mode, built in the graph (from symbolic sizes too) by graph builders."""
        if not self.shift_size or len(self.blocks) < 2:
            return None
        ws = self.window_size
        Hp, Wp = round_up(H, ws), round_up(W, ws)
        if torch.jit.is_scripting():
            return self._make_shift_mask(Hp, Wp, x)
        if building_graph(x):
            return self._make_shift_mask(Hp, Wp, x)
        return self._cached_shift_mask(Hp, Wp, x)

    def _make_shift_mask(self, Hp: int, Wp: int, x: Tensor) -> Tensor:
        return shifted_window_mask(Hp, Wp, self.window_size, self.shift_size, device=x.device).unsqueeze(1).to(x.dtype)

    @torch.jit.unused
    def _cached_shift_mask(self, Hp: int, Wp: int, x: Tensor) -> Tensor:
        return _cached(self._masks, (Hp, Wp, x.device, x.dtype), lambda: self._make_shift_mask(Hp, Wp, x))

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(B, H, W, C) -> (stage output, input of the next stage)."""
        mask = self.shift_mask(x.shape[1], x.shape[2], x)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
                x = checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask)
        return x, (self.downsample(x) if self.downsample is not None else x)


# --------------------------------------------------------------------------------------------
# Semantic-token parts
# --------------------------------------------------------------------------------------------

class _LayerScaleBlock(nn.Module):
    """Pre-norm attention + MLP with LayerScale (init 1e-5), the released names."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, proj_drop: float,
                 attn_drop: float, drop_path: float, layer_scale_init: float = 1e-5, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.layer_scale_init = layer_scale_init
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.attn = CrossAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), layer_scale_init, **dd))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), layer_scale_init, **dd))

    def init_weights(self) -> None:
        nn.init.constant_(self.layer_scale_1, self.layer_scale_init)
        nn.init.constant_(self.layer_scale_2, self.layer_scale_init)

    def mlp_residual(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.layer_scale_2 * self.mlp(self.norm2(x)))

    def neighbourhood_attention(self, queries: Tensor, kv: Tensor, mask: Optional[Tensor],
                                return_attn: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """Windowed cross-attention over gathered keys/values.

        ``queries`` (B * windows, M, C) normalised; ``kv`` (B, windows, K, 2C) each window's
        neighbourhood of keys/values (projected once per token, then gathered); ``mask``
        (windows, K) additive or None."""
        B, nW, K = kv.shape[0], kv.shape[1], kv.shape[2]
        k, v = kv.view(B * nW, K, kv.shape[3]).chunk(2, dim=-1)
        heads = self.attn.num_heads
        attn_mask: Optional[Tensor] = None
        if mask is not None:
            attn_mask = mask.to(k.dtype)[None, :, None, None, :].expand(B, -1, -1, -1, -1).reshape(B * nW, 1, 1, K)
        return self.attn.attend_projected(queries, split_heads(k, heads), split_heads(v, heads),
                                          attn_mask=attn_mask, return_attn=return_attn)

    def pad_kv(self, like: Tensor) -> Tensor:
        """Key/value of a zero (padding) token: the projection of LayerNorm's bias. (1, 1, 2C)."""
        return self.attn.kv(self.norm1(like.new_zeros(1, 1, like.shape[-1])))


def _adaptive_max_pool_static(win: Tensor, n: int) -> Tensor:
    """``F.adaptive_max_pool2d`` of (B', k, k, C) windows to (B', n, n, C), with PyTorch's bins
    [floor(i k / n), ceil((i + 1) k / n)) as static slices and maxima."""
    k = win.shape[1]
    bins = [((i * k) // n, -((-(i + 1) * k) // n)) for i in range(n)]
    rows = torch.stack([win[:, a:b].amax(1) for a, b in bins], dim=1)         # (B', n, k, C)
    return torch.stack([rows[:, :, a:b].amax(2) for a, b in bins], dim=2)     # (B', n, n, C)


class SemanticTokenBlock(_LayerScaleBlock):
    """Semantic tokens attend to the image tokens of an overlapping neighbourhood of their window.

    Without ``s`` the semantic tokens are made first: each window of the (zero-padded) image map
    is max-pooled to ``semantic_size`` x ``semantic_size`` tokens. ``pooled_keys`` adds the
    window's own (normalised) pooled tokens to its keys (classification form); ``shortcut`` adds
    the attention residual (dense form; the released classifier has none); ``padded``: the
    neighbourhoods reach beyond the map (dense form), so the pad slot holds a projected zero token.
    """

    def __init__(self, *args, window_size: int, semantic_size: int, shortcut: bool, pooled_keys: bool,
                 padded: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.window_size = window_size
        self.semantic_size = semantic_size
        self.shortcut = shortcut
        self.pooled_keys = pooled_keys
        self.padded = padded

    def pool_windows(self, x: Tensor) -> Tensor:
        """Each window of the (zero-padded) (B, H, W, C) map max-pooled to n x n: (B, sH, sW, C)."""
        ws, n = self.window_size, self.semantic_size
        xp, pad_b, pad_r = pad_to_multiple(x, ws)
        Hp, Wp = xp.shape[1], xp.shape[2]
        grid = [Hp // ws * n, Wp // ws * n]
        if torch.jit.is_scripting():
            return F.adaptive_max_pool2d(xp.permute(0, 3, 1, 2), grid).permute(0, 2, 3, 1)
        if building_graph(Hp):
            # window by window, so the pooling sizes stay static when the map size is symbolic (and
            # as slices and maxima, which every exporter translates; ONNX has no adaptive max pool)
            win = window_partition(xp, ws).view(-1, ws, ws, xp.shape[3])
            pooled = _adaptive_max_pool_static(win, n).reshape(-1, n * n, xp.shape[3])
            return window_reverse(pooled, n, grid[0], grid[1])
        # adaptive pooling of the whole map to (windows * n) bins equals pooling each window to n bins
        return F.adaptive_max_pool2d(xp.permute(0, 3, 1, 2), grid).permute(0, 2, 3, 1)

    def forward(self, x: Tensor, s: Optional[Tensor], index: Tensor, mask: Optional[Tensor],
                return_attn: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """``x`` (B, H, W, C) image tokens, ``s`` (B, sH, sW, C) semantic grid or None.
        Returns the semantic grid (and the attention (B * windows, heads, n*n, K))."""
        B, H, W, C = x.shape
        n = self.semantic_size
        if s is None:
            s = self.pool_windows(x)
        sH, sW = s.shape[1], s.shape[2]
        q_in = self.norm1(s)
        kv = self.attn.kv(self.norm1(x)).flatten(1, 2)
        pad = self.pad_kv(x) if self.padded else kv.new_zeros(1, 1, 1)   # classification: slot never read
        parts = [kv, pad.expand(B, 1, kv.shape[-1])]
        if self.pooled_keys:
            parts.append(self.attn.kv(q_in).flatten(1, 2))
        # neighbourhoods index the table [image tokens, pad slot, (pooled tokens)]
        kv = torch.cat(parts, dim=1)[:, index]
        out, attn = self.neighbourhood_attention(window_partition(q_in, n), kv, mask, return_attn)
        out = self.layer_scale_1 * window_reverse(out, n, sH, sW)
        s = s + self.drop_path(out) if self.shortcut else out
        return self.mlp_residual(s), attn


class SemanticBlock(_LayerScaleBlock):
    """Attention of tokens ``x`` (any (B, ..., C) layout) over a ``context`` (itself when None), or,
    with ``local_window``, self-attention inside local windows of a (B, sH, sW, C) grid."""

    def __init__(self, *args, local_window: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.local_window = local_window

    def forward(self, x: Tensor, context: Optional[Tensor] = None,
                return_attn: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        shape = x.shape
        n = self.local_window
        if n is not None:
            q = window_partition(self.norm1(x), n)
        else:
            q = self.norm1(x.flatten(1, -2))  # (B, N, C); no -1 to infer, so an empty batch passes
        k, v = self.attn.project_kv(q if context is None else self.norm1(context))
        out, attn = self.attn.attend_projected(q, k, v, return_attn=return_attn)
        out = window_reverse(out, n, shape[1], shape[2]) if n is not None else out.view(shape)
        x = x + self.drop_path(self.layer_scale_1 * out)
        return self.mlp_residual(x), attn


class RecoveryBlock(_LayerScaleBlock):
    """Dense-form recovery: each window of image tokens attends to a neighbourhood of the semantic
    grid around its own semantic tokens; residual on the image tokens."""

    def __init__(self, *args, window_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.window_size = window_size

    def forward(self, x: Tensor, s: Tensor, index: Tensor, mask: Optional[Tensor],
                return_attn: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        B, H, W, C = x.shape
        ws = self.window_size
        q_in, pad_b, pad_r = pad_to_multiple(self.norm1(x), ws)   # padded queries are cropped below
        kv = gather_neighbourhoods(self.attn.kv(self.norm1(s)).flatten(1, 2), index, self.pad_kv(x))
        out, attn = self.neighbourhood_attention(window_partition(q_in, ws), kv, mask, return_attn)
        out = window_reverse(out, ws, H + pad_b, W + pad_r)[:, :H, :W]   # a view when nothing was padded
        x = x + self.drop_path(self.layer_scale_1 * out)
        return self.mlp_residual(x), attn


@register_notrace_function   # one leaf node for timm's fx feature extraction ...
@torch.fx.wrap               # ... and for torch.fx.symbolic_trace: the check runs, with the same error, in the graph
def _check_images(x: Tensor, in_chans: int, img_size: Optional[Tuple[int, int]]) -> None:
    """ValueError unless ``x`` is (B, in_chans, H, W) images, of ``img_size`` when given (classifier)."""
    check_image_layout(x, in_chans)
    if x.dim() != 4 or x.shape[1] != in_chans:
        got = str(x.shape[1]) if x.dim() == 4 else "..."
        raise ValueError(f"expected images (B, {in_chans}, H, W), got shape {shape_str(x)}; "
                         f"build the model with in_chans={got} for other channel counts")
    if img_size is not None and (x.shape[-2] != img_size[0] or x.shape[-1] != img_size[1]):
        raise ValueError(
            f"the STViT-R classifier takes {img_size[0]}x{img_size[1]} images only, got "
            f"{x.shape[-2]}x{x.shape[-1]}: resize the input, or use the dense backbone "
            f"(timm.create_model('stvit_r_det_swin_small_patch4_window7', ...), any size)")


class _Geometry(NamedTuple):
    """Index tensors and masks of one stage-3 map size (built once per size in eager mode, in the
    graph by graph builders). Indices the form does not use are empty."""
    semantic_index: Tensor          # (windows, K1) into [image tokens, pad, (pooled tokens)]
    semantic_mask: Optional[Tensor]
    refine_index: Tensor            # dense: (windows, K2) into [image tokens, pad]
    refine_mask: Optional[Tensor]
    recovery_index: Tensor          # dense: (windows, K3) into [semantic tokens, pad]
    recovery_mask: Optional[Tensor]


def _positive(n: int) -> int:
    """1 if n > 0 else 0, for n >= 0, in integer arithmetic: a symbolic size (torch.export,
    torch.fx) stays a formula instead of becoming a branch pinned to the traced size."""
    return (2 * n) // (n + 1)


def _neighbourhood_mask(coords: Tensor, height: int, width: int, pad_b: int, pad_r: int,
                        mode: str, value: float = _MASK_VALUE) -> Optional[Tensor]:
    """Additive mask (windows, K) of neighbourhood positions ``coords`` (2, windows, K) on a
    (height, width) padded map (the released code's view: the last ``pad_b`` rows and ``pad_r``
    columns are padding). See the module docstring for ``mode``."""
    if mode == "none":
        return None
    rows, cols = coords[0], coords[1]
    outside = (rows < 0) | (rows >= height) | (cols < 0) | (cols >= width)
    if mode == "full":
        masked = outside | (rows >= height - pad_b) | (cols >= width - pad_r)
    else:  # 'released': the intersection of padded rows and columns; all rows (columns) if none padded
        # first masked row: height - pad_b when rows are padded, else 0; a negative value selects the
        # same positions as 0 (rows above the map are outside anyway)
        r0 = (height - pad_b) * _positive(pad_b)
        c0 = (width - pad_r) * _positive(pad_r)
        masked = outside | ((rows >= r0) & (cols >= c0))
    return torch.zeros(masked.shape, device=coords.device).masked_fill(masked, value)


class DumbbellStage(nn.Module):
    """Stage 3: repeated units of six blocks (see the module docstring); flat ``blocks`` keep the
    released parameter names (unit ``u`` is ``blocks[6u:6u+6]``)."""
    __jit_ignored_attributes__ = ["_geometry"]   # the eager-mode cache; TorchScript builds it in the graph

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 qkv_bias: bool, proj_drop: float, attn_drop: float, drop_path: list[float], *,
                 dense: bool, semantic_size: int, semantic_kernel: int, semantic_stride: int,
                 refine_kernel: int, recovery_kernel: int, semantic_shortcut: bool,
                 padding_mask: str, global_centers: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.dense = dense
        self.window_size = window_size
        self.semantic_size = semantic_size
        self.semantic_kernel, self.semantic_stride = semantic_kernel, semantic_stride
        self.refine_kernel, self.recovery_kernel = refine_kernel, recovery_kernel
        self.padding_mask = padding_mask
        common = (dim, num_heads, mlp_ratio, qkv_bias, proj_drop, attn_drop)
        blocks = []
        for u in range(depth // 6):
            dp = drop_path[6 * u:6 * u + 6]
            blocks += [
                SwinBlock(dim, num_heads, window_size, 0, mlp_ratio, qkv_bias, proj_drop, attn_drop, dp[0], **dd),
                SemanticTokenBlock(*common, dp[1], window_size=window_size, semantic_size=semantic_size,
                                   shortcut=semantic_shortcut, pooled_keys=not dense, padded=dense, **dd),
                SemanticTokenBlock(*common, dp[2], window_size=window_size, semantic_size=semantic_size,
                                   shortcut=True, pooled_keys=False, padded=True, **dd) if dense
                else SemanticBlock(*common, dp[2], **dd),
                SemanticBlock(*common, dp[3], local_window=semantic_size, **dd),
                SemanticBlock(*common, dp[4], **dd),
                RecoveryBlock(*common, dp[5], window_size=window_size, **dd) if dense
                else SemanticBlock(*common, dp[5], **dd),
            ]
        self.blocks = nn.ModuleList(blocks)
        if global_centers:
            self.global_centers = nn.Parameter(torch.zeros(1, global_centers, dim, **dd))
            trunc_normal_(self.global_centers, std=0.02)
        else:
            self.global_centers = None
        self.downsample = PatchMerging(dim, **dd)
        self.grad_checkpointing = False
        self._geometry: dict = {}

    def init_weights(self) -> None:
        if self.global_centers is not None:
            trunc_normal_(self.global_centers, std=0.02)

    @property
    def num_units(self) -> int:
        return len(self.blocks) // 6

    def geometry(self, H: int, W: int, device: torch.device) -> _Geometry:
        """Neighbourhood indices and masks for an (H, W) stage-3 map: built once per size in eager
        mode; built in the graph (from symbolic sizes too) by torch.fx, dynamo and TorchScript."""
        if torch.jit.is_scripting():
            return self._make_geometry(H, W, device)
        if building_graph(H) or building_graph(W):
            return self._make_geometry(H, W, device)
        return self._cached_geometry(H, W, device)

    @torch.jit.unused
    def _cached_geometry(self, H: int, W: int, device: torch.device) -> _Geometry:
        return _cached(self._geometry, (H, W, device), lambda: self._make_geometry(H, W, device))

    def _image_neighbourhoods(self, H: int, W: int, kernel: int,
                              device: torch.device) -> Tuple[Tensor, Optional[Tensor]]:
        """Dense form: ``kernel`` x ``kernel`` image neighbourhoods centred on each window."""
        ws = self.window_size
        Hp, Wp = round_up(H, ws), round_up(W, ws)
        index, coords = neighbourhood_index(H, W, (Hp // ws, Wp // ws), kernel, ws, (kernel - ws) // 2, device)
        return index, _neighbourhood_mask(coords, Hp, Wp, Hp - H, Wp - W, self.padding_mask)

    def _make_geometry(self, H: int, W: int, device: torch.device) -> _Geometry:
        ws, n = self.window_size, self.semantic_size
        Hp, Wp = round_up(H, ws), round_up(W, ws)
        pad_b, pad_r = Hp - H, Wp - W
        grid = (Hp // ws, Wp // ws)
        sH, sW = grid[0] * n, grid[1] * n
        if self.dense:
            sem_index, sem_mask = self._image_neighbourhoods(H, W, self.semantic_kernel, device)
            ref_index, ref_mask = self._image_neighbourhoods(H, W, self.refine_kernel, device)
            k = self.recovery_kernel
            rec_index, coords = neighbourhood_index(sH, sW, grid, k, n, (k - n) // 2, device)
            # the semantic grid itself has no padding, but the released mask marks the image's
            # padded rows/columns (pad_b, pad_r, counted in image tokens) on it
            if self.padding_mask == "released":
                rec_mask = _neighbourhood_mask(coords, sH, sW, pad_b, pad_r, self.padding_mask)
            else:
                rec_mask = _neighbourhood_mask(coords, sH, sW, 0, 0, self.padding_mask)
            return _Geometry(sem_index, sem_mask, ref_index, ref_mask, rec_index, rec_mask)
        k, stride = self.semantic_kernel, self.semantic_stride
        index, _ = neighbourhood_index(H, W, grid, k, stride, 0, device)
        # each window's own pooled tokens, stored after the image tokens and the pad slot
        t = torch.arange(n, device=device)
        pr = (torch.arange(grid[0], device=device) * n)[:, None] + t                        # (rows, n)
        pc = (torch.arange(grid[1], device=device) * n)[:, None] + t
        pooled = (pr[:, None, :, None] * sW + pc[None, :, None, :]).reshape(grid[0] * grid[1], n * n)
        none = torch.zeros(0, 0, dtype=torch.long, device=device)   # indices the classifier does not use
        return _Geometry(torch.cat([pooled + H * W + 1, index], dim=1), None, none, None, none, None)

    def forward(self, x: Tensor, attn_unit: Optional[int] = None):
        """(B, H, W, C) -> (stage output, next-stage input[, attention of unit ``attn_unit``: a dict
        with 'semantic', 'recovery' and 'semantic_grid', eager mode only])."""
        if attn_unit is not None and not torch.jit.is_scripting():
            x, s, a_sem, a_rec = self._forward_units(x, attn_unit)
            maps = dict(semantic=a_sem, recovery=a_rec, semantic_grid=tuple(s.shape[1:3]))
            return x, (self.downsample(x) if self.downsample is not None else x), maps
        x, _, _, _ = self._forward_units(x, -1)
        return x, (self.downsample(x) if self.downsample is not None else x)

    def _forward_units(self, x: Tensor, attn_unit: int) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """The dumbbell units on (B, H, W, C) image tokens: (image tokens, last semantic grid, and the
        semantic / recovery attention of unit ``attn_unit`` (None for other values, e.g. -1)).

        One flat loop over ``blocks`` (the released names), each block's role told by its position
        in the unit (``i % 6``) and its kind (static attribute checks, which TorchScript resolves
        at compile time as it unrolls the loop)."""
        B, H, W, C = x.shape
        geo = self.geometry(H, W, x.device)
        s = x   # the semantic grid, made by step 1 of every unit
        a_sem: Optional[Tensor] = None
        a_rec: Optional[Tensor] = None
        for i, blk in enumerate(self.blocks):
            step, want = i % 6, i // 6 == attn_unit
            ckpt = self.grad_checkpointing and torch.is_grad_enabled()
            if hasattr(blk, "shift_size"):         # 0: window attention on the image tokens
                if ckpt and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, None, use_reentrant=False)
                else:
                    x = blk(x, None)
            elif hasattr(blk, "pooled_keys"):      # 1 (dense: also 2): semantic tokens from image neighbourhoods
                index, mask = (geo.semantic_index, geo.semantic_mask) if step == 1 else (geo.refine_index, geo.refine_mask)
                prev: Optional[Tensor] = None if step == 1 else s
                if ckpt and not torch.jit.is_scripting():
                    s, a = checkpoint(blk, x, prev, index, mask, want and step == 1, use_reentrant=False)
                else:
                    s, a = blk(x, prev, index, mask, want and step == 1)
                if want and step == 1:
                    a_sem = a
            elif hasattr(blk, "window_size"):      # dense 5: each image window reads a patch of the semantic grid
                if ckpt and not torch.jit.is_scripting():
                    x, a = checkpoint(blk, x, s, geo.recovery_index, geo.recovery_mask, want, use_reentrant=False)
                else:
                    x, a = blk(x, s, geo.recovery_index, geo.recovery_mask, want)
                if want:
                    a_rec = a
            else:                                  # semantic-token attention (SemanticBlock)
                context: Optional[Tensor] = None
                if step == 5:                      # classification 5: recovery, the image tokens read all s
                    q, context = x, s.flatten(1, 2)
                elif step == 2:                    # classification 2: s (+ global centres, unit 0) reads [s, x]
                    q = s
                    if self.global_centers is not None and i < 6:
                        q = s + self.global_centers.view(1, s.shape[1], s.shape[2], C)
                    context = torch.cat([s.flatten(1, 2), x.flatten(1, 2)], dim=1)
                else:                              # 3, 4: local, then global self-attention of s
                    q = s
                if ckpt and not torch.jit.is_scripting():
                    y, a = checkpoint(blk, q, context, want and step == 5, use_reentrant=False)
                else:
                    y, a = blk(q, context, want and step == 5)
                if step == 5:
                    x = y
                    if want:
                        a_rec = a
                else:
                    s = y
        return x, s, a_sem, a_rec


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

def init_swin_module(m: nn.Module) -> None:
    """Swin's initialisation of one module (``model.apply``): linear weights truncated-normal with
    std 0.02 and zero biases, LayerNorms to the identity (timm's / the released code's ``_init_weights``)."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def reinit_swin_like(model: nn.Module) -> None:
    """Re-initialise every parameter and the computed buffers of a Swin-based model (also after
    ``to_empty`` from the meta device): convolutions and batch norms by their own reset, submodules
    with an ``init_weights`` by it, then :func:`init_swin_module` everywhere."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
            m.reset_parameters()
        elif m is not model and hasattr(m, "init_weights"):
            m.init_weights()
    model.apply(init_swin_module)
    reinit_non_persistent_buffers(model)


class STViTR(nn.Module):
    """STViT-R on Swin, classification (``dense=False``) or dense backbone (``dense=True``).

    Args:
        img_size: classification input size; the released classifier works at 224 only (its
            stage-3 neighbourhoods are laid out for a 14x14 map); the dense form takes any size.
        embed_dim, depths, num_heads, window_size, mlp_ratio, qkv_bias: Swin's. ``depths[2]`` must be
            a multiple of 6 (dumbbell units).
        semantic_size: semantic tokens per window side (3: 3x3 per 7x7 window).
        semantic_kernel, semantic_stride: image neighbourhood of the first semantic block
            (classification 10 / 4 with no padding; dense 14, stride = window, centred).
        refine_kernel, recovery_kernel: dense form's second semantic block (21) and recovery (27).
        semantic_shortcut: attention residual in the first semantic block (released: classification
            False, dense True).
        use_global_centers: classification form: learned global cluster centres added to the
            query of the second semantic block of the first unit (released: off).
        padding_mask: dense form, 'released' | 'full' | 'none' (module docstring).
        stage_norms: dense form: build the released per-stage output norms ``norm0..norm2`` of
            the feature maps (``norm3``, the last one, is also the final norm and always there).
            None (default): when the model has no classifier (``num_classes=0``, the backbone's
            default; ``features_only=True`` builds them too): a classifier's logits read the last
            stage only, so in a model with a head they would be parameters without a gradient.
            Without them, ``forward_intermediates`` gives stages 0-2 unnormalised.
        drop_path_rate: stochastic depth (the authors trained with T 0.2, S 0.3, B 0.4;
            dense S 0.2, B 0.3); 0 by default here.
        device, dtype: where and in which precision parameters and buffers are created (timm's
            factory keywords; ``device='meta'`` builds without memory: ``to_empty`` then
            ``init_weights()`` materialises it).

    ``forward_features`` gives the channels-last map (B, H/32, W/32, C), as timm's Swin
    (``output_fmt = 'NHWC'``); ``forward_head`` averages it over (H, W) (``global_pool='avg'``).
    """
    output_fmt = "NHWC"

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dim: int = 96,
            depths: tuple[int, ...] = (2, 2, 6, 2),
            num_heads: tuple[int, ...] = (3, 6, 12, 24),
            window_size: int = 7,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            dense: bool = False,
            semantic_size: int = 3,
            semantic_kernel: int | None = None,
            semantic_stride: int | None = None,
            refine_kernel: int = 21,
            recovery_kernel: int = 27,
            semantic_shortcut: bool | None = None,
            use_global_centers: bool = False,
            padding_mask: str = "released",
            stage_norms: bool | None = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        img_size = as_positive_ints(img_size, "img_size", 2, "224 or (224, 224)")
        if patch_size != 4:
            raise ValueError(f"patch_size must be 4 (the convolutional stem has two stride-2 convolutions), got {patch_size}")
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(f"depths and num_heads need 4 stages, got {depths} and {num_heads}")
        if depths[2] % 6 or depths[2] == 0:
            raise ValueError(f"the third stage is made of 6-block dumbbell units: depths[2] must be a positive "
                             f"multiple of 6 (6 for T, 18 for S and B), got {depths[2]}")
        if global_pool not in ("", "avg"):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if padding_mask not in _PADDING_MASKS:
            raise ValueError(f"padding_mask must be one of {_PADDING_MASKS}, got {padding_mask!r}")
        if dense and use_global_centers:
            raise ValueError("use_global_centers exists in the classification form only (the released dense "
                             "backbone has none); use a stvit_r_swin_* model or drop the option")
        self.dense = dense
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.img_size = None if dense else img_size
        self.window_size = window_size
        self.num_layers = 4
        dims = [int(embed_dim * 2 ** i) for i in range(4)]
        self.embed_dim = embed_dim
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False

        if dense:
            semantic_kernel = 14 if semantic_kernel is None else semantic_kernel
            semantic_stride = window_size if semantic_stride is None else semantic_stride
            semantic_shortcut = True if semantic_shortcut is None else semantic_shortcut
            if semantic_stride != window_size:
                raise ValueError("the dense form centres one neighbourhood per window: semantic_stride must "
                                 f"equal window_size ({window_size})")
            resolutions = [None] * 4
        else:
            semantic_kernel = 10 if semantic_kernel is None else semantic_kernel
            semantic_stride = 4 if semantic_stride is None else semantic_stride
            semantic_shortcut = False if semantic_shortcut is None else semantic_shortcut
            if img_size[0] % 32 or img_size[1] % 32:
                raise ValueError(f"img_size {img_size} must be a multiple of 32")
            resolutions = [(img_size[0] // 4 // 2 ** i, img_size[1] // 4 // 2 ** i) for i in range(4)]
            H3, W3 = resolutions[2]
            windows = (H3 // window_size, W3 // window_size)
            neighbourhoods = ((H3 - semantic_kernel) // semantic_stride + 1, (W3 - semantic_kernel) // semantic_stride + 1)
            if H3 % window_size or W3 % window_size or windows != neighbourhoods:
                raise ValueError(
                    f"the classification form only works at the size it was designed for (224x224: a 14x14 "
                    f"stage-3 map whose {semantic_kernel}x{semantic_kernel} neighbourhoods at stride "
                    f"{semantic_stride} match its 7x7 windows); img_size {img_size} does not fit. For other "
                    f"sizes use the dense backbone, e.g. timm.create_model('stvit_r_det_swin_small_patch4_window7', "
                    f"features_only=True), which pads any input")
        n_global = 0
        if use_global_centers:
            H3, W3 = resolutions[2]
            n_global = (H3 // window_size) * (W3 // window_size) * semantic_size ** 2

        self.patch_embed = ConvStem(in_chans, embed_dim, pad=dense, **dd)
        total = sum(depths)  # stochastic depth rising linearly over all blocks (plain floats: meta-device friendly)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.layers = nn.ModuleList()
        for i in range(4):
            dp = dpr[sum(depths[:i]):sum(depths[:i + 1])]
            common = (dims[i], depths[i], num_heads[i], window_size, mlp_ratio, qkv_bias, proj_drop_rate,
                      attn_drop_rate, dp)
            if i == 2:
                self.layers.append(DumbbellStage(
                    *common, dense=dense, semantic_size=semantic_size, semantic_kernel=semantic_kernel,
                    semantic_stride=semantic_stride, refine_kernel=refine_kernel,
                    recovery_kernel=recovery_kernel, semantic_shortcut=semantic_shortcut,
                    padding_mask=padding_mask, global_centers=n_global, **dd))
            else:
                self.layers.append(SwinStage(*common, downsample=i < 3, resolution=resolutions[i], **dd))
        self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"layers.{i}") for i in range(4)]

        if dense:  # per-stage output norms of the released backbone; norm3 is also the final norm
            self.stage_norms = num_classes == 0 if stage_norms is None else bool(stage_norms)
            for i in range(4):
                built = i == 3 or self.stage_norms
                self.add_module(f"norm{i}", nn.LayerNorm(dims[i], **dd) if built else nn.Identity())
        else:
            self.stage_norms = False
            self.norm = nn.LayerNorm(dims[-1], **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.apply(init_swin_module)

    def init_weights(self) -> None:
        """(Re)initialise every parameter and the computed buffers (also after ``to_empty``)."""
        reinit_swin_like(self)

    # ---- timm contract -----------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Relative position tables (the released optimiser's keyword list)."""
        return {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [
                (r"^layers\.(\d+)\.downsample", (0,)),
                (r"^layers\.(\d+)\.global_centers", (0,)),
                (r"^layers\.(\d+)\.\w+\.(\d+)", None),
                (r"^norm", (99999,)),
            ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        for layer in self.layers:
            layer.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        """A new classifier (model's device, dtype and mode); ``global_pool`` 'avg' or '' (None keeps)."""
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("", "avg"):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = new_classifier(self, self.num_features, num_classes)

    def _final_norm(self, x: Tensor) -> Tensor:
        """The final norm: ``norm`` (classifier), or in the dense form the output norm of the last
        stage (``norm3``, or another after pruning). Written with static attribute checks and
        ``len(self.layers)`` so that TorchScript resolves it."""
        if hasattr(self, "norm3"):   # dense form
            n = len(self.layers)
            if n == 1:
                return self.norm0(x)
            if n == 2:
                return self.norm1(x)
            if n == 3:
                return self.norm2(x)
            return self.norm3(x)
        return self.norm(x)

    def _check_input(self, x: Tensor):
        _check_images(x, self.in_chans, self.img_size)

    def _stage_norm(self, i: int, x: Tensor) -> Tensor:
        return getattr(self, f"norm{i}")(x)

    def forward_intermediates(
            self,
            x: Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ):
        """Stage outputs (before patch merging), NCHW (or NHWC).

        Dense form: every intermediate goes through its stage's output norm (``norm0..3``, the
        released backbone's outputs), whatever ``norm`` says. Classification form: raw stage
        outputs; ``norm=True`` applies the final norm to the last stage's."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        intermediates = []
        x = self.patch_embed(x)
        last = len(self.layers) - 1
        stages = self.layers[:max_index + 1] if stop_early else self.layers
        out = x
        for i, stage in enumerate(stages):
            out, x = stage(x)
            if i in take_indices:
                if self.dense:
                    y = self._stage_norm(i, out)
                else:
                    y = self.norm(out) if (norm and i == last) else out
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return self._final_norm(out), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages (and head / final norm) that the requested intermediates do not need.

        Dense form: each map's output norm is part of the map (the released backbone's outputs), so
        the last kept stage's norm stays and becomes the final norm whatever ``prune_norm`` says;
        the norms of stages that are dropped or not taken go."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        self.layers[-1].downsample = None
        if self.dense:
            for i in range(4):
                if i > max_index or (i < max_index and i not in take_indices):
                    setattr(self, f"norm{i}", nn.Identity())
        elif prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, H/32, W/32, C) channels-last map of the last stage after the final norm (``norm3`` in
        the dense form), as timm's Swin."""
        self._check_input(x)
        x = self.patch_embed(x)
        out = x
        for stage in self.layers:
            out, x = stage(x)
        return self._final_norm(out)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, H, W, C) map -> logits (B, classes) (``global_pool=''``: (B, H, W, classes))."""
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # ---- visualisation -----------------------------------------------------------------------

    @torch.no_grad()
    def token_maps(self, x: Tensor, unit: int = 0) -> dict:
        """Where the semantic tokens of stage-3 dumbbell ``unit`` look, on the stage-3 grid.

        Returns, for the ``sH * sW`` semantic tokens in grid order (3x3 per 7x7 window, row-major),
        maps (B, tokens, H3, W3) on the stage-3 image-token grid (1/16 of the input; the dense form
        shows the unpadded image only), each summing to 1 over image tokens (heads averaged):

        * ``semantic``: the first semantic block's attention of each token over the image tokens
          of its window's neighbourhood; the weight it puts on pooled tokens (classification) or
          padding (dense) is left out and the rest renormalised;
        * ``recovery``: the recovery attention seen from each semantic token: how much every image
          token draws from it, normalised over the image tokens (a token that no image token
          attends to, possible only under the released padding mask, gives a zero map);
        * ``owner`` (B, H3, W3): the semantic token each image token draws most from in recovery.
        """
        if not 0 <= unit < self.layers[2].num_units:
            raise ValueError(f"unit must be in 0..{self.layers[2].num_units - 1} (stage 3 has "
                             f"{self.layers[2].num_units} dumbbell units), got {unit}")
        self._check_input(x)
        stage = self.layers[2]
        h = self.patch_embed(x)
        for s in self.layers[:2]:
            _, h = s(h)
        B, H, W, _ = h.shape
        geo = stage.geometry(H, W, h.device)
        _, _, maps = stage(h, attn_unit=unit)
        sH, sW = maps["semantic_grid"]
        n, ws = stage.semantic_size, stage.window_size
        nh, nw = sH // n, sW // n
        nW = nh * nw

        def to_grid_order(t):  # (B, windows, n*n, ...) -> (B, sH*sW, ...)
            t = t.view(B, nh, nw, n, n, *t.shape[3:]).transpose(2, 3)
            return t.reshape(B, sH * sW, *t.shape[5:])

        # semantic block: (B*nW, heads, n*n, K) -> scatter onto image tokens
        a = maps["semantic"].mean(1).view(B, nW, n * n, -1)
        idx = geo.semantic_index
        sem = a.new_zeros(B, nW, n * n, H * W + 1 + sH * sW)
        sem.scatter_add_(-1, idx[None, :, None, :].expand_as(a), a)
        sem = to_grid_order(sem[..., :H * W])
        sem = sem / sem.sum(-1, keepdim=True).clamp_min(1e-12)

        rec = maps["recovery"].mean(1)
        if self.dense:  # (B*nW, 49, K) over the semantic neighbourhood -> (B, H, W, sH*sW)
            r = rec.new_zeros(B * nW, ws * ws, sH * sW + 1)
            r.scatter_add_(-1, geo.recovery_index.repeat(B, 1)[:, None, :].expand_as(rec), rec)
            r = window_reverse(r[..., :sH * sW], ws, nh * ws, nw * ws)[:, :H, :W]
        else:           # (B, H*W, sH*sW)
            r = rec.view(B, H, W, sH * sW)
        owner = r.argmax(-1)
        r = r.permute(0, 3, 1, 2).reshape(B, sH * sW, H * W)
        r = r / r.sum(-1, keepdim=True).clamp_min(1e-12)
        return dict(
            semantic=sem.view(B, sH * sW, H, W),
            recovery=r.view(B, sH * sW, H, W),
            owner=owner,
            owner_title="semantic token each patch draws most from (recovery)",
        )


# --------------------------------------------------------------------------------------------
# Checkpoints, configurations, registration
# --------------------------------------------------------------------------------------------

_REBUILT_BUFFERS = ("relative_position_index", "attn_mask")


def checkpoint_filter_fn(state_dict: dict, model: STViTR) -> dict[str, Tensor]:
    """Authors' checkpoints (classifier ``{'model': ...}``, MMDetection detector with
    ``backbone.`` keys, or a bare backbone) -> this model's state dict.

    Buffers the model rebuilds (``relative_position_index``, ``attn_mask``) are dropped,
    ``semantic_token2`` becomes ``global_centers``. An ImageNet classifier loads into a dense
    backbone as the authors started their detectors: ``norm``/``head`` are dropped and the
    per-stage norms keep their fresh initialisation."""
    sd = unwrap_state_dict(state_dict)
    if any(k.startswith("backbone.") for k in sd):  # a whole detector: keep its backbone
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    out = {}
    for k, v in sd.items():
        if k.rsplit(".", 1)[-1] in _REBUILT_BUFFERS:
            continue
        out[k.replace("semantic_token2", "global_centers")] = v

    new_keys = []
    if model.dense and "norm.weight" in out and "norm0.weight" not in out:
        out = {k: v for k, v in out.items()
               if not (k.startswith(("norm.", "head.")) or k.endswith("global_centers"))}
        new_keys = ["norm0.*", "norm1.*", "norm2.*", "norm3.*"]
    if model.dense and not model.stage_norms:
        # a backbone's per-stage norms, in a model with a classifier: nothing reads them
        out = {k: v for k, v in out.items() if not k.startswith(("norm0.", "norm1.", "norm2."))}
    has_centers = any(k.endswith("global_centers") for k in out)
    wants_centers = any(n.endswith("global_centers") for n, _ in model.named_parameters())
    if has_centers != wants_centers:
        raise CheckpointError(
            "the checkpoint was trained with%s learnable global centres (layers.2.semantic_token2) but the "
            "model was built with%s: create it with use_global_centers=%s"
            % (("", "out", True) if has_centers else ("out", "", False)))
    return complete_state_dict(out, model, new_keys=new_keys, source="the STViT-R checkpoint")


def _cfg(url: str = "", **kwargs) -> dict:
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj.0.c", "classifier": "head", "license": "mit",
        "paper_ids": "arXiv:2303.08685", "paper_name": "Making Vision Transformers Efficient from A Token Sparsification View",
        **kwargs,
    }


def _dense_cfg(**kwargs) -> dict:
    return _cfg(num_classes=0, fixed_input_size=False, min_input_size=(3, 32, 32), **kwargs,
                notes=("dense backbone: any input size (padded), features_only=True gives 4 NCHW maps; "
                       "COCO checkpoints are whole MMDetection detectors, the backbone is taken from them",))


_HF = "https://huggingface.co/csncsn/STViT-R/blob/main/"
_TEST_NOTE = ("a small untrained variant for fast generic tests (timm's test_* convention); no weights",)
_LOAD_NOTE = ("download the file, then pretrained=True, pretrained_cfg_overlay=dict(file=<path>)",)
default_cfgs = generate_default_cfgs({
    "stvit_r_swin_tiny_patch4_window7_224": _cfg(),
    "stvit_r_swin_small_patch4_window7_224.in1k": _cfg(origin_url=_HF + "STViT-R-Swin-S.pth", notes=_LOAD_NOTE),
    "stvit_r_swin_base_patch4_window7_224.in1k": _cfg(origin_url=_HF + "STViT-R-Swin-B.pth", notes=_LOAD_NOTE),
    "stvit_r_det_swin_tiny_patch4_window7": _dense_cfg(),
    "stvit_r_det_swin_small_patch4_window7.coco": _dense_cfg(
        origin_url=_HF + "cascade_mask_rcnn_swin_small_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco.pth"),
    "stvit_r_det_swin_base_patch4_window7.coco": _dense_cfg(
        origin_url=_HF + "cascade_mask_rcnn_swin_base_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco.pth"),
    "test_stvit_r": _cfg(notes=_TEST_NOTE),
    "test_stvit_r_det": _dense_cfg(input_size=(3, 128, 128), pool_size=(4, 4)),
})

_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_TEST = dict(embed_dim=32, depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8))


def _create(variant: str, pretrained: bool, arch: dict, dense: bool, **kwargs) -> STViTR:
    if dense and kwargs.get("features_only"):
        kwargs.setdefault("stage_norms", True)   # the feature maps are the released, normalised ones
    return build(STViTR, variant, pretrained, filter_fn=checkpoint_filter_fn,
                 feature_cfg=dict(out_indices=(0, 1, 2, 3)), **dict(arch, dense=dense, **kwargs))


@register_model
def stvit_r_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> STViTR:
    """STViT-R-Swin-T classifier (stage 3: one dumbbell unit). No released weights."""
    return _create("stvit_r_swin_tiny_patch4_window7_224", pretrained, _TINY, False, **kwargs)


@register_model
def stvit_r_swin_small_patch4_window7_224(pretrained: bool = False, **kwargs) -> STViTR:
    """STViT-R-Swin-S classifier (82.7% ImageNet top-1 released)."""
    return _create("stvit_r_swin_small_patch4_window7_224", pretrained, _SMALL, False, **kwargs)


@register_model
def stvit_r_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs) -> STViTR:
    """STViT-R-Swin-B classifier (83.2% ImageNet top-1 released)."""
    return _create("stvit_r_swin_base_patch4_window7_224", pretrained, _BASE, False, **kwargs)


@register_model
def stvit_r_det_swin_tiny_patch4_window7(pretrained: bool = False, **kwargs) -> STViTR:
    """STViT-R-Swin-T dense backbone (any input size). No released weights."""
    return _create("stvit_r_det_swin_tiny_patch4_window7", pretrained, _TINY, True, **kwargs)


@register_model
def stvit_r_det_swin_small_patch4_window7(pretrained: bool = False, **kwargs) -> STViTR:
    """STViT-R-Swin-S dense backbone (COCO Cascade Mask R-CNN 3x: 51.8 box AP released)."""
    return _create("stvit_r_det_swin_small_patch4_window7", pretrained, _SMALL, True, **kwargs)


@register_model
def stvit_r_det_swin_base_patch4_window7(pretrained: bool = False, **kwargs) -> STViTR:
    """STViT-R-Swin-B dense backbone (COCO Cascade Mask R-CNN 3x: 52.2 box AP released)."""
    return _create("stvit_r_det_swin_base_patch4_window7", pretrained, _BASE, True, **kwargs)


@register_model
def test_stvit_r(pretrained: bool = False, **kwargs) -> STViTR:
    """A small STViT-R classifier for fast tests (width 32; 224x224, the only size the form takes)."""
    return _create("test_stvit_r", pretrained, _TEST, False, **kwargs)


@register_model
def test_stvit_r_det(pretrained: bool = False, **kwargs) -> STViTR:
    """A small STViT-R dense backbone for fast tests (width 32, any input size; 128x128 by default)."""
    return _create("test_stvit_r_det", pretrained, _TEST, True, **kwargs)
