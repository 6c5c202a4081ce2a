"""Data set-up for training and evaluation: the train / val sets, their transforms sized for the
model, and the loaders.

It comes in two steps because the data and the model size each other: the data's classes size
the classifier, and the model's input size and normalisation (timm's ``resolve_data_config``) size
the transforms. :meth:`TrainData.open` reads the sets (and checks that images go to an image model,
clips to a video model, before any data is read); :meth:`TrainData.fit_to` then builds the
transforms and the loaders for the built model.

Video: with video data (``moving_digits``, ``moving_digits_direction``, a folder of clips; see
:func:`condensevit.data.is_video_data`) the sets are built at the model's ``input_size``
(C, T, H, W), found from a model on the meta device, and normalised with its mean and std. There is
no video augmentation in this version (``--aa``, ``--hflip``, ``--scale``, ``--color-jitter`` and
``--reprob`` do not apply).

Determinism: data order is a function of (seed, epoch) (:class:`ResumableDistributedSampler`), each
image's augmentation of (seed, epoch, index) (:class:`~condensevit.data.SeededAugmentation`).
"""
from __future__ import annotations

import os
import signal
import sys

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..data import (AugmentConfig, SeededAugmentation, build_dataset, build_transform, check_trainable_classes,
                    is_video_data)
from ..models.factory import create_model, is_video_model_name, model_input_size_for
from .config import TrainConfig
from .distributed import DistInfo, ResumableDistributedSampler, ShardedEvalSampler

__all__ = [
    "TrainData", "EvalData", "check_data_fits_model", "probe_video_input", "skipped_warning", "default_workers",
    "loader_kwargs", "VIDEO_DATA_HINT", "VIDEO_MODEL_HINT",
]

VIDEO_DATA_HINT = ("--data moving_digits (or moving_digits_direction) or a clip folder "
                   "(root/{train,val}/<class>/<clip>, a clip being a folder of frames or a video file)")
VIDEO_MODEL_HINT = ("a video model (vit_video_*, stvit_video_*, lookupvit_video_*, video_swin_*, stvit_video_swin_*; "
                    "`condensevit models` lists them)")


def _usage_error(msg: str):
    from ..cli import UsageError
    return UsageError(msg)


def check_data_fits_model(name: str, data: str, video_model: bool, video_data: bool):
    """A clear error when a video model is given images or an image model clips."""
    if video_model and not video_data:
        raise _usage_error(f"{name} takes clips (C, T, H, W) but {data} gives images; use {VIDEO_DATA_HINT}")
    if video_data and not video_model:
        raise _usage_error(f"{name} takes images (C, H, W) but {data} gives clips (C, T, H, W); use "
                           f"{VIDEO_MODEL_HINT}, or image data")


def probe_video_input(name: str, kwargs: dict, data: str) -> tuple[tuple[int, ...], dict]:
    """The (C, T, H, W) input size and the data config (mean, std) of ``name`` built with ``kwargs``,
    from a model on the meta device (no memory, no initialisation): the video sets must be built at
    the model's size before the real model, which their classes size."""
    from timm.data import resolve_data_config
    with torch.device("meta"):
        probe = create_model(name, num_classes=1, model_kwargs=kwargs)
    size = model_input_size_for(probe, kwargs)
    check_data_fits_model(name, data, len(size) == 4, True)
    return size, resolve_data_config({}, model=probe)


def video_augment_note(cfg: TrainConfig) -> str | None:
    """The warning for image augmentation options given with video data (they do not apply)."""
    given = [flag for flag, value in (("--aa", cfg.aa), ("--hflip", cfg.hflip), ("--scale", cfg.scale),
                                      ("--color-jitter", cfg.color_jitter), ("--reprob", cfg.reprob or None))
             if value is not None]
    if not given:
        return None
    return (f"condensevit train: warning: {', '.join(given)} do not apply to video data: there is no video "
            "augmentation in this version")


def skipped_warning(cmd: str, sets, video: bool) -> str | None:
    """One warning line for the unreadable images (or short clips) the sets left out, or None."""
    n = sum(s.num_skipped for s in sets)
    if not n:
        return None
    first = next(s.skipped[0] for s in sets if s.num_skipped)
    what = "clip(s)" if video else "unreadable image(s)"
    return (f"condensevit {cmd}: warning: skipped {n} {what} (first: {first[0]}: {first[1]}); --strict makes this "
            "an error")


