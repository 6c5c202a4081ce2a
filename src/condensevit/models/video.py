"""Video recognition on space-time tubelets: a joint space-time ViT and its STViT / LookupViT forms.

Clips are (B, C, T, H, W). A tubelet embedding (ViViT, Arnab et al. 2021) cuts them into
``tubelet_frames x patch x patch`` tubelets, 2 x 16 x 16 by default, so 16 frames at 224 give a
(T', H', W') = (8, 14, 14) grid of 1,568 tokens: eight times an image's, and attention cost grows with
the square. The three families share this stem and differ in what follows it:

* ``vit_video_*`` (:class:`VideoViT`), the baseline, ViViT's model 1 ("spatio-temporal attention"):
  ordinary ViT blocks over all tokens, final LayerNorm, mean of the tokens, linear head.
* ``stvit_video_*`` (:class:`STViTVideo`): the same trunk with STViT's semantic token generation
  module after layer 4. Initial centres are pooled from a grid of 3-D windows over the token
  volume, by default (2, 4, 4) = 32 tokens (windows of 4 x 4 x 4 tubelets, i.e. 8 frames x 64 x 64
  px, after padding 14 evenly to 16); then the image form's two module layers
  (:class:`~condensevit.models.stvit.SemanticTokenBlock`) and ordinary blocks on the semantic tokens.
* ``lookupvit_video_*`` (:class:`LookupViTVideo`): LookupViT's blocks
  (:class:`~condensevit.models.lookupvit.LookupViTBlock`) with the tubelet tokens as lookup tokens
  and a compressed grid over (time, height, width), by default (4, 5, 5) = 100 tokens, made by an
  antialiased trilinear resize of the lookup-token volume (after the position embedding).

Choices the papers leave open (each made here, named options where reasonable):

* Position embedding: one learned joint embedding of shape (1, T', H', W', C) (ViViT model 1; a
  separable spatial + temporal one would have fewer parameters, but the joint one is the simplest
  faithful form and an image embedding maps onto it exactly).
* No class token: the head averages the tokens it is given (all tokens for the baseline, the
  semantic tokens for STViT, the compressed tokens, or both streams, for LookupViT), the head
  convention of the whole library; an image checkpoint's class token and its position are dropped.
* The STViT scoring network's depthwise conv is 3x3x3 (the image form's 3x3, over time as well);
  semantic tokens carry no position embedding (as in the image form); their count and the module's
  position stay configurable (``semantic_grid``, ``stgm_start``, ``stgm_depth``).
* LookupViT's compressed tokens come from the lookup volume by :func:`~condensevit.layers.spacetime.resize_volume`,
  antialiased by default (each compressed token averages its whole cell, the image form's choice);
  any (t, h, w) up to the tubelet grid runs with the same weights (``compressed_grid=(t, h, w)``
  per call, ``train_grids`` sampled per training step as in the image form).
* Initialisation from an image checkpoint (timm ViT / DeiT, or our image STViT / LookupViT), in each
  family's ``checkpoint_filter_fn``: the 2-D patch kernel is inflated over the tubelet's frames
  (``patch_inflation='central'``, ViViT's central-frame initialisation, the better of the two in
  ViViT's input-encoding ablation on Kinetics-400, or ``'average'``, I3D's inflation, under which a
  clip of one repeated frame embeds exactly as that image); the spatial position embedding is
  resampled to (H', W') and repeated over the T' steps (a joint embedding that starts as the
  spatial one plus a zero temporal one); the blocks map by the image family's own filter. Video
  checkpoints of the same family load too (their position embedding resampled, trilinear, when the
  grid differs).
* Input: exactly ``num_frames`` frames of ``img_size``; anything else is a ValueError that names
  the fix (the data sets in :mod:`condensevit.data.video` sample a fixed number of frames).
"""

import math
import numbers
import random
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm, resample_patch_embed, trunc_normal_
from timm.models import adapt_input_conv, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg
from timm.models._features import FeatureGetterNet, feature_take_indices
from timm.models._features_fx import register_notrace_function
from timm.models._input import update_model_args
from timm.models._manipulate import checkpoint, named_apply, reinit_non_persistent_buffers
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import Tensor

from ..layers.pooling import POOL_MODES, WindowPool
from ..layers.tracing import check_clip_layout, is_fx_proxy, shape_str
from ..layers.spacetime import (
    PATCH_INFLATIONS, TubeletEmbed, inflate_patch_embed, resample_pos_embed_3d, resize_volume, tile_pos_embed,
)
from . import lookupvit as _lookupvit
from . import stvit as _stvit
from ._builder import (CheckpointError, as_positive_ints, build, complete_state_dict, new_classifier,
                       unwrap_state_dict)
from .lookupvit import LookupViTBlock, _ensure_lookup_update, _resolve_pool
from .stvit import SemanticTokenBlock, STGMSchedule, run_stgm_blocks

__all__ = [
    "VideoViT", "STViTVideo", "LookupViTVideo", "checkpoint_filter_fn", "stvit_checkpoint_filter_fn",
    "lookupvit_checkpoint_filter_fn",
]

LOOKUP_POOLS = ("compressed", "both")
_OUTPUT_FMTS = ("NCHW", "NCTHW", "NLC")   # 'NCHW' is timm's name for channels-first: (B, C, T', H', W') here


