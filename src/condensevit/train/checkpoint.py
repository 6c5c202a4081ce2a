"""Training checkpoints: the weights as safetensors (``last.safetensors``, readable by anything that
reads safetensors, with the model name, kwargs and classes in its metadata) beside the training
state (``last.state.pth``: optimizer, scheduler, scaler, EMA, RNG states, epoch, step, arguments).

Every file is written atomically: a temporary file in the same folder, flushed and fsync'ed, then
``os.replace``d over the old one, so a crash or a kill mid-write leaves the previous file whole.
Files get the mode an ordinary ``open`` would give (the user's umask), not ``mkstemp``'s 0600.

The two files of a checkpoint are a pair, published together (:func:`save_checkpoint`): both are
written to temporary files first; the current pair is kept as ``prev.safetensors`` /
``prev.state.pth`` (hard links: no copy, no space) while the new pair replaces it, and dropped
once the new pair is complete. Whenever the process dies, one complete pair (same global step in
both) is in the folder, and :func:`find_resume` takes the newest. A full disk is found before
anything is replaced (one-line error: the folder, the space needed, the space free).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import tempfile
import threading

import numpy as np
import torch

from ..models.factory import create_model, normalize_kwargs
from ..outputs import apply_umask, disk_full_error, is_disk_full

__all__ = [
    "atomic_write", "save_weights", "load_weights_file", "save_checkpoint", "load_checkpoint",
    "find_resume", "capture_rng", "restore_rng", "GracefulStop", "weights_hash",
    "WEIGHTS_NAME", "STATE_NAME", "load_model_for_inference", "fit_checkpoint",
]

WEIGHTS_NAME = "last.safetensors"
STATE_NAME = "last.state.pth"
PREV_WEIGHTS_NAME = "prev.safetensors"   # the previous pair, only while a new one is being published
PREV_STATE_NAME = "prev.state.pth"


def _fsync_dir(folder: str):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover  (not every system opens folders)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_temp(path: str, write, size_hint: int | None = None, full_error=None) -> str:
    """Write ``write(file_object)`` to a fsync'ed temporary file beside ``path`` (mode as an
    ordinary ``open`` gives); its name. On error nothing is left behind, and a full disk is an
    :class:`~condensevit.outputs.OutputError` naming the folder and ``size_hint``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        apply_umask(fd)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if _disk_full_in(e):
            raise (full_error() if full_error else disk_full_error(folder, size_hint, os.path.basename(path))) from None
        raise
    return tmp


def _disk_full_in(e: BaseException) -> bool:
    """A full disk, also when a writer (``torch.save``'s zip writer) wraps the ``OSError``."""
    seen = 0
    while e is not None and seen < 5:
        if is_disk_full(e) or "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def atomic_write(path: str, write, size_hint: int | None = None) -> str:
    """Call ``write(file_object)`` on a temporary file beside ``path``, fsync it, then rename it
    over ``path``. On any error the temporary file is removed and ``path`` is left as it was; a
    full disk is a one-line :class:`~condensevit.outputs.OutputError` (``size_hint``: the bytes
    the file needs, when known)."""
    path = os.fspath(path)
    tmp = _write_temp(path, write, size_hint)
    try:
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    return path


def _to_plain_tensors(state_dict: dict) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights) and non-contiguous views
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items() if torch.is_tensor(v)}


def save_weights(path: str, state_dict: dict, metadata: dict | None = None) -> str:
    """Write weights as safetensors, atomically. ``metadata`` values are stored as JSON text."""
    from safetensors.torch import save

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    blob = save(_to_plain_tensors(state_dict), metadata=meta)
    return atomic_write(path, lambda f: f.write(blob), size_hint=len(blob))


