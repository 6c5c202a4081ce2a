"""STViT, global form, on DeiT.

"Making Vision Transformers Efficient from A Token Sparsification View" (Chang et al., CVPR 2023).
The authors released only the Swin-based STViT-R; this global form follows the paper's description,
set out with every choice in docs/models.md ("STViT, global form"). For the default 12-layer model:

1. patch embedding and learned position embedding give the image tokens X (no class token);
2. layers 1-4 (``blocks.0-3``): ordinary pre-norm ViT blocks on X;
3. the semantic token generation module (STGM, ``blocks.4-5``):
   - initial centres P: one per window of a sqrt(n) x sqrt(n) grid over the token map (padded to a
     multiple of the grid, padding masked), a weighted average with weights from a scoring network
     and a softmax inside the window (``center_pool``; or plain 'avg' / 'max' pooling);
   - layer 5: P attends to X (query P, key/value X), residual on P, MLP -> S1;
   - layer 6: S1 + G attends to [S1, X] (G: learned global centres), residual on S1 + G, MLP -> S2;
   the image tokens are discarded after the module;
4. layers 7-12 (``blocks.6-11``): ordinary blocks on the n semantic tokens;
5. head: final LayerNorm, mean over the semantic tokens, linear classifier.

Our choices where the paper is silent (see also the module's constructor):
- the padding of the token map is split evenly between both sides (the extra row/column after), so
  border windows are equally cut and a flipped image gives flipped centres;
- the scoring network's last projection starts at zero: a fresh module pools window averages, which
  is also where a model initialised from DeiT starts;
- with ``stgm_depth > 2`` the extra layers are more layers of the second kind (query S, key/value
  [S, X]); the global centres are added once, in the first of them;
- semantic tokens carry no position embedding (the paper's ablation: none is best).

Every layer maps one to one onto DeiT's blocks; the STGM layers take their query projection from the
first third of DeiT's fused qkv and their key/value projection from the rest (:func:`checkpoint_filter_fn`).
"""

import math
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath, LayerNorm, Mlp, PatchEmbed, resample_abs_pos_embed, resample_patch_embed,
    trunc_normal_,
)
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_function
from timm.models._manipulate import checkpoint, named_apply, reinit_non_persistent_buffers
from timm.models.vision_transformer import Block, init_weights_vit_timm

from ..layers.attention import CrossAttention, split_qkv
from ..layers.pooling import POOL_MODES, WindowPool
from ..layers.tracing import check_image_layout, shape_str
from ._builder import (CheckpointError, as_positive_ints, build, check_positive_int, complete_state_dict,
                       new_classifier, unwrap_state_dict)

__all__ = ["STViT", "SemanticTokenBlock", "STGMSchedule", "checkpoint_filter_fn"]


