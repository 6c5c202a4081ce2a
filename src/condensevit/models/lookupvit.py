"""LookupViT: compressing visual information to a limited number of tokens (Koner et al., ECCV 2024).

No code from the authors; the block is our reading of the paper, set out with every choice in
docs/models.md ("LookupViT"). Two token streams:

* **lookup tokens** — the full patch grid (N = H_p x W_p tokens). They only get cheap layers: the
  scatter (cross-attention from the compressed tokens) and an MLP of reduced width.
* **compressed tokens** — a coarse grid (M = h x w, default 5x5), made once before the first block by
  bilinearly resizing the lookup-token grid (after the position embedding). They get a full ViT
  block (self-attention + MLP ratio 4) per layer.

One block, pre-norm, every step a residual::

    1. gather   c += gather_proj(softmax(S, over N) @ v_l),  S = q(norm(c)) k(norm(l))ᵀ / sqrt(d), once
    2. c = ViTBlock(c)                                        (fused attention)
    3. scatter  l += scatter_proj(softmax(Sᵀ, over M) @ scatter_v(norm(c)))   the same logits S
    4. l += lookup_mlp(norm(l))                               hidden width lookup_mlp_ratio * dim

The head is a final LayerNorm, the mean of the compressed tokens (``pool='compressed'``) or of all
tokens of both streams (``pool='both'``), and a linear classifier. Any grid from 1x1 up to the lookup
grid runs with the same weights (``forward(x, compressed_grid=(h, w))``); ``train_grids`` samples one
per training step.

Choices the paper leaves open (each documented where it is made; named options where reasonable):

* Norms: the gather has its own query norm (compressed) and one key/value norm (lookup, shared by
  k and v, as a ViT block's ``norm1`` is shared by q, k and v); the scatter's values have their own
  norm on the refined compressed tokens; the lookup MLP has its own norm. No norm is shared between
  the two streams or between steps. One final norm serves both streams.
* The scatter's logits are those of the gather, i.e. computed from the compressed tokens *before*
  the compressed block refined them, and from the lookup tokens before the scatter updated them.
* Compressed tokens get no position embedding of their own: the bilinear resize carries the lookup
  tokens' embedding along. The resize is antialiased by default (``resize_antialias``), so each
  compressed token averages its whole cell instead of sampling four pixels.
* With ``pool='compressed'`` the last block's scatter and lookup MLP cannot change the logits, so
  ``forward_features`` skips them (about 3% of the MACs of LookupViT-B at 5x5) and they are not
  built (``last_lookup_update=None``): every parameter gets a gradient, DDP needs no
  ``find_unused_parameters``. The last block then leaves the lookup tokens as they are.
  ``pool='both'`` and ``features_only=True`` (the last lookup map is a feature) build and run them;
  a checkpoint that has them loads into a model without (they are dropped) and the other way round
  (they start from the init, as from a ViT).
* Init: truncated normal (std 0.02) for every linear layer and the position embedding, zero
  biases, LayerNorms at (1, 0) — timm's ViT default.
* Training grids: one grid per forward call in train mode, drawn from ``train_grids`` by a Python
  ``random.Random(train_grid_seed)`` owned by the model (no device sync, no tensor state). Ranks
  built with the same seed draw the same sequence, so DDP ranks run the same grid at each step.
  The RNG state is not in the state dict (a resumed run restarts the sequence).
"""

import fnmatch
import math
import numbers
import random
from functools import partial
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import (
    DropPath, Mlp, PatchEmbed, get_device_dtype, resample_abs_pos_embed_nhwc, resample_patch_embed, trunc_normal_,
)
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_function
from timm.models._input import update_model_args
from timm.models.vision_transformer import Block
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..layers.attention import split_qkv
from ..layers.bidirectional import BidirectionalCrossAttention
from ..layers.tracing import check_image_layout, is_fx_proxy, known_equal, shape_str
from ._builder import CheckpointError, build, complete_state_dict, new_classifier

__all__ = ["LookupViT", "LookupViTBlock", "checkpoint_filter_fn"]

POOLS = ("compressed", "both")
_LayerNorm = partial(nn.LayerNorm, eps=1e-6)  # timm ViT's epsilon, so converted ViT weights behave the same