def load_weights_file(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and the decoded metadata of a safetensors file written by :func:`save_weights`;
    any other checkpoint format goes through :func:`condensevit.models.read_checkpoint` (no metadata)."""
    from ..models._builder import read_checkpoint, resolve_checkpoint_path

    path = resolve_checkpoint_path(path)  # a run folder: its last.safetensors
    state_dict = read_checkpoint(path)
    meta = {}
    if os.fspath(path).endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(os.fspath(path), framework="pt") as f:
            raw = f.metadata() or {}
        for k, v in raw.items():
            try:
                meta[k] = json.loads(v)
            except (TypeError, ValueError):
                meta[k] = v
    return state_dict, meta


def weights_hash(state_dict: dict) -> str:
    """SHA-256 of a state dict's names and exact bytes (equal across ranks when DDP kept them in step)."""
    import hashlib
    h = hashlib.sha256()
    for k in sorted(state_dict):
        v = state_dict[k]
        if not torch.is_tensor(v):
            continue
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ RNG

def capture_rng() -> dict:
    """The states of python's, numpy's and torch's (CPU and CUDA) generators, in a form that
    ``torch.load(weights_only=True)`` reads back."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict):
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------- checkpoints

def _nbytes(obj) -> int:
    """Bytes of the tensors in a nested state (what ``torch.save`` will write, less its small overhead)."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    if isinstance(obj, (str, bytes)):
        return len(obj)
    return 16


def weights_step(path: str) -> int | None:
    """The global step recorded in a weights file's metadata (its header only), or None."""
    try:
        from safetensors import safe_open
        with safe_open(os.fspath(path), framework="pt") as f:
            return int(json.loads((f.metadata() or {})["global_step"]))
    except Exception:  # noqa: BLE001  (missing, truncated, foreign: not part of a pair)
        return None


def state_step(path: str) -> int | None:
    """The global step of a training state file (memory-mapped: its tensors are not read), or None."""
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True)
        return int(state["global_step"])
    except Exception:  # noqa: BLE001
        return None


def _link_over(src: str, dst: str):
    """Make ``dst`` another name of ``src``, atomically (a hard link; a copy where links are not allowed)."""
    tmp = f"{dst}.{os.getpid()}.link.tmp"
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _publish(tmp: str, path: str):
    """The rename that makes one file of a new pair visible (a test hook: a kill can be simulated
    between the two)."""
    os.replace(tmp, path)


def save_checkpoint(output_dir: str, weights: dict, state: dict, metadata: dict) -> tuple[str, str]:
    """Write the pair ``last.safetensors`` + ``last.state.pth`` in ``output_dir`` so that a complete
    pair survives a kill or a full disk at any moment (see the module's notes).
    ``state['global_step']`` is recorded in both, so :func:`load_checkpoint` can pair them.

    Raises :class:`~condensevit.outputs.OutputError` when the disk is full (before anything is
    replaced: the previous pair is kept)."""
    from safetensors.torch import save

    folder = os.path.abspath(output_dir)
    os.makedirs(folder, exist_ok=True)
    step = int(state["global_step"])
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in {**metadata, "global_step": step}.items()}
    blob = save(_to_plain_tensors(weights), metadata=meta)
    state = {**state, "weights_file": WEIGHTS_NAME}
    need = len(blob) + _nbytes(state) + (1 << 20)
    w_path, s_path = os.path.join(folder, WEIGHTS_NAME), os.path.join(folder, STATE_NAME)
    kept = _kept_note(folder)

    def full():
        return disk_full_error(folder, need, "the checkpoint", kept=kept)

    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < need:
        raise full()
    tw = _write_temp(w_path, lambda f: f.write(blob), full_error=full)
    try:
        ts = _write_temp(s_path, lambda f: torch.save(state, f), full_error=full)
    except BaseException:
        os.unlink(tw)
        raise
    # keep the current pair while the new one replaces it (unless it is not a pair: then the
    # previous one, from an interrupted publication, is the one to keep)
    if _complete(w_path, s_path):
        _link_over(w_path, os.path.join(folder, PREV_WEIGHTS_NAME))
        _link_over(s_path, os.path.join(folder, PREV_STATE_NAME))
        _fsync_dir(folder)
    _publish(tw, w_path)
    _publish(ts, s_path)
    _fsync_dir(folder)
    for name in (PREV_WEIGHTS_NAME, PREV_STATE_NAME):
        try:
            os.unlink(os.path.join(folder, name))
        except FileNotFoundError:
            pass
    _fsync_dir(folder)
    return w_path, s_path


def _complete(weights_path: str, state_path: str) -> bool:
    if not (os.path.isfile(weights_path) and os.path.isfile(state_path)):
        return False
    w = weights_step(weights_path)
    return w is not None and w == state_step(state_path)


def _kept_note(folder: str) -> str | None:
    pair = newest_pair(folder)
    if pair is None:
        return None
    return f"the last complete checkpoint (step {pair[2]}) is kept: --resume auto continues from it"