@register_notrace_function   # one leaf node for timm's fx feature extraction ...
@torch.fx.wrap               # ... and for torch.fx.symbolic_trace: the check runs, with the same error, in the graph
def _check_clips(x: Tensor, in_chans: int, num_frames: int, tubelet_frames: int, img_size: Tuple[int, int],
                 patch_size: int) -> None:
    """ValueError unless ``x`` is (B, in_chans, num_frames, *img_size) clips; the message names the fix."""
    want = f"(B, {in_chans}, {num_frames}, {img_size[0]}, {img_size[1]})"
    if x.dim() == 4:
        raise ValueError(
            f"input of shape {shape_str(x)} is a batch of images; video models take clips {want} "
            f"(B, C, T, H, W): stack {num_frames} frames on dim 2")
    if x.dim() != 5:
        raise ValueError(f"input of shape {shape_str(x)} is not a batch of clips {want} (B, C, T, H, W)")
    check_clip_layout(x, in_chans)
    C, T, H, W = x.shape[1], x.shape[2], x.shape[3], x.shape[4]
    if C != in_chans:
        raise ValueError(
            f"the clips have {C} channels but the model takes {in_chans} (input {shape_str(x)}, expected "
            f"{want}); convert the frames (e.g. grey to RGB), or build the model with in_chans={C}")
    if T != num_frames:
        kt = tubelet_frames
        if T < num_frames:
            why = f"fewer than the {num_frames} frames this model takes"
        elif T % kt != 0:
            why = f"not a multiple of the tubelet's {kt} frames"
        else:
            why = f"more than the {num_frames} frames this model takes"
        usable = T - T % kt
        rebuild = f", or build the model with num_frames={usable}" if usable >= kt else ""
        raise ValueError(
            f"the clips have {T} frames, {why} (input {shape_str(x)}, expected {want}); sample "
            f"{num_frames} frames per clip (e.g. condensevit.data.video.ClipFolder(num_frames="
            f"{num_frames})){rebuild}")
    if H != img_size[0] or W != img_size[1]:
        raise ValueError(
            f"the frames are {H}x{W} but the model was built for {img_size[0]}x{img_size[1]} (input "
            f"{shape_str(x)}, expected {want}); resize the frames, or build the model with img_size=({H}, {W}) "
            f"(a multiple of the patch size {patch_size})")


_as_ints = as_positive_ints  # the name this module used


