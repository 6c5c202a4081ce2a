"""Training and evaluation: the loops, and ``train(config)`` / ``evaluate_checkpoint(...)``, the API
behind ``condensevit train`` / ``condensevit eval`` (and the demo).

Recipe pieces are timm's: transforms and RandAugment, Mixup/CutMix, label smoothing, AdamW with a
cosine schedule and warm-up (stepped per update), gradient clipping, EMA of the weights, AMP.

Video: with video data (``moving_digits``, ``moving_digits_direction``, a folder of clips; see
:func:`condensevit.data.is_video_data`) the model must be a video model (and image data needs an
image model): the sets are built at the model's ``input_size`` (C, T, H, W) and normalised with its
mean and std. There is no video augmentation in this version (``--aa``, ``--hflip``, ``--scale``,
``--color-jitter`` and ``--reprob`` do not apply); mixup mixes whole clips, cutmix is refused (timm's
CutMix cuts boxes out of (B, C, H, W) images, so on clips it would cut (T, H) planes).

Determinism: data order is a function of (seed, epoch), each image's augmentation of (seed, epoch,
index), and the generators the model and mixup draw from are saved in every checkpoint, so an
interrupted-then-resumed run ends with the same weights as an uninterrupted one (on CPU; exact on
GPU as far as its kernels are deterministic).

No per-step host syncs: losses and accuracies are accumulated on the device and read every
``log_interval`` steps and at the end of an epoch (where non-finite losses are caught, before
anything is saved).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..data import (AugmentConfig, SeededAugmentation, build_dataset, build_transform, is_video_data,
                    model_input_size)
from . import checkpoint as ckpt
from .distributed import (DistInfo, ResumableDistributedSampler, ShardedEvalSampler, all_reduce_sum,
                          broadcast_flag, cleanup_distributed, init_distributed)

__all__ = [
    "TrainConfig", "TrainResult", "train", "evaluate", "evaluate_checkpoint", "train_one_epoch",
    "create_model", "NonFiniteLossError", "normalize_kwargs",
]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped without saving."""


# ------------------------------------------------------------------------------------- config

@dataclass
class TrainConfig:
    """Everything ``condensevit train`` takes. ``None`` means "the dataset's / model's default"."""
    model: str
    data: str = "digits"
    model_kwargs: dict = field(default_factory=dict)
    output: str | None = None            # default: runs/<model>
    epochs: int = 30
    batch_size: int = 64                 # per process
    eval_batch_size: int | None = None   # default: 2 x batch_size
    # optimisation (timm create_optimizer_v2 / create_scheduler_v2)
    opt: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    sched: str = "cosine"
    warmup_epochs: int = 2
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    clip_grad: float | None = None
    clip_mode: str = "norm"
    # regularisation and augmentation
    smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    aa: str | None = None                # RandAugment spec or 'none'; None: the dataset's default
    hflip: float | None = None
    scale: tuple[float, float] | None = None
    color_jitter: float | None = None
    reprob: float = 0.0
    model_ema: bool = False
    model_ema_decay: float = 0.999
    amp: bool = False                    # float16 + grad scaling on CUDA, bfloat16 on CPU
    amp_dtype: str = "float16"           # on CUDA: float16 or bfloat16
    # distillation (DeiT's)
    teacher: str | None = None
    teacher_checkpoint: str | None = None
    teacher_kwargs: dict = field(default_factory=dict)
    distillation_type: str = "none"      # none | soft | hard
    distillation_alpha: float = 0.5
    distillation_tau: float = 1.0
    # initialisation and resumption
    pretrained_file: str | None = None
    resume: str | None = None            # FILE, run folder, or 'auto'
    # run
    seed: int = 0
    workers: int | None = None           # default: 0 on CPU, min(8, cores) on GPU
    device: str | None = None            # default: cuda when available
    strict: bool = False
    max_steps_per_epoch: int | None = None
    limit_val_batches: int | None = None
    log_interval: int = 50
    save_every_steps: int | None = None  # also checkpoint inside an epoch (long epochs)
    measure: bool = True                 # GMACs and throughput in the summary
    throughput_batch_size: int | None = None
    find_unused_parameters: bool = False
    progress: bool | None = None         # None: a progress bar when stderr is a terminal
    verbose: bool = True
    # test hooks (hidden from --help)
    debug_nan_at_step: int | None = None
    debug_stop_at_step: int | None = None
    debug_weights_hash: bool = False

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=list))


@dataclass
class TrainResult:
    best_top1: float | None
    best_epoch: int | None
    final_top1: float | None
    final_top5: float | None
    final_loss: float | None
    ema_top1: float | None
    gmacs: float | None
    params: int
    images_per_s: float | None
    train_time_s: float
    epochs_done: int
    checkpoint: str | None               # last.safetensors
    best_checkpoint: str | None          # best.safetensors
    output_dir: str
    interrupted: bool = False            # stopped by SIGTERM; resume with resume='auto'
    history: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------- models

def normalize_kwargs(kwargs: dict) -> dict:
    """JSON turns tuples into lists; model arguments such as ``compressed_grid`` want tuples."""
    def conv(v):
        if isinstance(v, list):
            return tuple(conv(x) for x in v)
        return v
    return {k: conv(v) for k, v in dict(kwargs).items()}


def _usage_error(msg: str):
    from ..cli import UsageError
    return UsageError(msg)


