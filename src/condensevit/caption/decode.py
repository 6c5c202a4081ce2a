"""Decoding captions from a :class:`~condensevit.caption.model.CaptionDecoder`: greedy and beam search.

Both return token ids (B, T) with ``<bos>`` first, at most ``max_len`` tokens in all (``<bos>`` and
``<eos>`` included), and ``<pad>`` (0) after ``<eos>``; a caption that reaches ``max_len`` without
``<eos>`` is cut there. Each step runs the decoder on the whole prefix (``nn.TransformerDecoder``
keeps no key/value cache; captions are short) and projects only the last position to the
vocabulary. Greedy stops as soon as every caption has ended.

Beam search keeps ``beam_size`` live hypotheses per image, ranks finished ones by
``sum of log-probabilities / length ** length_penalty`` (length = generated tokens, ``<eos>``
included; 0 turns the normalisation off, larger values favour longer captions), and stops an
image when it has ``beam_size`` finished hypotheses and no live one can still rank above them at
its current length (the rule of Hugging Face's ``BeamSearchScorer`` with ``early_stopping=False``).
With ``beam_size=1`` it returns exactly what greedy decoding returns.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["greedy", "beam_search"]


def _check(max_len: int, beam_size: int = 1, length_penalty: float = 0.0):
    if isinstance(max_len, bool) or int(max_len) != max_len or max_len < 2:
        raise ValueError(f"max_len {max_len} must be an int of at least 2 (<bos> and <eos>)")
    if isinstance(beam_size, bool) or int(beam_size) != beam_size or beam_size < 1:
        raise ValueError(f"beam_size {beam_size} must be a positive int")
    if length_penalty != length_penalty:  # NaN
        raise ValueError("length_penalty must be a number")


@torch.no_grad()
def greedy(decoder, memory: Tensor, *, bos_id: int = 1, eos_id: int = 2, pad_id: int = 0, max_len: int = 32) -> Tensor:
    """The most likely next token at every step. ``memory``: (B, n, dim) from
    ``decoder.prepare_memory``. Returns (B, T) ids, T <= ``max_len``."""
    _check(max_len)
    B = memory.shape[0]
    tokens = torch.full((B, 1), bos_id, dtype=torch.long, device=memory.device)
    done = torch.zeros(B, dtype=torch.bool, device=memory.device)
    for _ in range(max_len - 1):
        nxt = decoder(memory, tokens, last_only=True).argmax(-1)
        nxt = nxt.masked_fill(done, pad_id)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done |= nxt.eq(eos_id)
        if bool(done.all()):  # one host read per step: decoding is a loop on the host anyway
            break
    return tokens


@torch.no_grad()
def beam_search(decoder, memory: Tensor, *, bos_id: int = 1, eos_id: int = 2, pad_id: int = 0, max_len: int = 32,
                beam_size: int = 3, length_penalty: float = 1.0) -> Tensor:
    """Beam search (see the module docstring). Returns (B, T) ids, T <= ``max_len``."""
    _check(max_len, beam_size, length_penalty)
    B, k, dev = memory.shape[0], int(beam_size), memory.device
    mem = memory.repeat_interleave(k, dim=0)                       # (B*k, n, dim)
    tokens = torch.full((B * k, 1), bos_id, dtype=torch.long, device=dev)
    scores = torch.full((B, k), float("-inf"), dtype=torch.float64, device=dev)
    scores[:, 0] = 0.0                                             # one live beam to start from
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    active = [True] * B

    def norm(score: float, length: int) -> float:
        return score / (length ** length_penalty)

    for step in range(1, max_len):
        logp = F.log_softmax(decoder(mem, tokens, last_only=True).double(), dim=-1)   # (B*k, V)
        V = logp.shape[-1]
        cand = (scores.reshape(-1, 1) + logp).reshape(B, k * V)
        top_s, top_i = cand.topk(min(2 * k, k * V), dim=1)
        top_s, top_i = top_s.tolist(), top_i.tolist()
        rows, next_tok, next_scores = [], [], []
        prefixes = tokens[:, 1:].tolist()
        for b in range(B):
            keep: list[tuple[float, int, int]] = []
            if active[b]:
                for rank, (s, i) in enumerate(zip(top_s[b], top_i[b])):
                    if s == float("-inf"):
                        break
                    beam, tok = divmod(i, V)
                    row = b * k + beam
                    if tok == eos_id:
                        if rank < k:  # a finished hypothesis counts only from the top k
                            finished[b].append((norm(s, step), prefixes[row] + [eos_id]))
                    else:
                        keep.append((s, row, tok))
                    if len(keep) == k:
                        break
                finished[b].sort(key=lambda h: -h[0])
                del finished[b][k:]
                if len(finished[b]) == k and (not keep or norm(keep[0][0], step) <= finished[b][-1][0]):
                    active[b] = False
            if not active[b] or not keep:
                active[b] = False
                keep = [(float("-inf"), b * k, pad_id)] * k        # idle rows keep the batch shape
            keep += [(float("-inf"), keep[0][1], pad_id)] * (k - len(keep))
            for s, row, tok in keep:
                rows.append(row)
                next_tok.append(tok)
                next_scores.append(s)
        if not any(active):
            break
        idx = torch.tensor(rows, device=dev)
        tokens = torch.cat([tokens[idx], torch.tensor(next_tok, device=dev)[:, None]], dim=1)
        scores = torch.tensor(next_scores, dtype=torch.float64, device=dev).reshape(B, k)
    else:  # max_len reached: the live hypotheses end there, without <eos>
        prefixes = tokens[:, 1:].tolist()
        flat = scores.reshape(-1).tolist()
        for b in range(B):
            if active[b]:
                for j in range(k):
                    s = flat[b * k + j]
                    if s != float("-inf"):
                        finished[b].append((norm(s, max_len - 1), prefixes[b * k + j]))
                finished[b].sort(key=lambda h: -h[0])
    best = [max(f, key=lambda h: h[0])[1] if f else [] for f in finished]
    T = 1 + max(len(s) for s in best)
    out = torch.full((B, T), pad_id, dtype=torch.long, device=dev)
    out[:, 0] = bos_id
    for b, seq in enumerate(best):
        if seq:
            out[b, 1:1 + len(seq)] = torch.tensor(seq, device=dev)
    return out
