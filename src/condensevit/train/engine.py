"""Training and evaluation entry points: ``train(config)`` and ``evaluate_checkpoint(...)``, the API
behind ``condensevit train`` / ``condensevit eval`` (and the demo).

A run, read top to bottom in :class:`_Run`:

1. :meth:`_Run.setup`: check the options; pick the output folder and the checkpoint to resume
   (:class:`~.run_state.RunState`); read the data (:class:`~.data_setup.TrainData`: its classes size
   the classifier); build the model (:func:`condensevit.models.factory.create_model`) and fit the
   transforms and loaders to it; the optimizer and schedule; the loss (mixup, label smoothing,
   distillation); DDP under torchrun; then resume or start afresh.
2. :meth:`_Run.run`: the epochs: :func:`~.loop.train_one_epoch`, :func:`~.loop.evaluate`, then
   the log row, ``best.safetensors`` and the checkpoint; a stop request saves and returns.
3. :meth:`_Run.finish`: GMACs and throughput, ``summary.json``.

Recipe pieces are timm's: transforms and RandAugment, Mixup/CutMix, label smoothing, AdamW with a
cosine schedule and warm-up (stepped per update), gradient clipping, EMA of the weights, AMP.

Video: with video data the model must be a video model (and image data needs an image model); see
:mod:`.data_setup`. Mixup mixes whole clips, cutmix is refused (timm's CutMix cuts boxes out of
(B, C, H, W) images, so on clips it would cut (T, H) planes).

Determinism: data order is a function of (seed, epoch), each image's augmentation of (seed, epoch,
index), and the generators the model and mixup draw from are saved in every checkpoint, so an
interrupted-then-resumed run ends with the same weights as an uninterrupted one (on CPU; exact on
GPU as far as its kernels are deterministic).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys

import torch.nn as nn

from ..models.factory import check_model_name, create_model, model_input_size_for, normalize_kwargs
from ..models.factory import first_line as _first_line
from . import checkpoint as ckpt
from .config import TrainConfig, TrainResult
from .data_setup import EvalData, TrainData
from .distributed import DistInfo, cleanup_distributed, init_distributed
from .loop import EpochState, NonFiniteLossError, amp_context, evaluate, train_one_epoch
from .run_state import RunState, log, seed_all

__all__ = [
    "TrainConfig", "TrainResult", "train", "evaluate", "evaluate_checkpoint", "train_one_epoch",
    "create_model", "NonFiniteLossError", "normalize_kwargs",
]

# the names these lived under before the split (kept importable from here)
_input_size = model_input_size_for
_EpochState = EpochState


def _usage_error(msg: str):
    from ..cli import UsageError
    return UsageError(msg)


def _check_config(cfg: TrainConfig):
    """Option errors that need no data and no model: the ranges (:meth:`TrainConfig.check`), then
    the options that only make sense together."""
    cfg.check()
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise ValueError(f"mixup/cutmix need an even --batch-size (got {cfg.batch_size})")
    if cfg.distillation_type != "none" and not cfg.teacher:
        raise ValueError(f"--distillation-type {cfg.distillation_type} needs --teacher NAME and "
                         "--teacher-checkpoint FILE")
    if cfg.teacher and cfg.distillation_type == "none":
        raise ValueError("--teacher was given but --distillation-type is none; pick soft or hard")
    if cfg.drop_path is not None and "drop_path_rate" in (cfg.model_kwargs or {}):
        raise ValueError("--drop-path and --model-kwargs drop_path_rate both set the drop path rate; give one")
    check_model_name(cfg.model)


class _Run:
    def __init__(self, cfg: TrainConfig, dist: DistInfo):
        self.cfg, self.dist = cfg, dist

    # -- set-up --------------------------------------------------------------------------------
    def setup(self):
        # the learning rates as they run (scaled by the global batch with --lr-base): what config.json records
        self.cfg = self.cfg.resolved(self.dist.world_size)
        cfg, dist = self.cfg, self.dist
        _check_config(cfg)
        self.state = RunState.prepare(cfg, dist)
        self.output = self.state.output
        if self.state.complete is not None:
            return  # nothing to do: run() says so
        self.model_kwargs = normalize_kwargs(cfg.model_kwargs)
        self.data = TrainData.open(cfg, dist, self.model_kwargs)  # data first: the classes size the classifier

        seed_all(cfg.seed)  # the same initial weights on every rank
        build_kwargs = dict(self.model_kwargs)
        if cfg.drop_path is not None:  # a training setting: not recorded with the weights' model kwargs
            build_kwargs["drop_path_rate"] = cfg.drop_path
        model = create_model(cfg.model, num_classes=self.data.num_classes, model_kwargs=build_kwargs,
                             pretrained_file=cfg.pretrained_file)
        self.data.fit_to(model)
        model.to(dist.device)
        self.model_plain = model
        self._build_optimisation()
        self._build_criterion()
        self.model = model
        if dist.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters)

        self.state.attach(model=model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                          ema=self.ema, model_kwargs=self.model_kwargs, classes=self.data.classes,
                          input_size=self.data.input_size)
        self.state.begin()

    def _build_optimisation(self):
        """EMA, optimizer, schedule (stepped per update), autocast and grad scaling (timm's)."""
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        cfg, dev, model = self.cfg, self.dist.device, self.model_plain
        self.ema = None
        if cfg.model_ema:
            from timm.utils import ModelEmaV3
            # warm-up makes the average useful in short runs too (decay grows towards model_ema_decay)
            self.ema = ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=True)
        self.optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False,
            updates_per_epoch=self.data.steps_per_epoch)
        self.amp_ctx = amp_context(cfg.amp, dev, cfg.amp_dtype)
        self.scaler = None
        if cfg.amp and dev.type == "cuda" and cfg.amp_dtype == "float16":
            from timm.utils import NativeScaler
            self.scaler = NativeScaler(device="cuda")

    def _build_criterion(self):
        """Mixup/CutMix, the base loss (soft targets, label smoothing or plain cross-entropy) and
        DeiT's distillation around it."""
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        from .distill import DistillationLoss, build_teacher

        cfg, data = self.cfg, self.data
        self.mixup_fn = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup
            self.mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                                  switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.smoothing,
                                  num_classes=data.num_classes)
        if self.mixup_fn is not None:
            base = SoftTargetCrossEntropy()  # mixup makes the (smoothed) soft targets
        elif cfg.smoothing > 0:
            base = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
        else:
            base = nn.CrossEntropyLoss()
        teacher = None
        teacher_size = None
        if cfg.teacher:
            teacher = build_teacher(cfg.teacher, cfg.teacher_checkpoint, data.num_classes,
                                    model_kwargs=cfg.teacher_kwargs, device=self.dist.device, data_name=cfg.data)
            teacher_size = model_input_size_for(teacher, {**(cfg.teacher_kwargs or {})})
            if data.video:
                # no resizing of clips for the teacher: it must take the student's clips as they are
                if tuple(teacher_size) != tuple(data.input_size):
                    raise _usage_error(
                        f"teacher {cfg.teacher} takes {'clips' if len(teacher_size) == 4 else 'images'} of size "
                        f"{tuple(teacher_size)} but the student's clips are {tuple(data.input_size)}; distillation "
                        "on video needs a video teacher built for the same clip size (--teacher-kwargs)")
                teacher_size = None
            else:
                teacher_size = teacher_size[1:]
        self.criterion = DistillationLoss(base, teacher, cfg.distillation_type, cfg.distillation_alpha,
                                          cfg.distillation_tau, teacher_input_size=teacher_size)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        if self.state.complete is not None:
            return self._already_complete()
        cfg, dist, data, state = self.cfg, self.dist, self.data, self.state
        interrupted = False
        nparams = sum(p.numel() for p in self.model_plain.parameters())
        log(cfg, dist, f"training {cfg.model} {self.model_kwargs or ''} on {cfg.data}: {len(data.train_set)} "
                       f"train / {len(data.val_set)} val images, {data.num_classes} classes, input "
                       f"{data.input_size}, {nparams / 1e6:.2f}M params, {dist.world_size} process(es) on "
                       f"{dist.device}, {data.steps_per_epoch} steps/epoch -> {self.output}")
        with ckpt.GracefulStop(signals=(signal.SIGTERM, signal.SIGINT)) as stop:
            for epoch in range(state.start_epoch, cfg.epochs):
                es = state.epoch_state or EpochState(epoch=epoch)
                state.epoch_state = None
                data.start_epoch(epoch, es.step_in_epoch)
                status = train_one_epoch(
                    model=self.model, loader=data.train_loader, criterion=self.criterion, optimizer=self.optimizer,
                    scheduler=self.scheduler, device=dist.device, es=es, steps=data.steps_per_epoch,
                    run_state=state.counters, amp_ctx=self.amp_ctx, scaler=self.scaler, mixup_fn=self.mixup_fn,
                    clip_grad=cfg.clip_grad, clip_mode=cfg.clip_mode, ema=self.ema, log_interval=cfg.log_interval,
                    stop=stop, dist=dist, debug_nan_at_step=cfg.debug_nan_at_step,
                    debug_stop_at_step=cfg.debug_stop_at_step, save_fn=lambda: state.save(epoch, es),
                    save_every_steps=cfg.save_every_steps, progress=cfg.progress,
                    desc=f"epoch {epoch + 1}/{cfg.epochs}", accum_steps=cfg.accum_steps)
                if status == "stopped":
                    state.save(epoch, es)
                    interrupted = True
                    self.stopped_by = _signal_name(stop.signum)
                    if dist.is_main:  # shown even with --quiet: the user must know how to go on
                        by = f" by {self.stopped_by}" if self.stopped_by else ""
                        print(f"condensevit train: stopped{by} at epoch {epoch + 1}, step {state.global_step}"
                              f": checkpoint saved in {self.output}; continue with --resume auto",
                              file=sys.stderr, flush=True)
                    break
                row = self._validate(epoch, es)
                state.save(epoch + 1, None, row)
                ema_txt = f"  ema_top1 {row['ema_val_top1']:.2f}" if "ema_val_top1" in row else ""
                log(cfg, dist, f"epoch {epoch + 1}/{cfg.epochs}  train_loss {row['train_loss']:.4f}  "
                               f"val_loss {row['val_loss']:.4f}  val_top1 {row['val_top1']:.2f}  val_top5 "
                               f"{row['val_top5']:.2f}{ema_txt}  lr {row['lr']:.2e}  {es.elapsed_s:.1f}s")
        train_time = state.run_time()
        state.close()
        if cfg.debug_weights_hash:
            print(f"weights-sha256 rank={dist.rank} {ckpt.weights_hash(self.model_plain.state_dict())}", flush=True)
        return self.finish(train_time, interrupted, nparams)

    def _validate(self, epoch: int, es: EpochState) -> dict:
        """The log row of a finished epoch: its training loss and speed, and the val metrics (of
        the EMA weights too, with ``--model-ema``)."""
        cfg, dist = self.cfg, self.dist
        val = evaluate(self.model_plain, self.data.val_loader, dist.device, amp_ctx=self.amp_ctx,
                       limit_batches=cfg.limit_val_batches)
        row = dict(epoch=epoch + 1, step=self.state.global_step,
                   lr=self.optimizer.param_groups[0]["lr"],
                   train_loss=es.loss_sum / max(es.images, 1),
                   val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"], val_images=val["images"],
                   epoch_time_s=round(es.elapsed_s, 3),
                   train_images_per_s=round(es.images / max(es.elapsed_s, 1e-9), 2))
        if self.ema is not None:
            ev = evaluate(self.ema.module, self.data.val_loader, dist.device, amp_ctx=self.amp_ctx,
                          limit_batches=cfg.limit_val_batches)
            row.update(ema_val_top1=ev["top1"], ema_val_loss=ev["loss"])
        return row

    def finish(self, train_time: float, interrupted: bool, nparams: int) -> TrainResult:
        """Measure the trained model (GMACs, throughput) and write the summary."""
        cfg, dist, state = self.cfg, self.dist, self.state
        input_size = self.data.input_size
        last = state.history[-1] if state.history else {}
        gm = ips = None
        if dist.is_main and not interrupted and cfg.measure:
            from ..measure import gmacs, throughput
            model = self.model_plain.eval()
            try:
                gm = gmacs(model, input_size)
            except Exception as e:  # noqa: BLE001  (a measurement failure must not lose the run)
                log(cfg, dist, f"note: GMACs could not be counted: {_first_line(e)}")
            bs = cfg.throughput_batch_size or (16 if dist.device.type == "cpu" else 64)
            try:
                ips = throughput(model, input_size, batch_size=bs, device=dist.device, amp=cfg.amp,
                                 warmup=2, iters=5, latency_iters=0).images_per_s
            except Exception as e:  # noqa: BLE001
                log(cfg, dist, f"note: throughput could not be measured: {_first_line(e)}")
        out = self.output
        result = TrainResult(
            best_top1=state.best.get("top1"), best_epoch=state.best.get("epoch"),
            final_top1=last.get("val_top1"), final_top5=last.get("val_top5"), final_loss=last.get("val_loss"),
            ema_top1=last.get("ema_val_top1"), gmacs=gm, params=nparams, images_per_s=ips,
            train_time_s=round(train_time, 2), epochs_done=len(state.history),
            checkpoint=os.path.join(out, ckpt.WEIGHTS_NAME),
            best_checkpoint=os.path.join(out, "best.safetensors") if state.best.get("top1") is not None else None,
            output_dir=out, interrupted=interrupted, history=list(state.history),
            stopped_by=getattr(self, "stopped_by", None))
        if dist.is_main and not interrupted:
            summary = {k: v for k, v in result.as_dict().items() if k != "history"}
            summary.update(model=cfg.model, model_kwargs=self.model_kwargs, data=cfg.data,
                           num_classes=self.data.num_classes, input_size=list(input_size),
                           world_size=dist.world_size, device=str(dist.device),
                           global_batch=cfg.global_batch(dist.world_size), config=cfg.to_json())
            state.write_final(summary)
            log(cfg, dist, _format_summary(summary))
        return result


    def _already_complete(self) -> TrainResult:
        """``--resume auto`` on a run that had finished: say so, change nothing, return its summary."""
        cfg, summary = self.cfg, self.state.complete
        if self.dist.is_main:
            print(f"condensevit train: {self.output} has already finished its {summary['epochs_done']} epochs "
                  f"(top-1 {_fmt(summary.get('final_top1'), '.2f')}); nothing to do, nothing changed. To train "
                  f"it longer, pass --resume auto with --epochs above {summary['epochs_done']} (asked: "
                  f"{cfg.epochs})", file=sys.stderr, flush=True)
        history = []
        log_path = os.path.join(self.output, "log.jsonl")
        if os.path.isfile(log_path):
            with open(log_path) as f:
                history = [json.loads(ln) for ln in f if ln.strip()]
        fields = {f.name for f in dataclasses.fields(TrainResult)} - {"history", "interrupted", "stopped_by"}
        return TrainResult(**{k: summary.get(k) for k in fields}, history=history)


