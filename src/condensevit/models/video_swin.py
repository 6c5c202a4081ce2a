"""Video Swin (torchvision's) as a timm model, and STViT on Video Swin (the STViT paper's Table 6).

Clips are (B, C, T, H, W). Two families:

* ``video_swin_{tiny,small}_patch2x4x4_window8x7x7`` (:class:`VideoSwin`): torchvision's
  ``SwinTransformer3d`` (``swin3d_t`` / ``swin3d_s``, Liu et al. 2022) itself, subclassed only to
  speak timm's model contract (``forward_features`` / ``forward_head``, ``reset_classifier``,
  ``forward_intermediates``, gradient checkpointing ...). Its state dict is torchvision's, so
  torchvision's Kinetics-400 weights load unchanged. Like torchvision's, it takes clips of any
  length and frame size (padded to the patches and windows; windows larger than the map shrink to it).
* ``stvit_video_swin_{tiny,small}_patch2x4x4_window8x7x7`` (:class:`STViTVideoSwin`): the same
  network with the image form's condensation (:mod:`condensevit.models.stvit_swin`) moved to
  space-time windows. In the third stage, after two thirds of its blocks (torchvision's own blocks),
  every 8x7x7 window of tubelet tokens is max-pooled to 2x3x3 semantic tokens, which attend to an
  8x10x10 neighbourhood of tubelet tokens around their window and to their window's pooled tokens
  (STViT-R's :class:`~condensevit.models.stvit_r.SemanticTokenBlock`, in 3-D); a second block lets
  them (plus learned global centres) attend to all of [semantic, tubelet tokens]; the tubelet tokens
  are then dropped, later blocks of the stage alternate attention inside each window's tokens and
  over all of them (STViT-R's :class:`~condensevit.models.stvit_r.SemanticBlock`), and the last
  stage is torchvision's patch merging and blocks on the (4, 6, 6) -> (4, 3, 3) semantic grid
  (at 32x224x224). The temporal count (2 per window of 8 steps), the module's place and the
  neighbourhood are our reading (the paper gives the figures only); all are options.

Weights: a torchvision Video Swin state dict of the same size loads into the condensed model
(:func:`stvit_checkpoint_filter_fn`): block for block, a semantic block taking ``attn.q`` from the
first third of the Swin block's ``attn.qkv`` and ``attn.kv`` from the rest, ``mlp.0`` / ``mlp.3``
as ``mlp.fc1`` / ``mlp.fc2``, its relative position table dropped; LayerScale and the global
centres start from their initial values. A checkpoint of another size is a one-line
:class:`~condensevit.models.CheckpointError` naming both sizes.

Input of the condensed model: exactly ``num_frames`` frames of ``img_size`` (its semantic geometry
and global centres are laid out for that clip); the map is padded to the windows as Video Swin pads
it, and windows longer than the map shrink to it, as in Video Swin.
"""

import math
import numbers
import re
from contextlib import nullcontext
from functools import partial
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_function
from timm.models._manipulate import reinit_non_persistent_buffers
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from torchvision.models.video.swin_transformer import PatchEmbed3d, ShiftedWindowAttention3d, SwinTransformer3d

from ..layers.attention import split_qkv
from ..layers.tracing import check_clip_layout, known_zero, shape_str
from ..layers.windows import window_neighbourhood_index
from ._builder import CheckpointError, complete_state_dict, new_classifier, unwrap_state_dict
from .stvit_r import SemanticBlock, SemanticTokenBlock
from .video import _create, _patch_kernel

__all__ = ["VideoSwin", "STViTVideoSwin", "SpaceTimeSemanticTokenBlock", "checkpoint_filter_fn",
           "stvit_checkpoint_filter_fn"]

_OUTPUT_FMTS = ("NCHW", "NCTHW", "NTHWC")   # 'NCHW' is timm's name for channels-first: (B, C, T', H', W') here


def _ints(value, name: str, n: int, example: str) -> tuple[int, ...]:
    seq = (value,) * n if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    try:
        seq = tuple(seq)
    except TypeError:
        seq = ()
    if len(seq) != n or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in seq):
        raise ValueError(f"{name}={value!r} must be {n} positive ints, e.g. {example}")
    return tuple(int(s) for s in seq)


def _maybe_checkpoint(fn, enabled: bool, *args, **kwargs):
    if enabled and torch.is_grad_enabled() and not torch.jit.is_scripting():
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


