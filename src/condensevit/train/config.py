"""What a training run takes and what it returns: :class:`TrainConfig` (every ``condensevit train``
option) and :class:`TrainResult`."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

__all__ = ["TrainConfig", "TrainResult", "check_aa", "check_opt", "check_sched", "check_range"]


def check_range(flag: str, value, *, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False,
                fix: str = "", optional: bool = False):
    """Raise ``ValueError("FLAG must be ... (got VALUE)[; FIX]")`` unless ``value`` lies in the range
    ``[lo, hi]`` (``lo_open`` / ``hi_open``: the bound itself is excluded). ``None`` passes when
    ``optional``. One wording for every numeric option of ``train`` and ``caption train``."""
    if value is None and optional:
        return
    ok = True
    if lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if ok:
        return
    if lo is not None and hi is not None:
        want = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        want = (f"> {lo:g}" if lo_open else
                f"at least {lo:g}" if isinstance(value, int) and not isinstance(value, bool) and lo >= 1 else f">= {lo:g}")
    else:
        want = f"< {hi:g}" if hi_open else f"<= {hi:g}"
    raise ValueError(f"{flag} must be {want} (got {value:g}){'; ' + fix if fix else ''}")


_AA_EXAMPLES = "e.g. rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5-w4-d2, v0 or original (AutoAugment), or none"
# the sections of each family's spec (timm.data.auto_augment), each a key and a number ('t' takes a name)
_AA_KEYS = {"rand": ("mstd", "mmax", "inc", "m", "n", "p"), "augmix": ("mstd", "m", "w", "d", "a", "b"),
            "auto": ("mstd",)}


def check_aa(spec: str | None, flag: str = "--aa"):
    """Raise a one-line ``ValueError`` unless ``spec`` is an augmentation spec timm's
    ``create_transform`` accepts (``None`` / ``'none'``: no auto-augmentation). timm's own parsers
    (:mod:`timm.data.auto_augment`) build the transform here, catching their ``AssertionError``;
    sections they would skip silently (``rand-mfoo``: no number, so the default magnitude) are
    refused too."""
    import re

    from timm.data import auto_augment as taa

    if spec is None or spec in ("", "none", "None"):
        return
    if not isinstance(spec, str):
        raise ValueError(f"{flag} must be a string, {_AA_EXAMPLES} (got {spec!r})")
    family = "rand" if spec.startswith("rand") else "augmix" if spec.startswith("augmix") else "auto"
    bad = f"{flag} {spec!r} is not an augmentation timm knows"
    head, *sections = spec.split("-")
    if family != "auto" and head != family:
        raise ValueError(f"{bad}: it must start with '{family}-'; {_AA_EXAMPLES}")
    for sec in sections:
        if family == "rand" and sec.startswith("t") and len(sec) > 1:
            continue  # a transform-set name (rand-...-tweights)
        key, *num = re.split(r"(\d.*)", sec)
        if not num or key not in _AA_KEYS[family]:
            keys = ", ".join(_AA_KEYS[family])
            raise ValueError(f"{bad}: section {sec!r} is not a setting of '{head}' (its settings: a key of {keys} "
                             f"followed by a number, as in m9); {_AA_EXAMPLES}")
    hparams = dict(translate_const=100, img_mean=(124, 116, 104))
    try:
        if family == "rand":
            taa.rand_augment_transform(spec, hparams)
        elif family == "augmix":
            taa.augment_and_mix_transform(spec, dict(hparams, translate_pct=0.3))
        else:
            taa.auto_augment_transform(spec, hparams)
    except (AssertionError, ValueError, KeyError, TypeError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{bad} ({why}); {_AA_EXAMPLES}") from None


def _probe_optimizer(opt: str, lr: float = 1e-3, weight_decay: float = 0.0):
    import torch
    from timm.optim import create_optimizer_v2
    return create_optimizer_v2(torch.nn.Linear(1, 1), opt=opt, lr=lr, weight_decay=weight_decay)


def check_opt(opt: str, flag: str = "--opt"):
    """Raise a one-line ``ValueError`` unless timm's ``create_optimizer_v2`` knows ``opt`` (built
    here on a 1x1 layer)."""
    try:
        _probe_optimizer(opt)
    except (ValueError, KeyError, AssertionError):
        raise ValueError(f"{flag} {opt!r} is not a timm optimizer; e.g. adamw, sgd, momentum, lamb, lion, adan (timm.optim.list_optimizers() lists all)") \
            from None


_SCHEDS = "cosine, tanh, step, multistep, poly, wsd, constant"


def check_sched(sched: str, flag: str = "--sched"):
    """Raise a one-line ``ValueError`` unless timm's ``create_scheduler_v2`` builds ``sched``
    stepped per update, as the trainer steps it (timm's 'plateau' steps per epoch on a metric)."""
    from timm.scheduler import create_scheduler_v2
    try:
        create_scheduler_v2(_probe_optimizer("sgd"), sched=sched, num_epochs=3, warmup_epochs=1,
                            step_on_epochs=False, updates_per_epoch=2)
    except (ValueError, KeyError, AssertionError, TypeError):
        why = (" (it steps once per epoch on a validation metric; the trainer steps its schedule per update)"
               if sched == "plateau" else "")
        raise ValueError(f"{flag} {sched!r} is not a timm scheduler this trainer can use{why}; e.g. {_SCHEDS}") \
            from None


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

    def check(self):
        """Raise a one-line ``ValueError`` naming the option, its value and the fix for an option out
        of its range, before any data or model is touched. The one place these checks live: the
        command line, a ``--config`` YAML file and the Python API all come through here."""
        c = self
        for flag, value in (("--epochs", c.epochs), ("--batch-size", c.batch_size), ("--accum-steps", c.accum_steps),
                            ("--lr-base-size", c.lr_base_size), ("--recount", c.recount),
                            ("--repeated-aug-repeats", c.repeated_aug_repeats), ("--log-interval", c.log_interval)):
            check_range(flag, value, lo=1)
        for flag, value in (("--eval-batch-size", c.eval_batch_size), ("--max-steps-per-epoch", c.max_steps_per_epoch),
                            ("--limit-val-batches", c.limit_val_batches),
                            ("--throughput-batch-size", c.throughput_batch_size)):
            check_range(flag, value, lo=1, optional=True)
        check_range("--save-every-steps", c.save_every_steps, lo=1, optional=True,
                    fix="omit it to checkpoint at the end of each epoch only")
        check_range("--workers", c.workers, lo=0, optional=True, fix="0 loads data in the training process")
        check_range("--lr-base", c.lr_base, lo=0, lo_open=True, optional=True, fix="e.g. 5e-4 (per --lr-base-size images)")
        check_range("--lr", c.lr, lo=0, lo_open=True, fix="e.g. 1e-3 (or set --lr-base)")
        for flag, value, optional in (("--warmup-lr", c.warmup_lr, False), ("--min-lr", c.min_lr, False),
                                      ("--warmup-lr-base", c.warmup_lr_base, True), ("--min-lr-base", c.min_lr_base, True),
                                      ("--weight-decay", c.weight_decay, False)):
            check_range(flag, value, lo=0, optional=optional)
        check_range("--warmup-epochs", c.warmup_epochs, lo=0, fix="0 for no warm-up")
        check_range("--clip-grad", c.clip_grad, lo=0, lo_open=True, optional=True, fix="omit it for no clipping")
        check_range("--smoothing", c.smoothing, lo=0, hi=1, hi_open=True, fix="e.g. 0.1, or 0 for none")
        check_range("--mixup", c.mixup, lo=0, fix="it is the Beta distribution's alpha, e.g. 0.8; 0 turns mixup off")
        check_range("--cutmix", c.cutmix, lo=0, fix="it is the Beta distribution's alpha, e.g. 1.0; 0 turns cutmix off")
        check_range("--mixup-prob", c.mixup_prob, lo=0, hi=1)
        check_range("--mixup-switch-prob", c.mixup_switch_prob, lo=0, hi=1)
        check_range("--hflip", c.hflip, lo=0, hi=1, optional=True, fix="it is a probability, e.g. 0.5")
        check_range("--reprob", c.reprob, lo=0, hi=1, fix="it is a probability, e.g. 0.25")
        check_range("--color-jitter", c.color_jitter, lo=0, optional=True, fix="e.g. 0.3, or 0 for none")
        if c.scale is not None:
            lo, hi = c.scale
            if not 0 < lo <= hi <= 1:
                fix = (f"give the smaller first: {hi:g},{lo:g}" if 0 < hi <= lo <= 1 else
                       "two area fractions 0 < MIN <= MAX <= 1, e.g. 0.08,1.0")
                raise ValueError(f"--scale {lo:g},{hi:g} is not a crop-area range: {fix}")
        check_range("--drop-path", c.drop_path, lo=0, hi=1, hi_open=True, optional=True, fix="e.g. 0.1")
        check_range("--model-ema-decay", c.model_ema_decay, lo=0, hi=1, hi_open=True, fix="e.g. 0.9998")
        check_range("--distillation-alpha", c.distillation_alpha, lo=0, hi=1, fix="the distillation term's weight")
        check_range("--distillation-tau", c.distillation_tau, lo=0, lo_open=True, fix="e.g. 1.0")
        check_range("--seed", c.seed, lo=0)
        for flag, value, choices in (("--clip-mode", c.clip_mode, ("norm", "value", "agc")),
                                     ("--remode", c.remode, ("pixel", "rand", "const")),
                                     ("--amp-dtype", c.amp_dtype, ("float16", "bfloat16")),
                                     ("--distillation-type", c.distillation_type, ("none", "soft", "hard"))):
            if value not in choices:
                raise ValueError(f"{flag} {value!r} must be one of {', '.join(choices)}")
        check_aa(c.aa)
        check_opt(c.opt)
        check_sched(c.sched)

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