class SemanticTokenBlock(nn.Module):
    """One layer of the semantic token generation module.

    The semantic tokens (plus ``query_offset``, the global centres, when given) are the query; the
    image tokens, preceded by the semantic tokens themselves when ``attend_to_semantic``, are key and
    value. Pre-norm with ``norm1`` on both sides, residual on the query input, then an MLP. Parameter
    names follow timm's ``Block`` with ``attn.qkv`` split into ``attn.q`` and ``attn.kv``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            *,
            attend_to_semantic: bool,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            proj_drop: float = 0.0,
            attn_drop: float = 0.0,
            drop_path: float = 0.0,
            norm_layer=LayerNorm,
            act_layer=nn.GELU,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.attend_to_semantic = attend_to_semantic
        self.norm1 = norm_layer(dim, **dd)
        self.attn = CrossAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, semantic: Tensor, image: Tensor, query_offset: Optional[Tensor] = None,
                return_attn: bool = False):
        """(B, n, C) semantic and (B, N, C) image tokens -> (B, n, C) semantic tokens.

        With ``return_attn`` (eager mode) also the attention (B, heads, n, context), context =
        [semantic, image] or image alone, computed through the plain (non-fused) path.
        """
        query = semantic if query_offset is None else semantic + query_offset
        context = torch.cat([semantic, image], dim=1) if self.attend_to_semantic else image
        q, kv = self.norm1(query), self.norm1(context)
        attn: Optional[Tensor] = None
        if return_attn and not torch.jit.is_scripting():
            out, attn = self.attn(q, kv, return_attn=True)
        else:
            out = self.attn(q, kv)
        x = query + self.drop_path1(out)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        if return_attn and not torch.jit.is_scripting():
            return x, attn
        return x


class STGMSchedule:
    """The STViT layer schedule, shared by the image and video forms (a mixin of both models): ordinary
    blocks on the tokens ``x`` before ``stgm_start``, then the initial centres (``center_pool``), the
    STGM blocks (query: semantic tokens, context: ``x``; global centres added in the second) and the
    blocks on the semantic tokens. One program for eager PyTorch, torch.fx, dynamo and TorchScript
    (which unrolls the loop and tells the block kinds apart by a static attribute check)."""

    def _run_schedule(self, x: Tensor, take: List[int], stop: int) -> Tuple[Tensor, List[Tensor]]:
        """Blocks ``0 .. stop`` on tokens ``x``; returns the last tokens (``x`` if no STGM layer ran,
        else the semantic ones) and the outputs of the blocks in ``take``, in block order."""
        outs: List[Tensor] = []
        semantic: Optional[Tensor] = None
        for i, blk in enumerate(self.blocks):
            if i <= stop:
                if hasattr(blk, "attend_to_semantic"):      # an STGM layer
                    if semantic is None:
                        semantic = self.center_pool(x)
                    offset: Optional[Tensor] = None
                    if i == self.stgm_start + 1:
                        offset = self.global_centers
                    if self.grad_checkpointing and not torch.jit.is_scripting():
                        semantic = checkpoint(blk, semantic, x, offset)
                    else:
                        semantic = blk(semantic, x, offset)
                    out = semantic
                elif semantic is None:                      # an ordinary block on the image tokens
                    if self.grad_checkpointing and not torch.jit.is_scripting():
                        x = checkpoint(blk, x)
                    else:
                        x = blk(x)
                    out = x
                else:                                       # an ordinary block on the semantic tokens
                    if self.grad_checkpointing and not torch.jit.is_scripting():
                        semantic = checkpoint(blk, semantic)
                    else:
                        semantic = blk(semantic)
                    out = semantic
                if i in take:
                    outs.append(out)
        return (x if semantic is None else semantic), outs


def run_stgm_blocks(model: nn.Module, x: Tensor, take_indices=(), stop: Optional[int] = None,
                    collect=None) -> Tensor:
    """:meth:`STGMSchedule._run_schedule` of ``model`` up to block ``stop``; ``collect(tokens, grid)``
    receives the output of each block in ``take_indices`` with its grid (``model.grid_size`` for
    image tokens, ``model.semantic_grid`` for semantic ones). Returns the last tokens."""
    stop = len(model.blocks) - 1 if stop is None else stop
    take = [i for i in range(stop + 1) if i in take_indices]
    last, outs = model._run_schedule(x, take, stop)
    if collect is not None:
        for i, out in zip(take, outs):
            collect(out, model.grid_size if i < model.stgm_start else model.semantic_grid)
    return last


@register_notrace_function   # one leaf node for timm's fx feature extraction ...
@torch.fx.wrap               # ... and for torch.fx.symbolic_trace: the check runs, with the same error, in the graph
def _check_images(x: Tensor, in_chans: int, img_size: Tuple[int, int]) -> None:
    """ValueError unless ``x`` is (B, in_chans, *img_size) images."""
    check_image_layout(x, in_chans)
    if x.dim() != 4 or x.shape[1] != in_chans or x.shape[2] != img_size[0] or x.shape[3] != img_size[1]:
        raise ValueError(
            f"input of shape {shape_str(x)} does not fit this model, built for (B, {in_chans}, "
            f"{img_size[0]}, {img_size[1]}) images; resize the input, or build the model "
            f"with img_size=(H, W) (and in_chans=C) for your images")


class STViT(STGMSchedule, nn.Module):
    """STViT, global form: a DeiT whose image tokens are condensed into a few semantic tokens.

    Args (keyword-only):
        img_size, patch_size, in_chans: input geometry; position embeddings are made (and
            interpolated from checkpoints) for this size, which the patch size must divide.
        num_classes, global_pool: classifier ('avg' over the semantic tokens, or '' for none).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the ViT trunk (DeiT-T/S/B widths).
        num_semantic_tokens: n, a square number; the initial centres come from a sqrt(n) x sqrt(n)
            grid of windows.
        stgm_start: number of ordinary layers on the image tokens before the module (0-based index
            of its first layer).
        stgm_depth: layers in the module (>= 1). The first is of the first kind (centres attend to
            the image tokens); the others of the second kind (semantic tokens attend to [semantic,
            image]).
        center_pool: how the initial centres are pooled: 'weighted' (scoring network), 'avg', 'max'.
        global_centers: add learned global centres G to the query of the first second-kind layer;
            only used (and only created) when ``stgm_depth >= 2``.
        drop_rate, pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate: regularisation.
        device, dtype: where and in which precision parameters and buffers are created (timm's
            factory keywords; ``device='meta'`` builds without memory: ``to_empty`` then
            ``init_weights()`` materialises it).
    """

    def __init__(
            self,
            *,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dim: int = 384,
            depth: int = 12,
            num_heads: int = 6,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            num_semantic_tokens: int = 16,
            stgm_start: int = 4,
            stgm_depth: int = 2,
            center_pool: str = "weighted",
            global_centers: bool = True,
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
        img_size = as_positive_ints(img_size, "img_size", 2, "224 or (224, 224)")
        patch_size = check_positive_int(patch_size, "patch_size")
        _check_args(img_size, patch_size, global_pool, embed_dim, depth, num_heads,
                    num_semantic_tokens, stgm_start, stgm_depth, center_pool)
        norm_layer, act_layer = LayerNorm, nn.GELU
        self.img_size = tuple(img_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0
        self.num_semantic_tokens = num_semantic_tokens
        self.semantic_grid = (math.isqrt(num_semantic_tokens),) * 2
        self.stgm_start, self.stgm_depth = stgm_start, stgm_depth
        self.stgm_end = stgm_start + stgm_depth
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                                      **dd)
        self.grid_size = self.patch_embed.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        # raises a ValueError when the token map is too small for the window grid
        self.center_pool = WindowPool(embed_dim, self.grid_size, self.semantic_grid, center_pool,
                                      norm_layer=norm_layer, act_layer=act_layer, **dd)
        self.global_centers = nn.Parameter(torch.zeros(1, num_semantic_tokens, embed_dim, **dd)) \
            if global_centers and stgm_depth >= 2 else None

        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]   # stochastic depth, linear
        common = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                      norm_layer=norm_layer, act_layer=act_layer, **dd)
        self.blocks = nn.ModuleList([
            SemanticTokenBlock(embed_dim, num_heads, attend_to_semantic=i > stgm_start, drop_path=dpr[i], **common)
            if stgm_start <= i < self.stgm_end else
            Block(embed_dim, num_heads, drop_path=dpr[i], **common)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        window_px = max(self.center_pool.window_size) * patch_size
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=patch_size if i < stgm_start else window_px, module=f"blocks.{i}",
                 tokens="image" if i < stgm_start else "semantic")
            for i in range(depth)]
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise every parameter and the computed buffers (also after ``to_empty``)."""
        named_apply(init_weights_vit_timm, self)   # Linear: trunc-normal(.02); scorer: its own init
        trunc_normal_(self.pos_embed, std=0.02)
        if self.global_centers is not None:
            trunc_normal_(self.global_centers, std=0.02)
        reinit_non_persistent_buffers(self)

    # ----------------------------------------------------------------------------------- forward
    def _check_input(self, x: Tensor) -> None:
        _check_images(x, self.in_chans, self.img_size)

    def _embed(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return self.pos_drop(self.patch_embed(x) + self.pos_embed)

    def _forward_blocks(self, x: Tensor, take_indices=(), stop: Optional[int] = None, norm: bool = False,
                        reshape: bool = False) -> Tuple[Tensor, List[Tensor]]:
        """Run the blocks (up to index ``stop``) on embedded image tokens; collect the outputs of
        ``take_indices``. Returns the last tokens (image tokens if no STGM layer ran, else semantic)."""
        intermediates = []

        def collect(out: Tensor, grid) -> None:
            out = self.norm(out) if norm else out
            if reshape:
                out = out.reshape(out.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
            intermediates.append(out)

        return run_stgm_blocks(self, x, take_indices, stop, collect), intermediates

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, num_semantic_tokens, embed_dim), after the final norm."""
        x, _ = self._run_schedule(self._embed(x), [], len(self.blocks) - 1)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Outputs of the blocks ``indices`` (timm's convention: an int n = the last n blocks).

        Blocks before the STGM give the image-token map, (B, C, H/patch, W/patch) in NCHW; the STGM
        and later blocks give the semantic tokens laid out as their sqrt(n) x sqrt(n) grid (the
        window grid they started from), (B, C, sqrt(n), sqrt(n)). ``feature_info[i]['tokens']`` says
        which. 'NLC' gives (B, tokens, C) instead.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt {output_fmt!r} is not supported; use 'NCHW' or 'NLC'")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, intermediates = self._forward_blocks(
            self._embed(x), set(take_indices), stop=max_index if stop_early else None, norm=norm,
            reshape=output_fmt == "NCHW")
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if max_index < self.stgm_start:
            self.center_pool = None
        if max_index <= self.stgm_start:
            self.global_centers = None
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def token_maps(self, x: Tensor) -> Dict[str, Tensor]:
        """Where each semantic token looks, over the image tokens, each (B, n, H/patch, W/patch):

        - ``'center_pool'``: its initial pooling weights (for 'max', the share of channels whose
          maximum each image token holds);
        - ``'blocks.{i}'`` for each STGM layer i: its attention over the image tokens, averaged over
          heads. Second-kind layers also attend to the semantic tokens; their image part is
          renormalised to sum to 1 (the share left to the semantic tokens is dropped).

        Every map sums to 1 over the image tokens. Computed with the plain attention path.
        """
        x, _ = self._forward_blocks(self._embed(x), stop=self.stgm_start - 1)   # image layers only
        B, n, (H, W) = x.shape[0], self.num_semantic_tokens, self.grid_size
        semantic, weights = self.center_pool(x, return_weights=True)
        maps = {"center_pool": weights.reshape(B, n, H, W)}
        for i in range(self.stgm_start, self.stgm_end):
            offset = self.global_centers if i == self.stgm_start + 1 else None
            semantic, attn = self.blocks[i](semantic, x, offset, return_attn=True)
            attn = attn.mean(dim=1)
            if self.blocks[i].attend_to_semantic:
                attn = attn[..., n:]
                attn = attn / attn.sum(dim=-1, keepdim=True)
            maps[f"blocks.{i}"] = attn.reshape(B, n, H, W)
        return maps

    # ------------------------------------------------------------------------- timm helpers
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed"} | ({"global_centers"} if self.global_centers is not None else set())

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        # the pooling belongs with the first STGM layer, the global centres with the layer using them
        return dict(
            stem=r"^pos_embed|patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^center_pool", (self.stgm_start,)),
                    (r"^global_centers", (self.stgm_start + 1,)), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool {global_pool!r} is not supported; use 'avg' or ''")
            self.global_pool = global_pool
        self.head = new_classifier(self, self.embed_dim, num_classes)


def _check_args(img_size, patch_size, global_pool, embed_dim, depth, num_heads,
                num_semantic_tokens, stgm_start, stgm_depth, center_pool) -> None:
    if any(s % patch_size for s in img_size) or min(img_size) < patch_size:
        good = tuple(max(patch_size, round(s / patch_size) * patch_size) for s in img_size)
        raise ValueError(f"img_size {tuple(img_size)} is not divisible by patch_size {patch_size}; "
                         f"use a multiple of {patch_size}, e.g. img_size={good}")
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool {global_pool!r} is not supported; use 'avg' (mean of the semantic "
                         "tokens) or '' (no pooling)")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}; pick a divisor")
    if not isinstance(num_semantic_tokens, int) or num_semantic_tokens < 1 \
            or math.isqrt(num_semantic_tokens) ** 2 != num_semantic_tokens:
        r = max(1, math.isqrt(num_semantic_tokens) if isinstance(num_semantic_tokens, int) and
                num_semantic_tokens > 0 else 1)
        raise ValueError(
            f"num_semantic_tokens={num_semantic_tokens!r} is not a square number (the tokens start from a "
            f"sqrt(n) x sqrt(n) grid of windows); use a square such as {r * r} or {(r + 1) ** 2}")
    if stgm_depth < 1:
        raise ValueError(f"stgm_depth={stgm_depth} must be at least 1 (the module's first layer makes the "
                         "semantic tokens)")
    if stgm_start < 0 or stgm_start + stgm_depth > depth:
        raise ValueError(
            f"the semantic token module (stgm_start={stgm_start}, stgm_depth={stgm_depth}) does not fit in "
            f"depth={depth} layers: it needs 0 <= stgm_start and stgm_start + stgm_depth <= depth; use "
            f"stgm_start <= {max(depth - stgm_depth, 0)} or a smaller stgm_depth")
    if center_pool not in POOL_MODES:
        raise ValueError(f"center_pool={center_pool!r} is not one of {POOL_MODES}; pick one of them")


# ------------------------------------------------------------------------------------ weights
def _pos_embed_grid(length: int, num_prefix: int) -> Tuple[int, int]:
    """Prefix-token count and side of a square pos_embed grid of ``length`` entries."""
    for prefix in dict.fromkeys((num_prefix, 0)):
        side = math.isqrt(max(length - prefix, 0))
        if side > 0 and side * side == length - prefix:
            return prefix, side
    raise CheckpointError(
        f"the checkpoint's pos_embed has {length} entries, not a square grid after {num_prefix} class/"
        "distillation tokens; it is not a ViT/DeiT checkpoint this converter understands")


def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: STViT) -> Dict[str, Tensor]:
    """Convert a timm DeiT / ViT checkpoint (or an STViT one) to ``model``.

    Drops the class and distillation tokens (``cls_token``, ``dist_token``, ``head_dist``) and their
    slots in ``pos_embed``, resamples the position embedding to the model's grid, maps the blocks
    one to one (STGM layers: ``attn.q`` = first third of ``attn.qkv``, ``attn.kv`` = the rest) and
    fills the parameters DeiT cannot have (scoring network, global centres) from the model's init.
    Raises :class:`CheckpointError` naming missing / unexpected / mismatched keys otherwise.
    """
    state_dict = unwrap_state_dict(state_dict)
    if "fc_norm.weight" in state_dict and "norm.weight" not in state_dict:
        # a ViT pooled by average (global_pool='avg') keeps its final LayerNorm after the pooling,
        # as fc_norm; ours normalises before the mean over semantic tokens: the nearest counterpart
        state_dict = {("norm." + k[len("fc_norm."):] if k.startswith("fc_norm.") else k): v
                      for k, v in state_dict.items()}
    num_prefix = sum(k in state_dict for k in ("cls_token", "dist_token"))
    if "reg_token" in state_dict:
        num_prefix += state_dict["reg_token"].shape[1]
    out = {}
    for k, v in state_dict.items():
        if k in ("cls_token", "dist_token", "reg_token") or k.startswith("head_dist."):
            continue
        if k == "pos_embed":
            prefix, side = _pos_embed_grid(v.shape[1], num_prefix)
            v = resample_abs_pos_embed(v[:, prefix:], new_size=list(model.grid_size), old_size=[side, side],
                                       num_prefix_tokens=0)
        elif k == "patch_embed.proj.weight" and v.dim() == 4 \
                and v.shape[-2:] != model.patch_embed.proj.weight.shape[-2:]:
            v = resample_patch_embed(v, list(model.patch_embed.proj.weight.shape[-2:]))
        out[k] = v
    g = out.get("global_centers")
    if g is not None and model.global_centers is not None and g.shape[1] != model.global_centers.shape[1]:
        # an STViT checkpoint with another token count: centre i belongs to pooling window i of a
        # sqrt(n) x sqrt(n) grid, so the centres are resampled as a grid, like position embeddings
        old_side, new_side = math.isqrt(g.shape[1]), math.isqrt(model.global_centers.shape[1])
        if old_side * old_side == g.shape[1]:
            out["global_centers"] = resample_abs_pos_embed(g, new_size=[new_side, new_side],
                                                           old_size=[old_side, old_side], num_prefix_tokens=0)
    for i in range(model.stgm_start, model.stgm_end):
        weight, bias = out.pop(f"blocks.{i}.attn.qkv.weight", None), out.pop(f"blocks.{i}.attn.qkv.bias", None)
        if weight is None:
            continue
        q_w, kv_w, q_b, kv_b = split_qkv(weight, bias)
        out[f"blocks.{i}.attn.q.weight"], out[f"blocks.{i}.attn.kv.weight"] = q_w, kv_w
        if bias is not None:
            out[f"blocks.{i}.attn.q.bias"], out[f"blocks.{i}.attn.kv.bias"] = q_b, kv_b
    return complete_state_dict(out, model, new_keys=("center_pool.*", "global_centers"),
                               source="the DeiT/ViT checkpoint")


# ------------------------------------------------------------------------------ registration
def _cfg(deit: str, **kwargs) -> dict:
    return {
        "url": "",
        "hf_hub_id": f"timm/{deit}.fb_in1k",
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "apache-2.0",
        "paper_name": "Making Vision Transformers Efficient from A Token Sparsification View",
        "notes": (f"weights of {deit} (ImageNet-1k) converted by checkpoint_filter_fn: an initialisation "
                  "to fine-tune, not a trained STViT",),
        **kwargs,
    }


_TEST_NOTE = ("a small untrained variant for fast generic tests (timm's test_* convention); no weights",)
# the tag names the weights' origin: DeiT's, converted; fine-tune before use
default_cfgs = generate_default_cfgs({
    "stvit_deit_tiny_patch16_224.fb_in1k_deit": _cfg("deit_tiny_patch16_224"),
    "stvit_deit_small_patch16_224.fb_in1k_deit": _cfg("deit_small_patch16_224"),
    "stvit_deit_base_patch16_224.fb_in1k_deit": _cfg("deit_base_patch16_224"),
    "test_stvit": _cfg("", hf_hub_id=None, input_size=(3, 96, 96), notes=_TEST_NOTE),
})


def _create_stvit(variant: str, pretrained: bool = False, **kwargs) -> STViT:
    depth, start = kwargs.get("depth", 12), kwargs.get("stgm_start", 4)
    end = start + kwargs.get("stgm_depth", 2)
    # features_only default: the image map entering the module, the semantic tokens leaving it, the last layer
    out_indices = tuple(sorted({i for i in (start - 1, end - 1, depth - 1) if 0 <= i < depth})) or (depth - 1,)
    return build(STViT, variant, pretrained, filter_fn=checkpoint_filter_fn,
                 feature_cfg=dict(out_indices=out_indices), **kwargs)


@register_model
def stvit_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> STViT:
    """STViT on DeiT-T: 16 semantic tokens from layer 5 on."""
    return _create_stvit("stvit_deit_tiny_patch16_224", pretrained,
                         **dict(dict(embed_dim=192, depth=12, num_heads=3), **kwargs))


@register_model
def stvit_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> STViT:
    """STViT on DeiT-S: 16 semantic tokens from layer 5 on (1.91 GMACs against DeiT-S's 4.61)."""
    return _create_stvit("stvit_deit_small_patch16_224", pretrained,
                         **dict(dict(embed_dim=384, depth=12, num_heads=6), **kwargs))


@register_model
def stvit_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> STViT:
    """STViT on DeiT-B: 16 semantic tokens from layer 5 on."""
    return _create_stvit("stvit_deit_base_patch16_224", pretrained,
                         **dict(dict(embed_dim=768, depth=12, num_heads=12), **kwargs))


@register_model
def test_stvit(pretrained: bool = False, **kwargs) -> STViT:
    """A small STViT for fast tests (96x96 input, width 64, 6 layers, 9 semantic tokens from layer 3)."""
    return _create_stvit("test_stvit", pretrained, **dict(dict(
        img_size=96, embed_dim=64, depth=6, num_heads=2, num_semantic_tokens=9, stgm_start=2), **kwargs))
