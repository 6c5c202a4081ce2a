"""STViT on Swin without recovery: "Making Vision Transformers Efficient from A Token Sparsification
View" (Chang et al., CVPR 2023), the local form of the paper's Table 2.

``stvit_swin_{tiny,small,base}_patch4_window7_224``. A Swin transformer in which, from one point
of one stage on, every window of image tokens is replaced by a few **semantic tokens** (3x3 per 7x7
window by default, 2x2 as the paper's ablation) and the image tokens are dropped: there is no
recovery, unlike STViT-R (:mod:`condensevit.models.stvit_r`). The parts are STViT-R's:

1. stages before the condensed one, and the condensed stage's first ``stgm_start`` blocks: Swin
   blocks on the image tokens (:class:`~condensevit.models.stvit_r.SwinStage` / ``SwinBlock``);
2. the semantic token generation module, two blocks: STViT-R's
   :class:`~condensevit.models.stvit_r.SemanticTokenBlock` (each window max-pooled to n x n tokens,
   which attend to an enlarged, overlapping neighbourhood of image tokens around their window and
   to the window's own pooled tokens: 10x10 at 224, the released classifier's neighbourhoods), then
   a :class:`~condensevit.models.stvit_r.SemanticBlock` in which the semantic tokens (plus the
   learned global centres) attend to all of [semantic tokens, image tokens]; the image tokens are
   discarded after it;
3. the rest of the condensed stage: semantic blocks alternating self-attention inside each
   window's n x n tokens and over the whole semantic grid;
4. later stages: Swin's patch merging and Swin stages on the semantic grid (at 224 the 6x6 grid
   merges to 3x3, one window: the tokens of different windows mix);
5. final LayerNorm, average over the tokens, linear classifier (timm's ``ClassifierHead``).

The paper gives the token counts and the FLOPs (-24 / -25 / -25% for T / S / B at 9 tokens per
window), not the layout; the layout above is **our reading**, chosen so that our GMACs land on the
paper's reductions: the module sits in the third stage (``stgm_stage=2``) after two thirds of its
blocks (``stgm_start`` 4 of 6 for T, 12 of 18 for S and B). See docs/models.md for the figures.

**Stem.** Swin's 4x4 patch embedding (``stem='patch'``, default), so timm's Swin checkpoints load
into everything but the new parameters; ``stem='conv'`` takes STViT-R's convolutional stem instead,
so an STViT-R checkpoint's stem loads.

**Weights** (:func:`checkpoint_filter_fn`): a timm Swin (or an original Microsoft Swin) checkpoint
maps block for block; in a semantic block, ``attn.q`` takes the first third of Swin's ``attn.qkv``
and ``attn.kv`` the rest, and the relative position table is dropped; Swin tables of the stages on
the (smaller) semantic grid are resized with timm's ``resize_rel_pos_bias_table``; LayerScale and
the global centres start from their initial values. An STViT-R checkpoint loads where its layers
correspond (see :func:`checkpoint_filter_fn`).
"""

import math
import re
import warnings
from typing import Optional, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, PatchEmbed, get_device_dtype, resize_rel_pos_bias_table, trunc_normal_
from timm.models import adapt_input_conv, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_function
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..layers.attention import split_qkv
from ..layers.tracing import check_image_layout, shape_str
from ..layers.windows import shifted_window_mask, window_neighbourhood_index
from ._builder import CheckpointError, as_positive_ints, build, complete_state_dict, unwrap_state_dict
from .stvit_r import (ConvStem, PatchMerging, SemanticBlock, SemanticTokenBlock, SwinBlock, SwinStage,
                      init_swin_module, reinit_swin_like)

__all__ = ["STViTSwin", "SemanticStage", "checkpoint_filter_fn", "semantic_index"]

STEMS = ("patch", "conv")


