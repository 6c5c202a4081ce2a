"""Image captioning with a frozen condensed encoder (LookupViT's third domain).

A captioner is a frozen image encoder (any registered model, ours or timm's; for LookupViT its
compressed tokens, optionally both streams) and a transformer text decoder trained on its tokens.
``condensevit caption train|eval|predict`` is the command line; the pieces:

* :mod:`~condensevit.caption.model`: :class:`FrozenEncoder`, :class:`CaptionDecoder`, :class:`Captioner`;
* :mod:`~condensevit.caption.decode`: greedy and beam-search decoding;
* :mod:`~condensevit.caption.tokenizer`: the word-level vocabulary;
* :mod:`~condensevit.caption.data`: the embedded ``digit_scenes`` set and the COCO captions format;
* :mod:`~condensevit.caption.metrics`: BLEU-1..4 and CIDEr-D (pycocoevalcap);
* :mod:`~condensevit.caption.engine`: training, evaluation, loading (docs/captioning.md).
"""
from .data import CocoCaptions, DigitScenes, build_caption_dataset
from .decode import beam_search, greedy
from .engine import (CaptionConfig, CaptionResult, build_encoder, captions_per_second, evaluate_captioner,
                     generate_captions, load_captioner, train_captioner)
from .metrics import caption_scores
from .model import CaptionDecoder, Captioner, FrozenEncoder, encoder_tokens, gmacs_per_caption
from .tokenizer import WordTokenizer, normalize

__all__ = [
    "CaptionConfig", "CaptionResult", "train_captioner", "evaluate_captioner", "load_captioner", "build_encoder",
    "generate_captions", "captions_per_second", "CaptionDecoder", "Captioner", "FrozenEncoder", "encoder_tokens",
    "gmacs_per_caption", "greedy", "beam_search", "WordTokenizer", "normalize", "caption_scores", "DigitScenes",
    "CocoCaptions", "build_caption_dataset",
]