def _as_grid(value, name: str) -> tuple[int, int]:
    """A grid (h, w) of positive ints from an int or a pair; ValueError otherwise."""
    pair = (value, value) if isinstance(value, numbers.Integral) else value
    try:
        h, w = pair
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be an int or a pair (h, w) of ints, e.g. (5, 5)") from None
    for s in (h, w):
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise ValueError(f"{name}={value!r} must hold integers, e.g. (5, 5); got {type(s).__name__}")
        if s < 1:
            raise ValueError(f"{name}={value!r}: each side must be at least 1 (a 1x1 grid is the smallest)")
    return int(h), int(w)


@register_notrace_function   # one leaf node for timm's fx feature extraction ...
@torch.fx.wrap               # ... and for torch.fx.symbolic_trace: the check runs, with the same error, in the graph
def _check_grid_fits(grid: Tuple[int, int], lookup_grid: Tuple[int, int], name: str) -> None:
    if grid[0] > lookup_grid[0] or grid[1] > lookup_grid[1]:
        lookup = f"({lookup_grid[0]}, {lookup_grid[1]})"
        raise ValueError(
            f"{name}=({grid[0]}, {grid[1]}) is larger than the lookup-token grid {lookup}; the compressed grid "
            f"must be at most the patch grid (pick at most {lookup} or a larger image)")


@register_notrace_function
@torch.fx.wrap
def _check_images(x: Tensor, in_chans: int, patch_size: int, img_size: Optional[Tuple[int, int]]) -> None:
    """ValueError unless ``x`` is (B, in_chans, H, W) images with H, W multiples of the patch, and of
    ``img_size`` when given (a model without ``dynamic_img_size``)."""
    check_image_layout(x, in_chans)
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"expected images (B, {in_chans}, H, W), got shape {shape_str(x)}")
    H, W = x.shape[-2], x.shape[-1]
    if H % patch_size != 0 or W % patch_size != 0:
        raise ValueError(f"image size ({H}, {W}) is not divisible by the patch size {patch_size}; resize or crop it")
    if img_size is not None and (H != img_size[0] or W != img_size[1]):
        raise ValueError(
            f"image size ({H}, {W}) differs from the size the model was built for ({img_size[0]}, {img_size[1]}); "
            "resize the input, or build the model with that img_size or with dynamic_img_size=True")


@register_notrace_function
@torch.fx.wrap
def _check_traced_grid(compressed_grid, traced_grid: Tuple[int, ...]) -> None:
    """In a graph that torch.fx traced without a concrete ``compressed_grid`` (so at ``traced_grid``,
    the model's default): another grid cannot change the graph, so it is refused (image and video forms)."""
    if compressed_grid is None:
        return
    grid = (compressed_grid,) * len(traced_grid) if isinstance(compressed_grid, numbers.Integral) \
        else tuple(compressed_grid)
    if grid != tuple(traced_grid):
        raise ValueError(
            f"this graph was traced at compressed_grid={tuple(traced_grid)} and cannot run at {compressed_grid!r}; "
            "trace a model whose default grid is the one you want (built with compressed_grid=(h, w), or with "
            "model.compressed_grid = (h, w) set before tracing)")


def _resize_pos_embed(pos: Tensor, grid: Tuple[int, int]) -> Tensor:
    """A (1, H, W, C) position embedding resampled to ``grid`` as timm's ``resample_abs_pos_embed_nhwc``
    does (bicubic, antialiased, in float32), with no Python branch on a symbolic size: in eager mode
    an embedding of the right size is returned as is, in a graph with dynamic sizes it is resampled."""
    if known_equal(pos.shape[1], grid[0]) and known_equal(pos.shape[2], grid[1]):
        return pos
    out = F.interpolate(pos.float().permute(0, 3, 1, 2), size=[grid[0], grid[1]], mode="bicubic", antialias=True)
    return out.permute(0, 2, 3, 1).to(pos.dtype)


