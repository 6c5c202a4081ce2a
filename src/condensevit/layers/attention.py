"""Attention primitives shared by every family.

One function, :func:`attend`, chooses between the fused kernel (``F.scaled_dot_product_attention``)
and a plain path that also returns the attention probabilities (for visualisation and tests).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .tracing import building_graph

__all__ = ["attend", "CrossAttention", "split_heads", "merge_heads", "split_qkv"]


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, N, H*D) -> (B, H, N, D)."""
    B, N, C = x.shape
    return x.view(B, N, num_heads, C // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, N, D) -> (B, N, H*D)."""
    B, H, N, D = x.shape
    x = x.transpose(1, 2)
    if torch.jit.is_scripting():
        return x.reshape(B, N, H * D)
    if building_graph(x):
        # a fused kernel's output layout differs between kernels, and changes when the ONNX exporter
        # decomposes the kernel: a copy to the standard layout keeps the recorded reshape valid for all
        x = x.clone(memory_format=torch.contiguous_format)
    return x.reshape(B, N, H * D)


def attend(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Optional[Tensor] = None,
        dropout_p: float = 0.0,
        fused: bool = True,
        return_attn: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Scaled dot-product attention over (..., heads, tokens, head_dim) tensors.

    ``attn_mask`` is additive (float) or boolean (True = keep), broadcastable to the logits.
    With ``return_attn`` the plain path runs and the softmax probabilities come back too.
    """
    if fused and not return_attn:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p), None
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask
    attn = logits.softmax(dim=-1)
    out = F.dropout(attn, dropout_p) @ v if dropout_p > 0 else attn @ v
    return out, (attn if return_attn else None)


class CrossAttention(nn.Module):
    """Multi-head attention with queries from one token set and keys/values from another.

    Parameters are ``q`` (dim -> dim), ``kv`` (dim -> 2*dim) and ``proj``, the layout of the
    STViT-R code; a ViT block's fused ``qkv`` splits onto it with :func:`split_qkv`.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            *,
            qkv_bias: bool = True,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
            fused_attn: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.fused_attn = fused_attn
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def project_kv(self, context: Tensor) -> Tuple[Tensor, Tensor]:
        """Keys and values (B, heads, N, D) of a context, projected once per token."""
        k, v = self.kv(context).chunk(2, dim=-1)
        return split_heads(k, self.num_heads), split_heads(v, self.num_heads)

    def forward(
            self,
            x: Tensor,
            context: Optional[Tensor] = None,
            attn_mask: Optional[Tensor] = None,
            return_attn: bool = False,
    ):
        """``x`` (B, M, C) attends to ``context`` (B, N, C) (itself when None).

        Returns (B, M, C), or ``(out, attn)`` with attn (B, heads, M, N) when ``return_attn``
        (eager mode; a TorchScript module returns the output only).
        """
        k, v = self.project_kv(x if context is None else context)
        out, attn = self.attend_projected(x, k, v, attn_mask=attn_mask, return_attn=return_attn)
        if return_attn and not torch.jit.is_scripting():
            return out, attn
        return out

    def attend_projected(self, x: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
                         return_attn: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """Attention of ``x`` over keys/values that were already projected (and perhaps gathered)."""
        q = split_heads(self.q(x), self.num_heads)
        out, attn = attend(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0,
            fused=self.fused_attn, return_attn=return_attn)
        return self.proj_drop(self.proj(merge_heads(out))), attn


def split_qkv(weight: Tensor, bias: Optional[Tensor] = None):
    """Split a fused (3*dim, dim) qkv projection into ``q`` (dim, dim) and ``kv`` (2*dim, dim)."""
    dim = weight.shape[0] // 3
    q_w, kv_w = weight[:dim], weight[dim:]
    if bias is None:
        return q_w, kv_w, None, None
    return q_w, kv_w, bias[:dim], bias[dim:]
