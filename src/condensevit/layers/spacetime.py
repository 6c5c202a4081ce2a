"""Space-time primitives of the video forms: tubelet embedding, resizing token volumes, and turning
image (2-D) weights into video (3-D) ones.

Token volumes are channels-last, (B, T, H, W, C), as the patch embedding gives them; ``T, H, W``
count tubelets, not frames or pixels. Window pooling over (T, H, W) grids lives with the 2-D form in
:mod:`condensevit.layers.pooling` (its functions take maps of either rank).

* :class:`TubeletEmbed` — a Conv3d whose kernel and stride are one tubelet (ViViT's "tubelet
  embedding"), e.g. 2 frames x 16 x 16 pixels.
* :func:`resize_volume` — trilinear resizing of a (B, C, T, H, W) volume, optionally antialiased
  (each output token then averages its whole cell, as LookupViT's image form does in 2-D).
* :func:`inflate_patch_embed` — a 2-D patch kernel made 3-D: 'central' (ViViT's central-frame
  initialisation: the image kernel in the middle frame, zeros elsewhere) or 'average' (I3D's
  inflation: the image kernel divided by the frame count in every frame).
* :func:`tile_pos_embed` / :func:`resample_pos_embed_3d` — a spatial (1, H, W, C) position embedding
  repeated over time, and a (1, T, H, W, C) one resampled to another grid.
"""
from __future__ import annotations

import math
import numbers
from typing import Tuple

import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed_nhwc
from torch import Tensor

from .tracing import known_equal

__all__ = [
    "TubeletEmbed", "resize_volume", "inflate_patch_embed", "tile_pos_embed", "resample_pos_embed_3d",
    "PATCH_INFLATIONS",
]

PATCH_INFLATIONS = ("central", "average")


class TubeletEmbed(nn.Module):
    """(B, C, T, H, W) clips -> (B, T', H', W', D) tubelet tokens, channels-last.

    One Conv3d with kernel = stride = (tubelet_frames, patch_size, patch_size), so every tubelet is
    embedded once and tubelets do not overlap. The parameter names (``proj.weight``, ``proj.bias``)
    are those of timm's 2-D ``PatchEmbed``, with one more (time) axis in the kernel. Shape checks
    are the model's (it knows the fix to suggest); this module only embeds.
    """

    def __init__(self, *, img_size: tuple[int, int], num_frames: int, patch_size: int, tubelet_frames: int,
                 in_chans: int, embed_dim: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.img_size = tuple(img_size)
        self.num_frames = int(num_frames)
        self.patch_size = (int(patch_size), int(patch_size))
        self.tubelet_size = (int(tubelet_frames), int(patch_size), int(patch_size))
        self.grid_size = (num_frames // tubelet_frames, img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = math.prod(self.grid_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.tubelet_size, stride=self.tubelet_size,
                              bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)


def resize_volume(x: Tensor, size: Tuple[int, int, int], antialias: bool = True) -> Tensor:
    """Trilinear resize of a (B, C, T, H, W) volume to ``size`` = (t, h, w) (align_corners=False).

    With ``antialias`` (for shrinking) the filter widens with the scale factor on every axis, so each
    output token is a weighted average of its whole cell rather than of its 8 nearest inputs. PyTorch
    antialiases only 2-D resizes; the triangle filter is separable, so the volume is resized over
    (H, W) and then over T, each by an antialiased bilinear pass (an axis left at its size is
    unchanged by such a pass). Without ``antialias`` this is ``F.interpolate(mode='trilinear')``.
    Computed in float32 and returned in the input's dtype.
    """
    B, C, T, H, W = x.shape
    t, h, w = size
    # in float32, cast back: CPU kernels of these resizes lack bfloat16 / float16
    if not antialias:
        return F.interpolate(x.float(), size=[t, h, w], mode="trilinear", align_corners=False).to(x.dtype)
    y = x.float()
    # an axis left at its size is unchanged by a pass: skipped when that is known (eager, static shapes)
    if not (known_equal(h, H) and known_equal(w, W)):
        y = F.interpolate(y.reshape(B, C * T, H, W), size=[h, w], mode="bilinear", align_corners=False,
                          antialias=True).view(B, C, T, h, w)
    if not known_equal(t, T):
        y = F.interpolate(y.reshape(B, C, T, h * w), size=[t, h * w], mode="bilinear", align_corners=False,
                          antialias=True).view(B, C, t, h, w)
    return y.to(x.dtype)


def inflate_patch_embed(weight: Tensor, frames: int, mode: str = "central") -> Tensor:
    """A 2-D patch kernel (D, C, p, q) made a tubelet kernel (D, C, frames, p, q).

    ``'central'``: the image kernel in frame ``frames // 2`` and zeros in the others (ViViT,
    Arnab et al. 2021, "central frame initialisation": at the start the model sees one frame of
    each tubelet exactly as the image model saw it). ``'average'``: the kernel divided by
    ``frames`` in every frame (I3D's inflation: a clip of one repeated frame embeds exactly like
    that image).
    """
    if mode not in PATCH_INFLATIONS:
        raise ValueError(f"patch inflation {mode!r} is not one of {PATCH_INFLATIONS}; pick one of them")
    if weight.dim() != 4:
        raise ValueError(f"a 2-D patch kernel is (D, C, p, q); got shape {tuple(weight.shape)}")
    if not isinstance(frames, numbers.Integral) or frames < 1:
        raise ValueError(f"frames={frames!r} must be a positive int (the tubelet's length in frames)")
    if mode == "average":
        return weight.unsqueeze(2).repeat(1, 1, frames, 1, 1) / frames
    out = weight.new_zeros(weight.shape[0], weight.shape[1], frames, *weight.shape[2:])
    out[:, :, frames // 2] = weight
    return out


def tile_pos_embed(pos: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """A spatial (1, H, W, C) position embedding -> (1, t, h, w, C): resampled (bicubic, timm's
    ``resample_abs_pos_embed_nhwc``) to (h, w) and repeated over the t time steps. The same as a
    spatial embedding plus a zero-initialised temporal one, held jointly."""
    t, h, w = grid
    if tuple(pos.shape[1:3]) != (h, w):
        pos = resample_abs_pos_embed_nhwc(pos, [h, w])
    return pos.unsqueeze(1).expand(-1, t, -1, -1, -1).contiguous()


def resample_pos_embed_3d(pos: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """A (1, T, H, W, C) space-time position embedding resampled (trilinear) to ``grid`` = (t, h, w)."""
    if tuple(pos.shape[1:4]) == tuple(grid):
        return pos
    dtype = pos.dtype
    out = F.interpolate(pos.permute(0, 4, 1, 2, 3).float(), size=tuple(grid), mode="trilinear",
                        align_corners=False)
    return out.permute(0, 2, 3, 4, 1).to(dtype).contiguous()