class LookupViTBlock(nn.Module):
    """One LookupViT layer: gather, compressed ViT block, scatter (same logits), lookup MLP.

    ``lookup_update=False`` builds the gather and the compressed block only (steps 1-2): the
    block then leaves the lookup tokens as they are (for the last block of a model whose output
    never reads them; :meth:`add_lookup_update` builds steps 3-4 later)."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            *,
            mlp_ratio: float = 4.0,
            lookup_mlp_ratio: float = 0.5,
            qkv_bias: bool = True,
            proj_drop: float = 0.0,
            attn_drop: float = 0.0,
            drop_path: float = 0.0,
            norm_layer=None,
            act_layer=nn.GELU,
            lookup_update: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        norm_layer = norm_layer or _LayerNorm
        self.lookup_hidden = max(1, int(dim * lookup_mlp_ratio))
        self.gather_norm_q = norm_layer(dim, **dd)     # compressed tokens, as queries
        self.gather_norm_kv = norm_layer(dim, **dd)    # lookup tokens, one norm shared by keys and values
        self.mhbc = BidirectionalCrossAttention(
            dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, scatter=False, **dd)
        self.compressed = Block(
            dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop,
            attn_drop=attn_drop, drop_path=drop_path, norm_layer=norm_layer, act_layer=act_layer, **dd)
        self.lookup_update = False
        self.scatter_norm = self.lookup_norm = self.lookup_mlp = None
        if lookup_update:
            self.add_lookup_update(**dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def add_lookup_update(self, device=None, dtype=None) -> None:
        """Build steps 3-4 (scatter and lookup MLP), PyTorch's default init (the model re-inits)."""
        dd = dict(device=device, dtype=dtype)
        like = self.gather_norm_q   # the block's norm layer and settings, from the modules it holds
        dim = like.normalized_shape[0]
        self.mhbc.add_scatter(**dd)
        self.scatter_norm = type(like)(dim, eps=like.eps, **dd)   # refined compressed tokens, as scatter values
        self.lookup_norm = type(like)(dim, eps=like.eps, **dd)
        mlp = self.compressed.mlp
        self.lookup_mlp = Mlp(dim, self.lookup_hidden, act_layer=type(mlp.act), drop=mlp.drop1.p, **dd)
        self.lookup_update = True

    def forward(self, compressed: Tensor, lookup: Tensor, update_lookup: bool = True, return_attn: bool = False):
        """(B, M, C), (B, N, C) -> the same two, updated. ``update_lookup=False`` (or a block built
        without the lookup update) skips steps 3-4: the lookup tokens come back unchanged.
        ``return_attn`` (eager mode) also returns the gather (B, heads, M, N) and scatter (B, heads, N, M)
        probabilities (None when the scatter is skipped; the logits' softmax over M in a block
        without a lookup update)."""
        gathered, logits, gather_attn = self.mhbc._gather(self.gather_norm_q(compressed), self.gather_norm_kv(lookup))
        compressed = self.compressed(compressed + self.drop_path(gathered))
        scatter_attn: Optional[Tensor] = None
        if return_attn and update_lookup and not self.lookup_update:
            scatter_attn = logits.softmax(dim=-2).transpose(-2, -1)   # what the scatter would read
        # scatter_norm is None in a block built without the lookup update (a static check for TorchScript)
        if update_lookup and self.scatter_norm is not None:
            scattered, scatter_attn = self.mhbc._scatter(logits, self.scatter_norm(compressed))
            lookup = lookup + self.drop_path(scattered)
            lookup = lookup + self.drop_path(self.lookup_mlp(self.lookup_norm(lookup)))
        if return_attn and not torch.jit.is_scripting():
            return compressed, lookup, gather_attn, scatter_attn
        return compressed, lookup