def newest_pair(folder: str) -> tuple[str, str, int] | None:
    """(state path, weights path, global step) of the newest complete checkpoint pair in ``folder``
    (``last.*``, else ``prev.*``, else a state and weights of the same step across the two), or None."""
    states = [os.path.join(folder, n) for n in (STATE_NAME, PREV_STATE_NAME)]
    weights = [os.path.join(folder, n) for n in (WEIGHTS_NAME, PREV_WEIGHTS_NAME)]
    wsteps = {w: weights_step(w) for w in weights if os.path.isfile(w)}
    best = None
    for s in states:
        if not os.path.isfile(s):
            continue
        step = state_step(s)
        if step is None:
            continue
        for w, ws in wsteps.items():
            if ws == step and (best is None or step > best[2]):
                best = (s, w, step)
                break
    return best


def has_checkpoint(folder: str) -> bool:
    """Whether ``folder`` holds any file of a training checkpoint (a run to resume or to protect)."""
    return any(os.path.isfile(os.path.join(folder, n)) for n in (STATE_NAME, PREV_STATE_NAME))


def remove_stale_temporaries(folder: str):
    """Temporary files of writes that a kill interrupted (only call while holding the run's lock)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if name.startswith(".") and name.endswith(".tmp") and not name.startswith(".condensevit-write-check"):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass
        elif name.endswith(".link.tmp"):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass


def find_resume(resume: str | None, output_dir: str) -> str | None:
    """The state file to resume from: ``auto`` means the newest complete pair in ``output_dir``
    (a fresh start when there is none); a path may name a state file, its weights file or their
    folder (then its newest complete pair)."""
    from ..models._builder import CheckpointError

    if not resume:
        return None
    if resume == "auto":
        if not has_checkpoint(output_dir):
            return None
        pair = newest_pair(output_dir)
        if pair is None:
            raise CheckpointError(
                f"{output_dir} holds a training state but no complete checkpoint pair (weights and state of the "
                "same step); resume from another copy, or start afresh with another --output")
        return pair[0]
    path = os.fspath(resume)
    if os.path.isdir(path):
        pair = newest_pair(path)
        if pair is not None:
            return pair[0]
        path = os.path.join(path, STATE_NAME)
    elif path.endswith(".safetensors"):
        path = os.path.join(os.path.dirname(path), STATE_NAME if os.path.basename(path) != PREV_WEIGHTS_NAME
                            else PREV_STATE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no training state to resume at {path!r}; give the run's folder, its {STATE_NAME}, or --resume auto")
    return path


def load_checkpoint(state_path: str) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(weights, training state, weights metadata) of a checkpoint, checked to belong together: the
    weights file is the one of the state's global step (``last.safetensors``, or
    ``prev.safetensors`` after a publication a kill interrupted)."""
    from ..models._builder import CheckpointError

    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"training state {state_path!r} could not be read ({type(e).__name__}: "
                              f"{str(e)[:200]}); it is truncated or not a condensevit training state") from e
    folder = os.path.dirname(os.path.abspath(state_path))
    step = int(state.get("global_step", -2))
    recorded = os.path.join(folder, state.get("weights_file", WEIGHTS_NAME))
    candidates = [recorded] + [os.path.join(folder, n) for n in (PREV_WEIGHTS_NAME, WEIGHTS_NAME)
                               if os.path.join(folder, n) != recorded]
    wpath = next((w for w in candidates if os.path.isfile(w) and weights_step(w) == step), recorded)
    weights, meta = load_weights_file(wpath)
    if int(meta.get("global_step", -1)) != step:
        raise CheckpointError(
            f"{wpath!r} (step {meta.get('global_step')}) and {state_path!r} (step {state.get('global_step')}) "
            "are not from the same moment of training, and no other weights file of that step is kept. "
            "Resume from a matching pair or start again.")
    return weights, state, meta


# ------------------------------------------------------------------------------------- SIGTERM

class GracefulStop:
    """While active, SIGTERM (what schedulers and torchrun send before killing) and the other
    ``signals`` (the trainer adds SIGINT: Ctrl-C) only set :attr:`requested`; the training loop then
    saves a checkpoint at the next step boundary and returns. A second SIGINT while waiting for that
    raises ``KeyboardInterrupt`` at once (the checkpoint of the last boundary stays). Does nothing
    outside the main thread, where signals cannot be caught."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = signals
        self.requested = False
        self.signum = None
        self._previous = {}

    def _handler(self, signum, frame):  # noqa: ARG002
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()
        return False


# ----------------------------------------------------------------- fitting weights to a model

def classifier_key(model: torch.nn.Module) -> str | None:
    """State-dict name of the classifier's weight (via timm's ``get_classifier``), or None."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Module) or getattr(head, "weight", None) is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return f"{name}.weight" if name else "weight"
    return None