def _signal_name(signum) -> str | None:
    if signum is None:
        return None
    return {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}.get(signum, f"signal {signum}")


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
    run = _Run(config, dist)
    try:
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
        if getattr(run, "state", None) is not None:
            run.state.release()
        if owned:
            cleanup_distributed()


# ----------------------------------------------------------------------------------- evaluation

def evaluate_checkpoint(checkpoint: str, data: str = "digits", *, model: str | None = None,
                        model_kwargs: dict | None = None, batch_size: int = 128, device: str | None = None,
                        workers: int | None = None, strict: bool = False, amp: bool = False,
                        limit_batches: int | None = None, views=None) -> dict:
    """Top-1 / top-5 (percent) and loss of a checkpoint on the ``val`` split of ``data``.

    The model is built from the checkpoint's recorded name and kwargs (ours), with
    ``model_kwargs`` on top: a LookupViT checkpoint can be evaluated at another
    ``compressed_grid``, an STViT one at another token count (through the model's checkpoint
    filter), as far as the weights fit; when they do not, a clear error.

    ``views`` (``'4x3'`` or (4, 3); video data only): multi-view testing, ``4`` temporal clips x
    ``3`` spatial crops of each clip (:func:`condensevit.data.video.view_indices`,
    :func:`~condensevit.data.video.spatial_crops`), their probabilities averaged; ``batch_size``
    then counts clips, each giving that many model inputs.
    """
    from ..data.video import parse_views
    from .config import check_range
    check_range("--batch-size", batch_size, lo=1)
    check_range("--limit-batches", limit_batches, lo=1, optional=True, fix="omit it for the whole val split")
    check_range("--workers", workers, lo=0, optional=True, fix="0 loads data in the evaluating process")
    try:
        views = parse_views(views) if views is not None else (1, 1)
    except ValueError as e:
        raise _usage_error(f"--views: {e}") from None
    from ..models._builder import resolve_checkpoint_path
    checkpoint = resolve_checkpoint_path(checkpoint)  # a run folder: its last.safetensors
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
                                    workers=workers, strict=strict, amp=amp, limit_batches=limit_batches,
                                    views=views)
    finally:
        if owned:
            cleanup_distributed()