class LookupViT(nn.Module):
    """LookupViT classifier and dense backbone (the lookup stream keeps the full patch grid)."""
    __jit_ignored_attributes__ = ["_grid_rng"]   # Python RNG for train_grids: eager mode only

    def __init__(
            self,
            *,
            img_size: int | tuple[int, int] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            lookup_mlp_ratio: float = 0.5,
            compressed_grid: int | tuple[int, int] = (5, 5),
            train_grids: Sequence[tuple[int, int]] = (),
            train_grid_seed: int = 0,
            pool: str = "compressed",
            global_pool: str = "avg",
            last_lookup_update: bool | None = None,
            qkv_bias: bool = True,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            dynamic_img_size: bool = False,
            resize_antialias: bool = True,
            device=None,
            dtype=None,
    ):
        """
        Args:
            img_size: image size the model is built for (int or (H, W)); the patch must divide it.
            compressed_grid: default (h, w) grid of compressed tokens, at most the patch grid.
            train_grids: grids sampled, one per forward call, in train mode (empty: always
                ``compressed_grid``); e.g. ``((3, 3), (5, 5), (7, 7), (10, 10))``.
            train_grid_seed: seed of the Python RNG that samples ``train_grids``.
            lookup_mlp_ratio: hidden width of the lookup tokens' MLP, as a fraction of ``embed_dim``.
            pool: the tokens the head reads: 'compressed' (the compressed tokens) or 'both' (all
                tokens of both streams).
            global_pool: timm's pooling choice: 'avg' (the mean of those tokens) or '' (none: the
                head sees every token); 'compressed' / 'both' are read as ``pool`` (averaged).
            last_lookup_update: build the last block's scatter and lookup MLP. None (default): only
                when the head reads the lookup tokens (``pool='both'``); with 'compressed' they
                could not reach the output (parameters without a gradient). ``features_only=True``
                builds them (the last lookup map is a feature). Without them the last block leaves
                the lookup tokens as they are.
            dynamic_img_size: accept other image sizes (position embedding resampled for that
                call); otherwise an input of another size is a ValueError.
            resize_antialias: antialiased bilinear resize when making the compressed tokens.
            device, dtype: where and in which precision parameters are created (timm's factory
                keywords; ``device='meta'``, then ``to_empty`` and ``init_weights()``).
        """
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        pool, global_pool = _resolve_pool(pool, global_pool)
        img_size = _as_grid(img_size, "img_size")
        if not isinstance(patch_size, numbers.Integral) or patch_size < 1:
            raise ValueError(f"patch_size={patch_size!r} must be a positive int")
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(
                f"img_size {img_size} is not divisible by patch_size {patch_size}; use a multiple of {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0
        self.in_chans = in_chans
        self.img_size = img_size
        self.patch_size = int(patch_size)
        self.pool, self.global_pool = pool, global_pool
        self.dynamic_img_size = dynamic_img_size
        self.resize_antialias = resize_antialias
        self.grad_checkpointing = False
        lookup_grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.lookup_grid = lookup_grid
        self.compressed_grid = _as_grid(compressed_grid, "compressed_grid")
        _check_grid_fits(self.compressed_grid, lookup_grid, "compressed_grid")
        grids = []
        for g in train_grids:
            g = _as_grid(g, "train_grids entry")
            _check_grid_fits(g, lookup_grid, "train_grids entry")
            grids.append(g)
        self.train_grids = tuple(sorted(set(grids)))
        self._grid_rng = random.Random(train_grid_seed)

        # strict size checks are ours (ValueErrors), so the patch embedding accepts any multiple
        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            output_fmt="NHWC", strict_img_size=False, **dd)
        # (1, H_p, W_p, C): the grid is explicit, so non-square images need no guessing
        self.pos_embed = nn.Parameter(torch.zeros(1, *lookup_grid, embed_dim, **dd))
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear stochastic depth
        last_update = pool == "both" if last_lookup_update is None else bool(last_lookup_update)
        self.blocks = nn.ModuleList([
            LookupViTBlock(
                embed_dim, num_heads, mlp_ratio=mlp_ratio, lookup_mlp_ratio=lookup_mlp_ratio,
                qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i],
                lookup_update=i < depth - 1 or last_update, **dd)
            for i in range(depth)])
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)]
        self.norm = _LayerNorm(embed_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def init_weights(self) -> None:
        """(Re)initialise every parameter (also after ``to_empty`` from the meta device)."""
        for m in self.modules():
            if isinstance(m, (nn.LayerNorm, nn.Conv2d)):
                m.reset_parameters()
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    # ---- timm contract -------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        """New classifier of ``num_classes`` (0: none) on the model's device, dtype and mode.
        ``global_pool``: 'avg' / '' (average the tokens or not), 'compressed' / 'both' (which
        tokens, averaged; 'both' builds the last block's lookup update if it was left out);
        None keeps the current choice."""
        if global_pool is not None:
            self.pool, self.global_pool = _resolve_pool(self.pool, global_pool, current=self.global_pool)
            if self.pool == "both":
                _ensure_lookup_update(self, self.blocks[-1], self._init_weights)
            update_model_args(self, pool=self.pool)   # timm's export rebuilds the model as it is now
        self.num_classes = num_classes
        self.head = new_classifier(self, self.embed_dim, num_classes)

    # ---- streams -------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> Tuple[int, int]:
        """Checks the images (ValueError) and returns their lookup-token grid (H / patch, W / patch)."""
        p = self.patch_size
        if self.dynamic_img_size:
            _check_images(x, self.in_chans, p, None)
            return x.shape[-2] // p, x.shape[-1] // p
        _check_images(x, self.in_chans, p, self.img_size)
        return self.lookup_grid

    def _grid(self, compressed_grid: Optional[Tuple[int, int]]) -> Tuple[int, int]:
        """This call's compressed grid: the argument, else (in training) one of ``train_grids``, else the
        default. TorchScript: the argument or the default (no Python RNG)."""
        if torch.jit.is_scripting():
            return self.compressed_grid if compressed_grid is None else compressed_grid
        if is_fx_proxy(compressed_grid):
            # torch.fx made the argument a graph input: trace at the default grid; the graph refuses
            # another one at run time
            _check_traced_grid(compressed_grid, self.compressed_grid)
            compressed_grid = None
        if compressed_grid is not None:
            return _as_grid(compressed_grid, "compressed_grid")
        if self.training and self.train_grids:
            return self._grid_rng.choice(self.train_grids)  # Python RNG: no device sync
        return self.compressed_grid

    def _embed(self, x: Tensor, compressed_grid: Optional[Tuple[int, int]]) -> Tuple[Tensor, Tensor, Tuple[int, int]]:
        """Images -> compressed (B, M, C) and lookup (B, N, C) tokens, and the lookup grid."""
        lookup_grid = self._check_input(x)
        grid = self._grid(compressed_grid)
        _check_grid_fits(grid, lookup_grid, "compressed_grid")
        x = self.patch_embed(x)                                   # (B, H_p, W_p, C)
        pos = self.pos_embed
        if self.dynamic_img_size:                                 # resampled for another image size
            pos = _resize_pos_embed(pos, lookup_grid)
        x = x + pos
        B, H, W, C = x.shape
        # in float32: CPU kernels of the antialiased resize lack bfloat16 / float16
        compressed = F.interpolate(
            x.permute(0, 3, 1, 2).float(), size=[grid[0], grid[1]], mode="bilinear", align_corners=False,
            antialias=self.resize_antialias).to(x.dtype)
        return compressed.flatten(2).transpose(1, 2), x.reshape(B, H * W, C), lookup_grid

    def _run_block(self, blk: LookupViTBlock, c: Tensor, l: Tensor, update_lookup: bool):
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(blk, c, l, update_lookup, use_reentrant=False)
        return blk(c, l, update_lookup)

    def _pooled_tokens(self, c: Tensor, l: Tensor) -> Tensor:
        return self.norm(c) if self.pool == "compressed" else self.norm(torch.cat([c, l], dim=1))

    def forward_features(self, x: Tensor, compressed_grid: Optional[Tuple[int, int]] = None) -> Tensor:
        """Normalised tokens the head pools: (B, M, C) compressed tokens with ``pool='compressed'``,
        (B, M + N, C) compressed then lookup tokens with ``pool='both'``."""
        c, l, _ = self._embed(x, compressed_grid)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            # the last lookup update cannot reach a head that pools only the compressed tokens
            update_lookup = i < last or self.pool == "both"
            if self.grad_checkpointing and not torch.jit.is_scripting():
                c, l = checkpoint(blk, c, l, update_lookup, use_reentrant=False)
            else:
                c, l = blk(c, l, update_lookup)
        return self._pooled_tokens(c, l)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor, compressed_grid: Optional[Tuple[int, int]] = None) -> Tensor:
        """(B, C, H, W) images -> logits; ``compressed_grid`` (h, w) overrides the default grid for this call."""
        return self.forward_head(self.forward_features(x, compressed_grid=compressed_grid))

    def forward_intermediates(
            self,
            x: Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
            compressed_grid=None,
    ):
        """Lookup-stream outputs of the chosen blocks: NCHW maps (B, C, H_p, W_p) or NLC (B, N, C).

        Returns the list when ``intermediates_only``, else ``(forward_features output, list)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r} must be 'NCHW' or 'NLC'")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        c, l, (H, W) = self._embed(x, compressed_grid)
        B = x.shape[0]
        last = max_index if (stop_early or intermediates_only) else len(self.blocks) - 1
        intermediates = []
        for i, blk in enumerate(self.blocks[:last + 1]):
            needs_lookup = i < last or i in take_indices or self.pool == "both"
            c, l = self._run_block(blk, c, l, update_lookup=needs_lookup)
            if i in take_indices:
                y = self.norm(l) if norm else l
                if output_fmt == "NCHW":
                    y = y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
                intermediates.append(y)
        if intermediates_only:
            return intermediates
        return self._pooled_tokens(c, l), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last wanted intermediate (and the norm / head if asked)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices

    # ---- visualisation -------------------------------------------------------------------------
    def token_maps(self, x: Tensor, compressed_grid=None, layer: int = -1) -> dict[str, Tensor]:
        """Attention maps of the shared-logit cross-attention, averaged over heads, through the
        plain path (the probabilities the block computes; no state is kept between calls).

        Returns, with M compressed tokens and the (H_p, W_p) patch grid:

        * ``gather`` (B, M, H_p, W_p): what each compressed token reads in ``layer``; each map
          sums to 1 over the image tokens.
        * ``scatter`` (B, M, H_p, W_p): how much each patch reads each compressed token in
          ``layer``; sums to 1 over the M compressed tokens at every patch (not over the image).
        * ``scatter_argmax`` (B, H_p, W_p), int64: the compressed token each patch reads most.
        * ``gather_per_layer`` / ``scatter_per_layer`` (B, depth, M, H_p, W_p): every layer.

        Wrap the call in ``torch.no_grad()`` unless gradients through the maps are wanted.
        """
        depth = len(self.blocks)
        if not -depth <= layer < depth:
            raise ValueError(f"layer={layer} is out of range for {depth} blocks (use -{depth} .. {depth - 1})")
        c, l, (H, W) = self._embed(x, compressed_grid)
        B, M = c.shape[:2]
        gathers, scatters = [], []
        for blk in self.blocks:
            c, l, g, s = blk(c, l, update_lookup=True, return_attn=True)
            gathers.append(g.mean(dim=1))                   # (B, M, N)
            scatters.append(s.mean(dim=1).transpose(1, 2))  # (B, N, M) -> (B, M, N)
        gather = torch.stack(gathers, dim=1).reshape(B, depth, M, H, W)
        scatter = torch.stack(scatters, dim=1).reshape(B, depth, M, H, W)
        return {
            "gather": gather[:, layer],
            "scatter": scatter[:, layer],
            "scatter_argmax": scatter[:, layer].argmax(dim=1),
            "gather_per_layer": gather,
            "scatter_per_layer": scatter,
        }


def _resolve_pool(pool: str, global_pool: str, current: str = "avg") -> tuple[str, str]:
    """(pool, global_pool) from a ``pool`` and timm's ``global_pool`` ('avg', '', or a pool name)."""
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r} must be one of {POOLS}")
    if global_pool in POOLS:
        return global_pool, current
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool={global_pool!r} must be 'avg' (the mean of the tokens `pool` names), '' (no "
                         f"pooling) or one of {POOLS} (those tokens, averaged)")
    return pool, global_pool