def default_workers(workers: int | None, device: torch.device, world: int) -> int:
    """Data loading processes: as given, else none on a CPU (they would compete with the training
    threads) and up to 8 per GPU process."""
    if workers is not None:
        if workers < 0:
            raise ValueError(f"--workers {workers} must be 0 or more")
        return workers
    if device.type == "cpu":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) // max(world, 1) - 1))


def _ignore_sigint(worker_id: int):  # noqa: ARG001
    # Ctrl-C reaches the whole process group: the main process stops at a step boundary and saves,
    # so the workers must not die under it first
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def loader_kwargs(workers: int, device: torch.device) -> dict:
    kw = dict(num_workers=workers, pin_memory=device.type == "cuda")
    if workers > 0:
        kw["persistent_workers"] = False  # workers must see each epoch's set_epoch
        kw["worker_init_fn"] = _ignore_sigint
    return kw


class TrainData:
    """The train and val sets of a run and, after :meth:`fit_to`, their transforms and loaders.

    Attributes after :meth:`open`: ``train_set``, ``val_set``, ``classes``, ``num_classes``,
    ``video``. After :meth:`fit_to`: ``input_size`` ((C, H, W) or (C, T, H, W)), ``data_config``,
    ``train_data`` (the seeded-augmentation view), ``sampler``, ``train_loader``, ``val_loader``,
    ``steps_per_epoch``, ``workers``.
    """

    def __init__(self, cfg: TrainConfig, dist: DistInfo, model_kwargs: dict):
        self.cfg, self.dist, self.model_kwargs = cfg, dist, model_kwargs

    @classmethod
    def open(cls, cfg: TrainConfig, dist: DistInfo, model_kwargs: dict) -> "TrainData":
        """Read the train and val sets of ``cfg.data`` (video sets at the model's clip size)."""
        self = cls(cfg, dist, model_kwargs)
        self.video = is_video_data(cfg.data)
        self._data_kwargs = {}
        check_data_fits_model(cfg.model, cfg.data, is_video_model_name(cfg.model), self.video)  # before any data
        if self.video:
            if cfg.cutmix > 0:
                raise ValueError("--cutmix does not apply to video data: timm's CutMix cuts boxes out of (B, C, H, W) "
                                 "images and would cut (T, H) planes out of clips; use --mixup (it mixes whole clips) "
                                 "and --cutmix 0")
            note = video_augment_note(cfg)
            if note and dist.is_main:
                print(note, file=sys.stderr, flush=True)
            # the clips are sampled and sized for the model: its input size first (a meta-device build)
            size, data_config = probe_video_input(cfg.model, model_kwargs, cfg.data)
            self._data_kwargs = dict(input_size=size, data_config=data_config)
        self.train_set = build_dataset(cfg.data, "train", strict=cfg.strict, **self._data_kwargs)
        check_trainable_classes(self.train_set.classes, cfg.data)
        self.val_set = build_dataset(cfg.data, "val", strict=cfg.strict, **self._data_kwargs)
        self.classes = list(self.train_set.classes)
        self.num_classes = len(self.classes)
        warning = skipped_warning("train", (self.train_set, self.val_set), self.video)
        if warning and dist.is_main:
            print(warning, file=sys.stderr, flush=True)
        return self

    def fit_to(self, model: nn.Module):
        """Size the transforms for ``model`` and build the samplers and loaders."""
        from timm.data import resolve_data_config

        cfg, dist = self.cfg, self.dist
        self.input_size = model_input_size_for(model, self.model_kwargs)
        check_data_fits_model(cfg.model, cfg.data, len(self.input_size) == 4, self.video)
        self.data_config = resolve_data_config({}, model=model)
        if self.video:
            if tuple(self.input_size) != tuple(self._data_kwargs["input_size"]):  # not expected: the probe is the model
                kw = dict(input_size=self.input_size, data_config=self.data_config)
                self.train_set = build_dataset(cfg.data, "train", strict=cfg.strict, **kw)
                self.val_set = build_dataset(cfg.data, "val", strict=cfg.strict, **kw)
        else:
            augment = AugmentConfig(aa=cfg.aa, hflip=cfg.hflip, scale=cfg.scale, color_jitter=cfg.color_jitter,
                                    re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount)
            self.train_set.transform = build_transform(cfg.data, True, self.input_size,
                                                       data_config=self.data_config, augment=augment)
            self.val_set.transform = build_transform(cfg.data, False, self.input_size, data_config=self.data_config,
                                                     augment=augment)
        self.train_data = SeededAugmentation(self.train_set, seed=cfg.seed)

        per_rank = len(self.train_set) // dist.world_size
        per_step = cfg.batch_size * cfg.accum_steps  # images of one optimizer update on one process
        if per_rank < per_step:
            what = f"--batch-size {cfg.batch_size}" + (f" x --accum-steps {cfg.accum_steps}" if cfg.accum_steps > 1 else "")
            raise ValueError(f"{what} is larger than the {per_rank} training images each process gets; lower it")
        dev = dist.device
        self.workers = default_workers(cfg.workers, dev, dist.world_size)
        if cfg.repeated_aug:
            from .repeat_aug import RepeatAugmentSampler
            self.sampler = RepeatAugmentSampler(len(self.train_set), num_replicas=dist.world_size, rank=dist.rank,
                                                seed=cfg.seed, num_repeats=cfg.repeated_aug_repeats)
        else:
            self.sampler = ResumableDistributedSampler(len(self.train_set), num_replicas=dist.world_size,
                                                       rank=dist.rank, shuffle=True, seed=cfg.seed)
        self.loader_gen = torch.Generator()
        self.train_loader = DataLoader(self.train_data, batch_size=cfg.batch_size, sampler=self.sampler,
                                       drop_last=True, generator=self.loader_gen,
                                       **loader_kwargs(self.workers, dev))
        self.steps_per_epoch = len(self.sampler) // per_step  # optimizer updates
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        val_sampler = ShardedEvalSampler(len(self.val_set), num_replicas=dist.world_size, rank=dist.rank)
        self.val_loader = DataLoader(self.val_set, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                                     sampler=val_sampler, **loader_kwargs(self.workers, dev))

    def start_epoch(self, epoch: int, step_in_epoch: int):
        """Position the data at ``step_in_epoch`` of ``epoch``: the order and the augmentation are
        functions of (seed, epoch), so a resumed epoch sees the batches it would have."""
        cfg = self.cfg
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(step_in_epoch * cfg.batch_size * cfg.accum_steps)
        self.train_data.set_epoch(epoch)
        self.loader_gen.manual_seed(cfg.seed * 1_000_003 + epoch)


