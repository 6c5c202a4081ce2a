"""Caption metrics from the COCO caption toolkit (``pycocoevalcap``): BLEU-1..4 and CIDEr-D,
corpus-level, each generated caption against all reference captions of its image.

Only the toolkit's pure-Python scorers are imported (``pycocoevalcap.bleu``, ``pycocoevalcap.cider``):
METEOR and SPICE run Java programs and are left out, and so is the toolkit's PTB tokenizer (Java);
captions are normalised by :func:`condensevit.caption.tokenizer.normalize` instead (lower case,
punctuation dropped). The toolkit's ``Cider`` is CIDEr-D (clipped n-gram counts, a Gaussian
length penalty with sigma 6, times 10), with document frequencies from the references of the
scored set, as the COCO evaluation server computes it.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from .tokenizer import normalize

__all__ = ["caption_scores", "METRICS"]

METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "cider")


def _scorers():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as e:  # pragma: no cover  (a core dependency)
        raise ImportError("caption metrics need pycocoevalcap: pip install pycocoevalcap") from e
    return Bleu, Cider


def caption_scores(predictions: Mapping | Sequence[str], references: Mapping | Sequence[Sequence[str]]) -> dict:
    """BLEU-1..4 and CIDEr-D (floats; BLEU in [0, 1], CIDEr-D in [0, 10]) of generated captions.

    Args:
        predictions: one caption per image, as a list or a mapping image id -> caption.
        references: the reference captions of each image (list of lists, or mapping image id ->
            list), in the same order / with the same ids.

    Raises:
        ValueError: the two do not cover the same images, or an image has no reference.
    """
    if not isinstance(predictions, Mapping):
        predictions = dict(enumerate(predictions))
    if not isinstance(references, Mapping):
        references = dict(enumerate(references))
    if set(predictions) != set(references):
        raise ValueError(f"predictions cover {len(predictions)} images and references {len(references)}; "
                         "give one prediction per referenced image")
    if not predictions:
        raise ValueError("no captions to score")
    res, gts = {}, {}
    for k in predictions:
        refs = [" ".join(normalize(r)) for r in references[k]]
        if not refs:
            raise ValueError(f"image {k!r} has no reference captions")
        gts[k] = refs
        res[k] = [" ".join(normalize(predictions[k]))]
    Bleu, Cider = _scorers()
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return dict(bleu1=float(bleu[0]), bleu2=float(bleu[1]), bleu3=float(bleu[2]), bleu4=float(bleu[3]),
                cider=float(cider))
