"""Word-level tokenizer of captions: a vocabulary built from the training captions with a minimum
count, and the four special tokens ``<pad>`` (0), ``<bos>`` (1), ``<eos>`` (2), ``<unk>`` (3).

Text is normalised the same way for training, decoding and scoring (:func:`normalize`): lower case,
punctuation dropped, split on white space. The COCO caption toolkit normalises with the Stanford
PTB tokenizer, which needs Java; ours is the pure-Python approximation that the papers' scripts
use for their vocabularies (lower case, strip punctuation). Scores computed on text normalised
another way are not comparable to the third decimal.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Sequence

import torch

__all__ = ["WordTokenizer", "normalize", "PAD", "BOS", "EOS", "UNK", "SPECIALS"]

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)

# anything that is not a letter, a digit, an apostrophe inside a word or white space is punctuation
_PUNCT = re.compile(r"[^\w\s']|_|(?<!\w)'|'(?!\w)")


def normalize(caption: str) -> list[str]:
    """Lower-cased words of ``caption`` with punctuation dropped: ``"A cat, on the mat."`` ->
    ``['a', 'cat', 'on', 'the', 'mat']``."""
    return _PUNCT.sub(" ", caption.lower()).split()


class WordTokenizer:
    """Maps captions to token ids and back.

    Args:
        words: the vocabulary after the four specials, in id order (ids 4, 5, ...).

    Build one from captions with :meth:`build`; store it with :meth:`to_dict` / :meth:`from_dict`
    (the caption checkpoints keep it in their metadata).
    """

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, words: Sequence[str]):
        words = list(words)
        clash = [w for w in words if w in SPECIALS]
        if clash:
            raise ValueError(f"vocabulary words {clash} clash with the special tokens {SPECIALS}")
        if len(set(words)) != len(words):
            raise ValueError("vocabulary words must be unique")
        self.itos = list(SPECIALS) + words
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> "WordTokenizer":
        """The words that occur at least ``min_count`` times in ``captions``, most frequent first
        (ties alphabetical, so the same captions always give the same ids)."""
        if min_count < 1:
            raise ValueError(f"min_count {min_count} must be at least 1")
        counts = Counter(w for c in captions for w in normalize(c))
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        if not words:
            raise ValueError(f"no word occurs {min_count} or more times in the training captions; lower --min-count")
        return cls(words)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other) -> bool:
        return isinstance(other, WordTokenizer) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"WordTokenizer({len(self)} tokens)"

    def to_dict(self) -> dict:
        return {"type": "word", "words": self.itos[len(SPECIALS):]}

    @classmethod
    def from_dict(cls, d: dict) -> "WordTokenizer":
        if not isinstance(d, dict) or d.get("type") != "word" or not isinstance(d.get("words"), list):
            raise ValueError("not a condensevit word vocabulary (expected {'type': 'word', 'words': [...]})")
        return cls(d["words"])

    def encode(self, caption: str, max_len: int | None = None) -> list[int]:
        """``<bos> w1 ... wn <eos>`` as ids; words beyond ``max_len`` tokens in all are cut (the
        ``<eos>`` is kept)."""
        ids = [self.stoi.get(w, self.unk_id) for w in normalize(caption)]
        if max_len is not None:
            if max_len < 2:
                raise ValueError(f"max_len {max_len} leaves no room for <bos> and <eos>")
            ids = ids[:max_len - 2]
        return [self.bos_id, *ids, self.eos_id]

    def encode_batch(self, captions: Sequence[str], max_len: int) -> torch.Tensor:
        """(len(captions), max_len) int64 ids, padded with ``<pad>``."""
        out = torch.full((len(captions), max_len), self.pad_id, dtype=torch.long)
        for i, c in enumerate(captions):
            ids = self.encode(c, max_len)
            out[i, :len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """The words of ``ids`` up to the first ``<eos>`` (``<bos>`` and ``<pad>`` skipped)."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.bos_id, self.pad_id):
                continue
            words.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return " ".join(words)
