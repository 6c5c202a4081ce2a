"""The state of a training run that outlives a process: its output folder, checkpoints, resumption,
the log and the summary.

A run folder holds ``last.safetensors`` + ``last.state.pth`` (the checkpoint pair, see
:mod:`.checkpoint`), ``best.safetensors``, ``ema.safetensors`` (with ``--model-ema``),
``config.json`` and ``config.yaml`` (the resolved config; ``train --config`` takes the latter),
``log.jsonl`` (one row per finished epoch), ``summary.json`` (at the end) and
``tensorboard/`` (when tensorboard is installed). Only rank 0 writes; saving is collective (every
rank's random-number states go into the checkpoint).

Resumption restores the weights, optimizer, scheduler, scaler, EMA, the random streams of every
rank, and the position inside a partly done epoch, so an interrupted-then-resumed run ends with
the same weights as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from ..models.factory import normalize_kwargs
from ..outputs import check_output_dir, disk_full_error, is_disk_full
from . import checkpoint as ckpt
from .config import TrainConfig
from .distributed import DistInfo, raise_together
from .loop import EpochState
from .run_lock import RunLock

__all__ = ["RunState", "seed_all", "log"]


def _usage_error(msg: str):
    from ..cli import UsageError
    return UsageError(msg)


def seed_all(seed: int):
    """Seed python's, numpy's and torch's generators."""
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def log(cfg: TrainConfig, dist: DistInfo, msg: str):
    """A progress line on rank 0 (not with ``--quiet``)."""
    if cfg.verbose and dist.is_main:
        print(msg, flush=True)