def check_model_name(name: str):
    """A clear error for a missing or unknown model name, with the closest registered names."""
    if not name:
        raise _usage_error("no model given; pass --model NAME (`condensevit models` lists ours)")
    from ..bench import _check_model_name
    _check_model_name(name)


def create_model(name: str, *, num_classes: int, model_kwargs: dict | None = None,
                 pretrained_file: str | None = None) -> nn.Module:
    """``timm.create_model`` for any registered model, ours or timm's. ``pretrained_file``
    initialises it through the model's checkpoint filter (``pretrained_cfg_overlay``); a
    classifier of another size is replaced by a fresh one."""
    import timm

    from ..models._builder import CheckpointError, read_checkpoint

    check_model_name(name)
    kwargs = normalize_kwargs(model_kwargs or {})
    for reserved in ("num_classes", "pretrained", "pretrained_cfg_overlay"):
        if reserved in kwargs:
            raise _usage_error(f"model kwarg {reserved!r} is set by condensevit itself; leave it out")
    extra = {}
    state_dict = None
    if pretrained_file:
        state_dict = read_checkpoint(pretrained_file)  # clear errors for missing / truncated files
        extra = dict(pretrained=True, pretrained_cfg_overlay=dict(state_dict=dict(state_dict)))
    try:
        model = timm.create_model(name, num_classes=num_classes, **extra, **kwargs)
    except CheckpointError as e:
        raise CheckpointError(f"pretrained file {pretrained_file!r}: {e}") from e
    except (TypeError, ValueError, AssertionError) as e:
        raise _usage_error(f"cannot build {name} with {kwargs}: {_first_line(e)}") from e
    except RuntimeError as e:
        if pretrained_file:
            raise CheckpointError(f"pretrained file {pretrained_file!r} does not fit {name} {kwargs}: "
                                  f"{_first_line(e)}") from e
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


def _input_size(model: nn.Module, kwargs: dict) -> tuple[int, ...]:
    """(C, H, W) to feed, or (C, T, H, W) for a video model: the ``img_size`` (and, for video,
    ``num_frames``) the user built the model with, else what the model says."""
    size = tuple(model_input_size(model))
    img = kwargs.get("img_size")
    if img is not None:
        img = (img, img) if isinstance(img, int) else tuple(img)
        size = (*size[:-2], int(img[-2]), int(img[-1]))
    if len(size) == 4 and kwargs.get("num_frames") is not None:
        size = (size[0], int(kwargs["num_frames"]), size[2], size[3])
    return size


VIDEO_DATA_HINT = ("--data moving_digits (or moving_digits_direction) or a clip folder "
                   "(root/{train,val}/<class>/<clip>, a clip being a folder of frames or a video file)")
VIDEO_MODEL_HINT = "a video model (vit_video_*, stvit_video_*, lookupvit_video_*; `condensevit models` lists them)"


def _is_video_model_name(name: str) -> bool:
    """Whether the registered model ``name`` takes clips, from its default config (no model built)."""
    try:
        from timm.models import get_pretrained_cfg
        cfg = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001  (no config: decided once the model is built)
        return False
    return cfg is not None and len(tuple(getattr(cfg, "input_size", None) or ())) == 4


def _check_data_fits_model(name: str, data: str, video_model: bool, video_data: bool):
    """A clear error when a video model is given images or an image model clips."""
    if video_model and not video_data:
        raise _usage_error(f"{name} takes clips (C, T, H, W) but {data} gives images; use {VIDEO_DATA_HINT}")
    if video_data and not video_model:
        raise _usage_error(f"{name} takes images (C, H, W) but {data} gives clips (C, T, H, W); use "
                           f"{VIDEO_MODEL_HINT}, or image data")


def _probe_video_input(name: str, kwargs: dict, data: str) -> tuple[tuple[int, ...], dict]:
    """The (C, T, H, W) input size and the data config (mean, std) of ``name`` built with ``kwargs``,
    from a model on the meta device (no memory, no initialisation): the video sets must be built at
    the model's size before the real model, which their classes size."""
    from timm.data import resolve_data_config
    with torch.device("meta"):
        probe = create_model(name, num_classes=1, model_kwargs=kwargs)
    size = _input_size(probe, kwargs)
    _check_data_fits_model(name, data, len(size) == 4, True)
    return size, resolve_data_config({}, model=probe)


def _video_augment_note(cfg: "TrainConfig") -> str | None:
    given = [flag for flag, value in (("--aa", cfg.aa), ("--hflip", cfg.hflip), ("--scale", cfg.scale),
                                      ("--color-jitter", cfg.color_jitter), ("--reprob", cfg.reprob or None))
             if value is not None]
    if not given:
        return None
    return (f"condensevit train: warning: {', '.join(given)} do not apply to video data: there is no video "
            "augmentation in this version")


def _skipped_warning(cmd: str, sets, video: bool) -> str | None:
    n = sum(s.num_skipped for s in sets)
    if not n:
        return None
    first = next(s.skipped[0] for s in sets if s.num_skipped)
    what = "clip(s)" if video else "unreadable image(s)"
    return (f"condensevit {cmd}: warning: skipped {n} {what} (first: {first[0]}: {first[1]}); --strict makes this "
            "an error")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------------- data

