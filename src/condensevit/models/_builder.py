"""Shared machinery of the model families: building through timm, reading checkpoint files,
and checking converted state dicts so that a wrong checkpoint fails with a clear message."""
from __future__ import annotations

import fnmatch
import numbers
import os
import pickle
from typing import Callable, Iterable

import torch
import torch.nn as nn
from timm.layers import get_device_dtype
from timm.models import build_model_with_cfg

__all__ = ["CheckpointError", "read_checkpoint", "build", "complete_state_dict", "unwrap_state_dict",
           "new_classifier"]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or that does not fit the model."""


_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")


def unwrap_state_dict(checkpoint) -> dict[str, torch.Tensor]:
    """Find the state dict inside the usual wrappers ({'model': ...}, {'state_dict': ...}, DDP's
    'module.' prefix) and keep the tensors."""
    sd = checkpoint
    while isinstance(sd, dict):
        inner = next((k for k in _WRAPPER_KEYS if isinstance(sd.get(k), dict)), None)
        if inner is None:
            break
        sd = sd[inner]
    if not isinstance(sd, dict):
        raise CheckpointError(f"the checkpoint holds a {type(sd).__name__}, not a state dict")
    out = {}
    for k, v in sd.items():
        if not torch.is_tensor(v):
            continue
        out[k[len("module."):] if k.startswith("module.") else k] = v
    if not out:
        raise CheckpointError("the checkpoint holds no tensors")
    return out


RUN_WEIGHTS_NAME = "last.safetensors"  # a training run's weights (condensevit.train.checkpoint.WEIGHTS_NAME)
_CHECKPOINT_EXTENSIONS = (".safetensors", ".pth", ".pt", ".bin")


def resolve_checkpoint_path(path: str | os.PathLike) -> str:
    """The weights file ``path`` stands for: a training run's folder stands for its
    ``last.safetensors`` (as ``train --resume`` takes a run folder); any other folder is a
    :class:`CheckpointError` naming the checkpoint files it holds. A file path is returned as is."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return path
    last = os.path.join(path, RUN_WEIGHTS_NAME)
    if os.path.isfile(last):
        return last
    found = sorted(f for f in os.listdir(path) if f.endswith(_CHECKPOINT_EXTENSIONS))
    if found:
        raise CheckpointError(f"{path!r} is a folder, not a checkpoint file; pass one of its files, e.g. "
                              f"{os.path.join(path, found[0])!r} (it holds {', '.join(found[:4])}"
                              f"{', ...' if len(found) > 4 else ''})")
    raise CheckpointError(f"{path!r} is a folder that holds no checkpoint (no {RUN_WEIGHTS_NAME} of a training run, "
                          f"no {' / '.join(_CHECKPOINT_EXTENSIONS)} file); pass the weights file itself")


