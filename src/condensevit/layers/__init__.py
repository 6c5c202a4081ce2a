"""Reusable primitives: attention (self, cross, shared-logit bidirectional), windows, pooling."""
from .attention import CrossAttention, attend, merge_heads, split_heads, split_qkv
from .bidirectional import BidirectionalCrossAttention, gather_from_logits, scatter_from_logits, shared_logits
from .pooling import POOL_MODES, TokenScorer, WindowGrid, WindowPool, window_grid, window_index
from .windows import (
    gather_neighbourhoods, neighbourhood_index, pad_to_multiple, round_up, shifted_window_mask, window_partition,
    window_neighbourhood_index, window_reverse,
)

__all__ = [
    "CrossAttention", "attend", "merge_heads", "split_heads", "split_qkv",
    "BidirectionalCrossAttention", "gather_from_logits", "scatter_from_logits", "shared_logits",
    "POOL_MODES", "TokenScorer", "WindowGrid", "WindowPool", "window_grid", "window_index",
    "gather_neighbourhoods", "neighbourhood_index", "pad_to_multiple", "round_up", "shifted_window_mask",
    "window_neighbourhood_index", "window_partition", "window_reverse",
]