def _evaluate_checkpoint(checkpoint, data, name, kwargs, meta, state_dict, dist, *, batch_size, workers, strict,
                         amp, limit_batches, views=(1, 1)) -> dict:
    ev = EvalData.open(data, name, kwargs, dist, strict=strict, views=views)
    num_classes = len(ev.val_set.classes)
    net = create_model(name, num_classes=num_classes, model_kwargs=kwargs)
    ckpt.fit_checkpoint(net, state_dict, source=f"checkpoint {checkpoint!r}", meta=meta, data_classes=num_classes,
                        data_name=data)
    if meta.get("classes") and list(meta["classes"]) != list(ev.val_set.classes):
        print(f"condensevit eval: warning: the checkpoint's class names {meta['classes'][:5]}... differ from the "
              f"data's {ev.val_set.classes[:5]}...; accuracy assumes they correspond in sorted order", file=sys.stderr)
    ev.fit_to(net, batch_size=batch_size, workers=workers)
    net.to(dist.device)
    stats = evaluate(net, ev.loader, dist.device, amp_ctx=amp_context(amp, dist.device), limit_batches=limit_batches,
                     views=ev.num_views)
    stats.update(model=name, model_kwargs=kwargs, checkpoint=os.path.abspath(checkpoint), data=data,
                 views=f"{views[0]}x{views[1]}",
                 num_classes=num_classes, input_size=list(ev.input_size), skipped_images=ev.val_set.num_skipped)
    return stats