class RunState:
    """Where a run stands (``global_step``, ``start_epoch``, a partly done ``epoch_state``, ``best``,
    ``history``) and everything that writes or reads its folder.

    Use: :meth:`prepare` (pick the folder and the checkpoint to resume, before any work), then
    :meth:`attach` the built model, optimizer, scheduler, scaler and EMA, then :meth:`begin`
    (resume, or start afresh); during the run :meth:`save` (mid-epoch, or with an epoch's log row);
    at the end :meth:`write_final` and :meth:`release`.
    """

    def __init__(self, cfg: TrainConfig, dist: DistInfo, output: str, resume_path: str | None):
        self.cfg, self.dist = cfg, dist
        self.output = output
        self.resume_path = resume_path
        self.lock: RunLock | None = None
        self.created_output: list[str] = []  # folders this run created (removed again if it writes nothing)
        self.complete: dict | None = None  # the summary of a run that had already finished
        self.time_before = 0.0  # training time of the sessions before this one (resumed runs)
        self.session_start = time.perf_counter()
        self.counters = dict(global_step=0)  # updated in place by the training loop
        self.start_epoch = 0
        self.epoch_state: EpochState | None = None  # a partly done epoch, from a mid-epoch checkpoint
        self.best = dict(top1=None, epoch=None)
        self.history: list[dict] = []
        self.tb = None

    @property
    def global_step(self) -> int:
        return self.counters["global_step"]

    # -- before any work -----------------------------------------------------------------------
    @classmethod
    def prepare(cls, cfg: TrainConfig, dist: DistInfo) -> "RunState":
        """Before any work: the output folder (``--output``, else the folder of the checkpoint
        resumed, else ``runs/MODEL``), checked writable and locked against a second training
        (rank 0; every rank fails when it fails); the checkpoint to resume; and whether the run
        had already finished (:attr:`complete`). Refuses a folder that already holds a run unless
        it is resumed."""
        if cfg.output is None and cfg.resume not in (None, "auto"):
            found = ckpt.find_resume(cfg.resume, ".")
            output = os.path.dirname(os.path.abspath(found))  # continue writing where the run was
        else:
            output = os.path.abspath(cfg.output or os.path.join("runs", cfg.model))
        self = cls(cfg, dist, output, None)
        error = None
        if dist.is_main:
            try:
                check_output_dir(output, "--output")
                folder = output
                while not os.path.isdir(folder):
                    self.created_output.append(folder)
                    folder = os.path.dirname(folder)
                os.makedirs(output, exist_ok=True)
                self.lock = RunLock.acquire(output)
                if self.lock.notice:
                    print(f"condensevit train: {self.lock.notice}", file=sys.stderr, flush=True)
            except Exception as e:  # noqa: BLE001  (shared with the other ranks, then raised)
                error = e
        raise_together(error, dist)
        try:
            self.resume_path = ckpt.find_resume(cfg.resume, output)
            if self.resume_path is None and ckpt.has_checkpoint(output):
                raise _usage_error(f"{output} already holds a training run; pass --resume auto to continue it, "
                                   "or another --output")
            if self.resume_path:
                self.complete = self._finished_summary()
        except BaseException:
            self.release()
            raise
        return self

    def _finished_summary(self) -> dict | None:
        """The summary of the resumed run when it had finished all the epochs asked (nothing to do)."""
        try:
            state = torch.load(self.resume_path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001  (unreadable: resuming says why)
            return None
        summary = os.path.join(self.output, "summary.json")
        if int(state.get("epoch", 0)) < self.cfg.epochs or state.get("step_in_epoch") or not os.path.isfile(summary):
            return None
        try:
            with open(summary) as f:
                done = json.load(f)
        except (OSError, ValueError):
            return None
        return done if int(done.get("epochs_done") or 0) == int(state["epoch"]) else None

    def release(self):
        """Unlock the folder (and remove it when this run created it and wrote nothing)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
            for folder in self.created_output:  # innermost first; only succeeds when empty
                try:
                    os.rmdir(folder)
                except OSError:
                    break

    def attach(self, *, model: torch.nn.Module, optimizer, scheduler, scaler, ema, model_kwargs: dict,
               classes: list[str], input_size: tuple[int, ...]):
        """The objects a checkpoint saves and restores (``model`` unwrapped, not DDP's), and what
        the weights' metadata records."""
        self.model, self.optimizer, self.scheduler, self.scaler, self.ema = model, optimizer, scheduler, scaler, ema
        self.model_kwargs, self.classes, self.input_size = model_kwargs, list(classes), tuple(input_size)

    def begin(self):
        """Resume from the checkpoint found by :meth:`prepare`, or start afresh; then write
        ``config.json`` and open tensorboard."""
        cfg, dist = self.cfg, self.dist
        if dist.is_main:
            ckpt.remove_stale_temporaries(self.output)  # of writes a kill interrupted (we hold the lock)
        self.created_output = []  # from here on the folder holds the run
        self.session_start = time.perf_counter()
        if self.resume_path:
            self._resume()
        if not self.resume_path:
            seed_all(cfg.seed + dist.rank)  # dropout and mixup differ between ranks, as in DeiT
        self.scheduler.step_update(num_updates=self.global_step)
        if dist.is_main:
            if not self.resume_path and os.path.isfile(os.path.join(self.output, "log.jsonl")):
                os.remove(os.path.join(self.output, "log.jsonl"))  # a fresh start: no rows of an older try
            ckpt.atomic_write(os.path.join(self.output, "config.json"),
                              lambda f: f.write(json.dumps(cfg.to_json(), indent=2).encode()))
            from .config_file import dump_config  # the same, as a file `train --config` takes
            ckpt.atomic_write(os.path.join(self.output, "config.yaml"), lambda f: f.write(dump_config(cfg).encode()))
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(self.output, "tensorboard"))
            except Exception:  # noqa: BLE001  (tensorboard is optional)
                self.tb = None

    def metadata(self, **extra) -> dict:
        """What every weights file of the run records (read back by ``eval``, ``viz``, resumption)."""
        return dict(format="condensevit", model=self.cfg.model, model_kwargs=self.model_kwargs,
                    num_classes=len(self.classes), classes=self.classes, data=self.cfg.data,
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
        ckpt.fit_checkpoint(self.model, weights, source=f"checkpoint {self.resume_path!r}", meta=meta,
                            data_classes=len(self.classes), data_name=cfg.data)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise _usage_error(f"{self.resume_path} was trained without --model-ema; resume it the same way")
            self.ema.module.load_state_dict(state["ema"])
        self.counters["global_step"] = int(state["global_step"])
        self.start_epoch = int(state["epoch"])
        if state.get("step_in_epoch"):
            self.epoch_state = EpochState(epoch=self.start_epoch, step_in_epoch=int(state["step_in_epoch"]),
                                          loss_sum=float(state.get("loss_sum", 0.0)),
                                          images=int(state.get("images", 0)),
                                          elapsed_s=float(state.get("elapsed_s", 0.0)))
        self.best = dict(state.get("best") or self.best)
        self.history = [dict(h) for h in json.loads(state.get("history", "[]"))]
        self.time_before = float(state.get("run_time_s", sum(h.get("epoch_time_s", 0.0) for h in self.history)))
        saved = json.loads(state.get("config", "{}"))
        for key in ("batch_size", "data", "seed", "lr", "epochs", "mixup", "cutmix", "smoothing"):
            if key in saved and saved[key] != getattr(cfg, key):
                log(cfg, dist, f"note: resuming with {key}={getattr(cfg, key)!r} where the run had "
                               f"{saved[key]!r}; the result will differ from an uninterrupted run")
        rngs = state["rng"]
        if int(state.get("world_size", 1)) == dist.world_size and len(rngs) == dist.world_size:
            ckpt.restore_rng(rngs[dist.rank])
        else:
            seed_all(cfg.seed + dist.rank + self.global_step)
            log(cfg, dist, f"note: the run had {state.get('world_size')} processes, this one "
                           f"{dist.world_size}; random streams start afresh")
        # the log keeps the epochs this checkpoint had finished
        if dist.is_main:
            path = os.path.join(self.output, "log.jsonl")
            if os.path.isfile(path):
                with open(path) as f:
                    lines = [ln for ln in f if _log_epoch_of(ln) <= self.start_epoch]
                ckpt.atomic_write(path, lambda f: f.write("".join(lines).encode()))
        log(cfg, dist, f"resumed {self.resume_path} at epoch {self.start_epoch + 1}, step {self.global_step}")

    # -- during the run ------------------------------------------------------------------------
    def run_time(self) -> float:
        """Seconds of training, all sessions of the run together."""
        return self.time_before + time.perf_counter() - self.session_start

    def _gather_rng(self) -> list:
        state = ckpt.capture_rng()
        if not self.dist.distributed:
            return [state]
        import torch.distributed as tdist
        out = [None] * self.dist.world_size
        tdist.all_gather_object(out, state)
        return out

    def save(self, epoch: int, es: EpochState | None, row: dict | None = None):
        """Checkpoint (collective: every rank calls it; rank 0 writes; when a write fails every rank
        raises). ``epoch`` is the epoch to run next; ``es`` a partly done epoch. With ``row``, the
        epoch just finished: it joins the history and the log, and ``best.safetensors`` when its
        top-1 is the best so far, before the checkpoint is written."""
        improved = False
        if row is not None:
            self.history.append(row)
            improved = self.best["top1"] is None or row["val_top1"] > self.best["top1"]
            if improved:
                self.best = dict(top1=row["val_top1"], epoch=row["epoch"])
        rngs = self._gather_rng()
        error = None
        if self.dist.is_main:
            try:
                if improved:
                    ckpt.save_weights(os.path.join(self.output, "best.safetensors"), self.model.state_dict(),
                                      self.metadata(epoch=row["epoch"], val_top1=row["val_top1"]))
                if row is not None:
                    self._log_epoch(row)
                self._write_checkpoint(epoch, es, rngs)
            except Exception as e:  # noqa: BLE001  (shared with the other ranks, then raised)
                error = e
        raise_together(error, self.dist)

    def _write_checkpoint(self, epoch: int, es: EpochState | None, rngs: list):
        state = dict(
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            ema=self.ema.module.state_dict() if self.ema is not None else None,
            rng=rngs,
            world_size=self.dist.world_size,
            epoch=epoch,
            global_step=self.global_step,
            step_in_epoch=es.step_in_epoch if es else 0,
            loss_sum=es.loss_sum if es else 0.0,
            images=es.images if es else 0,
            elapsed_s=es.elapsed_s if es else 0.0,
            best=self.best,
            history=json.dumps(self.history),
            config=json.dumps(self.cfg.to_json()),
            run_time_s=self.run_time(),
        )
        ckpt.save_checkpoint(self.output, self.model.state_dict(), state,
                             self.metadata(epoch=epoch, step_in_epoch=state["step_in_epoch"]))

    def _log_epoch(self, row: dict):
        """Append ``row`` to ``log.jsonl`` (fsync'ed) and tensorboard."""
        path = os.path.join(self.output, "log.jsonl")
        line = json.dumps(row) + "\n"
        try:
            with open(path, "a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(self.output, len(line), "log.jsonl") from None
            raise
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    self.tb.add_scalar(k, v, row["epoch"])
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    # -- at the end ----------------------------------------------------------------------------
    def write_final(self, summary: dict):
        """``ema.safetensors`` (with ``--model-ema``) and ``summary.json`` (rank 0)."""
        if not self.dist.is_main:
            return
        if self.ema is not None:
            ckpt.save_weights(os.path.join(self.output, "ema.safetensors"), self.ema.module.state_dict(),
                              self.metadata(epoch=len(self.history), ema=True))
        ckpt.atomic_write(os.path.join(self.output, "summary.json"),
                          lambda f: f.write((json.dumps(summary, indent=2, default=str) + "\n").encode()))


def _log_epoch_of(line: str) -> float:
    """The epoch of a ``log.jsonl`` line (infinity for a line a kill or a full disk cut short: dropped)."""
    try:
        return float(json.loads(line).get("epoch", 0)) if line.strip() else float("inf")
    except ValueError:
        return float("inf")