def _ensure_lookup_update(model: nn.Module, block: LookupViTBlock, init) -> None:
    """Build a block's lookup update (steps 3-4) on the model's device and dtype when it lacks it."""
    if not block.lookup_update:
        block.add_lookup_update(**get_device_dtype(model))
        for m in (block.mhbc.scatter_v, block.mhbc.scatter_proj, block.lookup_mlp):
            m.apply(init)
        block.train(model.training)


# ---- pretrained weights -------------------------------------------------------------------------
# parameters that a ViT checkpoint cannot provide: they keep the model's own initial values
LOOKUP_ONLY_KEYS = (
    "blocks.*.mhbc.scatter_v.*", "blocks.*.mhbc.scatter_proj.*", "blocks.*.scatter_norm.*",
    "blocks.*.lookup_norm.*", "blocks.*.lookup_mlp.*",
)
_VIT_BLOCK_PARTS = ("norm1.", "attn.qkv.", "attn.proj.", "norm2.", "mlp.fc1.", "mlp.fc2.")
_VIT_DROPPED = ("cls_token", "reg_token", "dist_token", "mask_token", "head_dist.")


def _pos_embed_grid(pos: Tensor, num_prefix: int) -> Tensor:
    """A ViT's (1, prefix + g*g, C) position embedding -> (1, g, g, C) without the prefix tokens."""
    for prefix in dict.fromkeys((num_prefix, 0)):
        n = pos.shape[1] - prefix
        g = math.isqrt(max(n, 0))
        if n > 0 and g * g == n:
            return pos[:, prefix:].reshape(1, g, g, pos.shape[-1])
    raise CheckpointError(
        f"pos_embed of shape {tuple(pos.shape)} is not a square grid (after {num_prefix} class/register "
        "tokens); is this a ViT checkpoint?")