@register_notrace_function   # one leaf node for timm's fx feature extraction ...
@torch.fx.wrap               # ... and for torch.fx.symbolic_trace: the check runs, with the same error, in the graph
def _check_images(x: Tensor, in_chans: int, img_size: Tuple[int, int]) -> None:
    """ValueError unless ``x`` is (B, in_chans, *img_size) images (TorchScript compiles it too)."""
    check_image_layout(x, in_chans)
    if x.dim() != 4 or x.shape[1] != in_chans:
        got = str(x.shape[1]) if x.dim() == 4 else "..."
        raise ValueError(f"expected images (B, {in_chans}, H, W), got shape {shape_str(x)}; build the "
                         f"model with in_chans={got} for other channel counts")
    if x.shape[-2] != img_size[0] or x.shape[-1] != img_size[1]:
        H, W = x.shape[-2], x.shape[-1]
        h, w = max(4, (H + 2) // 4 * 4), max(4, (W + 2) // 4 * 4)  # the nearest sides the 4x4 patches take
        take = f"this model takes {img_size[0]}x{img_size[1]} images (its semantic tokens and global " \
               f"centres are laid out for that size), got {H}x{W}"
        if h == H and w == W:
            msg = f"{take}: resize the input to {img_size[0]}x{img_size[1]}, or build the model with img_size=({H}, {W})"
        elif h == img_size[0] and w == img_size[1]:
            msg = f"{take}; {H}x{W} is not a multiple of the 4x4 patches: resize or crop the input to {h}x{w}"
        else:
            msg = (f"{take}; {H}x{W} is not a multiple of the 4x4 patches: resize or crop the input to {h}x{w} and "
                   f"build the model with img_size=({h}, {w}), or resize it to {img_size[0]}x{img_size[1]}")
        raise ValueError(msg)


def semantic_index(height: int, width: int, window_size: int, semantic_size: int, kernel: int,
                   device=None) -> Tensor:
    """Keys of each window's semantic tokens in the first semantic block, (windows, n*n + K).

    Indices into the table that :class:`~condensevit.models.stvit_r.SemanticTokenBlock` builds,
    [image tokens (H*W), one pad slot, pooled tokens (sH*sW)]: first the window's own n*n pooled
    tokens, then the ``kernel`` x ``kernel`` image neighbourhood around the window, kept inside the
    map (:func:`~condensevit.layers.windows.window_neighbourhood_index`). At 224 (a 14x14 map,
    7x7 windows, kernel 10) this is the released STViT-R classifier's geometry."""
    n = semantic_size
    nh, nw = -(-height // window_size), -(-width // window_size)
    sW = nw * n
    t = torch.arange(n, device=device)
    rows = (torch.arange(nh, device=device) * n)[:, None] + t
    cols = (torch.arange(nw, device=device) * n)[:, None] + t
    pooled = (rows[:, None, :, None] * sW + cols[None, :, None, :]).reshape(nh * nw, n * n)
    neighbourhood = window_neighbourhood_index((height, width), (window_size, window_size), (kernel, kernel), device)
    return torch.cat([pooled + height * width + 1, neighbourhood], dim=1)


class SemanticStage(nn.Module):
    """The condensed stage: Swin blocks on the image tokens, the two-block semantic token
    generation module, then semantic blocks (alternately inside each window and over the whole
    grid), and Swin's patch merging of the semantic grid. Blocks are one flat ``blocks`` list, so
    Swin's ``layers.{i}.blocks.{j}`` weights map by index.

    Input (B, H, W, C) image tokens of ``resolution``; output the (B, sH, sW, C) semantic grid
    (``n`` tokens per window side, windows in row-major order, each window's tokens contiguous)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 qkv_bias: bool, proj_drop: float, attn_drop: float, drop_path: list[float], *,
                 resolution: tuple[int, int], stgm_start: int, semantic_size: int, semantic_kernel: int,
                 semantic_shortcut: bool, global_centers: bool, layer_scale_init: float, downsample: bool,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        H, W = resolution
        shift = window_size // 2
        if min(resolution) <= window_size:   # a map no larger than the window is one unshifted window, as in Swin
            window_size, shift = min(resolution), 0
        self.resolution = (H, W)
        self.window_size, self.shift_size = window_size, shift
        self.semantic_size, self.semantic_kernel = semantic_size, semantic_kernel
        self.stgm_start = stgm_start
        n = semantic_size
        self.grid = (-(-H // window_size) * n, -(-W // window_size) * n)
        common = (dim, num_heads, mlp_ratio, qkv_bias, proj_drop, attn_drop)
        blocks: list[nn.Module] = [
            SwinBlock(dim, num_heads, window_size, shift if i % 2 else 0, mlp_ratio, qkv_bias, proj_drop, attn_drop,
                      drop_path[i], **dd) for i in range(stgm_start)]
        blocks.append(SemanticTokenBlock(
            *common, drop_path[stgm_start], window_size=window_size, semantic_size=n, shortcut=semantic_shortcut,
            pooled_keys=True, padded=False, layer_scale_init=layer_scale_init, **dd))
        blocks.append(SemanticBlock(*common, drop_path[stgm_start + 1], layer_scale_init=layer_scale_init, **dd))
        for j, i in enumerate(range(stgm_start + 2, depth)):
            blocks.append(SemanticBlock(*common, drop_path[i], local_window=n if j % 2 == 0 else None,
                                        layer_scale_init=layer_scale_init, **dd))
        self.blocks = nn.ModuleList(blocks)
        if global_centers:
            self.global_centers = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], dim, **dd))
        else:
            self.global_centers = None
        self.init_weights()
        self.downsample = PatchMerging(dim, **dd) if downsample else None
        self.grad_checkpointing = False
        self.init_non_persistent_buffers()

    def init_weights(self) -> None:
        if self.global_centers is not None:
            trunc_normal_(self.global_centers, std=0.02)

    def init_non_persistent_buffers(self) -> None:
        """Build the geometry buffers (again, e.g. after ``to_empty`` from the meta device; timm's
        ``reinit_non_persistent_buffers`` calls this). All of it is fixed by the map size."""
        device = next((p.device for p in self.parameters()), None)
        H, W = self.resolution
        ws = self.window_size
        self.register_buffer("semantic_index", semantic_index(
            H, W, ws, self.semantic_size, self.semantic_kernel, device), persistent=False)
        mask = None
        if self.shift_size and self.stgm_start >= 2:
            Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
            mask = shifted_window_mask(Hp, Wp, ws, self.shift_size, device=device).unsqueeze(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: Tensor, return_attn: bool = False):
        """(B, H, W, C) -> (semantic grid, next-stage input[, attention maps]). With ``return_attn``
        (eager mode only) the module's attention probabilities come back too: ``semantic``
        (B * windows, heads, n*n, n*n + K) and ``refine`` (B, heads, sH*sW, sH*sW + H*W).

        One loop over ``blocks`` (Swin's names), each block's role told by its kind (static
        attribute checks, which TorchScript resolves as it unrolls the loop) and its position."""
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        s0 = self.stgm_start
        mask = None if self.attn_mask is None else self.attn_mask.to(x.dtype)
        s = x   # the semantic grid, made by the module's first block
        a_make: Optional[Tensor] = None
        a_refine: Optional[Tensor] = None
        for j, blk in enumerate(self.blocks):
            if hasattr(blk, "shift_size"):            # Swin blocks on the image tokens
                if ckpt and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, mask, use_reentrant=False)
                else:
                    x = blk(x, mask)
            elif hasattr(blk, "pooled_keys"):         # the module's first block: the semantic tokens
                if ckpt and not torch.jit.is_scripting():
                    s, a_make = checkpoint(blk, x, None, self.semantic_index, None, return_attn, use_reentrant=False)
                else:
                    s, a_make = blk(x, None, self.semantic_index, None, return_attn)
            else:                                     # semantic blocks
                context: Optional[Tensor] = None
                q = s
                if j == s0 + 1:                       # the module's second block: s (+ centres) reads [s, x]
                    if self.global_centers is not None:
                        q = s + self.global_centers.view(1, s.shape[1], s.shape[2], s.shape[3])
                    context = torch.cat([s.flatten(1, 2), x.flatten(1, 2)], dim=1)
                want = return_attn and j == s0 + 1
                if ckpt and not torch.jit.is_scripting():
                    s, a = checkpoint(blk, q, context, want, use_reentrant=False)
                else:
                    s, a = blk(q, context, want)
                if j == s0 + 1:
                    a_refine = a
        down = self.downsample(s) if self.downsample is not None else s
        if return_attn and not torch.jit.is_scripting():
            return s, down, dict(semantic=a_make, refine=a_refine)
        return s, down


class STViTSwin(nn.Module):
    """STViT on Swin without recovery (see the module docstring).

    ``forward_features`` gives the channels-last grid (B, h, w, C) as timm's Swin
    (``output_fmt = 'NHWC'``); ``forward_head`` averages it over (h, w) (``global_pool='avg'``).

    Args:
        img_size: input size (a multiple of 4); the model takes this size only, as timm's Swin.
        patch_size, in_chans, num_classes, global_pool ('avg' or ''), embed_dim, depths, num_heads,
            window_size, mlp_ratio, qkv_bias: Swin's.
        semantic_tokens_per_window: a square, 9 (3x3 per window, the paper's default) or 4 (2x2).
        stgm_stage: the stage (0-3) where the semantic tokens are made; later stages run on them.
            The paper condenses Swin's third stage: 2.
        stgm_start: index, inside that stage, of the module's first block; ``depth - 2`` at most
            (the module has two blocks). Default: two thirds of the stage's depth (T 4, S/B 12).
        semantic_kernel: side of the image neighbourhood each window's semantic tokens attend to
            in the first module block (10: the released classifier's 10x10 at 224).
        semantic_shortcut: attention residual on the pooled tokens in the first module block
            (True here: the pooled tokens are the initial centres the attention refines; the
            released STViT-R classifier has none).
        use_global_centers: learned global centres added to the query of the second module block.
        layer_scale_init: LayerScale of the semantic blocks (STViT-R's 1e-5).
        stem: 'patch' (Swin's patch embedding: Swin weights load) or 'conv' (STViT-R's stem).
        drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate: regularisation (stochastic depth
            rising linearly over all blocks).
        device, dtype: where and in what type the parameters and buffers are made (timm's factory
            keywords; ``device='meta'`` builds without memory: ``to_empty`` then ``init_weights()``,
            or a state dict and timm's ``reinit_non_persistent_buffers``, materialise it).
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
            semantic_tokens_per_window: int = 9,
            stgm_stage: int = 2,
            stgm_start: int | None = None,
            semantic_kernel: int = 10,
            semantic_shortcut: bool = True,
            use_global_centers: bool = True,
            layer_scale_init: float = 1e-5,
            stem: str = "patch",
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            device=None,
            dtype=None,
    ):
        super().__init__()
        img_size = as_positive_ints(img_size, "img_size", 2, "224 or (224, 224)")
        if patch_size != 4:
            raise ValueError(f"patch_size must be 4 (Swin's, and what the STViT-R stem makes), got {patch_size}")
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(f"depths and num_heads need 4 stages, got {depths} and {num_heads}")
        if len(img_size) != 2 or img_size[0] % 4 or img_size[1] % 4 or min(img_size) < 4:
            raise ValueError(f"img_size {img_size} must be a multiple of the 4x4 patches, e.g. 224")
        if global_pool not in ("", "avg"):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        n = math.isqrt(int(semantic_tokens_per_window))
        if n < 1 or n * n != semantic_tokens_per_window:
            raise ValueError(f"semantic_tokens_per_window must be a square (9 = 3x3, the paper's default, or 4 = 2x2), "
                             f"got {semantic_tokens_per_window}")
        if stgm_stage not in (0, 1, 2, 3):
            raise ValueError(f"stgm_stage must be a stage index 0-3 (the paper condenses the third: 2), got {stgm_stage}")
        depth = depths[stgm_stage]
        if depth < 2:
            raise ValueError(f"stage {stgm_stage} has {depth} blocks; the semantic token module needs 2: pick "
                             "another stgm_stage or a deeper stage")
        if stgm_start is None:
            stgm_start = min(depth - depth // 3, depth - 2)
        if not 0 <= stgm_start <= depth - 2:
            raise ValueError(f"stgm_start={stgm_start} does not leave the module's two blocks in stage {stgm_stage} "
                             f"({depth} blocks): use 0..{depth - 2}")
        # odd maps are padded by the patch merging, as in Swin
        resolutions = [(-(-img_size[0] // (4 * 2 ** i)), -(-img_size[1] // (4 * 2 ** i))) for i in range(4)]
        H, W = resolutions[stgm_stage]
        if n > min(window_size, H, W):
            raise ValueError(
                f"{n}x{n} semantic tokens per window do not fit the {min(window_size, H, W)}-token windows of "
                f"stage {stgm_stage} at img_size {img_size}: use fewer semantic_tokens_per_window, a larger image "
                f"or an earlier stgm_stage")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.img_size = img_size
        self.stem = stem
        self.semantic_size = n
        self.stgm_stage, self.stgm_start = stgm_stage, stgm_start
        self.num_layers = 4
        dims = [int(embed_dim * 2 ** i) for i in range(4)]
        self.embed_dim = embed_dim
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False

        # the input convolution timm's loader adapts to in_chans (the cfg names Swin's, the default stem)
        self._traits = {"first_conv": "patch_embed.proj" if stem == "patch" else "patch_embed.proj.0.c"}

        dd = dict(device=device, dtype=dtype)
        if stem == "patch":
            self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                          embed_dim=embed_dim, norm_layer=nn.LayerNorm, output_fmt="NHWC", **dd)
        else:
            self.patch_embed = ConvStem(in_chans, embed_dim, pad=False, **dd)
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.layers = nn.ModuleList()
        self.feature_info = []
        res, reduction = resolutions[0], 4.0
        for i in range(4):
            dp = dpr[sum(depths[:i]):sum(depths[:i + 1])]
            common = (dims[i], depths[i], num_heads[i], window_size, mlp_ratio, qkv_bias, proj_drop_rate,
                      attn_drop_rate, dp)
            if i == stgm_stage:
                stage = SemanticStage(
                    *common, resolution=res, stgm_start=stgm_start, semantic_size=n,
                    semantic_kernel=semantic_kernel, semantic_shortcut=semantic_shortcut,
                    global_centers=use_global_centers, layer_scale_init=layer_scale_init, downsample=i < 3, **dd)
                # nominal: one semantic token stands for window/n image tokens per side
                reduction *= stage.window_size / n
                res = stage.grid
            else:
                stage = SwinStage(*common, downsample=i < 3, resolution=res, **dd)
            self.layers.append(stage)
            self.feature_info.append(dict(num_chs=dims[i], reduction=int(round(reduction)), module=f"layers.{i}"))
            res, reduction = (-(-res[0] // 2), -(-res[1] // 2)), reduction * 2
        self.norm = nn.LayerNorm(dims[-1], **dd)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt="NHWC", **dd)
        self.apply(init_swin_module)

    def init_weights(self) -> None:
        """(Re)initialise every parameter and the computed buffers (also after ``to_empty`` from the
        meta device)."""
        reinit_swin_like(self)

    # ---- timm contract -----------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Relative position tables and the global centres."""
        return {n for n, _ in self.named_parameters()
                if n.endswith("relative_position_bias_table") or n.endswith("global_centers")}

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
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        if global_pool is not None and global_pool not in ("", "avg"):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        # on the model's device and dtype (a head without parameters cannot tell the new one), in its mode
        self.head.reset(num_classes, pool_type=global_pool, **get_device_dtype(self))

    def _check_input(self, x: Tensor):
        _check_images(x, self.in_chans, self.img_size)

    def forward_intermediates(
            self,
            x: Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ):
        """Stage outputs (before patch merging), NCHW (or NHWC): image-token maps before the
        condensed stage, semantic grids from it on (``feature_info`` reductions of those are
        nominal). ``norm=True`` applies the final norm to the last stage's output."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        intermediates = []
        x = self.patch_embed(x)
        last = len(self.layers) - 1
        stages = self.layers[:max_index + 1] if (stop_early or intermediates_only) else self.layers
        out = x
        for i, stage in enumerate(stages):
            out, x = stage(x)
            if i in take_indices:
                y = self.norm(out) if (norm and i == last) else out
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return self.norm(out), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages (and head / final norm) that the requested intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        self.layers[-1].downsample = None
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, h, w, C) final tokens after the final norm, channels-last as
        timm's Swin (3x3 semantic tokens at 224)."""
        self._check_input(x)
        x = self.patch_embed(x)
        for stage in self.layers:
            out, x = stage(x)
        return self.norm(out)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # ---- visualisation -----------------------------------------------------------------------
    @torch.no_grad()
    def token_maps(self, x: Tensor) -> dict:
        """Where the semantic tokens look, on the image-token grid of the condensed stage.

        For the sH * sW semantic tokens in grid order (row-major over the semantic grid), maps
        (B, tokens, H, W) over the image tokens that enter the module (heads averaged), each
        summing to 1:

        * ``semantic``: the first module block's attention over the image tokens of its window's
          neighbourhood (the weight on the pooled tokens left out, the rest renormalised);
        * ``refine``: the second module block's attention over all image tokens (its weight on the
          semantic tokens left out, the rest renormalised);
        * ``owner`` (B, H, W): the semantic token that attends most to each image token in ``refine``.
        """
        self._check_input(x)
        h = self.patch_embed(x)
        for stage in self.layers[:self.stgm_stage]:
            _, h = stage(h)
        stage = self.layers[self.stgm_stage]
        B, H, W, _ = h.shape
        _, _, maps = stage(h, return_attn=True)
        sH, sW = stage.grid
        n = stage.semantic_size
        nh, nw = sH // n, sW // n
        a = maps["semantic"].mean(1).view(B, nh * nw, n * n, -1)
        idx = stage.semantic_index
        sem = a.new_zeros(B, nh * nw, n * n, H * W + 1 + sH * sW)
        sem.scatter_add_(-1, idx[None, :, None, :].expand_as(a), a)
        # (B, windows, n*n, HW) -> grid order (B, sH*sW, HW)
        sem = sem[..., :H * W].view(B, nh, nw, n, n, H * W).transpose(2, 3).reshape(B, sH * sW, H * W)
        sem = sem / sem.sum(-1, keepdim=True).clamp_min(1e-12)
        ref = maps["refine"].mean(1)[..., sH * sW:]
        ref = ref / ref.sum(-1, keepdim=True).clamp_min(1e-12)
        return dict(
            semantic=sem.view(B, sH * sW, H, W),
            refine=ref.view(B, sH * sW, H, W),
            owner=ref.argmax(1).view(B, H, W),
            owner_title="semantic token attending most to each patch (second module block)",
        )


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
_REBUILT_BUFFERS = ("relative_position_index", "attn_mask")
_BLOCK_KEY = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_NEW_KEYS = ("*.layer_scale_1", "*.layer_scale_2", "*.global_centers")


def _stage_kinds(sd: dict, stage: int) -> list[str]:
    """'swin' / 'semantic' for each block of a checkpoint's stage, by its attention parameters."""
    kinds = {}
    for k in sd:
        m = _BLOCK_KEY.match(k)
        if m and int(m.group(1)) == stage:
            if m.group(3).startswith("attn.qkv."):
                kinds[int(m.group(2))] = "swin"
            elif m.group(3).startswith("attn.kv."):
                kinds[int(m.group(2))] = "semantic"
    return [kinds.get(j, "?") for j in range(max(kinds) + 1)] if kinds else []


def _is_stvit_r(sd: dict) -> bool:
    """STViT-R's stage 3 is made of units [Swin, five semantic-shaped blocks] (its recovery block has
    a semantic block's parameters); ours is Swin blocks then semantic blocks. Both shapes occur only
    for a 6-block stage whose module starts at block 1: then STViT-R's plain ``head`` decides."""
    kinds = _stage_kinds(sd, 2)
    if not kinds or len(kinds) % 6:
        return False
    units = all(kinds[j] == ("swin" if j % 6 == 0 else "semantic") for j in range(len(kinds)))
    prefix = kinds == sorted(kinds, key=lambda k: k != "swin")
    return units and (not prefix or "head.weight" in sd)


def _semantic_from_swin(prefix: str, rest: dict, out: dict) -> None:
    """A Swin block's weights (``rest``: suffix -> tensor) as a semantic block's: ``attn.q`` = first
    third of ``attn.qkv``, ``attn.kv`` the rest; the relative position table has no counterpart."""
    for suffix, v in rest.items():
        if suffix == "attn.relative_position_bias_table":
            continue
        if suffix in ("attn.qkv.weight", "attn.qkv.bias"):
            kind = suffix.rsplit(".", 1)[-1]
            q, kv, _, _ = split_qkv(v)
            out[f"{prefix}.attn.q.{kind}"], out[f"{prefix}.attn.kv.{kind}"] = q, kv
        else:
            out[f"{prefix}.{suffix}"] = v


def _swin_table(v: Tensor, model: STViTSwin, key: str) -> Tensor:
    """A Swin relative position table resized (timm's resize_rel_pos_bias_table) to the window of
    the block it goes to (stages on the semantic grid have smaller windows)."""
    target = model.state_dict().get(key)
    if target is None or target.shape == v.shape or target.shape[-1] != v.shape[-1]:
        return v
    ws = model.get_submodule(key[: -len(".relative_position_bias_table")]).window_size
    return resize_rel_pos_bias_table(v, new_window_size=(ws, ws), new_bias_shape=tuple(target.shape))


def _blocks_by_key(sd: dict) -> dict:
    """{(stage, block): {suffix: tensor}} of a checkpoint's block weights."""
    blocks: dict = {}
    for k, v in sd.items():
        m = _BLOCK_KEY.match(k)
        if m:
            blocks.setdefault((int(m.group(1)), int(m.group(2))), {})[m.group(3)] = v
    return blocks


def _put_block(out: dict, model: STViTSwin, stage: int, block: int, rest: dict, source_kind: str) -> None:
    """Write a source block's weights (``source_kind`` 'swin' or 'semantic') into the model's block
    (stage, block); a block the model does not have is passed through for the completeness check."""
    prefix = f"layers.{stage}.blocks.{block}"
    try:
        blk = model.layers[stage].blocks[block]
    except (IndexError, AttributeError):
        blk = None
    if source_kind == "swin" and blk is not None and not isinstance(blk, SwinBlock):
        _semantic_from_swin(prefix, rest, out)
        return
    for suffix, v in rest.items():
        key = f"{prefix}.{suffix}"
        out[key] = _swin_table(v, model, key) if suffix.endswith("relative_position_bias_table") else v


def _from_swin(sd: dict, model: STViTSwin) -> dict:
    """timm's Swin layout (patch merging at the start of stages 1-3, ``head.fc``) or the original
    Microsoft layout (merging at the end of stages 0-2, ``head``), to ours (merging at the end)."""
    if model.stem != "patch":
        raise CheckpointError("a Swin checkpoint's patch embedding (patch_embed.proj, a 4x4 convolution) does not fit "
                              "STViT-R's convolutional stem: build the model with stem='patch' (the default)")
    timm_layout = "layers.0.downsample.reduction.weight" not in sd
    out = {}
    for k, v in sd.items():
        if timm_layout:
            k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        if k.startswith("head.") and not k.startswith("head.fc."):
            k = "head.fc." + k[len("head."):]
        if not _BLOCK_KEY.match(k):
            out[k] = v
    for (i, j), rest in _blocks_by_key(sd).items():
        _put_block(out, model, i, j, rest, "swin")
    return out


def _from_stvit_r(sd: dict, model: STViTSwin) -> tuple[dict, list[str]]:
    """An STViT-R classifier checkpoint, where its layers correspond: see :func:`checkpoint_filter_fn`."""
    if model.stem != "conv":
        raise CheckpointError("an STViT-R checkpoint has STViT-R's convolutional stem (patch_embed.proj.0.c), which "
                              "Swin's patch embedding cannot take: build the model with stem='conv' to load it")
    if model.stgm_stage != 2:
        raise CheckpointError(f"STViT-R makes its semantic tokens in stage 2, this model in stage {model.stgm_stage}: "
                              "their layers do not correspond; build the model with stgm_stage=2")
    out = {}
    for k, v in sd.items():
        k = k.replace("semantic_token2", "global_centers")
        if k == "global_centers":   # an older layout kept it at the top level
            k = "layers.2.global_centers"
        if k.startswith("head.") and not k.startswith("head.fc."):
            k = "head.fc." + k[len("head."):]
        m = _BLOCK_KEY.match(k)
        if m and int(m.group(1)) == 2:
            continue
        if m:
            _put_block(out, model, int(m.group(1)), int(m.group(2)), {m.group(3): v}, "swin")
        else:
            out[k] = v
    # stage 3 by role: STViT-R unit u = [Swin, make, refine, local, global, recovery]
    blocks = _blocks_by_key(sd)
    units = len(_stage_kinds(sd, 2)) // 6
    stage = model.layers[2]
    s0 = stage.stgm_start
    source = {}
    swin = [6 * u for u in range(units)]
    for j in range(s0):
        if j < len(swin):
            source[j] = swin[j]
    source[s0], source[s0 + 1] = 1, 2
    pairs = [6 * u + r for u in range(units) for r in (3, 4)]   # local, global of each unit, in order
    for j, src in zip(range(s0 + 2, len(stage.blocks)), pairs):
        source[j] = src
    for j, src in source.items():
        _put_block(out, model, 2, j, blocks[(2, src)], "semantic" if src % 6 else "swin")
    fresh = [j for j in range(len(stage.blocks)) if j not in source]
    if fresh:
        warnings.warn(
            f"STViT-R checkpoint: stage-2 blocks {fresh} of this model have no counterpart in STViT-R (whose third "
            f"stage holds one Swin block per 6-block unit and only {2 * units} local/global semantic blocks) and keep "
            "their initial values; fine-tune, or initialise from timm's Swin instead", stacklevel=3)
    out = {k: v for k, v in out.items() if not (k == "layers.2.global_centers" and
                                                  stage.global_centers is not None and
                                                  v.shape != stage.global_centers.shape)}
    return out, [f"layers.2.blocks.{j}.*" for j in fresh]


def checkpoint_filter_fn(state_dict: dict, model: STViTSwin) -> dict[str, Tensor]:
    """timm's Swin, an original Microsoft Swin, an STViT-R classifier or an STViT-Swin checkpoint
    -> this model's state dict.

    * **Swin** (timm's ``swin_{tiny,small,base}_patch4_window7_224`` layout, or the original one):
      block for block; a semantic block takes ``attn.q`` from the first third of the Swin block's
      ``attn.qkv`` and ``attn.kv`` from the rest, its norms, projection and MLP as they are, and
      drops the relative position table; tables of Swin blocks whose window is smaller here (the
      stages on the semantic grid) are resized; patch merging moves to the end of the stage before;
      ``head`` becomes ``head.fc``. LayerScale and the global centres keep their initial values.
    * **STViT-R** (needs ``stem='conv'`` and ``stgm_stage=2``): its stem, stages 0-1, merging,
      last stage (tables resized), final norm, head and global centres as they are; in the third
      stage, by role: the module's blocks from unit 0's first two semantic blocks, our semantic
      blocks from the units' local and global blocks in order, our Swin blocks from the units'
      Swin blocks in order. Blocks left without a counterpart keep their initial values, with a
      warning naming them.
    * **STViT-Swin**: as saved.

    A classifier of another size is dropped (the model keeps its fresh one); any other missing,
    unexpected or mismatched key raises :class:`~condensevit.models.CheckpointError`.
    """
    sd = unwrap_state_dict(state_dict)
    sd = {k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] not in _REBUILT_BUFFERS}
    new_keys = list(_NEW_KEYS)
    if _is_stvit_r(sd):
        out, fresh = _from_stvit_r(sd, model)
        new_keys += fresh
        source = "the STViT-R checkpoint"
    elif any(".attn.kv." in k or k.endswith(("global_centers", ".layer_scale_1")) for k in sd):
        out, source = dict(sd), "the STViT-Swin checkpoint"
        new_keys = []
    else:
        out, source = _from_swin(sd, model), "the Swin checkpoint"
    if isinstance(model.head.fc, nn.Identity):   # a model without classifier takes the trunk only
        out = {k: v for k, v in out.items() if not k.startswith("head.")}
    stem_key = "patch_embed.proj.weight" if model.stem == "patch" else "patch_embed.proj.0.c.weight"
    w = out.get(stem_key)
    if w is not None and w.dim() == 4 and w.shape[1] != model.in_chans:
        out[stem_key] = adapt_input_conv(model.in_chans, w)
    return complete_state_dict(out, model, new_keys=new_keys, source=source)


# --------------------------------------------------------------------------------------------
# Configurations, registration
# --------------------------------------------------------------------------------------------
def _cfg(swin: str, **kwargs) -> dict:
    return {
        "url": "", "hf_hub_id": f"timm/{swin}.ms_in1k",
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (3, 3),
        "crop_pct": 0.9, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head.fc", "license": "mit",
        "paper_ids": "arXiv:2303.08685",
        "paper_name": "Making Vision Transformers Efficient from A Token Sparsification View",
        "notes": (f"weights of {swin} (ImageNet-1k) converted by checkpoint_filter_fn: an initialisation to "
                  "fine-tune, not a trained STViT",),
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    **{f"stvit_swin_{s}_patch4_window7_224.ms_in1k_swin": _cfg(f"swin_{s}_patch4_window7_224")
       for s in ("tiny", "small", "base")},
    # 112x112: a 7x7 stage-3 map (one window, 3x3 semantic tokens), 2x2 after the last merging
    "test_stvit_swin": _cfg("", url="", hf_hub_id=None, input_size=(3, 112, 112), pool_size=(2, 2), notes=(
        "a small untrained variant for fast generic tests (timm's test_* convention); no weights",)),
})

_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_TEST = dict(embed_dim=32, depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8))


def _create(variant: str, pretrained: bool, arch: dict, **kwargs) -> STViTSwin:
    return build(STViTSwin, variant, pretrained, filter_fn=checkpoint_filter_fn,
                 feature_cfg=dict(out_indices=(0, 1, 2, 3)), **dict(arch, **kwargs))


@register_model
def stvit_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> STViTSwin:
    """STViT-Swin-T: 3x3 semantic tokens per window from stage-3 block 5 on (paper: -24% FLOPs)."""
    return _create("stvit_swin_tiny_patch4_window7_224", pretrained, _TINY, **kwargs)


@register_model
def stvit_swin_small_patch4_window7_224(pretrained: bool = False, **kwargs) -> STViTSwin:
    """STViT-Swin-S: 3x3 semantic tokens per window from stage-3 block 13 on (paper: -25% FLOPs)."""
    return _create("stvit_swin_small_patch4_window7_224", pretrained, _SMALL, **kwargs)


@register_model
def stvit_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs) -> STViTSwin:
    """STViT-Swin-B: 3x3 semantic tokens per window from stage-3 block 13 on (paper: -25% FLOPs)."""
    return _create("stvit_swin_base_patch4_window7_224", pretrained, _BASE, **kwargs)


@register_model
def test_stvit_swin(pretrained: bool = False, **kwargs) -> STViTSwin:
    """A small STViT-Swin for fast tests (width 32, Swin-T's depths, 112x112)."""
    return _create("test_stvit_swin", pretrained, _TEST, **kwargs)
