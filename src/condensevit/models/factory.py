"""Building any registered model (ours or timm's) by name, with the checks a user needs: the one
factory behind ``condensevit train``, ``eval``, ``viz``, ``bench`` and the Python API.

* :func:`check_model_name`: an unknown name is a one-line error with the closest registered names;
* :func:`normalize_kwargs`: constructor arguments read back from JSON (lists) as the tuples the
  models take (``compressed_grid=(3, 3)``);
* :func:`create_model`: ``timm.create_model`` with a clear error for arguments a model refuses and
  for a ``pretrained_file`` that does not fit (loaded through the family's checkpoint filter);
* :func:`model_input_size_for`: the (C, H, W) / (C, T, H, W) input a built model takes;
* :func:`is_video_model_name`: whether a registered name takes clips, without building it.

Errors are :class:`condensevit.cli.UsageError` (a ``ValueError``: one line, exit code 2 on the
command line) or :class:`~condensevit.models.CheckpointError`.
"""
from __future__ import annotations

import difflib

import torch.nn as nn

__all__ = ["check_model_name", "normalize_kwargs", "create_model", "model_input_size_for", "is_video_model_name"]


def _usage_error(msg: str):
    from ..cli import UsageError
    return UsageError(msg)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def normalize_kwargs(kwargs: dict) -> dict:
    """JSON turns tuples into lists; model arguments such as ``compressed_grid`` want tuples."""
    def conv(v):
        if isinstance(v, list):
            return tuple(conv(x) for x in v)
        return v
    return {k: conv(v) for k, v in dict(kwargs).items()}


def check_model_name(name: str):
    """A clear error for a missing or unknown model name, with the closest registered names."""
    import timm

    import condensevit  # noqa: F401  (registers our models)
    if not name:
        raise _usage_error("no model given; pass --model NAME (`condensevit models` lists ours)")
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `condensevit models` lists ours, timm.list_models() all"
    raise _usage_error(f"unknown model {name!r}{hint}")


def create_model(name: str, *, num_classes: int, model_kwargs: dict | None = None,
                 pretrained_file: str | None = None) -> nn.Module:
    """``timm.create_model`` for any registered model, ours or timm's. ``pretrained_file``
    initialises it through the model's checkpoint filter (``pretrained_cfg_overlay``); a
    classifier of another size is replaced by a fresh one.

    Raises ``UsageError`` (unknown name, arguments the model refuses, a reserved keyword in
    ``model_kwargs``) and ``CheckpointError`` (a ``pretrained_file`` that is missing, truncated or
    does not fit)."""
    import timm

    from ._builder import CheckpointError, read_checkpoint, resolve_checkpoint_path

    check_model_name(name)
    if pretrained_file:
        pretrained_file = resolve_checkpoint_path(pretrained_file)  # a run folder: its last.safetensors
    kwargs = normalize_kwargs(model_kwargs or {})
    for reserved in ("num_classes", "pretrained", "pretrained_cfg_overlay"):
        if reserved in kwargs:
            raise _usage_error(f"model kwarg {reserved!r} is set by condensevit itself; leave it out")
    extra = {}
    state_dict = None
    what = ""
    if pretrained_file:
        state_dict = read_checkpoint(pretrained_file)  # clear errors for missing / truncated files
        recorded = recorded_model(pretrained_file)
        if recorded:
            _check_source_family(name, recorded, pretrained_file)
            what = f" (a {recorded} checkpoint, from its metadata)"
        extra = dict(pretrained=True, pretrained_cfg_overlay=dict(state_dict=dict(state_dict)))
    try:
        model = timm.create_model(name, num_classes=num_classes, **extra, **kwargs)
    except CheckpointError as e:
        raise CheckpointError(f"pretrained file {pretrained_file!r}{what}: {e}") from e
    except (TypeError, ValueError, AssertionError) as e:
        if pretrained_file and what:  # a filter that could not read it; the file says what it is
            raise CheckpointError(f"pretrained file {pretrained_file!r}{what} does not fit {name}: "
                                  f"{first_line(e)}") from e
        raise _usage_error(f"cannot build {name} with {kwargs}: {first_line(e)}") from e
    except RuntimeError as e:
        if pretrained_file:
            raise CheckpointError(f"pretrained file {pretrained_file!r}{what} does not fit {name} {kwargs}: "
                                  f"{first_line(e)}") from e
        raise
    if state_dict is not None and not type(model).__module__.startswith("condensevit"):
        # timm loads foreign weights with strict=False when the classifier is replaced: make sure
        # the file really was this model's, not silently ignored
        own = model.state_dict()
        fits = sum(1 for k, v in own.items() if k in state_dict and state_dict[k].shape == v.shape)
        if fits < 0.5 * len(own):
            raise CheckpointError(
                f"pretrained file {pretrained_file!r} does not fit {name}: only {fits} of its {len(own)} "
                "tensors are found with the right shape; is it a checkpoint of this model and size?")
    return model