def checkpoint_classes(state_dict: dict, meta: dict, model: torch.nn.Module) -> int | None:
    """Number of classes a checkpoint was trained for: its metadata, else its classifier's rows."""
    if meta.get("num_classes") is not None:
        return int(meta["num_classes"])
    key = classifier_key(model)
    if key and key in state_dict and state_dict[key].ndim >= 1:
        return int(state_dict[key].shape[0])
    return None


def fit_checkpoint(model: torch.nn.Module, state_dict: dict, *, source: str, meta: dict | None = None,
                   data_classes: int | None = None, data_name: str | None = None) -> None:
    """Load ``state_dict`` into ``model`` exactly (every tensor, every shape) or raise a clear
    :class:`~condensevit.models.CheckpointError`.

    A classifier sized for another number of classes than the data is named with both counts.
    When the plain load does not fit (e.g. the model was built with another token count, grid or
    image size), the weights go through the model family's ``checkpoint_filter_fn`` (the one place
    weights are resized) before giving up.
    """
    import sys

    from ..models._builder import CheckpointError, complete_state_dict

    meta = meta or {}
    if data_classes is not None:
        n = checkpoint_classes(state_dict, meta, model)
        if n is not None and n != data_classes:
            where = f" ({data_name})" if data_name else ""
            raise CheckpointError(
                f"{source} was trained for {n} classes but the data{where} has {data_classes}; "
                "evaluate it on data with the same classes, or fine-tune it with --pretrained-file")
    try:
        fitted = complete_state_dict(state_dict, model, source=source, reinit_head=None)
    except CheckpointError as first:
        filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if filter_fn is None:
            raise _with_kwargs_hint(first, meta) from None
        try:
            fitted = complete_state_dict(filter_fn(dict(state_dict), model), model, source=source, reinit_head=None)
        except Exception:  # noqa: BLE001  (the filter could not adapt it either: the first message says why)
            raise _with_kwargs_hint(first, meta) from None
    model.load_state_dict(fitted, strict=True)


def _with_kwargs_hint(err: Exception, meta: dict) -> Exception:
    from ..models._builder import CheckpointError
    if meta.get("model_kwargs") is not None:
        return CheckpointError(f"{err} The checkpoint was trained as {meta.get('model')} with model kwargs "
                               f"{meta.get('model_kwargs')}.")
    return err


def load_model_for_inference(name: str | None, path: str, **model_kwargs) -> torch.nn.Module:
    """A model built and loaded from weights for inference (eval mode, CPU).

    A condensevit training output (``last.safetensors``, ``best.safetensors``) records its model,
    kwargs and classes: ``name`` may then be None, and ``model_kwargs`` go on top of the recorded
    ones (another compressed grid, token count or image size, adapted by the family's checkpoint
    filter). Any other file (a pretrained checkpoint) is loaded through the model's checkpoint
    filter, as ``--pretrained-file`` does, keeping its classifier when it has one.
    """
    from ..models._builder import resolve_checkpoint_path
    path = resolve_checkpoint_path(path)  # a run folder: its last.safetensors
    state_dict, meta = load_weights_file(path)
    recorded = meta.get("model") if meta.get("format") == "condensevit" else None
    name = name or recorded
    if not name:
        raise ValueError(f"{path!r} does not record its model; pass the model name")
    if recorded and recorded != name:
        raise ValueError(f"{path!r} holds a {recorded}, not a {name}; pass --model {recorded}")
    if recorded:
        kwargs = {**normalize_kwargs(meta.get("model_kwargs") or {}), **normalize_kwargs(model_kwargs)}
        model = create_model(name, num_classes=int(meta["num_classes"]), model_kwargs=kwargs)
        fit_checkpoint(model, state_dict, source=f"checkpoint {path!r}", meta=meta)
    else:
        key = classifier_key(create_model(name, num_classes=1, model_kwargs=model_kwargs))
        n = int(state_dict[key].shape[0]) if key and key in state_dict else 1000
        model = create_model(name, num_classes=n, model_kwargs=model_kwargs, pretrained_file=path)
    return model.eval()