def _training_state_error(ckpt, path: str) -> CheckpointError | None:
    """The error for a training run's state file (optimizer, schedule, generators: no weights)
    given where weights are wanted, pointing at the weights file beside it."""
    if not (isinstance(ckpt, dict) and "optimizer" in ckpt and ("global_step" in ckpt or "epoch" in ckpt)):
        return None
    name = ckpt.get("weights_file")
    name = os.path.basename(name) if isinstance(name, str) and name else RUN_WEIGHTS_NAME
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), name)
    return CheckpointError(f"it is a training run's state (optimizer, schedule, random generators), not its weights; "
                           f"pass {beside!r} beside it (or its folder), or resume training from it with --resume")


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read weights from a .safetensors or a torch (.pth/.pt/.bin) file, unwrapped; a training
    run's folder stands for its ``last.safetensors`` (:func:`resolve_checkpoint_path`).

    Raises :class:`CheckpointError` naming the file and the fix when the file is missing,
    truncated or not a checkpoint (a run's ``last.state.pth`` is named as its training state).
    """
    path = resolve_checkpoint_path(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path!r}; check the path")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint file {path!r} is empty; re-download or re-save it")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        # safetensors files start with an 8-byte little-endian header length, then '{'
        if path.endswith(".safetensors") or (len(head) == 8 and _looks_like_safetensors(path)):
            from safetensors.torch import load_file
            return unwrap_state_dict(load_file(path, device="cpu"))
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # older checkpoints (e.g. the STViT-R releases) pickle argparse/yacs configs beside
            # the weights; only load those the user handed us explicitly
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        state_error = _training_state_error(ckpt, path)
        if state_error is not None:
            raise state_error
        return unwrap_state_dict(ckpt)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {path!r}: {e}") from e
    except Exception as e:  # torch, zipfile, pickle and safetensors each raise their own kinds
        raise CheckpointError(
            f"checkpoint file {path!r} could not be read ({type(e).__name__}: {str(e)[:200]}); "
            "it is probably truncated or corrupt: download or save it again") from e


def _looks_like_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < 100_000_000 and head[8:9] == b"{"


def as_positive_ints(value, name: str, n: int, example: str) -> tuple[int, ...]:
    """``n`` positive ints from an int (``n == 2`` only: a square) or a sequence of ``n``; a
    ``ValueError`` naming ``name`` and an example otherwise (a string such as ``'abc'``, a float,
    zero). The constructors' check of ``img_size``, ``patch_size`` and grids, in every family."""
    seq = (value,) * n if n == 2 and isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    try:
        seq = tuple(seq) if not isinstance(seq, (str, bytes)) else ()
    except TypeError:
        seq = ()
    if len(seq) != n or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in seq):
        raise ValueError(f"{name}={value!r} must be {n} positive ints, e.g. {example}")
    return tuple(int(s) for s in seq)


def check_positive_int(value, name: str) -> int:
    """``value`` as an int when it is a positive int (not a bool); a ``ValueError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    return int(value)


def new_classifier(model: nn.Module, width: int, num_classes: int) -> nn.Module:
    """A fresh linear classifier (``nn.Identity`` for ``num_classes=0``) for ``reset_classifier``:
    on the model's device and dtype, in the model's train/eval mode, as timm's own models do."""
    head = nn.Linear(width, num_classes, **get_device_dtype(model)) if num_classes > 0 else nn.Identity()
    return head.train(model.training)


def _first_conv_weights(model: nn.Module) -> set[str]:
    """Weight names of the model's input convolution(s), as its traits / pretrained cfg name them
    (timm's ``first_conv``, the layer ``load_pretrained`` adapts to ``in_chans``)."""
    traits = getattr(model, "_traits", None) or {}
    names = traits.get("first_conv", (getattr(model, "pretrained_cfg", None) or {}).get("first_conv"))
    if not names:
        return set()
    return {f"{n}.weight" for n in ((names,) if isinstance(names, str) else names)}