def _resample_pos(pos: Tensor, model: LookupViT) -> Tensor:
    """A (1, H, W, C) position embedding resampled (bicubic) to the model's grid when it differs."""
    if pos.dim() != 4:
        raise CheckpointError(f"pos_embed of shape {tuple(pos.shape)} is not a (1, H, W, C) grid")
    if pos.shape[-1] != model.pos_embed.shape[-1]:
        return pos  # another width: complete_state_dict reports the mismatch
    return resample_abs_pos_embed_nhwc(pos, list(model.pos_embed.shape[1:3]))


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: LookupViT) -> dict[str, Tensor]:
    """Weights of a LookupViT, or of a timm ViT, for ``model``.

    From a ViT: patch embedding, position embedding without its class/register tokens (resampled
    to the model's grid), each block onto the compressed stream's ViT block of the same index, and
    the gather of that block from the same attention: ``q`` from the first third of ``qkv``,
    ``kv`` from the rest, ``gather_proj`` from ``attn.proj``, both gather norms from ``norm1``
    (the ViT's attention read ``norm1`` of its tokens). The final norm and the classifier map as
    they are. The scatter and the lookup MLP (``LOOKUP_ONLY_KEYS``) keep their initial values.

    From a LookupViT: as it is, the position embedding resampled. The last block's lookup update
    follows the model: dropped when the model left it out (nothing reads it), initialised when
    the checkpoint's model left it out. A patch embedding for other input channels passes to
    timm's loader, which adapts it to ``in_chans``. Anything else (another family, another size)
    raises a :class:`CheckpointError` naming the keys.
    """
    sd = dict(state_dict)
    if any(k.startswith("blocks.") and ".mhbc." in k for k in sd):   # already a LookupViT
        if "pos_embed" in sd:
            sd["pos_embed"] = _resample_pos(sd["pos_embed"], model)
        last = [p.replace("blocks.*.", f"blocks.{len(model.blocks) - 1}.") for p in LOOKUP_ONLY_KEYS]
        own = model.state_dict()
        sd = {k: v for k, v in sd.items() if k in own or not any(fnmatch.fnmatchcase(k, p) for p in last)}
        return complete_state_dict(sd, model, new_keys=last, source="the LookupViT checkpoint")

    out: dict[str, Tensor] = {}
    num_prefix = int("cls_token" in sd) + (sd["reg_token"].shape[1] if "reg_token" in sd else 0)
    if "fc_norm.weight" in sd and "norm.weight" not in sd:  # ViTs pooled by average keep it here
        sd = {("norm." + k[len("fc_norm."):] if k.startswith("fc_norm.") else k): v for k, v in sd.items()}
    for k, v in sd.items():
        if k.startswith(_VIT_DROPPED):
            continue
        if k == "pos_embed":
            if v.dim() == 3:
                v = _pos_embed_grid(v, num_prefix)
            out[k] = _resample_pos(v, model)
        elif k == "patch_embed.proj.weight":
            kh, kw = model.patch_embed.proj.weight.shape[-2:]
            if v.dim() == 4 and tuple(v.shape[-2:]) != (kh, kw):
                v = resample_patch_embed(v, [kh, kw])
            out[k] = v   # other input channels (grey images): timm's loader adapts them after this filter
        elif k.startswith("blocks."):
            _, idx, rest = k.split(".", 2)
            pre = f"blocks.{idx}."
            if not rest.startswith(_VIT_BLOCK_PARTS):
                out[k] = v  # e.g. LayerScale: unexpected, reported by complete_state_dict
                continue
            out[pre + "compressed." + rest] = v
            if rest == "attn.qkv.weight":
                out[pre + "mhbc.q.weight"], out[pre + "mhbc.kv.weight"], _, _ = split_qkv(v)
            elif rest == "attn.qkv.bias":
                _, _, out[pre + "mhbc.q.bias"], out[pre + "mhbc.kv.bias"] = split_qkv(v, v)
            elif rest.startswith("attn.proj."):
                out[pre + "mhbc.gather_proj." + rest[len("attn.proj."):]] = v
            elif rest.startswith("norm1."):
                out[pre + "gather_norm_q." + rest[len("norm1."):]] = v
                out[pre + "gather_norm_kv." + rest[len("norm1."):]] = v
        else:
            out[k] = v
    return complete_state_dict(out, model, new_keys=LOOKUP_ONLY_KEYS, source="the ViT checkpoint")