def _default_workers(workers: int | None, device: torch.device, world: int) -> int:
    if workers is not None:
        if workers < 0:
            raise ValueError(f"--workers {workers} must be 0 or more")
        return workers
    if device.type == "cpu":
        return 0  # on a CPU the workers would compete with the training threads
    return max(0, min(8, (os.cpu_count() or 1) // max(world, 1) - 1))


def _loader_kwargs(workers: int, device: torch.device) -> dict:
    kw = dict(num_workers=workers, pin_memory=device.type == "cuda")
    if workers > 0:
        kw["persistent_workers"] = False  # workers must see each epoch's set_epoch
    return kw


def _amp_context(amp: bool, device: torch.device, amp_dtype: str = "float16"):
    if not amp:
        return contextlib.nullcontext
    if device.type == "cuda":
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(amp_dtype)
        if dtype is None:
            raise ValueError(f"--amp-dtype {amp_dtype!r} must be float16 or bfloat16")
    else:
        dtype = torch.bfloat16
    return lambda: torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------------- loops

@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, amp_ctx=contextlib.nullcontext,
             limit_batches: int | None = None, **forward_kwargs) -> dict:
    """Top-1 / top-5 accuracy (percent) and cross-entropy over ``loader``, summed across ranks."""
    was_training = model.training
    model.eval()
    stats = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, top1, top5, count
    for i, (x, y) in enumerate(loader):
        if limit_batches is not None and i >= limit_batches:
            break
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with amp_ctx():
            out = model(x, **forward_kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        out = out.float()
        k = min(5, out.shape[1])
        top = out.topk(k, dim=1).indices
        hit = top.eq(y[:, None])
        stats += torch.stack([F.cross_entropy(out, y, reduction="sum").double(),
                              hit[:, :1].sum().double(), hit.sum().double(),
                              torch.tensor(float(len(y)), device=device, dtype=torch.float64)])
    all_reduce_sum(stats)
    model.train(was_training)
    loss_sum, c1, c5, n = stats.tolist()
    if n == 0:
        return dict(top1=float("nan"), top5=float("nan"), loss=float("nan"), images=0)
    return dict(top1=100.0 * c1 / n, top5=100.0 * c5 / n, loss=loss_sum / n, images=int(n))


@dataclass
class _EpochState:
    """What a training epoch carries between steps (and across a mid-epoch checkpoint)."""
    epoch: int
    step_in_epoch: int = 0
    loss_sum: float = 0.0
    images: int = 0
    elapsed_s: float = 0.0


def train_one_epoch(*, model, loader, criterion, optimizer, scheduler, device, es: _EpochState, steps: int,
                    run_state: dict, amp_ctx=contextlib.nullcontext, scaler=None, mixup_fn=None,
                    clip_grad=None, clip_mode="norm", ema=None, log_interval=50, stop=None, dist: DistInfo,
                    debug_nan_at_step=None, debug_stop_at_step=None, save_fn=None, save_every_steps=None,
                    progress=None, desc="") -> str:
    """Run the remaining steps of one epoch. Returns 'done' or 'stopped' (a stop was requested:
    SIGTERM, or the test hook); raises :class:`NonFiniteLossError`. ``es`` and ``run_state``
    ('global_step') are updated in place."""
    from timm.utils import dispatch_clip_grad

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    loss_acc = torch.zeros((), device=device, dtype=torch.float64)
    acc_images = 0
    last_sync = run_state["global_step"]
    t0 = time.perf_counter()
    bar = None
    if dist.is_main and progress is not False:
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=es.step_in_epoch, desc=desc, leave=False, dynamic_ncols=True,
                   disable=None if progress is None else False, file=sys.stderr)

    def sync(final: bool) -> bool:
        """Read the accumulated loss (the only host sync), check it, and agree on stopping."""
        nonlocal loss_acc, acc_images, last_sync
        if dist.distributed:
            pair = torch.stack([loss_acc, torch.tensor(float(acc_images), device=device, dtype=torch.float64)])
            all_reduce_sum(pair)
            loss_sum, images = pair.tolist()
        else:
            loss_sum, images = float(loss_acc), acc_images
        if not math.isfinite(loss_sum):
            raise NonFiniteLossError(
                f"the training loss became {loss_sum} in epoch {es.epoch + 1}, between steps {last_sync + 1} and "
                f"{run_state['global_step']}")
        last_sync = run_state["global_step"]
        es.loss_sum += loss_sum
        es.images += int(images)
        loss_acc = torch.zeros((), device=device, dtype=torch.float64)
        acc_images = 0
        if bar is not None:
            bar.set_postfix(loss=f"{es.loss_sum / max(es.images, 1):.4f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.2e}", refresh=False)
        requested = stop is not None and stop.requested
        return broadcast_flag(requested, device) if dist.distributed else requested

    status = "done"
    try:
        it = iter(loader)
        while es.step_in_epoch < steps:
            x, y = next(it)
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if mixup_fn is not None:
                x, y = mixup_fn(x, y)
            with amp_ctx():
                out = model(x)
                loss = criterion(x, out, y)
            step = run_state["global_step"] + 1
            if debug_nan_at_step is not None and step >= debug_nan_at_step:
                loss = loss * float("nan")  # test hook: a diverging run
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler(loss, optimizer, clip_grad=clip_grad, clip_mode=clip_mode, parameters=params)
            else:
                loss.backward()
                if clip_grad is not None:
                    dispatch_clip_grad(params, clip_grad, mode=clip_mode)
                optimizer.step()
            run_state["global_step"] = step
            scheduler.step_update(num_updates=step)
            if ema is not None:
                ema.update(_unwrap(model), step=step)
            loss_acc += loss.detach().double() * len(x)
            acc_images += len(x)
            es.step_in_epoch += 1
            if bar is not None:
                bar.update(1)
            last = es.step_in_epoch == steps
            want_stop = debug_stop_at_step is not None and step >= debug_stop_at_step
            if not dist.distributed and stop is not None and stop.requested:
                want_stop = True  # one process: a python flag, no sync needed
            at_log = es.step_in_epoch % max(log_interval, 1) == 0
            at_save = bool(save_every_steps) and step % save_every_steps == 0
            if at_log or last or want_stop or at_save:
                want_stop = sync(last) or want_stop
            if want_stop:
                status = "stopped"
                break
            if at_save and not last and save_fn is not None:
                es.elapsed_s += time.perf_counter() - t0
                t0 = time.perf_counter()
                save_fn()
    finally:
        if bar is not None:
            bar.close()
    es.elapsed_s += time.perf_counter() - t0
    return status


# ------------------------------------------------------------------------------------ the run

def _seed_all(seed: int):
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _log(cfg: TrainConfig, dist: DistInfo, msg: str):
    if cfg.verbose and dist.is_main:
        print(msg, flush=True)


class _Run:
    def __init__(self, cfg: TrainConfig, dist: DistInfo):
        self.cfg, self.dist = cfg, dist

    # -- set-up --------------------------------------------------------------------------------
    def setup(self):
        cfg, dist = self.cfg, self.dist
        dev = dist.device
        if cfg.epochs < 1:
            raise ValueError(f"--epochs {cfg.epochs} must be at least 1")
        if cfg.batch_size < 1:
            raise ValueError(f"--batch-size {cfg.batch_size} must be at least 1")
        if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
            raise ValueError(f"mixup/cutmix need an even --batch-size (got {cfg.batch_size})")
        if cfg.distillation_type != "none" and not cfg.teacher:
            raise ValueError(f"--distillation-type {cfg.distillation_type} needs --teacher NAME and "
                             "--teacher-checkpoint FILE")
        if cfg.teacher and cfg.distillation_type == "none":
            raise ValueError("--teacher was given but --distillation-type is none; pick soft or hard")
        check_model_name(cfg.model)
        if cfg.output is None and cfg.resume not in (None, "auto"):
            found = ckpt.find_resume(cfg.resume, ".")
            self.output = os.path.dirname(os.path.abspath(found))  # continue writing where the run was
        else:
            self.output = os.path.abspath(cfg.output or os.path.join("runs", cfg.model))
        self.resume_path = ckpt.find_resume(cfg.resume, self.output)
        if self.resume_path is None and os.path.isfile(os.path.join(self.output, ckpt.STATE_NAME)):
            raise _usage_error(f"{self.output} already holds a training run; pass --resume auto to continue it, "
                               "or another --output")

        # data first: the classes size the classifier
        self.model_kwargs = normalize_kwargs(cfg.model_kwargs)
        self.video = is_video_data(cfg.data)
        data_kwargs = {}
        _check_data_fits_model(cfg.model, cfg.data, _is_video_model_name(cfg.model), self.video)  # before any data
        if self.video:
            if cfg.cutmix > 0:
                raise ValueError("--cutmix does not apply to video data: timm's CutMix cuts boxes out of (B, C, H, W) "
                                 "images and would cut (T, H) planes out of clips; use --mixup (it mixes whole clips) "
                                 "and --cutmix 0")
            note = _video_augment_note(cfg)
            if note and dist.is_main:
                print(note, file=sys.stderr, flush=True)
            # the clips are sampled and sized for the model: its input size first (a meta-device build)
            size, data_config = _probe_video_input(cfg.model, self.model_kwargs, cfg.data)
            data_kwargs = dict(input_size=size, data_config=data_config)
        self.train_set = build_dataset(cfg.data, "train", strict=cfg.strict, **data_kwargs)
        self.val_set = build_dataset(cfg.data, "val", strict=cfg.strict, **data_kwargs)
        self.classes = list(self.train_set.classes)
        self.num_classes = len(self.classes)
        warning = _skipped_warning("train", (self.train_set, self.val_set), self.video)
        if warning and dist.is_main:
            print(warning, file=sys.stderr, flush=True)

        _seed_all(cfg.seed)  # the same initial weights on every rank
        model = create_model(cfg.model, num_classes=self.num_classes, model_kwargs=self.model_kwargs,
                             pretrained_file=cfg.pretrained_file)
        self.input_size = _input_size(model, self.model_kwargs)
        _check_data_fits_model(cfg.model, cfg.data, len(self.input_size) == 4, self.video)
        from timm.data import resolve_data_config
        self.data_config = resolve_data_config({}, model=model)
        if self.video:
            if tuple(self.input_size) != tuple(data_kwargs["input_size"]):  # not expected: the probe is the model
                data_kwargs = dict(input_size=self.input_size, data_config=self.data_config)
                self.train_set = build_dataset(cfg.data, "train", strict=cfg.strict, **data_kwargs)
                self.val_set = build_dataset(cfg.data, "val", strict=cfg.strict, **data_kwargs)
        else:
            augment = AugmentConfig(aa=cfg.aa, hflip=cfg.hflip, scale=cfg.scale, color_jitter=cfg.color_jitter,
                                    re_prob=cfg.reprob)
            self.train_set.transform = build_transform(cfg.data, True, self.input_size,
                                                       data_config=self.data_config, augment=augment)
            self.val_set.transform = build_transform(cfg.data, False, self.input_size, data_config=self.data_config,
                                                     augment=augment)
        self.train_data = SeededAugmentation(self.train_set, seed=cfg.seed)

        per_rank = len(self.train_set) // dist.world_size
        if per_rank < cfg.batch_size:
            raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {per_rank} training images each "
                             "process gets; lower it")
        self.workers = _default_workers(cfg.workers, dev, dist.world_size)
        self.sampler = ResumableDistributedSampler(len(self.train_set), num_replicas=dist.world_size,
                                                   rank=dist.rank, shuffle=True, seed=cfg.seed)
        self.loader_gen = torch.Generator()
        self.train_loader = DataLoader(self.train_data, batch_size=cfg.batch_size, sampler=self.sampler,
                                       drop_last=True, generator=self.loader_gen,
                                       **_loader_kwargs(self.workers, dev))
        self.steps_per_epoch = len(self.sampler) // cfg.batch_size
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        val_sampler = ShardedEvalSampler(len(self.val_set), num_replicas=dist.world_size, rank=dist.rank)
        self.val_loader = DataLoader(self.val_set, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                                     sampler=val_sampler, **_loader_kwargs(self.workers, dev))

        model.to(dev)
        self.model_plain = model
        self.ema = None
        if cfg.model_ema:
            from timm.utils import ModelEmaV3
            # warm-up makes the average useful in short runs too (decay grows towards model_ema_decay)
            self.ema = ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=True)
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        self.optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False,
            updates_per_epoch=self.steps_per_epoch)
        self.amp_ctx = _amp_context(cfg.amp, dev, cfg.amp_dtype)
        self.scaler = None
        if cfg.amp and dev.type == "cuda" and cfg.amp_dtype == "float16":
            from timm.utils import NativeScaler
            self.scaler = NativeScaler(device="cuda")

        self.mixup_fn = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup
            self.mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                                  switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.smoothing,
                                  num_classes=self.num_classes)
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        if self.mixup_fn is not None:
            base = SoftTargetCrossEntropy()  # mixup makes the (smoothed) soft targets
        elif cfg.smoothing > 0:
            base = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
        else:
            base = nn.CrossEntropyLoss()
        teacher = None
        teacher_size = None
        if cfg.teacher:
            from .distill import build_teacher
            teacher = build_teacher(cfg.teacher, cfg.teacher_checkpoint, self.num_classes,
                                    model_kwargs=cfg.teacher_kwargs, device=dev, data_name=cfg.data)
            teacher_size = _input_size(teacher, {**(cfg.teacher_kwargs or {})})
            if self.video:
                # no resizing of clips for the teacher: it must take the student's clips as they are
                if tuple(teacher_size) != tuple(self.input_size):
                    raise _usage_error(
                        f"teacher {cfg.teacher} takes {'clips' if len(teacher_size) == 4 else 'images'} of size "
                        f"{tuple(teacher_size)} but the student's clips are {tuple(self.input_size)}; distillation on "
                        "video needs a video teacher built for the same clip size (--teacher-kwargs)")
                teacher_size = None
            else:
                teacher_size = teacher_size[1:]
        from .distill import DistillationLoss
        self.criterion = DistillationLoss(base, teacher, cfg.distillation_type, cfg.distillation_alpha,
                                          cfg.distillation_tau, teacher_input_size=teacher_size)

        self.model = model
        if dist.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                model, device_ids=[dev.index] if dev.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters)

        self.run_state = dict(global_step=0)
        self.start_epoch = 0
        self.epoch_state = None  # a partly done epoch, from a mid-epoch checkpoint
        self.best = dict(top1=None, epoch=None)
        self.history = []
        if self.resume_path:
            self._resume()
        elif dist.is_main:
            os.makedirs(self.output, exist_ok=True)
        _seed_rank = cfg.seed + dist.rank  # dropout and mixup differ between ranks, as in DeiT
        if not self.resume_path:
            import random

            import numpy as np
            random.seed(_seed_rank)
            np.random.seed(_seed_rank % 2**32)
            torch.manual_seed(_seed_rank)
        self.scheduler.step_update(num_updates=self.run_state["global_step"])
        if dist.is_main:
            if not self.resume_path and os.path.isfile(os.path.join(self.output, "log.jsonl")):
                os.remove(os.path.join(self.output, "log.jsonl"))  # a fresh start: no rows of an older try
            ckpt.atomic_write(os.path.join(self.output, "config.json"),
                              lambda f: f.write(json.dumps(cfg.to_json(), indent=2).encode()))
        self.tb = None
        if dist.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(self.output, "tensorboard"))
            except Exception:  # noqa: BLE001  (tensorboard is optional)
                self.tb = None

    def _metadata(self, **extra) -> dict:
        return dict(format="condensevit", model=self.cfg.model, model_kwargs=self.model_kwargs,
                    num_classes=self.num_classes, classes=self.classes, data=self.cfg.data,
                    input_size=list(self.input_size), **extra)

    def _resume(self):
        cfg, dist = self.cfg, self.dist
        weights, state, meta = ckpt.load_checkpoint(self.resume_path)
        if meta.get("model") not in (None, cfg.model):
            raise _usage_error(f"{self.resume_path} is a run of {meta.get('model')}, not {cfg.model}; "
                               "pass the same --model to resume it")
        saved_kwargs = normalize_kwargs(meta.get("model_kwargs") or {})
        if saved_kwargs != self.model_kwargs:
            raise _usage_error(f"{self.resume_path} was trained with model kwargs {saved_kwargs}, not "
                               f"{self.model_kwargs}; pass the same --model-kwargs to resume it")
        ckpt.fit_checkpoint(self.model_plain, weights, source=f"checkpoint {self.resume_path!r}", meta=meta,
                            data_classes=self.num_classes, data_name=cfg.data)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise _usage_error(f"{self.resume_path} was trained without --model-ema; resume it the same way")
            self.ema.module.load_state_dict(state["ema"])
        self.run_state["global_step"] = int(state["global_step"])
        self.start_epoch = int(state["epoch"])
        if state.get("step_in_epoch"):
            self.epoch_state = _EpochState(epoch=self.start_epoch, step_in_epoch=int(state["step_in_epoch"]),
                                           loss_sum=float(state.get("loss_sum", 0.0)),
                                           images=int(state.get("images", 0)),
                                           elapsed_s=float(state.get("elapsed_s", 0.0)))
        self.best = dict(state.get("best") or self.best)
        self.history = [dict(h) for h in json.loads(state.get("history", "[]"))]
        saved = json.loads(state.get("config", "{}"))
        for key in ("batch_size", "data", "seed", "lr", "epochs", "mixup", "cutmix", "smoothing"):
            if key in saved and saved[key] != getattr(cfg, key):
                _log(cfg, dist, f"note: resuming with {key}={getattr(cfg, key)!r} where the run had "
                                f"{saved[key]!r}; the result will differ from an uninterrupted run")
        rngs = state["rng"]
        if int(state.get("world_size", 1)) == dist.world_size and len(rngs) == dist.world_size:
            ckpt.restore_rng(rngs[dist.rank])
        else:
            _seed_all(cfg.seed + dist.rank + self.run_state["global_step"])
            _log(cfg, dist, f"note: the run had {state.get('world_size')} processes, this one "
                            f"{dist.world_size}; random streams start afresh")
        # the log keeps the epochs this checkpoint had finished
        if dist.is_main:
            log = os.path.join(self.output, "log.jsonl")
            if os.path.isfile(log):
                with open(log) as f:
                    lines = [ln for ln in f if ln.strip() and json.loads(ln).get("epoch", 0) <= self.start_epoch]
                ckpt.atomic_write(log, lambda f: f.write("".join(lines).encode()))
        _log(cfg, dist, f"resumed {self.resume_path} at epoch {self.start_epoch + 1}, "
                        f"step {self.run_state['global_step']}")

    # -- saving --------------------------------------------------------------------------------
    def _gather_rng(self) -> list:
        state = ckpt.capture_rng()
        if not self.dist.distributed:
            return [state]
        import torch.distributed as tdist
        out = [None] * self.dist.world_size
        tdist.all_gather_object(out, state)
        return out

    def save(self, epoch: int, es: _EpochState | None):
        """Checkpoint (collective: every rank calls it; rank 0 writes). ``epoch`` is the epoch to
        run next; ``es`` a partly done epoch."""
        rngs = self._gather_rng()
        if not self.dist.is_main:
            return
        state = dict(
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            ema=self.ema.module.state_dict() if self.ema is not None else None,
            rng=rngs,
            world_size=self.dist.world_size,
            epoch=epoch,
            global_step=self.run_state["global_step"],
            step_in_epoch=es.step_in_epoch if es else 0,
            loss_sum=es.loss_sum if es else 0.0,
            images=es.images if es else 0,
            elapsed_s=es.elapsed_s if es else 0.0,
            best=self.best,
            history=json.dumps(self.history),
            config=json.dumps(self.cfg.to_json()),
        )
        ckpt.save_checkpoint(self.output, self.model_plain.state_dict(), state,
                             self._metadata(epoch=epoch, step_in_epoch=state["step_in_epoch"]))

    def _log_epoch(self, row: dict):
        if not self.dist.is_main:
            return
        with open(os.path.join(self.output, "log.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    self.tb.add_scalar(k, v, row["epoch"])
            self.tb.flush()

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, dist = self.cfg, self.dist
        t_start = time.perf_counter()
        interrupted = False
        nparams = sum(p.numel() for p in self.model_plain.parameters())
        _log(cfg, dist, f"training {cfg.model} {self.model_kwargs or ''} on {cfg.data}: {len(self.train_set)} "
                        f"train / {len(self.val_set)} val images, {self.num_classes} classes, input "
                        f"{self.input_size}, {nparams / 1e6:.2f}M params, {dist.world_size} process(es) on "
                        f"{dist.device}, {self.steps_per_epoch} steps/epoch -> {self.output}")
        with ckpt.GracefulStop() as stop:
            for epoch in range(self.start_epoch, cfg.epochs):
                es = self.epoch_state or _EpochState(epoch=epoch)
                self.epoch_state = None
                self.sampler.set_epoch(epoch)
                self.sampler.set_start(es.step_in_epoch * cfg.batch_size)
                self.train_data.set_epoch(epoch)
                self.loader_gen.manual_seed(cfg.seed * 1_000_003 + epoch)
                status = train_one_epoch(
                    model=self.model, loader=self.train_loader, criterion=self.criterion, optimizer=self.optimizer,
                    scheduler=self.scheduler, device=dist.device, es=es, steps=self.steps_per_epoch,
                    run_state=self.run_state, amp_ctx=self.amp_ctx, scaler=self.scaler, mixup_fn=self.mixup_fn,
                    clip_grad=cfg.clip_grad, clip_mode=cfg.clip_mode, ema=self.ema, log_interval=cfg.log_interval,
                    stop=stop, dist=dist, debug_nan_at_step=cfg.debug_nan_at_step,
                    debug_stop_at_step=cfg.debug_stop_at_step, save_fn=lambda: self.save(epoch, es),
                    save_every_steps=cfg.save_every_steps, progress=cfg.progress,
                    desc=f"epoch {epoch + 1}/{cfg.epochs}")
                if status == "stopped":
                    self.save(epoch, es)
                    interrupted = True
                    if dist.is_main:  # shown even with --quiet: the user must know how to go on
                        print(f"condensevit train: stopped at epoch {epoch + 1}, step {self.run_state['global_step']}"
                              f": checkpoint saved in {self.output}; continue with --resume auto",
                              file=sys.stderr, flush=True)
                    break
                val = evaluate(self.model_plain, self.val_loader, dist.device, amp_ctx=self.amp_ctx,
                               limit_batches=cfg.limit_val_batches)
                row = dict(epoch=epoch + 1, step=self.run_state["global_step"],
                           lr=self.optimizer.param_groups[0]["lr"],
                           train_loss=es.loss_sum / max(es.images, 1),
                           val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"], val_images=val["images"],
                           epoch_time_s=round(es.elapsed_s, 3),
                           train_images_per_s=round(es.images / max(es.elapsed_s, 1e-9), 2))
                if self.ema is not None:
                    ev = evaluate(self.ema.module, self.val_loader, dist.device, amp_ctx=self.amp_ctx,
                                  limit_batches=cfg.limit_val_batches)
                    row.update(ema_val_top1=ev["top1"], ema_val_loss=ev["loss"])
                self.history.append(row)
                if self.best["top1"] is None or val["top1"] > self.best["top1"]:
                    self.best = dict(top1=val["top1"], epoch=epoch + 1)
                    if dist.is_main:
                        ckpt.save_weights(os.path.join(self.output, "best.safetensors"),
                                          self.model_plain.state_dict(),
                                          self._metadata(epoch=epoch + 1, val_top1=val["top1"]))
                self._log_epoch(row)
                self.save(epoch + 1, None)
                ema_txt = f"  ema_top1 {row['ema_val_top1']:.2f}" if "ema_val_top1" in row else ""
                _log(cfg, dist, f"epoch {epoch + 1}/{cfg.epochs}  train_loss {row['train_loss']:.4f}  "
                                f"val_loss {val['loss']:.4f}  val_top1 {val['top1']:.2f}  val_top5 "
                                f"{val['top5']:.2f}{ema_txt}  lr {row['lr']:.2e}  {es.elapsed_s:.1f}s")
        train_time = time.perf_counter() - t_start
        if self.tb is not None:
            self.tb.close()
        if cfg.debug_weights_hash:
            print(f"weights-sha256 rank={dist.rank} {ckpt.weights_hash(self.model_plain.state_dict())}", flush=True)
        return self._finish(train_time, interrupted, nparams)

    def _finish(self, train_time: float, interrupted: bool, nparams: int) -> TrainResult:
        cfg, dist = self.cfg, self.dist
        last = self.history[-1] if self.history else {}
        gm = ips = None
        if dist.is_main and not interrupted and cfg.measure:
            from ..measure import gmacs, throughput
            model = self.model_plain.eval()
            try:
                gm = gmacs(model, self.input_size)
            except Exception as e:  # noqa: BLE001  (a measurement failure must not lose the run)
                _log(cfg, dist, f"note: GMACs could not be counted: {_first_line(e)}")
            bs = cfg.throughput_batch_size or (16 if dist.device.type == "cpu" else 64)
            try:
                ips = throughput(model, self.input_size, batch_size=bs, device=dist.device, amp=cfg.amp,
                                 warmup=2, iters=5, latency_iters=0).images_per_s
            except Exception as e:  # noqa: BLE001
                _log(cfg, dist, f"note: throughput could not be measured: {_first_line(e)}")
        out = self.output
        result = TrainResult(
            best_top1=self.best.get("top1"), best_epoch=self.best.get("epoch"),
            final_top1=last.get("val_top1"), final_top5=last.get("val_top5"), final_loss=last.get("val_loss"),
            ema_top1=last.get("ema_val_top1"), gmacs=gm, params=nparams, images_per_s=ips,
            train_time_s=round(train_time, 2), epochs_done=len(self.history),
            checkpoint=os.path.join(out, ckpt.WEIGHTS_NAME),
            best_checkpoint=os.path.join(out, "best.safetensors") if self.best.get("top1") is not None else None,
            output_dir=out, interrupted=interrupted, history=list(self.history))
        if dist.is_main and not interrupted:
            if self.ema is not None:
                ckpt.save_weights(os.path.join(out, "ema.safetensors"), self.ema.module.state_dict(),
                                  self._metadata(epoch=len(self.history), ema=True))
            summary = {k: v for k, v in result.as_dict().items() if k != "history"}
            summary.update(model=cfg.model, model_kwargs=self.model_kwargs, data=cfg.data,
                           num_classes=self.num_classes, input_size=list(self.input_size),
                           world_size=dist.world_size, device=str(dist.device))
            ckpt.atomic_write(os.path.join(out, "summary.json"),
                              lambda f: f.write((json.dumps(summary, indent=2, default=str) + "\n").encode()))
            _log(cfg, dist, _format_summary(summary))
        return result


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def _format_summary(s: dict) -> str:
    return (f"done: {s['model']} top-1 {_fmt(s['final_top1'], '.2f')} (best {_fmt(s['best_top1'], '.2f')} at epoch "
            f"{s['best_epoch']}), {_fmt(s['gmacs'], '.4f')} GMACs, {_fmt(s['images_per_s'], '.0f')} images/s, "
            f"{s['params'] / 1e6:.2f}M params, trained in {s['train_time_s']:.0f}s; summary in "
            f"{os.path.join(s['output_dir'], 'summary.json')}")


def train(config: TrainConfig) -> TrainResult:
    """Train ``config.model`` on ``config.data`` as the ``train`` command does, and return the
    accuracies, cost and checkpoint paths. Under ``torchrun`` every process calls it; only rank 0
    writes. Raises :class:`NonFiniteLossError` when the loss diverges (the last good checkpoint
    is kept); a SIGTERM returns early with ``interrupted=True`` after saving a checkpoint."""
    import torch.distributed as tdist
    owned = not (tdist.is_available() and tdist.is_initialized())
    dist = init_distributed(config.device)
    try:
        run = _Run(config, dist)
        run.setup()
        try:
            return run.run()
        except NonFiniteLossError as e:
            last = os.path.join(run.output, ckpt.WEIGHTS_NAME)
            kept = (f"the last good checkpoint {last} is kept" if os.path.isfile(last)
                    else "no checkpoint had been written yet")
            raise NonFiniteLossError(f"{e}; stopped without saving, {kept}. Lower --lr, set --clip-grad, "
                                     "or check the data") from None
    finally:
        if owned:
            cleanup_distributed()


# ----------------------------------------------------------------------------------- evaluation

def evaluate_checkpoint(checkpoint: str, data: str = "digits", *, model: str | None = None,
                        model_kwargs: dict | None = None, batch_size: int = 128, device: str | None = None,
                        workers: int | None = None, strict: bool = False, amp: bool = False,
                        limit_batches: int | None = None) -> dict:
    """Top-1 / top-5 (percent) and loss of a checkpoint on the ``val`` split of ``data``.

    The model is built from the checkpoint's recorded name and kwargs (ours), with
    ``model_kwargs`` on top: a LookupViT checkpoint can be evaluated at another
    ``compressed_grid``, an STViT one at another token count (through the model's checkpoint
    filter), as far as the weights fit; when they do not, a clear error.
    """
    state_dict, meta = ckpt.load_weights_file(checkpoint)
    name = model or meta.get("model")
    if not name:
        raise _usage_error(f"{checkpoint!r} does not record its model; pass --model NAME")
    if model and meta.get("model") and meta["model"] != model:
        raise _usage_error(f"{checkpoint!r} holds a {meta['model']}, not a {model}; pass --model {meta['model']}")
    kwargs = {**normalize_kwargs(meta.get("model_kwargs") or {}), **normalize_kwargs(model_kwargs or {})}
    import torch.distributed as tdist
    owned = not (tdist.is_available() and tdist.is_initialized())
    dist = init_distributed(device)
    try:
        return _evaluate_checkpoint(checkpoint, data, name, kwargs, meta, state_dict, dist, batch_size=batch_size,
                                    workers=workers, strict=strict, amp=amp, limit_batches=limit_batches)
    finally:
        if owned:
            cleanup_distributed()


def _evaluate_checkpoint(checkpoint, data, name, kwargs, meta, state_dict, dist, *, batch_size, workers, strict,
                         amp, limit_batches) -> dict:
    from timm.data import resolve_data_config

    video = is_video_data(data)
    data_kwargs = {}
    _check_data_fits_model(name, data, _is_video_model_name(name), video)  # before any data is read
    if video:
        size, data_config = _probe_video_input(name, kwargs, data)
        data_kwargs = dict(input_size=size, data_config=data_config)
    val_set = build_dataset(data, "val", strict=strict, **data_kwargs)
    num_classes = len(val_set.classes)
    net = create_model(name, num_classes=num_classes, model_kwargs=kwargs)
    ckpt.fit_checkpoint(net, state_dict, source=f"checkpoint {checkpoint!r}", meta=meta, data_classes=num_classes,
                        data_name=data)
    if meta.get("classes") and list(meta["classes"]) != list(val_set.classes):
        print(f"condensevit eval: warning: the checkpoint's class names {meta['classes'][:5]}... differ from the "
              f"data's {val_set.classes[:5]}...; accuracy assumes they correspond in sorted order", file=sys.stderr)
    input_size = _input_size(net, kwargs)
    _check_data_fits_model(name, data, len(input_size) == 4, video)
    if video:
        if tuple(input_size) != tuple(size):  # not expected: the probe is the model
            val_set = build_dataset(data, "val", strict=strict, input_size=input_size,
                                    data_config=resolve_data_config({}, model=net))
        warning = _skipped_warning("eval", (val_set,), True)
        if warning and dist.is_main:
            print(warning, file=sys.stderr)
    else:
        val_set.transform = build_transform(data, False, input_size, data_config=resolve_data_config({}, model=net))
    sampler = ShardedEvalSampler(len(val_set), num_replicas=dist.world_size, rank=dist.rank)
    loader = DataLoader(val_set, batch_size=batch_size, sampler=sampler,
                        **_loader_kwargs(_default_workers(workers, dist.device, dist.world_size), dist.device))
    net.to(dist.device)
    stats = evaluate(net, loader, dist.device, amp_ctx=_amp_context(amp, dist.device), limit_batches=limit_batches)
    stats.update(model=name, model_kwargs=kwargs, checkpoint=os.path.abspath(checkpoint), data=data,
                 num_classes=num_classes, input_size=list(input_size), skipped_images=val_set.num_skipped)
    return stats