def complete_state_dict(
        state_dict: dict[str, torch.Tensor],
        model: nn.Module,
        *,
        new_keys: Iterable[str] = (),
        source: str = "the checkpoint",
        reinit_head: str | None = "head.",
) -> dict[str, torch.Tensor]:
    """Check a converted state dict against the model and fill the parameters that the source
    cannot have (``new_keys``: fnmatch patterns, e.g. the scoring network) with the model's own
    initial values. Any other missing key, unexpected key or shape mismatch raises a
    :class:`CheckpointError` that names them.

    With ``reinit_head`` (the prefix of the classifier; pretrained-weight loading) two adaptations
    are left to timm, as for its own models:

    * the classifier: a checkpoint classifier of another size, or one the model does not have
      (``num_classes=0``), is dropped and the model keeps its own;
    * the input convolution (``first_conv`` of the model's cfg): a weight that differs in its input
      channels only passes unchanged; ``timm.models.load_pretrained`` adapts it to ``in_chans``
      right after this filter (``adapt_input_conv``).

    ``reinit_head=None`` asks for an exact fit: nothing is dropped or passed through."""
    target = model.state_dict()
    new_keys = tuple(new_keys)
    first_conv = _first_conv_weights(model) if reinit_head else set()
    out = {}
    unexpected, mismatched, mismatched_keys = [], [], set()
    for k, v in state_dict.items():
        is_head = bool(reinit_head) and k.startswith(reinit_head)
        if k not in target:
            if not is_head:
                unexpected.append(k)
        elif tuple(v.shape) != tuple(target[k].shape):
            if is_head:
                continue
            if k in first_conv and v.dim() == target[k].dim() and v.shape[0] == target[k].shape[0] \
                    and v.shape[2:] == target[k].shape[2:]:
                out[k] = v   # other input channels: timm's loader adapts them to in_chans
                continue
            mismatched_keys.add(k)
            mismatched.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}")
        else:
            out[k] = v
    missing = []
    for k, v in target.items():
        if k in out or k in mismatched_keys:
            continue
        if any(fnmatch.fnmatchcase(k, p) for p in new_keys) or (reinit_head and k.startswith(reinit_head)):
            out[k] = v
        else:
            missing.append(k)
    if missing or unexpected or mismatched:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)):
            if keys:
                more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                parts.append(f"{len(keys)} {name}: {', '.join(keys[:8])}{more}")
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: " + "; ".join(parts)
            + ". Is it a checkpoint of this model family and size? Pick the matching variant "
              "(or the matching embed_dim/depth/num_heads).")
    return out


def _keeping_a_fitting_classifier(filter_fn: Callable | None) -> Callable:
    """``filter_fn`` that also tells timm's loader to keep a classifier that fits.

    timm's ``load_pretrained`` drops the classifier whenever the model's ``num_classes`` differs
    from the pretrained cfg's (1000 for ImageNet weights), even when the checkpoint holds a
    K-class classifier and the model was asked for K classes: the head would be re-initialised
    without a word. When every classifier tensor of the *filtered* state dict (so a classifier the
    filter renamed, e.g. an original Swin's ``head`` -> ``head.fc``, counts) has the model's shape,
    the (per-model copy of the) pretrained cfg is set to the model's class count, so it is loaded.
    (A filter that completes the state dict fills a classifier of another size from the model's
    own: keeping that is the same as timm's dropping it.)"""
    def fn(state_dict, model):
        out = filter_fn(state_dict, model) if filter_fn is not None else state_dict
        cfg = getattr(model, "pretrained_cfg", None)
        num_classes = getattr(model, "num_classes", 0)
        classifiers = (cfg or {}).get("classifier")
        if isinstance(cfg, dict) and classifiers and num_classes and cfg.get("num_classes") != num_classes:
            view = out if filter_fn is not None else unwrap_state_dict(out)
            own = model.state_dict()
            names = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
            keys = [f"{c}.{p}" for c in names for p in ("weight", "bias") if f"{c}.{p}" in own]
            if keys and all(k in view and tuple(view[k].shape) == tuple(own[k].shape) for k in keys):
                cfg["num_classes"] = num_classes
        return out
    return fn


def build(
        model_cls: Callable[..., nn.Module],
        variant: str,
        pretrained: bool = False,
        *,
        filter_fn: Callable | None = None,
        feature_cfg: dict | None = None,
        **kwargs,
) -> nn.Module:
    """``timm.models.build_model_with_cfg`` with our conventions: a checkpoint named by
    ``pretrained_cfg_overlay=dict(file=...)`` is read by :func:`read_checkpoint` (clear errors,
    any wrapper layout) and ``features_only`` goes through the model's ``forward_intermediates``."""
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if pretrained and overlay.get("file") and overlay.get("state_dict") is None:
        overlay["state_dict"] = read_checkpoint(overlay.pop("file"))
    feature_cfg = dict(feature_cls="getter", **(feature_cfg or {}))
    return build_model_with_cfg(
        model_cls, variant, pretrained,
        pretrained_cfg_overlay=overlay or None,
        pretrained_filter_fn=_keeping_a_fitting_classifier(filter_fn),
        feature_cfg=feature_cfg,
        **kwargs,
    )
