"""The captioner: a frozen image encoder and an autoregressive transformer decoder that
cross-attends to the encoder's output tokens (the LookupViT paper's captioning set-up: the encoder
is trained for classification, then frozen, and only the text decoder is trained).

* :class:`FrozenEncoder` wraps any registered model (ours or timm's) and returns its tokens
  (B, n, C) from ``forward_features``: all tokens of a ViT / DeiT (prefix and patch tokens), the
  semantic tokens of STViT, the compressed tokens of LookupViT (``streams='both'``: compressed and
  lookup tokens, through ``forward_intermediates``), and 4-D maps flattened (NHWC (B, H, W, C) as
  Swin and STViT-R give, or NCHW). The wrapped model stays in eval mode with every parameter
  frozen, and runs without autograd.
* :class:`CaptionDecoder`: learned token and position embeddings, a linear map of the encoder
  tokens to the decoder width (plus a learned position embedding per encoder token, since
  cross-attention by itself ignores their order), PyTorch's ``nn.TransformerDecoder`` (pre-norm,
  GELU, causal self-attention, fused attention kernels), a final LayerNorm and an output
  projection tied to the token embedding.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FrozenEncoder", "CaptionDecoder", "Captioner", "encoder_tokens", "gmacs_per_caption", "STREAMS"]

STREAMS = ("default", "both")


def _flatten_tokens(x: Tensor, num_features: int | None, output_fmt: str | None = None) -> Tensor:
    """Encoder output as (B, n, C): 3-D as it is, 4-D maps flattened (NHWC or NCHW)."""
    if x.dim() == 3:
        return x
    if x.dim() == 4:
        if output_fmt == "NCHW" or (output_fmt != "NHWC" and num_features is not None and x.shape[-1] != num_features
                                    and x.shape[1] == num_features):
            x = x.permute(0, 2, 3, 1)
        return x.flatten(1, 2)
    raise ValueError(f"encoder output of shape {tuple(x.shape)} is not tokens (B, n, C) nor a map (B, H, W, C); "
                     "use an image model whose forward_features gives tokens")


def encoder_tokens(model: nn.Module, images: Tensor, *, streams: str = "default", **forward_kwargs) -> Tensor:
    """Output tokens (B, n, C) of ``model`` for ``images``; see :class:`FrozenEncoder`."""
    if streams == "both":
        if not hasattr(model, "lookup_grid"):
            raise ValueError("streams='both' applies to LookupViT encoders (compressed and lookup tokens); "
                             f"{type(model).__name__} has one stream")
        last = len(model.blocks) - 1
        pooled, (lookup,) = model.forward_intermediates(images, indices=[last], norm=True, output_fmt="NLC",
                                                        **forward_kwargs)
        if getattr(model, "pool", "compressed") == "both":
            return pooled  # forward_features already gives both streams
        return torch.cat([pooled, lookup], dim=1)
    out = model.forward_features(images, **forward_kwargs)
    return _flatten_tokens(out, getattr(model, "num_features", None), getattr(model, "output_fmt", None))


class FrozenEncoder(nn.Module):
    """A frozen image encoder: ``forward(images (B, C, H, W)) -> tokens (B, n, C)``.

    Args:
        model: any timm-style image model with ``forward_features``.
        streams: 'default' (what ``forward_features`` gives: the compressed tokens for LookupViT)
            or 'both' (LookupViT: compressed then lookup tokens, each after the final norm).
        forward_kwargs: passed to the model on every call (e.g. ``compressed_grid=(3, 3)``).

    Every parameter has ``requires_grad=False``, the model stays in eval mode whatever
    ``train()`` is called with, and the forward runs under ``torch.no_grad()``.
    """

    def __init__(self, model: nn.Module, *, streams: str = "default", **forward_kwargs):
        super().__init__()
        if streams not in STREAMS:
            raise ValueError(f"streams={streams!r} must be one of {STREAMS}")
        self.model = model
        self.streams = streams
        self.forward_kwargs = dict(forward_kwargs)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True):  # frozen: never leaves eval mode (dropout, drop-path, train grids off)
        return super().train(False)

    @property
    def embed_dim(self) -> int:
        return int(getattr(self.model, "num_features", None) or self.model.embed_dim)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return encoder_tokens(self.model, images, streams=self.streams, **self.forward_kwargs)


class CaptionDecoder(nn.Module):
    """Autoregressive transformer decoder over caption tokens, cross-attending to encoder tokens.

    Args:
        vocab_size: tokens of the vocabulary (specials included).
        encoder_dim: width C of the encoder tokens.
        num_memory_tokens: how many encoder tokens n it reads (sizes their position embedding;
            0 turns that embedding off).
        dim, depth, num_heads, mlp_ratio, dropout: the decoder's width, layers, heads, MLP
            ratio and dropout.
        max_len: longest token sequence, ``<bos>`` and ``<eos>`` included.
        pad_id: id of ``<pad>`` (its embedding row is zero and gets no gradient).

    ``forward(memory (B, n, C), tokens (B, L) int64) -> logits (B, L, vocab_size)``: position t
    predicts token t + 1; ``<pad>`` positions are masked as keys.
    """

    def __init__(self, vocab_size: int, encoder_dim: int, num_memory_tokens: int, *, dim: int = 256, depth: int = 3,
                 num_heads: int = 4, mlp_ratio: float = 4.0, dropout: float = 0.1, max_len: int = 32, pad_id: int = 0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder dim {dim} is not divisible by num_heads {num_heads}")
        if max_len < 2:
            raise ValueError(f"max_len {max_len} leaves no room for <bos> and <eos>")
        self.vocab_size, self.dim, self.max_len, self.pad_id = vocab_size, dim, max_len, pad_id
        self.num_memory_tokens = num_memory_tokens
        self.token_embed = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, dim))
        self.memory_proj = nn.Linear(encoder_dim, dim)
        self.memory_pos_embed = nn.Parameter(torch.zeros(1, num_memory_tokens, dim)) if num_memory_tokens else None
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerDecoderLayer(dim, num_heads, dim_feedforward=int(dim * mlp_ratio), dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerDecoder(layer, depth)
        self.norm = nn.LayerNorm(dim)
        self.out_bias = nn.Parameter(torch.zeros(vocab_size))
        self._init_weights()

    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.token_embed.weight, std=self.dim ** -0.5)  # tied: logits start near zero
        with torch.no_grad():
            self.token_embed.weight[self.pad_id].zero_()
        if self.memory_pos_embed is not None:
            nn.init.trunc_normal_(self.memory_pos_embed, std=0.02)
        nn.init.trunc_normal_(self.memory_proj.weight, std=0.02)
        nn.init.zeros_(self.memory_proj.bias)

    def prepare_memory(self, tokens: Tensor) -> Tensor:
        """Encoder tokens (B, n, C) -> decoder memory (B, n, dim), computed once per image."""
        if self.memory_pos_embed is not None and tokens.shape[1] != self.num_memory_tokens:
            raise ValueError(f"the decoder was built for {self.num_memory_tokens} encoder tokens but got "
                             f"{tokens.shape[1]}; use the encoder (and grid / streams) it was trained with")
        m = self.memory_proj(tokens)
        if self.memory_pos_embed is not None:
            m = m + self.memory_pos_embed
        return self.drop(m)

    def forward(self, memory: Tensor, tokens: Tensor, *, last_only: bool = False) -> Tensor:
        """Logits (B, L, V) (``last_only``: (B, V) of the last position) for ``tokens`` (B, L) given
        decoder ``memory`` (B, n, dim) from :meth:`prepare_memory`."""
        L = tokens.shape[1]
        if L > self.max_len:
            raise ValueError(f"{L} tokens exceed the decoder's max_len {self.max_len}")
        x = self.drop(self.token_embed(tokens) + self.pos_embed[:, :L])
        causal = torch.ones(L, L, dtype=torch.bool, device=tokens.device).triu(1)  # True = may not attend
        pad = tokens.eq(self.pad_id)
        x = self.layers(x, memory, tgt_mask=causal, tgt_key_padding_mask=pad, tgt_is_causal=True)
        if last_only:
            x = x[:, -1]
        return F.linear(self.norm(x), self.token_embed.weight, self.out_bias)

    def config(self) -> dict:
        first = self.layers.layers[0]
        return dict(vocab_size=self.vocab_size, encoder_dim=self.memory_proj.in_features,
                    num_memory_tokens=self.num_memory_tokens, dim=self.dim, depth=len(self.layers.layers),
                    num_heads=first.self_attn.num_heads, mlp_ratio=first.linear1.out_features / self.dim,
                    dropout=first.dropout.p, max_len=self.max_len, pad_id=self.pad_id)


class Captioner(nn.Module):
    """A :class:`FrozenEncoder` and a :class:`CaptionDecoder`.

    ``forward(images, tokens) -> logits``: teacher-forced (the tokens are the caption with
    ``<bos>``, without its last token); :meth:`generate` decodes captions
    (:mod:`condensevit.caption.decode`).
    """

    def __init__(self, encoder: FrozenEncoder, decoder: CaptionDecoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def encode(self, images: Tensor) -> Tensor:
        return self.encoder(images)

    def forward(self, images: Tensor, tokens: Tensor) -> Tensor:
        return self.decoder(self.decoder.prepare_memory(self.encode(images)), tokens)

    @torch.no_grad()
    def generate(self, images: Tensor | None = None, *, encoder_tokens: Tensor | None = None, bos_id: int = 1,
                 eos_id: int = 2, max_len: int | None = None, beam_size: int = 1, length_penalty: float = 1.0) -> Tensor:
        """Token ids (B, <= max_len) of the decoded captions (``<bos>`` first, ``<pad>`` after
        ``<eos>``), greedy when ``beam_size == 1``, else beam search."""
        from .decode import beam_search, greedy
        if encoder_tokens is None:
            encoder_tokens = self.encode(images)
        was = self.decoder.training
        self.decoder.eval()
        try:
            memory = self.decoder.prepare_memory(encoder_tokens)
            max_len = max_len or self.decoder.max_len
            if beam_size == 1:
                return greedy(self.decoder, memory, bos_id=bos_id, eos_id=eos_id, max_len=max_len)
            return beam_search(self.decoder, memory, bos_id=bos_id, eos_id=eos_id, max_len=max_len,
                               beam_size=beam_size, length_penalty=length_penalty)
        finally:
            self.decoder.train(was)


def gmacs_per_caption(captioner: Captioner, images: Tensor, **generate_kwargs) -> tuple[float, float, float]:
    """(encoder GMACs, decoder GMACs, mean caption length in words) per caption, counted at batch 1
    over ``images`` (N, C, H, W) and averaged: the encoder's forward, and the decoder's work to
    generate each caption as :meth:`Captioner.generate` does it (memory projection, and every
    decoding step on the prefix so far). Attention is counted through its math form
    (:mod:`condensevit.measure`)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..measure import _CountableAttention

    enc = dec = 0.0
    words = 0
    eos = generate_kwargs.get("eos_id", 2)
    for x in images.split(1):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter, _CountableAttention():
            tokens = captioner.encode(x)
        enc += counter.get_total_flops() / 2
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter, _CountableAttention():
            ids = captioner.generate(encoder_tokens=tokens, **generate_kwargs)
        dec += counter.get_total_flops() / 2
        row = ids[0, 1:].tolist()
        words += row.index(eos) if eos in row else len(row)
    n = max(len(images), 1)
    return enc / n / 1e9, dec / n / 1e9, words / n
