"""Shared-logit multi-head bidirectional cross-attention (MHBC), after LookupViT (Koner et al., ECCV 2024).

Two token sets: a few *compressed* tokens (M of them) and many *lookup* tokens (N). One logit
matrix per head is computed once and read in both directions::

    S = q_c k_lᵀ / sqrt(d)                        (B, heads, M, N)   q from compressed, k from lookup
    gather:  softmax(S,  over N) @ v_l  -> proj   (B, M, C)  information flows lookup -> compressed
    scatter: softmax(Sᵀ, over M) @ v_c  -> proj   (B, N, C)  information flows compressed -> lookup

The scatter normalises the *logits* over the compressed tokens; it does not reuse (transpose) the
gather probabilities, which are normalised over the other axis. The lookup tokens need no query
projection. Between the two directions the caller may refine the compressed tokens (LookupViT runs
a transformer block on them); the scatter's values are projected from whatever it is given.

The pure tensor functions (:func:`shared_logits`, :func:`gather_from_logits`,
:func:`scatter_from_logits`) are separate from the module that owns the projections, so other
families can reuse them.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .attention import merge_heads, split_heads

__all__ = [
    "BidirectionalCrossAttention", "shared_logits", "gather_from_logits", "scatter_from_logits",
]


def shared_logits(q: Tensor, k: Tensor) -> Tensor:
    """Scaled logits ``q kᵀ / sqrt(d)`` of (B, heads, M, d) queries and (B, heads, N, d) keys: (B, heads, M, N)."""
    return (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)


def gather_from_logits(logits: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tuple[Tensor, Tensor]:
    """Each of the M rows attends over the N columns: ``softmax(S, -1) @ v`` with v (B, heads, N, d).

    Returns the output (B, heads, M, d) and the probabilities (B, heads, M, N), rows summing to 1.
    """
    attn = logits.softmax(dim=-1)
    out = (F.dropout(attn, dropout_p) if dropout_p > 0 else attn) @ v
    return out, attn


def scatter_from_logits(logits: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tuple[Tensor, Tensor]:
    """Each of the N columns attends over the M rows: ``softmax(Sᵀ, -1) @ v`` with v (B, heads, M, d).

    Returns the output (B, heads, N, d) and the probabilities as (B, heads, N, M), each lookup
    token's row summing to 1 over the compressed tokens.
    """
    # softmax(Sᵀ, -1) is softmax(S, -2) read transposed: normalising over M in place avoids a
    # copy of the (B, heads, N, M) logits, and the matmul reads the transposed view for free.
    attn = logits.softmax(dim=-2).transpose(-2, -1)
    out = (F.dropout(attn, dropout_p) if dropout_p > 0 else attn) @ v
    return out, attn


class BidirectionalCrossAttention(nn.Module):
    """Shared-logit bidirectional cross-attention between compressed (M) and lookup (N) tokens.

    Parameters: ``q`` (compressed queries), ``kv`` (lookup keys and values, the layout of a ViT
    block's ``qkv`` without its first third), ``gather_proj`` (output of the gather),
    ``scatter_v`` (values projected from the compressed tokens) and ``scatter_proj`` (output of
    the scatter). Inputs are expected to be normalised already (the block owns the norms).

    Use :meth:`gather` then, after refining the compressed tokens, :meth:`scatter` with the
    logits the gather returned; :meth:`forward` does both on the same compressed tokens.
    ``scatter=False`` builds the gather only (no ``scatter_v`` / ``scatter_proj``), for a caller
    whose lookup tokens are not read after it (:meth:`add_scatter` adds them later).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            *,
            qkv_bias: bool = True,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
            scatter: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}; pick num_heads dividing dim")
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.qkv_bias = qkv_bias
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        self.gather_proj = nn.Linear(dim, dim, **dd)
        self.scatter_v = self.scatter_proj = None
        if scatter:
            self.add_scatter(**dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def add_scatter(self, device=None, dtype=None) -> None:
        """Build the scatter's projections (``scatter_v``, ``scatter_proj``), PyTorch's default init."""
        dim = self.q.in_features
        dd = dict(device=device, dtype=dtype)
        self.scatter_v = nn.Linear(dim, dim, bias=self.qkv_bias, **dd)
        self.scatter_proj = nn.Linear(dim, dim, **dd)

    def _drop(self) -> float:
        return self.attn_drop if self.training else 0.0

    def gather(self, compressed: Tensor, lookup: Tensor, return_attn: bool = False):
        """Compressed (B, M, C) tokens read the lookup (B, N, C) tokens.

        Returns ``(out (B, M, C), logits (B, heads, M, N))``, plus the gather probabilities
        (B, heads, M, N) when ``return_attn`` (eager mode). Pass the logits to :meth:`scatter`.
        """
        out, logits, attn = self._gather(compressed, lookup)
        if return_attn and not torch.jit.is_scripting():
            return out, logits, attn
        return out, logits

    def _gather(self, compressed: Tensor, lookup: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """:meth:`gather` with one return type (TorchScript): (out, logits, probabilities)."""
        B, N, C = lookup.shape
        q = split_heads(self.q(compressed), self.num_heads)
        kv = self.kv(lookup).view(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        logits = shared_logits(q, k)
        out, attn = gather_from_logits(logits, v, self._drop())
        out = self.proj_drop(self.gather_proj(merge_heads(out)))
        return out, logits, attn

    def scatter(self, logits: Tensor, compressed: Tensor, return_attn: bool = False):
        """Lookup tokens read the (refined) compressed (B, M, C) tokens through the gather's logits.

        Returns (B, N, C), plus the scatter probabilities (B, heads, N, M) when ``return_attn``
        (eager mode).
        """
        out, attn = self._scatter(logits, compressed)
        if return_attn and not torch.jit.is_scripting():
            return out, attn
        return out

    def _scatter(self, logits: Tensor, compressed: Tensor) -> Tuple[Tensor, Tensor]:
        """:meth:`scatter` with one return type (TorchScript): (out, probabilities)."""
        if self.scatter_v is None or self.scatter_proj is None:   # static under TorchScript: a gather-only module
            raise RuntimeError("this BidirectionalCrossAttention was built with scatter=False (gather only); "
                               "call add_scatter() first")
        v = split_heads(self.scatter_v(compressed), self.num_heads)
        out, attn = scatter_from_logits(logits, v, self._drop())
        out = self.proj_drop(self.scatter_proj(merge_heads(out)))
        return out, attn

    def forward(self, compressed: Tensor, lookup: Tensor) -> Tuple[Tensor, Tensor]:
        """Both directions with no refinement in between: (to_compressed (B, M, C), to_lookup (B, N, C))."""
        gathered, logits = self.gather(compressed, lookup)
        return gathered, self.scatter(logits, compressed)