class _VideoModel(nn.Module):
    """The stem (tubelet embedding, joint space-time position embedding), the input checks and the
    timm helpers the three video families share."""

    def _init_stem(self, *, img_size, num_frames: int, tubelet_frames: int, patch_size: int, in_chans: int,
                   embed_dim: int, num_heads: int, num_classes: int, patch_inflation: str, pos_drop_rate: float,
                   drop_rate: float, device=None, dtype=None) -> None:
        img_size = _as_ints(img_size, "img_size", 2, "224 or (224, 224)")
        for name, v in (("num_frames", num_frames), ("tubelet_frames", tubelet_frames), ("patch_size", patch_size)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive int")
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}; use a multiple "
                             f"of {patch_size}")
        if num_frames % tubelet_frames:
            nearest = max(1, num_frames // tubelet_frames) * tubelet_frames
            raise ValueError(f"num_frames={num_frames} is not divisible by tubelet_frames={tubelet_frames}; use a "
                             f"multiple of {tubelet_frames}, e.g. num_frames={nearest}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}; pick a divisor")
        if patch_inflation not in PATCH_INFLATIONS:
            raise ValueError(f"patch_inflation={patch_inflation!r} is not one of {PATCH_INFLATIONS}")
        self.img_size = img_size
        self.num_frames, self.tubelet_frames, self.patch_size = int(num_frames), int(tubelet_frames), int(patch_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0
        self.patch_inflation = patch_inflation
        self.grad_checkpointing = False
        self.patch_embed = TubeletEmbed(img_size=img_size, num_frames=num_frames, patch_size=patch_size,
                                        tubelet_frames=tubelet_frames, in_chans=in_chans, embed_dim=embed_dim,
                                        device=device, dtype=dtype)
        self.grid_size = self.patch_embed.grid_size                      # (T', H', W')
        self.pos_embed = nn.Parameter(torch.zeros(1, *self.grid_size, embed_dim, device=device, dtype=dtype))
        # the checkpoint filters adapt the stem to in_chans themselves (after inflating a 2-D kernel,
        # which timm's adapt_input_conv cannot take): timm's loader leaves it alone
        self._traits = {"first_conv": None}
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.head_drop = nn.Dropout(drop_rate)

    @property
    def input_size(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of the clips this model takes."""
        return (self.in_chans, self.num_frames, *self.img_size)

    # ---- input -----------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        _check_clips(x, self.in_chans, self.num_frames, self.tubelet_frames, self.img_size, self.patch_size)

    def _embed(self, x: Tensor) -> Tensor:
        """Clips -> (B, T', H', W', C) tubelet tokens with the position embedding added."""
        self._check_input(x)
        return self.pos_drop(self.patch_embed(x) + self.pos_embed)

    def _run(self, block: nn.Module, *args):
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(block, *args)
        return block(*args)

    @staticmethod
    def _format(tokens: Tensor, grid: Sequence[int], output_fmt: str) -> Tensor:
        """(B, N, C) tokens -> themselves ('NLC') or the (B, C, *grid) map."""
        if output_fmt == "NLC":
            return tokens
        return tokens.reshape(tokens.shape[0], *grid, tokens.shape[-1]).movedim(-1, 1).contiguous()

    @staticmethod
    def _check_output_fmt(output_fmt: str) -> None:
        if output_fmt not in _OUTPUT_FMTS:
            raise ValueError(f"output_fmt {output_fmt!r} is not supported; use 'NCHW' (channels-first maps "
                             "(B, C, T', H', W'); 'NCTHW' is the same) or 'NLC' (tokens)")

    # ---- timm helpers ----------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def _new_head(self, num_classes: int) -> nn.Module:
        """A fresh classifier on the model's device and dtype, in its train/eval mode."""
        self.num_classes = num_classes
        return new_classifier(self, self.embed_dim, num_classes)

    def _init_trunk_weights(self) -> None:
        named_apply(init_weights_vit_timm, self)   # Linear: trunc-normal(.02), zero bias; scorer: its own
        trunc_normal_(self.pos_embed, std=0.02)

    def init_weights(self) -> None:
        """(Re)initialise every parameter and the computed buffers (also after ``to_empty``)."""
        self._init_trunk_weights()
        if getattr(self, "global_centers", None) is not None:
            trunc_normal_(self.global_centers, std=0.02)
        reinit_non_persistent_buffers(self)


def _block_args(mlp_ratio, qkv_bias, proj_drop_rate, attn_drop_rate, **dd) -> dict:
    # timm's LayerNorm (eps 1e-6) is the ViT's, so converted image weights behave the same
    return dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                norm_layer=LayerNorm, act_layer=nn.GELU, **dd)


def _drop_path_rates(rate: float, depth: int) -> list[float]:
    return [rate * i / max(depth - 1, 1) for i in range(depth)]   # stochastic depth, linear


# ================================================================================== baseline
class VideoViT(_VideoModel):
    """Joint space-time ViT (ViViT model 1): every block attends over all T' x H' x W' tubelets.

    Args (keyword-only):
        img_size, num_frames, in_chans: clip geometry (H, W), T and C; the model takes exactly these.
        patch_size, tubelet_frames: a tubelet is ``tubelet_frames x patch_size x patch_size``.
        num_classes, global_pool: classifier ('avg' over the tokens, or '' for none).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the ViT trunk (ViT-Ti/S/B widths).
        patch_inflation: how ``checkpoint_filter_fn`` makes a 2-D patch kernel 3-D: 'central' or 'average'.
        drop_rate, pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate: regularisation.
        device, dtype: where and in which precision parameters and buffers are created (timm's
            factory keywords; ``device='meta'``, then ``to_empty`` and ``init_weights()``).
    """

    def __init__(
            self,
            *,
            img_size: int | tuple[int, int] = 224,
            num_frames: int = 16,
            tubelet_frames: int = 2,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 400,
            global_pool: str = "avg",
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            patch_inflation: str = "central",
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool {global_pool!r} is not supported; use 'avg' (mean of the tokens) or ''")
        self._init_stem(img_size=img_size, num_frames=num_frames, tubelet_frames=tubelet_frames,
                        patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, num_heads=num_heads,
                        num_classes=num_classes, patch_inflation=patch_inflation, pos_drop_rate=pos_drop_rate,
                        drop_rate=drop_rate, **dd)
        self.global_pool = global_pool
        common = _block_args(mlp_ratio, qkv_bias, proj_drop_rate, attn_drop_rate, **dd)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, drop_path=dp, **common) for dp in _drop_path_rates(drop_path_rate, depth)])
        self.norm = LayerNorm(embed_dim, **dd)
        self.head = self._new_head(num_classes)
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, temporal_reduction=tubelet_frames,
                                  module=f"blocks.{i}") for i in range(depth)]
        self._init_trunk_weights()

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, T, H, W) clips -> (B, T'*H'*W', embed_dim) tokens (time-major), after the final norm."""
        x = self._embed(x).flatten(1, 3)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x)
            else:
                x = blk(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Outputs of the blocks ``indices`` (an int n: the last n) as (B, C, T', H', W') maps, or
        (B, N, C) tokens with 'NLC'. Returns the list, or ``(forward_features output, list)``."""
        self._check_output_fmt(output_fmt)
        take, max_index = feature_take_indices(len(self.blocks), indices)
        x = self._embed(x).flatten(1, 3)
        last = max_index if (stop_early or intermediates_only) else len(self.blocks) - 1
        out = []
        for i in range(last + 1):
            x = self._run(self.blocks[i], x)
            if i in take:
                out.append(self._format(self.norm(x) if norm else x, self.grid_size, output_fmt))
        if intermediates_only:
            return out
        return self.norm(x), out

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool {global_pool!r} is not supported; use 'avg' or ''")
            self.global_pool = global_pool
        self.head = self._new_head(num_classes)


# ===================================================================================== STViT
class STViTVideo(STGMSchedule, _VideoModel):
    """STViT on the joint space-time ViT: semantic tokens pooled over space and time.

    Layers ``0 .. stgm_start-1`` are ordinary blocks on the tubelet tokens X; the module's first
    layer takes the centres P pooled from a ``semantic_grid`` of 3-D windows over X as query and X
    as key/value; its later layers take the semantic tokens (plus the learned global centres G, in
    the first of them) as query and [semantic, X] as key/value; X is then discarded and the
    remaining blocks run on the semantic tokens only. Head: final norm, mean, linear.

    Args (keyword-only): those of :class:`VideoViT`, and
        semantic_grid: windows along (T', H', W'); one semantic token per window (default (2, 4, 4)).
        stgm_start, stgm_depth, center_pool, global_centers: as in the image form
            (:class:`~condensevit.models.stvit.STViT`).
        device, dtype: timm's factory keywords, as in :class:`VideoViT`.
    """

    def __init__(
            self,
            *,
            img_size: int | tuple[int, int] = 224,
            num_frames: int = 16,
            tubelet_frames: int = 2,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 400,
            global_pool: str = "avg",
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            semantic_grid: tuple[int, int, int] = (2, 4, 4),
            stgm_start: int = 4,
            stgm_depth: int = 2,
            center_pool: str = "weighted",
            global_centers: bool = True,
            patch_inflation: str = "central",
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool {global_pool!r} is not supported; use 'avg' (mean of the semantic "
                             "tokens) or ''")
        semantic_grid = _as_ints(semantic_grid, "semantic_grid", 3, "(2, 4, 4) windows along (T', H', W')")
        if isinstance(stgm_depth, bool) or not isinstance(stgm_depth, numbers.Integral) or stgm_depth < 1:
            raise ValueError(f"stgm_depth={stgm_depth!r} must be at least 1 (the module's first layer makes the "
                             "semantic tokens)")
        if stgm_start < 0 or stgm_start + stgm_depth > depth:
            raise ValueError(
                f"the semantic token module (stgm_start={stgm_start}, stgm_depth={stgm_depth}) does not fit in "
                f"depth={depth} layers: it needs 0 <= stgm_start and stgm_start + stgm_depth <= depth; use "
                f"stgm_start <= {max(depth - stgm_depth, 0)} or a smaller stgm_depth")
        if center_pool not in POOL_MODES:
            raise ValueError(f"center_pool={center_pool!r} is not one of {POOL_MODES}; pick one of them")
        self._init_stem(img_size=img_size, num_frames=num_frames, tubelet_frames=tubelet_frames,
                        patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, num_heads=num_heads,
                        num_classes=num_classes, patch_inflation=patch_inflation, pos_drop_rate=pos_drop_rate,
                        drop_rate=drop_rate, **dd)
        self.global_pool = global_pool
        self.semantic_grid = semantic_grid
        self.num_semantic_tokens = math.prod(semantic_grid)
        self.stgm_start, self.stgm_depth = int(stgm_start), int(stgm_depth)
        self.stgm_end = self.stgm_start + self.stgm_depth
        # the image form's pooling on a (T', H', W') volume; a ValueError when the volume is too small
        self.center_pool = WindowPool(embed_dim, self.grid_size, semantic_grid, center_pool,
                                      norm_layer=LayerNorm, act_layer=nn.GELU, **dd)
        self.global_centers = nn.Parameter(torch.zeros(1, self.num_semantic_tokens, embed_dim, **dd)) \
            if global_centers and stgm_depth >= 2 else None
        common = _block_args(mlp_ratio, qkv_bias, proj_drop_rate, attn_drop_rate, **dd)
        dpr = _drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([
            SemanticTokenBlock(embed_dim, num_heads, attend_to_semantic=i > stgm_start, drop_path=dpr[i], **common)
            if self.stgm_start <= i < self.stgm_end else Block(embed_dim, num_heads, drop_path=dpr[i], **common)
            for i in range(depth)])
        self.norm = LayerNorm(embed_dim, **dd)
        self.head = self._new_head(num_classes)
        window = self.center_pool.window_size
        self.feature_info = [
            dict(num_chs=embed_dim, module=f"blocks.{i}",
                 **(dict(reduction=patch_size, temporal_reduction=tubelet_frames, tokens="image")
                    if i < stgm_start else
                    dict(reduction=max(window[1:]) * patch_size, temporal_reduction=window[0] * tubelet_frames,
                         tokens="semantic")))
            for i in range(depth)]
        self._init_trunk_weights()
        if self.global_centers is not None:
            trunc_normal_(self.global_centers, std=0.02)

    def _forward_blocks(self, x: Tensor, take=(), stop: int | None = None, norm: bool = False,
                        output_fmt: str = "NLC") -> tuple[Tensor, list[Tensor]]:
        """Blocks up to ``stop`` on (B, N, C) tubelet tokens; the outputs of ``take`` collected.
        Returns the last tokens (tubelet tokens if no module layer ran, else semantic ones)."""
        out = []
        last = run_stgm_blocks(self, x, take, stop,
                               lambda y, grid: out.append(self._format(self.norm(y) if norm else y, grid, output_fmt)))
        return last, out

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, T, H, W) clips -> (B, num_semantic_tokens, embed_dim), after the final norm."""
        x, _ = self._run_schedule(self._embed(x).flatten(1, 3), [], len(self.blocks) - 1)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Outputs of the blocks ``indices``: before the module the tubelet map (B, C, T', H', W'); from
        the module on the semantic tokens laid out as their window grid (B, C, *semantic_grid)
        (``feature_info[i]['tokens']`` says which); 'NLC' gives (B, tokens, C)."""
        self._check_output_fmt(output_fmt)
        take, max_index = feature_take_indices(len(self.blocks), indices)
        x, out = self._forward_blocks(self._embed(x).flatten(1, 3), set(take),
                                      stop=max_index if (stop_early or intermediates_only) else None, norm=norm,
                                      output_fmt=output_fmt)
        if intermediates_only:
            return out
        return self.norm(x), out

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if max_index < self.stgm_start:
            self.center_pool = None
        if max_index <= self.stgm_start:
            self.global_centers = None
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def token_maps(self, x: Tensor) -> dict[str, Tensor]:
        """Where each semantic token looks, over the tubelet tokens, each map (B, n, T', H', W')
        summing to 1 over all space-time tokens (plain attention path, no kept state):

        - ``'center_pool'``: its initial pooling weights (for 'max', the share of channels whose
          maximum each tubelet holds);
        - ``'blocks.{i}'`` for each module layer i: its attention over the tubelet tokens, averaged
          over heads (second-kind layers also attend to the semantic tokens: their tubelet part is
          renormalised to sum to 1);
        - ``'owner'`` (B, T', H', W'), int64: the semantic token whose last module-layer map is
          largest at each tubelet (``'owner_title'`` says so in words).
        """
        x, _ = self._forward_blocks(self._embed(x).flatten(1, 3), stop=self.stgm_start - 1)
        B, n = x.shape[0], self.num_semantic_tokens
        semantic, weights = self.center_pool(x, return_weights=True)
        maps = {"center_pool": weights.reshape(B, n, *self.grid_size)}
        for i in range(self.stgm_start, self.stgm_end):
            offset = self.global_centers if i == self.stgm_start + 1 else None
            semantic, attn = self.blocks[i](semantic, x, offset, return_attn=True)
            attn = attn.mean(dim=1)
            if self.blocks[i].attend_to_semantic:
                attn = attn[..., n:]
                attn = attn / attn.sum(dim=-1, keepdim=True)
            maps[f"blocks.{i}"] = attn.reshape(B, n, *self.grid_size)
        maps["owner"] = maps[f"blocks.{self.stgm_end - 1}"].argmax(dim=1)
        maps["owner_title"] = "semantic token attending most to each tubelet (last module layer)"
        return maps

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"} | ({"global_centers"} if self.global_centers is not None else set())

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        # the pooling belongs with the first module layer, the global centres with the layer using them
        return dict(
            stem=r"^pos_embed|patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^center_pool", (self.stgm_start,)),
                    (r"^global_centers", (self.stgm_start + 1,)), (r"^norm", (99999,))])

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool {global_pool!r} is not supported; use 'avg' or ''")
            self.global_pool = global_pool
        self.head = self._new_head(num_classes)


# ================================================================================= LookupViT
class LookupViTVideo(_VideoModel):
    __jit_ignored_attributes__ = ["_grid_rng"]   # Python RNG for train_grids: eager mode only
    """LookupViT on tubelets: the (T', H', W') tubelet tokens are the lookup tokens; a compressed
    (t, h, w) grid of tokens, resized from them once before the first block, gets the full blocks.

    Args (keyword-only): those of :class:`VideoViT`, and
        compressed_grid: default (t, h, w) compressed grid, at most the tubelet grid per axis.
        train_grids: grids sampled, one per forward call, in train mode (empty: always
            ``compressed_grid``); e.g. ``((2, 3, 3), (4, 5, 5), (4, 7, 7))``.
        train_grid_seed: seed of the Python RNG that samples ``train_grids`` (no device sync).
        lookup_mlp_ratio: hidden width of the lookup tokens' MLP, as a fraction of ``embed_dim``.
        pool: the tokens the head reads: 'compressed' or 'both' (both streams).
        global_pool: 'avg' (their mean) or '' (none), or a ``pool`` value; as in the image form.
        last_lookup_update: build the last block's scatter and lookup MLP; None: only with
            ``pool='both'`` (as in the image form: with 'compressed' nothing reads them;
            ``features_only=True`` builds them).
        resize_antialias: antialiased trilinear resize when making the compressed tokens.
        device, dtype: timm's factory keywords, as in :class:`VideoViT`.
    """

    def __init__(
            self,
            *,
            img_size: int | tuple[int, int] = 224,
            num_frames: int = 16,
            tubelet_frames: int = 2,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 400,
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            lookup_mlp_ratio: float = 0.5,
            compressed_grid: tuple[int, int, int] = (4, 5, 5),
            train_grids: Sequence[tuple[int, int, int]] = (),
            train_grid_seed: int = 0,
            pool: str = "compressed",
            global_pool: str = "avg",
            last_lookup_update: bool | None = None,
            qkv_bias: bool = True,
            resize_antialias: bool = True,
            patch_inflation: str = "central",
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        pool, global_pool = _resolve_pool(pool, global_pool)
        self._init_stem(img_size=img_size, num_frames=num_frames, tubelet_frames=tubelet_frames,
                        patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, num_heads=num_heads,
                        num_classes=num_classes, patch_inflation=patch_inflation, pos_drop_rate=pos_drop_rate,
                        drop_rate=drop_rate, **dd)
        self.pool, self.global_pool = pool, global_pool
        self.resize_antialias = resize_antialias
        self.compressed_grid = self._check_grid(compressed_grid, "compressed_grid")
        self.train_grids = tuple(sorted({self._check_grid(g, "train_grids entry") for g in train_grids}))
        self._grid_rng = random.Random(train_grid_seed)
        dpr = _drop_path_rates(drop_path_rate, depth)
        last_update = pool == "both" if last_lookup_update is None else bool(last_lookup_update)
        self.blocks = nn.ModuleList([
            LookupViTBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio, lookup_mlp_ratio=lookup_mlp_ratio,
                           qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i],
                           lookup_update=i < depth - 1 or last_update, **dd)
            for i in range(depth)])
        self.norm = LayerNorm(embed_dim, **dd)
        self.head = self._new_head(num_classes)
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, temporal_reduction=tubelet_frames,
                                  module=f"blocks.{i}") for i in range(depth)]
        self._init_trunk_weights()

    def _check_grid(self, grid, name: str) -> tuple[int, int, int]:
        grid = _as_ints(grid, name, 3, "(4, 5, 5) compressed tokens along (time, height, width)")
        if any(g > s for g, s in zip(grid, self.grid_size)):
            raise ValueError(
                f"{name}={grid} is larger than the tubelet grid {self.grid_size} along some axis; the compressed "
                f"grid must be at most the tubelet grid (pick at most {self.grid_size}, or more frames / a larger "
                "image)")
        return grid

    def _grid(self, compressed_grid: Optional[Tuple[int, int, int]]) -> Tuple[int, int, int]:
        """This call's grid (as the image form's ``_grid``; TorchScript: the argument or the default)."""
        if torch.jit.is_scripting():
            return self.compressed_grid if compressed_grid is None else compressed_grid
        if is_fx_proxy(compressed_grid):
            # torch.fx made the argument a graph input: trace at the default grid; the graph refuses
            # another one at run time
            _lookupvit._check_traced_grid(compressed_grid, self.compressed_grid)   # (fx patches it there)
            compressed_grid = None
        if compressed_grid is not None:
            return self._check_grid(compressed_grid, "compressed_grid")
        if self.training and self.train_grids:
            return self._grid_rng.choice(self.train_grids)   # Python RNG: no device sync
        return self.compressed_grid

    def _streams(self, x: Tensor, compressed_grid: Optional[Tuple[int, int, int]]) -> Tuple[Tensor, Tensor]:
        """Clips -> compressed (B, M, C) and lookup (B, N, C) tokens."""
        grid = self._grid(compressed_grid)
        x = self._embed(x)                                               # (B, T', H', W', C)
        compressed = resize_volume(x.permute(0, 4, 1, 2, 3), grid, antialias=self.resize_antialias)
        return compressed.flatten(2).transpose(1, 2), x.flatten(1, 3)

    def _pooled_tokens(self, c: Tensor, l: Tensor) -> Tensor:
        return self.norm(c) if self.pool == "compressed" else self.norm(torch.cat([c, l], dim=1))

    def forward_features(self, x: Tensor, compressed_grid: Optional[Tuple[int, int, int]] = None) -> Tensor:
        """Normalised tokens the head pools: (B, M, C) compressed tokens with ``pool='compressed'``,
        (B, M + N, C) compressed then lookup tokens with ``pool='both'``."""
        c, l = self._streams(x, compressed_grid)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            # the last lookup update cannot reach a head that pools only the compressed tokens
            update_lookup = i < last or self.pool == "both"
            if self.grad_checkpointing and not torch.jit.is_scripting():
                c, l = checkpoint(blk, c, l, update_lookup)
            else:
                c, l = blk(c, l, update_lookup)
        return self._pooled_tokens(c, l)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor, compressed_grid: Optional[Tuple[int, int, int]] = None) -> Tensor:
        return self.forward_head(self.forward_features(x, compressed_grid=compressed_grid))

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              compressed_grid=None):
        """Lookup-stream outputs of the chosen blocks: (B, C, T', H', W') maps, or (B, N, C) with 'NLC'.
        Returns the list when ``intermediates_only``, else ``(forward_features output, list)``."""
        self._check_output_fmt(output_fmt)
        take, max_index = feature_take_indices(len(self.blocks), indices)
        c, l = self._streams(x, compressed_grid)
        last = max_index if (stop_early or intermediates_only) else len(self.blocks) - 1
        out = []
        for i in range(last + 1):
            c, l = self._run(self.blocks[i], c, l, i < last or i in take or self.pool == "both")
            if i in take:
                out.append(self._format(self.norm(l) if norm else l, self.grid_size, output_fmt))
        if intermediates_only:
            return out
        return self._pooled_tokens(c, l), out

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take

    def token_maps(self, x: Tensor, compressed_grid=None, layer: int = -1) -> dict[str, Tensor]:
        """The shared-logit cross-attention of ``layer``, averaged over heads, through the plain path;
        the same keys and meanings as the image form's, with a time axis (M compressed tokens):

        * ``gather`` (B, M, T', H', W'): what each compressed token reads; sums to 1 over all tubelets.
        * ``scatter`` (B, M, T', H', W'): how much each tubelet reads each compressed token; sums to 1
          over the M compressed tokens at every tubelet (not over the tubelets).
        * ``owner`` / ``scatter_argmax`` (B, T', H', W'), int64: the compressed token each tubelet reads most.
        * ``gather_per_layer`` / ``scatter_per_layer`` (B, depth, M, T', H', W'): every layer.
        """
        depth = len(self.blocks)
        if not -depth <= layer < depth:
            raise ValueError(f"layer={layer} is out of range for {depth} blocks (use -{depth} .. {depth - 1})")
        c, l = self._streams(x, compressed_grid)
        B, M = c.shape[:2]
        gathers, scatters = [], []
        for blk in self.blocks:
            c, l, g, s = blk(c, l, update_lookup=True, return_attn=True)
            gathers.append(g.mean(dim=1))                     # (B, M, N)
            scatters.append(s.mean(dim=1).transpose(1, 2))    # (B, N, M) -> (B, M, N)
        gather = torch.stack(gathers, dim=1).reshape(B, depth, M, *self.grid_size)
        scatter = torch.stack(scatters, dim=1).reshape(B, depth, M, *self.grid_size)
        owner = scatter[:, layer].argmax(dim=1)
        return {
            "gather": gather[:, layer],
            "scatter": scatter[:, layer],
            "owner": owner,
            "scatter_argmax": owner,
            "owner_title": "compressed token each tubelet reads most (scatter)",
            "gather_per_layer": gather,
            "scatter_per_layer": scatter,
        }

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New classifier of ``num_classes`` (0: none) on the model's device, dtype and mode;
        ``global_pool`` as in the image form ('avg', '', 'compressed', 'both'; None keeps)."""
        if global_pool is not None:
            self.pool, self.global_pool = _resolve_pool(self.pool, global_pool, current=self.global_pool)
            if self.pool == "both":
                _ensure_lookup_update(self, self.blocks[-1], init_weights_vit_timm)
            update_model_args(self, pool=self.pool)   # timm's export rebuilds the model as it is now
        self.head = self._new_head(num_classes)


# =================================================================================== weights
_IMAGE_ONLY = ("cls_token", "dist_token", "reg_token", "mask_token", "head_dist.")
_TRUNK = ("blocks.", "norm.", "head.")


def _is_image_checkpoint(sd: dict[str, Tensor]) -> bool:
    w = sd.get("patch_embed.proj.weight")
    return w is not None and w.dim() == 4


def _source(sd: dict[str, Tensor]) -> str:
    return "the image checkpoint" if _is_image_checkpoint(sd) else "the video checkpoint"


def _pos_embed(v: Tensor, num_prefix: int, model: _VideoModel) -> Tensor:
    """Any position embedding we know -> (1, T', H', W', C) on the model's grid."""
    if v.shape[-1] != model.embed_dim:
        return v                                         # another width: complete_state_dict reports it
    if v.dim() == 3:                                     # timm ViT / DeiT: (1, prefix + g*g, C)
        for prefix in dict.fromkeys((num_prefix, 0)):
            n = v.shape[1] - prefix
            g = math.isqrt(max(n, 0))
            if n > 0 and g * g == n:
                return tile_pos_embed(v[:, prefix:].reshape(1, g, g, v.shape[-1]), model.grid_size)
        raise CheckpointError(
            f"pos_embed of shape {tuple(v.shape)} is not a square grid after {num_prefix} class/distillation/"
            "register tokens; it is not a ViT/DeiT checkpoint this converter understands")
    if v.dim() == 4:                                     # an image grid (1, H, W, C) (our LookupViT)
        return tile_pos_embed(v, model.grid_size)
    if v.dim() == 5:                                     # a video model's (1, T, H, W, C)
        return resample_pos_embed_3d(v, model.grid_size)
    raise CheckpointError(f"pos_embed of shape {tuple(v.shape)} is neither an image nor a video position embedding")


def _patch_kernel(v: Tensor, model: _VideoModel, inflation: str) -> Tensor:
    """An image (D, C, p, q) or video (D, C, t, p, q) patch kernel -> the model's tubelet kernel."""
    D, C, kt, kh, kw = model.patch_embed.proj.weight.shape
    if v.dim() == 4:
        if tuple(v.shape[-2:]) != (kh, kw):
            v = resample_patch_embed(v, [kh, kw])
        if v.shape[1] != C:                              # e.g. grey clips: timm's channel adaptation
            v = adapt_input_conv(C, v, base_chans=v.shape[1])
        return inflate_patch_embed(v, kt, inflation)
    if v.dim() == 5 and tuple(v.shape[-2:]) != (kh, kw):  # another patch size: resample each frame
        d, c, t = v.shape[:3]
        v = resample_patch_embed(v.reshape(d, c * t, *v.shape[-2:]), [kh, kw]).reshape(d, c, t, kh, kw)
    if v.dim() == 5 and v.shape[1] != C:                  # other channels: timm's adaptation, frames stacked
        d, c, t, p, q = v.shape
        v = adapt_input_conv(C, v.reshape(d, c, t * p, q), base_chans=c).reshape(d, C, t, p, q)
    return v


def _convert_stem(sd: dict[str, Tensor], model: _VideoModel, inflation: str | None) -> dict[str, Tensor]:
    """The checkpoint with its stem made the model's: image tokens (class, distillation, register)
    dropped, patch kernel inflated, position embedding tiled over time (or resampled), an averaging
    ViT's ``fc_norm`` read as ``norm``, and a classifier dropped when the model has none. An image
    STViT's scorer conv becomes a per-frame 3x3x3 one (zeros at the neighbouring steps) and its
    global centres are repeated for each temporal window."""
    inflation = inflation or model.patch_inflation
    num_prefix = sum(k in sd for k in ("cls_token", "dist_token")) + (
        sd["reg_token"].shape[1] if "reg_token" in sd else 0)
    if "fc_norm.weight" in sd and "norm.weight" not in sd:
        sd = {("norm." + k[len("fc_norm."):] if k.startswith("fc_norm.") else k): v for k, v in sd.items()}
    target = model.state_dict()
    out = {}
    for k, v in sd.items():
        if k.startswith(_IMAGE_ONLY) or (k.startswith("head.") and not any(t.startswith("head.") for t in target)):
            continue
        if k == "pos_embed":
            v = _pos_embed(v, num_prefix, model)
        elif k == "patch_embed.proj.weight":
            v = _patch_kernel(v, model, inflation)
        elif k == "center_pool.score.conv.weight" and v.dim() == 4 and k in target and target[k].dim() == 5:
            v = inflate_patch_embed(v, target[k].shape[2], "central")
        elif k == "global_centers" and k in target and v.shape[1] != target[k].shape[1] \
                and target[k].shape[1] == v.shape[1] * model.semantic_grid[0]:
            v = v.repeat(1, model.semantic_grid[0], 1)   # windows are time-major: one copy per time window
        out[k] = v
    return out


def _trunk_view(model: nn.Module, **attrs) -> nn.Module:
    """The model's blocks, final norm and head under their own names, in a module of the model's
    class name (for error messages), for an image family's filter to map and check the trunk."""
    view = type(type(model).__name__, (nn.Module,), {})()
    view.blocks, view.norm, view.head = model.blocks, model.norm, model.head
    for k, v in attrs.items():
        setattr(view, k, v)
    return view


def _split_trunk(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    trunk = {k: v for k, v in sd.items() if k.startswith(_TRUNK)}
    return trunk, {k: v for k, v in sd.items() if k not in trunk}


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: VideoViT,
                         patch_inflation: str | None = None) -> dict[str, Tensor]:
    """Weights of a timm ViT / DeiT image checkpoint, or of a :class:`VideoViT`, for ``model``.

    Image checkpoints: the patch kernel inflated over the tubelet's frames (``patch_inflation``,
    default the model's: 'central' or 'average'), the class token and its position dropped, the
    spatial position embedding resampled to (H', W') and repeated over T', the blocks, final norm
    and classifier (dropped when of another size) as they are. Video checkpoints: the position
    embedding resampled (trilinear) to the model's grid. Anything else raises a
    :class:`CheckpointError` naming the missing / unexpected / mismatched keys.
    """
    sd = unwrap_state_dict(state_dict)
    return complete_state_dict(_convert_stem(sd, model, patch_inflation), model, source=_source(sd))


def stvit_checkpoint_filter_fn(state_dict: dict[str, Tensor], model: STViTVideo,
                               patch_inflation: str | None = None) -> dict[str, Tensor]:
    """Weights of a timm ViT / DeiT, an image STViT, a :class:`VideoViT` or an :class:`STViTVideo`.

    The stem as in :func:`checkpoint_filter_fn`; the blocks by the image form's filter (module
    layers: ``attn.q`` = first third of ``attn.qkv``, ``attn.kv`` the rest); the scoring network and
    the global centres, which a ViT cannot have, keep the model's initial values.
    """
    sd = unwrap_state_dict(state_dict)
    trunk, out = _split_trunk(_convert_stem(sd, model, patch_inflation))
    view = _trunk_view(model, stgm_start=model.stgm_start, stgm_end=model.stgm_end)
    out.update(_stvit.checkpoint_filter_fn(trunk, view))
    return complete_state_dict(out, model, new_keys=("center_pool.*", "global_centers"), source=_source(sd))


def lookupvit_checkpoint_filter_fn(state_dict: dict[str, Tensor], model: LookupViTVideo,
                                   patch_inflation: str | None = None) -> dict[str, Tensor]:
    """Weights of a timm ViT / DeiT, an image LookupViT, a :class:`VideoViT` or a :class:`LookupViTVideo`.

    The stem as in :func:`checkpoint_filter_fn`; the blocks by the image form's filter (each ViT
    block onto the compressed stream's block and the gather of the same index; the scatter and the
    lookup MLP keep their initial values).
    """
    sd = unwrap_state_dict(state_dict)
    trunk, out = _split_trunk(_convert_stem(sd, model, patch_inflation))
    out.update(_lookupvit.checkpoint_filter_fn(trunk, _trunk_view(model)))
    return complete_state_dict(out, model, new_keys=_lookupvit.LOOKUP_ONLY_KEYS, source=_source(sd))


# ============================================================================== registration
def _cfg(image_weights: str, mean, std, **kwargs) -> dict:
    """Kinetics-400 label space; ``hf_hub_id`` names the timm image weights ``checkpoint_filter_fn`` inflates."""
    return {
        "url": "",
        "hf_hub_id": f"timm/{image_weights}",
        "num_classes": 400,
        "input_size": (3, 16, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": mean,
        "std": std,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "notes": (f"weights of the image model {image_weights}, inflated to tubelets by the checkpoint filter: "
                  "an initialisation to fine-tune on video, not a trained video model",),
        **kwargs,
    }


_VIT = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_DEIT = dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
_VIT_WEIGHTS = {"tiny": "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
                "small": "vit_small_patch16_224.augreg_in21k_ft_in1k",
                "base": "vit_base_patch16_224.augreg2_in21k_ft_in1k"}
_WIDTHS = {"tiny": dict(embed_dim=192, depth=12, num_heads=3), "small": dict(embed_dim=384, depth=12, num_heads=6),
           "base": dict(embed_dim=768, depth=12, num_heads=12),
           # the test_* variants: 4 frames of 64x64 (a 2x4x4 tubelet grid), width 64, 4 layers
           "test": dict(img_size=64, embed_dim=64, depth=4, num_heads=2)}

default_cfgs = generate_default_cfgs({
    **{f"vit_video_{s}_patch2x16_224.from_vit_{w.split('.')[1]}": _cfg(w, **_VIT)
       for s, w in _VIT_WEIGHTS.items()},
    **{f"stvit_video_{s}_patch2x16_224.from_deit_in1k": _cfg(f"deit_{s}_patch16_224.fb_in1k", **_DEIT)
       for s in _WIDTHS},
    **{f"lookupvit_video_{s}_patch2x16_224.from_vit_{w.split('.')[1]}": _cfg(w, **_VIT)
       for s, w in _VIT_WEIGHTS.items()},
    **{f"test_{family}": _cfg("", **_VIT, hf_hub_id=None, input_size=(3, 4, 64, 64), notes=(
        "a small untrained variant for fast generic tests (timm's test_* convention); no weights",))
       for family in ("vit_video", "stvit_video", "lookupvit_video")},
})


def _create(cls, variant: str, pretrained: bool, filter_fn, out_indices, **kwargs):
    """timm's builder with a clip input size.

    The cfg's ``input_size`` is (C, T, H, W): its T builds the model (``num_frames``, unless given),
    as its (H, W) builds a fixed-size image model. timm's builder takes (C, H, W) only, so the model
    is built with that and its cfg says (C, T, H, W) afterwards. timm's export (``save_for_hf``)
    writes (C, H, W) sizes; the frame count then travels as the model argument ``num_frames``
    (recorded here for it), and a cfg without T takes the model's."""
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    cfg_size = tuple(overlay.get("input_size") or resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.get("pretrained_cfg"), pretrained_cfg_overlay=overlay).input_size)
    if len(cfg_size) == 4:
        kwargs.setdefault("num_frames", cfg_size[1])
    overlay["input_size"] = (cfg_size[0], *cfg_size[-2:])
    if cls is LookupViTVideo and kwargs.get("features_only"):
        kwargs.setdefault("last_lookup_update", True)   # the last block's lookup map is a feature
    model = build(cls, variant, pretrained, filter_fn=filter_fn, feature_cfg=dict(out_indices=out_indices),
                  pretrained_cfg_overlay=overlay, **kwargs)
    net = model.model if isinstance(model, FeatureGetterNet) else model   # features_only: timm's wrapper
    video_size = (cfg_size[0], cfg_size[1] if len(cfg_size) == 4 else net.num_frames, *cfg_size[-2:])
    for attr in ("pretrained_cfg", "default_cfg"):
        if isinstance(getattr(model, attr, None), dict):
            setattr(model, attr, dict(getattr(model, attr), input_size=video_size))
    model._model_args = dict(getattr(model, "_model_args", {}), num_frames=net.num_frames)
    return model


def _name(family: str, size: str) -> str:
    return f"test_{family}" if size == "test" else f"{family}_{size}_patch2x16_224"


def _vit_video(size: str, pretrained: bool, kwargs) -> VideoViT:
    return _create(VideoViT, _name("vit_video", size), pretrained, checkpoint_filter_fn,
                   kwargs.pop("out_indices", 3), **dict(_WIDTHS[size], **kwargs))


def _stvit_video(size: str, pretrained: bool, kwargs) -> STViTVideo:
    args = dict(_WIDTHS[size], **kwargs)
    depth, start = args["depth"], args.get("stgm_start", 4)
    end = start + args.get("stgm_depth", 2)
    # features_only default: the tubelet map entering the module, the semantic tokens leaving it, the last layer
    default = tuple(sorted({i for i in (start - 1, end - 1, depth - 1) if 0 <= i < depth})) or (depth - 1,)
    return _create(STViTVideo, _name("stvit_video", size), pretrained, stvit_checkpoint_filter_fn,
                   args.pop("out_indices", default), **args)


def _lookupvit_video(size: str, pretrained: bool, kwargs) -> LookupViTVideo:
    return _create(LookupViTVideo, _name("lookupvit_video", size), pretrained,
                   lookupvit_checkpoint_filter_fn, kwargs.pop("out_indices", 4), **dict(_WIDTHS[size], **kwargs))


@register_model
def vit_video_tiny_patch2x16_224(pretrained: bool = False, **kwargs) -> VideoViT:
    """Joint space-time ViT-Ti: 2x16x16 tubelets, 16 frames at 224 (8x14x14 tokens)."""
    return _vit_video("tiny", pretrained, kwargs)


@register_model
def vit_video_small_patch2x16_224(pretrained: bool = False, **kwargs) -> VideoViT:
    """Joint space-time ViT-S: 2x16x16 tubelets, 16 frames at 224 (8x14x14 tokens)."""
    return _vit_video("small", pretrained, kwargs)


@register_model
def vit_video_base_patch2x16_224(pretrained: bool = False, **kwargs) -> VideoViT:
    """Joint space-time ViT-B (ViViT-B model 1): 2x16x16 tubelets, 16 frames at 224 (8x14x14 tokens)."""
    return _vit_video("base", pretrained, kwargs)


@register_model
def stvit_video_tiny_patch2x16_224(pretrained: bool = False, **kwargs) -> STViTVideo:
    """STViT on the joint space-time ViT-Ti: 2x4x4 = 32 semantic tokens from layer 5 on."""
    return _stvit_video("tiny", pretrained, kwargs)


@register_model
def stvit_video_small_patch2x16_224(pretrained: bool = False, **kwargs) -> STViTVideo:
    """STViT on the joint space-time ViT-S: 2x4x4 = 32 semantic tokens from layer 5 on."""
    return _stvit_video("small", pretrained, kwargs)


@register_model
def stvit_video_base_patch2x16_224(pretrained: bool = False, **kwargs) -> STViTVideo:
    """STViT on the joint space-time ViT-B: 2x4x4 = 32 semantic tokens from layer 5 on."""
    return _stvit_video("base", pretrained, kwargs)


@register_model
def lookupvit_video_tiny_patch2x16_224(pretrained: bool = False, **kwargs) -> LookupViTVideo:
    """LookupViT on 2x16x16 tubelets, ViT-Ti widths; 4x5x5 compressed tokens by default."""
    return _lookupvit_video("tiny", pretrained, kwargs)


@register_model
def lookupvit_video_small_patch2x16_224(pretrained: bool = False, **kwargs) -> LookupViTVideo:
    """LookupViT on 2x16x16 tubelets, ViT-S widths; 4x5x5 compressed tokens by default."""
    return _lookupvit_video("small", pretrained, kwargs)


@register_model
def lookupvit_video_base_patch2x16_224(pretrained: bool = False, **kwargs) -> LookupViTVideo:
    """LookupViT on 2x16x16 tubelets, ViT-B widths; 4x5x5 compressed tokens by default."""
    return _lookupvit_video("base", pretrained, kwargs)


@register_model
def test_vit_video(pretrained: bool = False, **kwargs) -> VideoViT:
    """A small joint space-time ViT for fast tests: 4 frames of 64x64, width 64, 4 layers."""
    return _vit_video("test", pretrained, kwargs)


@register_model
def test_stvit_video(pretrained: bool = False, **kwargs) -> STViTVideo:
    """A small video STViT for fast tests: 1x2x2 semantic tokens from layer 2 on."""
    return _stvit_video("test", pretrained, dict(dict(semantic_grid=(1, 2, 2), stgm_start=1), **kwargs))


@register_model
def test_lookupvit_video(pretrained: bool = False, **kwargs) -> LookupViTVideo:
    """A small video LookupViT for fast tests: 1x2x2 compressed tokens."""
    return _lookupvit_video("test", pretrained, dict(dict(compressed_grid=(1, 2, 2)), **kwargs))