def _stage_sizes(num_frames: int, img_size: tuple[int, int], patch_size: tuple[int, int, int]) -> list[tuple]:
    """(T', H', W') of each stage's map: patches (padded), then Video Swin's merging halves H and W."""
    t, h, w = (-(-s // p) for s, p in zip((num_frames, *img_size), patch_size))
    sizes = []
    for _ in range(4):
        sizes.append((t, h, w))
        h, w = -(-h // 2), -(-w // 2)
    return sizes


@register_notrace_function   # one leaf node for timm's fx feature extraction ...
@torch.fx.wrap               # ... and for torch.fx.symbolic_trace: the check runs, with the same error, in the graph
def _check_clips(x: Tensor, in_chans: int, num_frames: int, img_size: Tuple[int, int]) -> None:
    """ValueError unless ``x`` is a (B, in_chans, T, H, W) batch of clips (TorchScript compiles it too)."""
    want = f"(B, {in_chans}, T, H, W) (this model: T={num_frames}, {img_size[0]}x{img_size[1]})"
    if x.dim() == 4:
        raise ValueError(f"input of shape {shape_str(x)} is a batch of images; video models take clips {want}: "
                         "stack the frames on dim 2")
    if x.dim() != 5:
        raise ValueError(f"input of shape {shape_str(x)} is not a batch of clips {want}")
    check_clip_layout(x, in_chans)
    if x.shape[1] != in_chans:
        raise ValueError(f"the clips have {x.shape[1]} channels but the model takes {in_chans} (input "
                         f"{shape_str(x)}); convert the frames, or build the model with in_chans={x.shape[1]}")


@register_notrace_function
@torch.fx.wrap
def _check_clip_size(x: Tensor, num_frames: int, img_size: Tuple[int, int]) -> None:
    """ValueError unless the (B, C, T, H, W) clips have ``num_frames`` frames of ``img_size``."""
    T, H, W = x.shape[2], x.shape[3], x.shape[4]
    if T != num_frames or H != img_size[0] or W != img_size[1]:
        raise ValueError(
            f"this model takes clips of {num_frames} frames of {img_size[0]}x{img_size[1]} (its "
            f"semantic tokens and global centres are laid out for them), got {T} frames of {H}x{W}: sample "
            f"{num_frames} frames and resize them, or build the model with num_frames={T}, img_size=({H}, {W})")


# ===================================================================================== baseline
class VideoSwin(SwinTransformer3d):
    """torchvision's Video Swin with timm's model contract (state dict unchanged).

    Args (keyword-only):
        img_size, num_frames: the clip this model is described for (``input_size``); like
            torchvision's, it takes other lengths and frame sizes too.
        in_chans, num_classes (400: Kinetics-400), global_pool ('avg' or '').
        patch_size, embed_dim, depths, num_heads, window_size, mlp_ratio: Video Swin's.
        drop_rate: dropout before the classifier (timm's meaning; torchvision has none).
        proj_drop_rate, attn_drop_rate, drop_path_rate: torchvision's ``dropout`` (one rate for the
            embedding, the attention projections and the MLPs: torchvision ties them),
            ``attention_dropout``, ``stochastic_depth_prob`` (0.1 for T and S in torchvision).
        device, dtype: where and in what type the parameters and buffers are made (timm's factory
            keywords). torchvision's constructor takes neither: it runs under ``torch.device(device)``
            (so ``device='meta'`` allocates nothing; ``to_empty`` then ``init_weights()`` or a state
            dict materialise it) and the model is cast to ``dtype`` once built.

    ``forward_features`` gives the channels-last map (B, T', H', W', C) (``output_fmt = 'NTHWC'``,
    ``feature_dim = -1``: the channel axis, as timm's generic tests read it); ``forward_head``
    averages it over (T', H', W') (``global_pool='avg'``).
    """
    output_fmt = "NTHWC"
    feature_dim = -1

    def __init__(self, *, img_size=224, num_frames: int = 32, in_chans: int = 3, num_classes: int = 400,
                 global_pool: str = "avg", patch_size=(2, 4, 4), embed_dim: int = 96,
                 depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=(8, 7, 7), mlp_ratio: float = 4.0,
                 drop_rate: float = 0.0, proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1,
                 device=None, dtype=None):
        img_size = _ints(img_size, "img_size", 2, "224 or (224, 224)")
        patch_size = _ints(patch_size, "patch_size", 3, "(2, 4, 4)")
        window_size = _ints(window_size, "window_size", 3, "(8, 7, 7)")
        num_frames = _ints(num_frames, "num_frames", 1, "32")[0]
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(f"depths and num_heads need 4 stages, got {depths} and {num_heads}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' (mean of the tokens) or '', got {global_pool!r}")
        for i, h in enumerate(num_heads):
            if (embed_dim * 2 ** i) % h:
                raise ValueError(f"stage {i} width {embed_dim * 2 ** i} is not divisible by num_heads[{i}]={h}")
        with torch.device(device) if device is not None else nullcontext():
            super().__init__(
                patch_size=list(patch_size), embed_dim=embed_dim, depths=list(depths), num_heads=list(num_heads),
                window_size=list(window_size), mlp_ratio=mlp_ratio, dropout=proj_drop_rate,
                attention_dropout=attn_drop_rate, stochastic_depth_prob=drop_path_rate,
                num_classes=max(num_classes, 1), patch_embed=partial(PatchEmbed3d, in_channels=in_chans))
            if num_classes <= 0:
                self.head = nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.img_size, self.num_frames = img_size, num_frames
        self.patch_size, self.window_size = patch_size, window_size
        self.embed_dim = embed_dim
        self.depths, self.num_heads_per_stage = tuple(depths), tuple(num_heads)
        self.head_hidden_size = self.num_features
        self.grad_checkpointing = False
        self.feature_info = [dict(num_chs=embed_dim * 2 ** i, reduction=patch_size[1] * 2 ** i,
                                  temporal_reduction=patch_size[0], module=f"features.{2 * i}") for i in range(4)]
        # the checkpoint filters adapt the (5-D) patch kernel to in_chans themselves; timm's
        # adapt_input_conv takes 2-D kernels only, so its loader leaves the stem alone
        self._traits = {"first_conv": None}
        if dtype is not None:
            self.to(dtype=dtype)

    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer as torchvision's constructor does (also after
        ``to_empty`` from the meta device): linear layers truncated normal (std 0.02) with zero
        bias, norms and the patch convolution PyTorch's defaults, relative position tables
        truncated normal, their (persistent) index recomputed; our blocks' LayerScale and global
        centres; computed buffers (``reinit_non_persistent_buffers``)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.Conv3d)):
                m.reset_parameters()
            elif isinstance(m, ShiftedWindowAttention3d):
                trunc_normal_(m.relative_position_bias_table, std=0.02)
                device = m.relative_position_index.device
                with torch.device(device):
                    m.define_relative_position_index()
            elif m is not self and hasattr(m, "init_weights"):
                m.init_weights()
        reinit_non_persistent_buffers(self)

    @property
    def num_stages(self) -> int:
        """Stages left (4; fewer after ``prune_intermediate_layers``)."""
        return (len(self.features) + 1) // 2

    @property
    def input_size(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of the clips this model is described for."""
        return (self.in_chans, self.num_frames, *self.img_size)

    # ---- input / stages ------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        _check_clips(x, self.in_chans, self.num_frames, self.img_size)

    def _run_stage(self, i: int, x: Tensor) -> Tensor:
        """Stage ``i``'s blocks (torchvision's ``features[2i]``) on a (B, T, H, W, C) map."""
        for blk in self.features[2 * i]:
            x = _maybe_checkpoint(blk, self.grad_checkpointing, x)
        return x

    def _merge(self, i: int, x: Tensor) -> Tensor:
        return self.features[2 * i + 1](x) if 2 * i + 1 < len(self.features) else x

    def _stages(self, x: Tensor, stop: int | None = None):
        """Yield (stage index, stage output) for stages 0..stop; patch merging between them."""
        self._check_input(x)
        x = self.pos_drop(self.patch_embed(x))
        yield from self._stages_of(x, stop)

    def _stages_of(self, x: Tensor, stop: int | None = None):
        """:meth:`_stages` from the embedded (B, T', H', W', C) map on (eager mode)."""
        last = self.num_stages - 1 if stop is None else stop
        for i in range(last + 1):
            if i:
                x = self._merge(i - 1, x)
            x = self._run_stage(i, x)
            yield i, x

    # ---- timm contract -------------------------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, T, H, W) clips -> (B, T', H', W', C) final tokens after the final norm, channels-last
        as torchvision's ``features`` give them (and timm's Swin its NHWC maps)."""
        self._check_input(x)
        x = self.pos_drop(self.patch_embed(x))
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            x = self._checkpointed_features(x)
        else:
            x = self.features(x)   # torchvision's stages and patch merging, as its forward runs them
        return self.norm(x)

    @torch.jit.unused
    def _checkpointed_features(self, x: Tensor) -> Tensor:
        """The stages with gradient checkpointing (block by block; eager mode)."""
        for _, x in self._stages_of(x):
            pass
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, T', H', W', C) map -> logits (B, classes) (``global_pool=''``: per position)."""
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Stage outputs as (B, C, T', H', W') maps ('NCHW' / 'NCTHW') or channels-last ('NTHWC');
        ``norm=True`` applies the final norm to the last stage's. Returns the list, or
        ``(forward_features output, list)``."""
        if output_fmt not in _OUTPUT_FMTS:
            raise ValueError(f"output_fmt must be one of {_OUTPUT_FMTS}, got {output_fmt!r}")
        take, max_index = feature_take_indices(self.num_stages, indices)
        out = []
        last = None
        for i, y in self._stages(x, stop=max_index if (stop_early or intermediates_only) else None):
            last = y
            if i in take:
                y = self.norm(y) if (norm and i == self.num_stages - 1) else y
                out.append(y if output_fmt == "NTHWC" else y.permute(0, 4, 1, 2, 3).contiguous())
        if intermediates_only:
            return out
        return self.norm(last), out

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take, max_index = feature_take_indices(self.num_stages, indices)
        self.features = self.features[:2 * max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The relative position tables (and the global centres of the condensed form)."""
        return {n for n, _ in self.named_parameters()
                if n.endswith("relative_position_bias_table") or n.endswith("global_centers")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        # features.{2i} are stages (blocks features.{2i}.{j}), features.{2i+1} patch merging
        return dict(stem=r"^patch_embed", blocks=r"^features\.(\d+)" if coarse else [
            (r"^features\.(\d+)\.(\d+)\.", None),
            (r"^features\.(\d+)\.(?:norm|reduction|global_centers)", (0,)),
            (r"^norm", (99999,)),
        ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = new_classifier(self, self.num_features, num_classes)


# ================================================================================ STViT parts
def _partition(x: Tensor, window: Tuple[int, int, int]) -> Tensor:
    """(B, T, H, W, C) -> (B * windows, t*h*w, C), windows and tokens in row-major order."""
    B, T, H, W, C = x.shape
    t, h, w = window
    x = x.view(B, T // t, t, H // h, h, W // w, w, C).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, t * h * w, C)


def _reverse(x: Tensor, window: Tuple[int, int, int], size: Tuple[int, int, int]) -> Tensor:
    """The inverse of :func:`_partition`: (B * windows, t*h*w, C) -> (B, T, H, W, C)."""
    T, H, W = size
    t, h, w = window
    C = x.shape[-1]
    x = x.view(-1, T // t, H // h, W // w, t, h, w, C).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(-1, T, H, W, C)


class SpaceTimeSemanticTokenBlock(SemanticTokenBlock):
    """STViT-R's first semantic block (:class:`~condensevit.models.stvit_r.SemanticTokenBlock`: same
    parameters, same attention) on a (B, T, H, W, C) tubelet map: each space-time ``window`` of
    the (zero-padded) map is max-pooled to ``semantic_shape`` tokens, which attend to the tubelet
    tokens of their window's neighbourhood and to the window's pooled tokens, with LayerScale, an
    attention residual on the pooled tokens when ``shortcut``, then the MLP."""

    def __init__(self, *args, window: tuple[int, int, int], semantic_shape: tuple[int, int, int], **kwargs):
        super().__init__(*args, window_size=max(window), semantic_size=max(semantic_shape), pooled_keys=True,
                         padded=False, **kwargs)
        self.window, self.semantic_shape = tuple(window), tuple(semantic_shape)

    def forward(self, x: Tensor, index: Tensor, return_attn: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """``x`` (B, T, H, W, C); ``index`` (windows, K) into [tubelet tokens, pooled tokens].
        Returns the (B, sT, sH, sW, C) semantic grid and the attention (B * windows, heads, m, K)."""
        B, T, H, W, C = x.shape
        wt, wh, ww = self.window
        nt, nh, nw = self.semantic_shape
        pt, ph, pw = (-T) % wt, (-H) % wh, (-W) % ww
        xp = x
        if not (known_zero(pt) and known_zero(ph) and known_zero(pw)):   # eager: no copy when nothing is padded
            xp = F.pad(x, (0, 0, 0, pw, 0, ph, 0, pt))
        grid = ((T + pt) // wt * nt, (H + ph) // wh * nh, (W + pw) // ww * nw)
        # adaptive pooling of the whole map to (windows * n) bins = pooling each window to n bins
        s = F.adaptive_max_pool3d(xp.permute(0, 4, 1, 2, 3), [grid[0], grid[1], grid[2]]).permute(0, 2, 3, 4, 1)
        q_in = self.norm1(s)
        table = torch.cat([self.attn.kv(self.norm1(x)).flatten(1, 3), self.attn.kv(q_in).flatten(1, 3)], dim=1)
        out, attn = self.neighbourhood_attention(_partition(q_in, self.semantic_shape), table[:, index], None,
                                                 return_attn)
        out = self.layer_scale_1 * _reverse(out, self.semantic_shape, grid)
        s = s + self.drop_path(out) if self.shortcut else out
        return self.mlp_residual(s), attn


def space_time_semantic_index(size: tuple[int, int, int], window: tuple[int, int, int],
                              semantic_shape: tuple[int, int, int], kernel: tuple[int, int, int],
                              device=None) -> Tensor:
    """(windows, m + K) keys of each window's m semantic tokens: first its own pooled tokens (stored
    after the T*H*W tubelet tokens, in the semantic grid's row-major order), then the ``kernel``
    neighbourhood of tubelet tokens around the window, kept inside the map."""
    T, H, W = size
    counts = [-(-s // w) for s, w in zip(size, window)]
    sT, sH, sW = (c * n for c, n in zip(counts, semantic_shape))
    grid = torch.arange(sT * sH * sW, device=device).view(1, sT, sH, sW, 1)
    pooled = _partition(grid, semantic_shape).squeeze(-1)                          # (windows, m)
    neighbourhood = window_neighbourhood_index(size, window, kernel, device)
    return torch.cat([pooled + T * H * W, neighbourhood], dim=1)


class SpaceTimeSemanticStage(nn.Sequential):
    """The condensed stage: torchvision's Swin blocks on the tubelet tokens, then the semantic token
    module and the semantic blocks. A ``Sequential`` so that block ``j`` keeps torchvision's name
    ``features.{2i}.{j}``. Input (B, T, H, W, C); output the (B, sT, sH, sW, C) semantic grid."""

    def __init__(self, swin_blocks: list[nn.Module], dim: int, num_heads: int, mlp_ratio: float, drop_path: list[float],
                 *, size: tuple[int, int, int], window: tuple[int, int, int], semantic_shape: tuple[int, int, int],
                 semantic_kernel: tuple[int, int, int], semantic_shortcut: bool, global_centers: bool,
                 layer_scale_init: float, proj_drop: float, attn_drop: float, device=None, dtype=None):
        dd = dict(device=device, dtype=dtype)
        depth = len(drop_path)
        start = len(swin_blocks)
        common = (dim, num_heads, mlp_ratio, True, proj_drop, attn_drop)
        blocks = list(swin_blocks)
        blocks.append(SpaceTimeSemanticTokenBlock(
            *common, drop_path[start], window=window, semantic_shape=semantic_shape, shortcut=semantic_shortcut,
            layer_scale_init=layer_scale_init, **dd))
        blocks.append(SemanticBlock(*common, drop_path[start + 1], layer_scale_init=layer_scale_init, **dd))
        for j, i in enumerate(range(start + 2, depth)):
            # alternately inside each window's tokens (a Sequential of windows) and over all tokens
            blocks.append(SemanticBlock(*common, drop_path[i], layer_scale_init=layer_scale_init, **dd))
        super().__init__(*blocks)
        self.stgm_start = start
        self.size, self.window, self.semantic_shape = tuple(size), tuple(window), tuple(semantic_shape)
        self.semantic_kernel = tuple(semantic_kernel)
        self.grid = tuple(-(-s // w) * n for s, w, n in zip(size, window, semantic_shape))
        if global_centers:
            self.global_centers = nn.Parameter(torch.zeros(1, math.prod(self.grid), dim, **dd))
        else:
            self.global_centers = None
        self.init_weights()
        self.grad_checkpointing = False
        self.init_non_persistent_buffers()

    def init_weights(self) -> None:
        if self.global_centers is not None:
            trunc_normal_(self.global_centers, std=0.02)

    def init_non_persistent_buffers(self) -> None:
        """Build the geometry (again, e.g. after ``to_empty`` from the meta device)."""
        device = next((p.device for p in self.parameters()), None)
        self.register_buffer("semantic_index", space_time_semantic_index(
            self.size, self.window, self.semantic_shape, self.semantic_kernel, device), persistent=False)

    def forward(self, x: Tensor, return_attn: bool = False):
        """(B, T, H, W, C) -> the semantic grid (and, with ``return_attn``, eager mode only, the
        module's attention maps ``semantic`` and ``refine``).

        One loop over the blocks (torchvision's names), each block's role told by its kind (static
        attribute checks, which TorchScript resolves as it unrolls the loop) and its position."""
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        s0 = self.stgm_start
        s = x   # the semantic grid, made by the module's first block
        a_make: Optional[Tensor] = None
        a_refine: Optional[Tensor] = None
        for j, blk in enumerate(self):
            if hasattr(blk, "semantic_shape"):        # the module's first block: the semantic tokens
                if ckpt and not torch.jit.is_scripting():
                    s, a_make = checkpoint(blk, x, self.semantic_index, return_attn, use_reentrant=False)
                else:
                    s, a_make = blk(x, self.semantic_index, return_attn)
            elif hasattr(blk, "local_window"):        # semantic blocks
                context: Optional[Tensor] = None
                q = s
                local = (j - s0) % 2 == 0             # inside each window's tokens, else over all of them
                if j == s0 + 1:                       # the module's second block: s (+ centres) reads [s, x]
                    if self.global_centers is not None:
                        q = s + self.global_centers.view(1, s.shape[1], s.shape[2], s.shape[3], s.shape[4])
                    context = torch.cat([s.flatten(1, 3), x.flatten(1, 3)], dim=1)
                elif local:
                    q = _partition(s, self.semantic_shape)
                want = return_attn and j == s0 + 1
                if ckpt and not torch.jit.is_scripting():
                    y, a = checkpoint(blk, q, context, want, use_reentrant=False)
                else:
                    y, a = blk(q, context, want)
                if j == s0 + 1:
                    a_refine = a
                    s = y
                elif local:
                    s = _reverse(y, self.semantic_shape, self.grid)
                else:
                    s = y
            else:                                     # torchvision's Swin blocks on the tubelet tokens
                if ckpt and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, use_reentrant=False)
                else:
                    x = blk(x)
        if return_attn and not torch.jit.is_scripting():
            return s, dict(semantic=a_make, refine=a_refine)
        return s


class STViTVideoSwin(VideoSwin):
    """STViT on Video Swin (see the module docstring).

    Args (keyword-only): those of :class:`VideoSwin` (the model now takes exactly ``num_frames``
    frames of ``img_size``), and
        semantic_tokens_per_window: (t, h, w) semantic tokens per space-time window, (2, 3, 3).
        stgm_stage: the stage (0-3) where they are made; 2 (the third), as in the image form.
        stgm_start: index of the module's first block in that stage (default: two thirds of its
            depth, T 4 of 6, S 12 of 18); at most depth - 2.
        semantic_kernel: (t, h, w) tubelet neighbourhood of each window's semantic tokens in the
            first module block, centred on the window and kept inside the map: (8, 10, 10).
        semantic_shortcut, use_global_centers, layer_scale_init: as in
            :class:`~condensevit.models.stvit_swin.STViTSwin`.
    """

    def __init__(self, *, semantic_tokens_per_window=(2, 3, 3), stgm_stage: int = 2, stgm_start: int | None = None,
                 semantic_kernel=(8, 10, 10), semantic_shortcut: bool = True, use_global_centers: bool = True,
                 layer_scale_init: float = 1e-5, device=None, dtype=None, **kwargs):
        super().__init__(device=device, dtype=dtype, **kwargs)
        semantic_shape = _ints(semantic_tokens_per_window, "semantic_tokens_per_window", 3, "(2, 3, 3)")
        kernel = _ints(semantic_kernel, "semantic_kernel", 3, "(8, 10, 10)")
        if stgm_stage not in (0, 1, 2, 3):
            raise ValueError(f"stgm_stage must be a stage index 0-3 (the paper condenses the third: 2), got {stgm_stage}")
        depth = self.depths[stgm_stage]
        if depth < 2:
            raise ValueError(f"stage {stgm_stage} has {depth} blocks; the semantic token module needs 2")
        if stgm_start is None:
            stgm_start = min(depth - depth // 3, depth - 2)
        if not 0 <= stgm_start <= depth - 2:
            raise ValueError(f"stgm_start={stgm_start} does not leave the module's two blocks in stage {stgm_stage} "
                             f"({depth} blocks): use 0..{depth - 2}")
        size = _stage_sizes(self.num_frames, self.img_size, self.patch_size)[stgm_stage]
        window = tuple(min(w, s) for w, s in zip(self.window_size, size))   # Video Swin shrinks windows to the map
        for axis, s, w, n in zip(("time", "height", "width"), size, window, semantic_shape):
            if n > w:
                frames = n * self.patch_size[0]
                fix = (f"use at least {frames} frames (num_frames), or fewer semantic tokens along time "
                       f"(semantic_tokens_per_window=(1, ...))" if axis == "time" else
                       "use larger frames (img_size) or fewer semantic tokens per window")
                raise ValueError(
                    f"the stage-{stgm_stage} map is {size[0]}x{size[1]}x{size[2]} (time x height x width) for "
                    f"{self.num_frames} frames of {self.img_size[0]}x{self.img_size[1]}: its windows hold {w} along "
                    f"{axis}, fewer than the {n} semantic tokens asked for there; {fix}")
        self.semantic_shape = semantic_shape
        self.stgm_stage, self.stgm_start = stgm_stage, stgm_start
        width = self.embed_dim * 2 ** stgm_stage
        dpr = [self.features[2 * stgm_stage][j].stochastic_depth.p for j in range(depth)]
        attn0 = self.features[2 * stgm_stage][0].attn
        stage = SpaceTimeSemanticStage(
            list(self.features[2 * stgm_stage][:stgm_start]), width, self.num_heads_per_stage[stgm_stage],
            kwargs.get("mlp_ratio", 4.0), dpr, size=size, window=window, semantic_shape=semantic_shape,
            semantic_kernel=kernel, semantic_shortcut=semantic_shortcut, global_centers=use_global_centers,
            layer_scale_init=layer_scale_init, proj_drop=attn0.dropout, attn_drop=attn0.attention_dropout,
            device=device, dtype=dtype)
        for j in range(stgm_start, len(stage)):
            for m in stage[j].modules():
                if isinstance(m, nn.Linear):   # torchvision's init of linear layers, for the new blocks
                    trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        self.features[2 * stgm_stage] = stage
        # nominal reductions from the module on: one semantic token stands for window / n tokens
        for i in range(stgm_stage, 4):
            self.feature_info[i]["reduction"] = int(round(self.feature_info[i]["reduction"] * window[1] / semantic_shape[1]))
            self.feature_info[i]["temporal_reduction"] = int(round(self.patch_size[0] * window[0] / semantic_shape[0]))

    def _check_input(self, x: Tensor) -> None:
        _check_clips(x, self.in_chans, self.num_frames, self.img_size)
        _check_clip_size(x, self.num_frames, self.img_size)

    def _run_stage(self, i: int, x: Tensor) -> Tensor:
        if i == self.stgm_stage:
            return self.features[2 * i](x)   # checkpoints block by block itself
        return super()._run_stage(i, x)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        stage = self.features[2 * self.stgm_stage] if 2 * self.stgm_stage < len(self.features) else None
        if isinstance(stage, SpaceTimeSemanticStage):
            stage.grad_checkpointing = enable

    @torch.no_grad()
    def token_maps(self, x: Tensor) -> dict:
        """Where the semantic tokens look, over the tubelet tokens entering the module (the
        condensed stage's (T', H', W') grid: 16x14x14 at 32x224x224), heads averaged; tokens in the
        semantic grid's row-major order; every map sums to 1 over the tubelets:

        * ``semantic`` (B, tokens, T', H', W'): the first module block's attention over its
          window's neighbourhood (the weight on pooled tokens left out, the rest renormalised);
        * ``refine``: the second module block's attention over all tubelets (its weight on the
          semantic tokens left out, the rest renormalised);
        * ``owner`` (B, T', H', W'): the semantic token attending most to each tubelet in ``refine``.
        """
        h = None
        for i, h in self._stages(x, stop=self.stgm_stage - 1):
            pass
        if h is None:
            self._check_input(x)
            h = self.pos_drop(self.patch_embed(x))
        elif self.stgm_stage:
            h = self._merge(self.stgm_stage - 1, h)
        stage = self.features[2 * self.stgm_stage]
        B, T, H, W, _ = h.shape
        _, maps = stage(h, return_attn=True)
        N, n = T * H * W, math.prod(stage.grid)
        a = maps["semantic"].mean(1)                                         # (B * windows, m, K)
        nW, m = stage.semantic_index.shape[0], a.shape[1]
        a = a.view(B, nW, m, -1)
        sem = a.new_zeros(B, nW, m, N + n)
        sem.scatter_add_(-1, stage.semantic_index[None, :, None, :].expand_as(a), a)
        # window-major tokens -> the semantic grid's row-major order
        sem = _reverse(sem[..., :N].reshape(B * nW, m, N), stage.semantic_shape, stage.grid).reshape(B, n, N)
        sem = sem / sem.sum(-1, keepdim=True).clamp_min(1e-12)
        ref = maps["refine"].mean(1)[..., n:]
        ref = ref / ref.sum(-1, keepdim=True).clamp_min(1e-12)
        return dict(semantic=sem.view(B, n, T, H, W), refine=ref.view(B, n, T, H, W),
                    owner=ref.argmax(1).view(B, T, H, W),
                    owner_title="semantic token attending most to each tubelet (second module block)")


# =================================================================================== weights
_BLOCK = re.compile(r"^features\.(\d+)\.(\d+)\.(.+)$")
_TORCHVISION_MLP = {"mlp.0.": "mlp.fc1.", "mlp.3.": "mlp.fc2."}


def _architecture(sd: dict) -> tuple[tuple[int, ...], int] | None:
    """(depths, embed_dim) of a Video Swin state dict, or None when it is not one."""
    w = sd.get("patch_embed.proj.weight")
    if w is None or w.dim() != 5:
        return None
    depths = []
    for i in range(4):
        blocks = {int(m.group(2)) for k in sd if (m := _BLOCK.match(k)) and int(m.group(1)) == 2 * i}
        depths.append(max(blocks) + 1 if blocks else 0)
    return tuple(depths), int(w.shape[0])


def _name(depths, dim) -> str:
    known = {((2, 2, 6, 2), 96): "Video Swin-T (swin3d_t)", ((2, 2, 18, 2), 96): "Video Swin-S (swin3d_s)",
             ((2, 2, 18, 2), 128): "Video Swin-B (swin3d_b)"}
    return known.get((tuple(depths), dim), f"a Video Swin with depths {tuple(depths)} and width {dim}")


def _check_size(sd: dict, model: VideoSwin) -> None:
    arch = _architecture(sd)
    if arch is None:
        raise CheckpointError("the checkpoint is not a Video Swin (no 5-D patch_embed.proj.weight): load a torchvision "
                              "swin3d_t / swin3d_s state dict, or a checkpoint of this model")
    ours = (model.depths, model.embed_dim)
    if arch != ours:
        raise CheckpointError(f"the checkpoint is {_name(*arch)} but the model is {_name(*ours)}: pick the variant "
                              "of the checkpoint's size (video_swin_* / stvit_video_swin_{tiny,small}_...)")


def _finish(out: dict, model: VideoSwin, new_keys=(), source="the Video Swin checkpoint") -> dict:
    if isinstance(model.head, nn.Identity):   # a model without classifier takes the trunk only
        out = {k: v for k, v in out.items() if not k.startswith("head.")}
    w = out.get("patch_embed.proj.weight")
    if w is not None and w.dim() == 5 and w.shape[1] != model.in_chans:   # timm's channel adaptation, per frame
        out["patch_embed.proj.weight"] = _patch_kernel(w, model, None)
    return complete_state_dict(out, model, new_keys=new_keys, source=source)


def checkpoint_filter_fn(state_dict: dict, model: VideoSwin) -> dict[str, Tensor]:
    """A torchvision Video Swin state dict (or one of this model) for ``model``: as it is; a
    classifier of another size is dropped, a checkpoint of another size is a CheckpointError."""
    sd = unwrap_state_dict(state_dict)
    _check_size(sd, model)
    return _finish(dict(sd), model)


def stvit_checkpoint_filter_fn(state_dict: dict, model: STViTVideoSwin) -> dict[str, Tensor]:
    """A torchvision Video Swin state dict of the same size, or an STViT-Video-Swin checkpoint, for
    ``model``: Swin blocks as they are; in the semantic blocks ``attn.q`` = first third of
    ``attn.qkv``, ``attn.kv`` the rest, ``mlp.0`` / ``mlp.3`` -> ``mlp.fc1`` / ``mlp.fc2``, the
    relative position table and index dropped; LayerScale and global centres new."""
    sd = unwrap_state_dict(state_dict)
    _check_size(sd, model)
    if any(k.endswith(("global_centers", "layer_scale_1")) or ".attn.kv." in k for k in sd):
        return _finish(dict(sd), model, source="the STViT-Video-Swin checkpoint")
    stage = model.features[2 * model.stgm_stage]
    out = {}
    for k, v in sd.items():
        m = _BLOCK.match(k)
        if not (m and int(m.group(1)) == 2 * model.stgm_stage and int(m.group(2)) >= stage.stgm_start):
            out[k] = v
            continue
        prefix, suffix = f"features.{m.group(1)}.{m.group(2)}", m.group(3)
        if suffix.startswith("attn.relative_position"):
            continue
        if suffix.startswith("attn.qkv."):
            kind = suffix.rsplit(".", 1)[-1]
            q, kv, _, _ = split_qkv(v)
            out[f"{prefix}.attn.q.{kind}"], out[f"{prefix}.attn.kv.{kind}"] = q, kv
            continue
        for old, new in _TORCHVISION_MLP.items():
            if suffix.startswith(old):
                suffix = new + suffix[len(old):]
        out[f"{prefix}.{suffix}"] = v
    return _finish(out, model, new_keys=("*.layer_scale_1", "*.layer_scale_2", "*.global_centers"),
                   source="the torchvision Video Swin checkpoint")


# ============================================================================== registration
_TV = "https://download.pytorch.org/models/"


def _cfg(url: str, **kwargs) -> dict:
    return {
        "url": url, "num_classes": 400, "input_size": (3, 32, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bilinear", "fixed_input_size": True,
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "bsd-3-clause",
        "paper_ids": "arXiv:2106.13230", **kwargs,
    }


_STVIT_NOTE = ("torchvision's Kinetics-400 Video Swin weights converted by the checkpoint filter: an initialisation "
               "to fine-tune, not a trained STViT",)
default_cfgs = generate_default_cfgs({
    "video_swin_tiny_patch2x4x4_window8x7x7.tv_k400": _cfg(_TV + "swin3d_t-7615ae03.pth"),
    "video_swin_small_patch2x4x4_window8x7x7.tv_k400": _cfg(_TV + "swin3d_s-da41c237.pth"),
    "stvit_video_swin_tiny_patch2x4x4_window8x7x7.tv_k400_video_swin": _cfg(
        _TV + "swin3d_t-7615ae03.pth", paper_ids="arXiv:2303.08685", notes=_STVIT_NOTE),
    "stvit_video_swin_small_patch2x4x4_window8x7x7.tv_k400_video_swin": _cfg(
        _TV + "swin3d_s-da41c237.pth", paper_ids="arXiv:2303.08685", notes=_STVIT_NOTE),
    # 4 frames of 64x64: a 2x4x4 stage-3 map (one window, shrunk from 8x7x7 as Video Swin does)
    **{f"test_{family}": _cfg("", input_size=(3, 4, 64, 64), notes=(
        "a small untrained variant for fast generic tests (timm's test_* convention); no weights",))
       for family in ("video_swin", "stvit_video_swin")},
})

_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_TEST = dict(embed_dim=32, depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8))


def _video_swin(cls, variant: str, filter_fn, pretrained: bool, arch: dict, kwargs: dict):
    return _create(cls, variant, pretrained, filter_fn, kwargs.pop("out_indices", (0, 1, 2, 3)), **dict(arch, **kwargs))


@register_model
def video_swin_tiny_patch2x4x4_window8x7x7(pretrained: bool = False, **kwargs) -> VideoSwin:
    """torchvision's Video Swin-T (``swin3d_t``): 2x4x4 patches, 8x7x7 windows, 32 frames at 224."""
    return _video_swin(VideoSwin, "video_swin_tiny_patch2x4x4_window8x7x7", checkpoint_filter_fn, pretrained,
                       _TINY, kwargs)


@register_model
def video_swin_small_patch2x4x4_window8x7x7(pretrained: bool = False, **kwargs) -> VideoSwin:
    """torchvision's Video Swin-S (``swin3d_s``): 2x4x4 patches, 8x7x7 windows, 32 frames at 224."""
    return _video_swin(VideoSwin, "video_swin_small_patch2x4x4_window8x7x7", checkpoint_filter_fn, pretrained,
                       _SMALL, kwargs)


@register_model
def stvit_video_swin_tiny_patch2x4x4_window8x7x7(pretrained: bool = False, **kwargs) -> STViTVideoSwin:
    """STViT on Video Swin-T: 2x3x3 semantic tokens per 8x7x7 window from stage-3 block 5 on."""
    return _video_swin(STViTVideoSwin, "stvit_video_swin_tiny_patch2x4x4_window8x7x7", stvit_checkpoint_filter_fn,
                       pretrained, _TINY, kwargs)


@register_model
def stvit_video_swin_small_patch2x4x4_window8x7x7(pretrained: bool = False, **kwargs) -> STViTVideoSwin:
    """STViT on Video Swin-S: 2x3x3 semantic tokens per 8x7x7 window from stage-3 block 13 on."""
    return _video_swin(STViTVideoSwin, "stvit_video_swin_small_patch2x4x4_window8x7x7", stvit_checkpoint_filter_fn,
                       pretrained, _SMALL, kwargs)


@register_model
def test_video_swin(pretrained: bool = False, **kwargs) -> VideoSwin:
    """A small Video Swin for fast tests (width 32, Swin-T's depths, 4 frames of 64x64)."""
    return _video_swin(VideoSwin, "test_video_swin", checkpoint_filter_fn, pretrained, _TEST, kwargs)


@register_model
def test_stvit_video_swin(pretrained: bool = False, **kwargs) -> STViTVideoSwin:
    """A small STViT-Video-Swin for fast tests (width 32, Swin-T's depths, 4 frames of 64x64)."""
    return _video_swin(STViTVideoSwin, "test_stvit_video_swin", stvit_checkpoint_filter_fn, pretrained, _TEST,
                       kwargs)
