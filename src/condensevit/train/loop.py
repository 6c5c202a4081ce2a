"""The training loop: one epoch of steps (:func:`train_one_epoch`) and the evaluation pass
(:func:`evaluate`), with mixed precision (:func:`amp_context`).

No per-step host syncs: losses are accumulated on the device and read every ``log_interval``
steps and at the end of an epoch, where a non-finite loss is caught (:class:`NonFiniteLossError`)
before anything is saved. A stop request (SIGTERM, SIGINT, or the test hook) ends the epoch at a
step boundary; the caller then saves a checkpoint. What an epoch carries between steps, and across
a mid-epoch checkpoint, is an :class:`EpochState`.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import DistInfo, all_reduce_sum, broadcast_flag

__all__ = ["NonFiniteLossError", "EpochState", "amp_context", "evaluate", "average_view_scores", "train_one_epoch",
           "unwrap"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped without saving."""


def amp_context(amp: bool, device: torch.device, amp_dtype: str = "float16"):
    """A factory of autocast contexts: float16 (or ``amp_dtype``) on CUDA, bfloat16 on CPU, and
    no autocast when ``amp`` is off."""
    if not amp:
        return contextlib.nullcontext
    if device.type == "cuda":
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(amp_dtype)
        if dtype is None:
            raise ValueError(f"--amp-dtype {amp_dtype!r} must be float16 or bfloat16")
    else:
        dtype = torch.bfloat16
    return lambda: torch.autocast(device.type, dtype=dtype)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def average_view_scores(logits: torch.Tensor, num_views: int) -> torch.Tensor:
    """Multi-view testing: (B * num_views, K) logits, the views of each sample consecutive, ->
    (B, K) class probabilities averaged over the views (softmax, then mean: Video Swin's
    ``average_clips='prob'``)."""
    if logits.shape[0] % num_views:
        raise ValueError(f"{logits.shape[0]} scores are not a whole number of samples of {num_views} views")
    return logits.float().softmax(-1).view(-1, num_views, logits.shape[-1]).mean(1)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, amp_ctx=contextlib.nullcontext,
             limit_batches: int | None = None, views: int = 1, **forward_kwargs) -> dict:
    """Top-1 / top-5 accuracy (percent) and cross-entropy over ``loader``, summed across ranks.

    With ``views`` > 1 each batch holds (B, views, ...) views of B samples (multi-view testing,
    :class:`~condensevit.data.video.MultiViewClips`): the model scores every view and each sample's
    accuracy and loss come from its views' averaged probabilities (:func:`average_view_scores`)."""
    was_training = model.training
    model.eval()
    stats = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, top1, top5, count
    for i, (x, y) in enumerate(loader):
        if limit_batches is not None and i >= limit_batches:
            break
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if views > 1:
            if x.shape[1] != views:
                raise ValueError(f"a batch of shape {tuple(x.shape)} does not hold {views} views per sample")
            x = x.flatten(0, 1)
        with amp_ctx():
            out = model(x, **forward_kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        out = out.float()
        if views > 1:
            out = average_view_scores(out, views)
            loss = F.nll_loss(out.clamp_min(1e-12).log(), y, reduction="sum")
        else:
            loss = F.cross_entropy(out, y, reduction="sum")
        k = min(5, out.shape[1])
        top = out.topk(k, dim=1).indices
        hit = top.eq(y[:, None])
        stats += torch.stack([loss.double(),
                              hit[:, :1].sum().double(), hit.sum().double(),
                              torch.tensor(float(len(y)), device=device, dtype=torch.float64)])
    all_reduce_sum(stats)
    model.train(was_training)
    loss_sum, c1, c5, n = stats.tolist()
    if n == 0:
        return dict(top1=float("nan"), top5=float("nan"), loss=float("nan"), images=0)
    return dict(top1=100.0 * c1 / n, top5=100.0 * c5 / n, loss=loss_sum / n, images=int(n))


@dataclass
class EpochState:
    """What a training epoch carries between steps (and across a mid-epoch checkpoint)."""
    epoch: int
    step_in_epoch: int = 0
    loss_sum: float = 0.0
    images: int = 0
    elapsed_s: float = 0.0


def train_one_epoch(*, model, loader, criterion, optimizer, scheduler, device, es: EpochState, steps: int,
                    run_state: dict, amp_ctx=contextlib.nullcontext, scaler=None, mixup_fn=None,
                    clip_grad=None, clip_mode="norm", ema=None, log_interval=50, stop=None, dist: DistInfo,
                    debug_nan_at_step=None, debug_stop_at_step=None, save_fn=None, save_every_steps=None,
                    progress=None, desc="", accum_steps: int = 1) -> str:
    """Run the remaining steps of one epoch. Returns 'done' or 'stopped' (a stop was requested:
    SIGTERM, or the test hook); raises :class:`NonFiniteLossError`. ``es`` and ``run_state``
    ('global_step') are updated in place.

    A step is one optimizer update over ``accum_steps`` micro-batches (gradient accumulation: each
    micro-batch's loss divided by ``accum_steps``; under DDP the gradients are all-reduced only on
    the last one, ``no_sync`` before); clipping, the schedule and the EMA follow the updates, and a
    stop or checkpoint happens only between updates."""
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
            step = run_state["global_step"] + 1
            optimizer.zero_grad(set_to_none=True)
            for micro in range(accum_steps):
                final = micro == accum_steps - 1
                x, y = next(it)
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if mixup_fn is not None:
                    x, y = mixup_fn(x, y)
                # DDP all-reduces on the update's last micro-batch only
                with (contextlib.nullcontext() if final or not dist.distributed else model.no_sync()):
                    with amp_ctx():
                        out = model(x)
                        loss = criterion(x, out, y)
                    if debug_nan_at_step is not None and step >= debug_nan_at_step:
                        loss = loss * float("nan")  # test hook: a diverging run
                    part = loss / accum_steps if accum_steps > 1 else loss
                    if scaler is not None:
                        scaler(part, optimizer, clip_grad=clip_grad, clip_mode=clip_mode, parameters=params,
                               need_update=final)
                    else:
                        part.backward()
                loss_acc += loss.detach().double() * len(x)
                acc_images += len(x)
            if scaler is None:
                if clip_grad is not None:
                    dispatch_clip_grad(params, clip_grad, mode=clip_mode)
                optimizer.step()
            run_state["global_step"] = step
            scheduler.step_update(num_updates=step)
            if ema is not None:
                ema.update(unwrap(model), step=step)
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
