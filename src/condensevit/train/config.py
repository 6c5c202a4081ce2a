"""What a training run takes and what it returns: :class:`TrainConfig` (every ``condensevit train``
option) and :class:`TrainResult`."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

__all__ = ["TrainConfig", "TrainResult"]


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
    accum_steps: int = 1                 # micro-batches per optimizer update (gradient accumulation)
    # optimisation (timm create_optimizer_v2 / create_scheduler_v2)
    opt: str = "adamw"
    lr: float = 1e-3
    lr_base: float | None = None         # set: lr = lr_base * global batch / lr_base_size (DeiT, Swin)
    lr_base_size: int = 512
    warmup_lr_base: float | None = None  # set: warmup_lr scaled the same way (Swin's code; DeiT's does not)
    min_lr_base: float | None = None     # set: min_lr scaled the same way (Swin's code; DeiT's does not)
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
    remode: str = "pixel"                # random erasing fill: pixel (DeiT, timm's train.py), rand or const
    recount: int = 1
    repeated_aug: bool = False           # DeiT's repeated augmentation (timm's RepeatAugSampler)
    repeated_aug_repeats: int = 3
    drop_path: float | None = None       # the model's drop_path_rate (stochastic depth); None: its own default
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

    def global_batch(self, world_size: int) -> int:
        """Images per optimizer update over all processes: batch_size x accum_steps x world_size."""
        return self.batch_size * self.accum_steps * world_size

    def resolved(self, world_size: int) -> "TrainConfig":
        """The config as it runs: each rate given per ``lr_base_size`` images (``lr_base``,
        ``warmup_lr_base``, ``min_lr_base``) scaled linearly by the global batch into ``lr``,
        ``warmup_lr``, ``min_lr``: DeiT's rule (``lr = 5e-4 * batch / 512``; its warm-up and minimum
        rates are not scaled) and that of Swin's and STViT-R's code (all three scaled). Resolving
        again gives the same config."""
        factor = self.global_batch(world_size) / self.lr_base_size
        scaled = {name: base * factor for name, base in (("lr", self.lr_base), ("warmup_lr", self.warmup_lr_base),
                                                          ("min_lr", self.min_lr_base)) if base is not None}
        return dataclasses.replace(self, **scaled) if scaled else self


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
    interrupted: bool = False            # stopped by SIGTERM or Ctrl-C; resume with resume='auto'
    history: list = field(default_factory=list)
    stopped_by: str | None = None        # what stopped an interrupted run ('SIGTERM', 'Ctrl-C (SIGINT)')

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