class EvalData:
    """The val set of ``condensevit eval`` and, after :meth:`fit_to`, its transform and loader
    (``val_set``, ``input_size``, ``loader``); read first, as for training, since its classes size
    the model."""

    @classmethod
    def open(cls, data: str, name: str, kwargs: dict, dist: DistInfo, *, strict: bool,
             views: tuple[int, int] = (1, 1)) -> "EvalData":
        """``views`` (temporal clips, spatial crops): multi-view testing of video data, each clip's
        views scored and averaged (:class:`~condensevit.data.video.MultiViewClips`)."""
        self = cls()
        self.data, self.name, self.kwargs, self.dist, self.strict = data, name, kwargs, dist, strict
        self.views = tuple(views)
        self.video = is_video_data(data)
        if self.views != (1, 1) and not self.video:
            raise _usage_error(f"--views {self.views[0]}x{self.views[1]} applies to clips (temporal clips x spatial "
                               f"crops); {data} gives images: drop --views, or use video data")
        self._size = None
        data_kwargs = {}
        check_data_fits_model(name, data, is_video_model_name(name), self.video)  # before any data is read
        if self.video:
            self._size, data_config = probe_video_input(name, kwargs, data)
            data_kwargs = dict(input_size=self._size, data_config=data_config)
        self.val_set = build_dataset(data, "val", strict=strict, **data_kwargs)
        warning = skipped_warning("eval", (self.val_set,), self.video)  # as train says it
        if warning and dist.is_main:
            print(warning, file=sys.stderr, flush=True)
        return self

    def fit_to(self, net: nn.Module, *, batch_size: int, workers: int | None):
        from timm.data import resolve_data_config

        data, dist = self.data, self.dist
        self.input_size = model_input_size_for(net, self.kwargs)
        check_data_fits_model(self.name, data, len(self.input_size) == 4, self.video)
        if self.video:
            if tuple(self.input_size) != tuple(self._size):  # not expected: the probe is the model
                self.val_set = build_dataset(data, "val", strict=self.strict, input_size=self.input_size,
                                             data_config=resolve_data_config({}, model=net))
        else:
            self.val_set.transform = build_transform(data, False, self.input_size,
                                                     data_config=resolve_data_config({}, model=net))
        dataset = self.val_set
        if self.views != (1, 1):
            from ..data.video import MultiViewClips
            dataset = MultiViewClips(self.val_set, *self.views)
        self.num_views = self.views[0] * self.views[1]
        sampler = ShardedEvalSampler(len(self.val_set), num_replicas=dist.world_size, rank=dist.rank)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                 **loader_kwargs(default_workers(workers, dist.device, dist.world_size), dist.device))
