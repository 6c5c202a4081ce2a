"""Reusable primitives: attention (self, cross, shared-logit bidirectional), windows, pooling."""
from .attention import CrossAttention, attend, merge_heads, split_heads, split_qkv

__all__ = ["CrossAttention", "attend", "merge_heads", "split_heads", "split_qkv"]