def recorded_model(path: str) -> str | None:
    """The model a condensevit weights file records in its metadata (safetensors header), or None
    for any other file."""
    if not str(path).endswith(".safetensors"):
        return None
    try:
        import json

        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "condensevit":
            return None
        model = meta.get("model")
        return json.loads(model) if model and model.startswith('"') else model
    except Exception:  # noqa: BLE001  (unreadable headers are read_checkpoint's to report)
        return None


_FAMILY_SOURCES = {
    "STViT": "DeiT / ViT checkpoints or STViT ones",
    "LookupViT": "ViT / DeiT checkpoints or LookupViT ones",
    "STViT-R": "STViT-R checkpoints (the authors' release, huggingface.co/csncsn/STViT-R, or ours)",
    "ViT": "ViT / DeiT checkpoints",
}


def checkpoint_family(name: str) -> str | None:
    """The family whose weights a model holds, as far as converting checkpoints goes: STViT,
    STViT-R, LookupViT, ViT (timm's ViT / DeiT and our video baseline), or None (any other)."""
    if name.startswith("stvit_r"):
        return "STViT-R"
    if name.startswith("stvit_"):
        return "STViT"
    if name.startswith("lookupvit"):
        return "LookupViT"
    import timm
    if name.startswith("vit_video") or timm.models.is_model_in_modules(name, ["vision_transformer", "deit"]):
        return "ViT"
    return None


def _check_source_family(name: str, recorded: str, path: str):
    """A clear error, from the file's metadata, when a checkpoint of another family is given as
    the pretrained file (the family's converter would fail on some tensor with a reason that does
    not say so)."""
    from ._builder import CheckpointError

    target, source = checkpoint_family(name), checkpoint_family(recorded)
    if target is None or source is None or source == target or (source == "ViT" and target in ("STViT", "LookupViT")):
        return
    raise CheckpointError(
        f"pretrained file {path!r} holds a {recorded} ({source}, says its metadata), but {name} ({target}) "
        f"initialises from {_FAMILY_SOURCES[target]}; give one of those, or train --model {recorded}")


def model_input_size_for(model: nn.Module, kwargs: dict) -> tuple[int, ...]:
    """(C, H, W) to feed, or (C, T, H, W) for a video model: the ``img_size`` (and, for video,
    ``num_frames``) the user built the model with, else what the model says."""
    from ..data import model_input_size

    size = tuple(model_input_size(model))
    img = kwargs.get("img_size")
    if img is not None:
        img = (img, img) if isinstance(img, int) else tuple(img)
        size = (*size[:-2], int(img[-2]), int(img[-1]))
    if len(size) == 4 and kwargs.get("num_frames") is not None:
        size = (size[0], int(kwargs["num_frames"]), size[2], size[3])
    return size


def is_video_model_name(name: str) -> bool:
    """Whether the registered model ``name`` takes clips, from its default config (no model built)."""
    try:
        from timm.models import get_pretrained_cfg
        cfg = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001  (no config: decided once the model is built)
        return False
    return cfg is not None and len(tuple(getattr(cfg, "input_size", None) or ())) == 4