# ---- variants -----------------------------------------------------------------------------------
def _cfg(vit_hub_id: str = "", **kwargs) -> dict:
    """ViT preprocessing; ``hf_hub_id`` names the timm ViT whose weights ``checkpoint_filter_fn`` converts."""
    return {
        "url": "",
        "hf_hub_id": vit_hub_id,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "lookupvit_tiny_patch16_224.from_vit_augreg_in21k_ft_in1k": _cfg(
        "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"),
    "lookupvit_small_patch16_224.from_vit_augreg_in21k_ft_in1k": _cfg(
        "timm/vit_small_patch16_224.augreg_in21k_ft_in1k"),
    "lookupvit_base_patch16_224.from_vit_augreg2_in21k_ft_in1k": _cfg(
        "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"),
    "test_lookupvit": _cfg(None, input_size=(3, 96, 96), notes=(
        "a small untrained variant for fast generic tests (timm's test_* convention); no weights",)),
})


def _create(variant: str, pretrained: bool, **kwargs) -> LookupViT:
    # features_only: the lookup stream after the last 4 blocks unless out_indices says otherwise
    out_indices = kwargs.pop("out_indices", 4)
    if kwargs.get("features_only"):
        kwargs.setdefault("last_lookup_update", True)   # the last block's lookup map is a feature
    return build(LookupViT, variant, pretrained, filter_fn=checkpoint_filter_fn,
                 feature_cfg=dict(out_indices=out_indices), **kwargs)


@register_model
def lookupvit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> LookupViT:
    """LookupViT with ViT-Ti/16 widths (192, 12 layers, 3 heads), 5x5 compressed tokens by default."""
    args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create("lookupvit_tiny_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def lookupvit_small_patch16_224(pretrained: bool = False, **kwargs) -> LookupViT:
    """LookupViT with ViT-S/16 widths (384, 12 layers, 6 heads), 5x5 compressed tokens by default."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create("lookupvit_small_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def lookupvit_base_patch16_224(pretrained: bool = False, **kwargs) -> LookupViT:
    """LookupViT with ViT-B/16 widths (768, 12 layers, 12 heads), 5x5 compressed tokens by default."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create("lookupvit_base_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def test_lookupvit(pretrained: bool = False, **kwargs) -> LookupViT:
    """A small LookupViT for fast tests (96x96 input, width 64, 4 layers, 3x3 compressed tokens)."""
    args = dict(img_size=96, patch_size=16, embed_dim=64, depth=4, num_heads=2, compressed_grid=(3, 3))
    return _create("test_lookupvit", pretrained, **dict(args, **kwargs))
