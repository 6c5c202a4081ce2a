"""``condensevit train`` and ``condensevit eval``.

Examples::

    condensevit train --model deit_tiny_patch16_224 --model-kwargs img_size=64 patch_size=8 embed_dim=128 \\
        depth=6 num_heads=4 --data digits --epochs 30 --output runs/deit_digits
    torchrun --nproc_per_node 8 -m condensevit.cli train --model stvit_deit_small_patch16_224 \\
        --data /data/imagenet --batch-size 128 --lr 5e-4 --epochs 300 --mixup 0.8 --cutmix 1.0 --model-ema
    condensevit eval --checkpoint runs/lookup/last.safetensors --data digits --model-kwargs compressed_grid=3x3
"""
from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_parser", "parse_model_kwargs", "config_from_args"]


def parse_model_kwargs(items) -> dict:
    """``--model-kwargs`` as a JSON object, or as ``key=value`` items (``grid=3x3`` -> (3, 3))."""
    from ..cli import UsageError

    if not items:
        return {}
    if isinstance(items, dict):  # from a --config file
        return dict(items)
    if isinstance(items, str):
        items = [items]
    text = " ".join(items).strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--model-kwargs is not valid JSON ({e.msg} at character {e.pos})") from e
        if not isinstance(value, dict):
            raise UsageError("--model-kwargs JSON must be an object such as '{\"img_size\": 64}'")
        return value
    from ..bench import parse_kwargs
    out = {}
    for item in items:
        out.update(parse_kwargs(item))
    return out


def _scale(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"scale {text!r} must be two numbers such as '0.08,1.0'") from None
    return lo, hi


def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "0") else float(text)


def _on_off(p: argparse.ArgumentParser, flag: str, help: str, default: bool = False):
    """``--flag`` / ``--no-flag`` (so that a --config file's true can be turned off), without the
    "(default: False)" argparse's BooleanOptionalAction appends to the help."""
    action = p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
    action.help = help
    return action


def _add_common(p: argparse.ArgumentParser):
    p.add_argument("--model", help="any registered model, ours or timm's (see `condensevit models`)")
    p.add_argument("--model-kwargs", nargs="+", metavar="KEY=VALUE", default=None,
                   help="model constructor arguments as key=value items (img_size=64 compressed_grid=3x3) "
                        "or one JSON object")
    p.add_argument("--data", default="digits", help="embedded 'digits' (images), 'moving_digits' / "
                   "'moving_digits_direction' (clips), or a folder holding train/ and val/ (images, or clips: "
                   "frame folders / video files)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--workers", type=int, default=None,
                   help="data loading processes (default: 0 on CPU, up to 8 per process on GPU)")
    p.add_argument("--strict", action="store_true", help="unreadable images are an error instead of skipped")
    _on_off(p, "--amp", "mixed precision (float16 on CUDA, bfloat16 on CPU)")


def add_parser(sub: argparse._SubParsersAction):
    from ..cli import HelpFormatter
    from .engine import TrainConfig
    d = TrainConfig(model="")

    p = sub.add_parser("train", help="train or fine-tune a model (one CPU, one GPU, or torchrun)",
                       description="Train or fine-tune any registered model on the digits set, an ImageFolder "
                                   "tree or clips; launch with torchrun for several processes. Writes OUTPUT/"
                                   "{last,best}.safetensors, last.state.pth, log.jsonl, summary.json.",
                       formatter_class=HelpFormatter)
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="options from a YAML file (keys: these options' names, e.g. batch_size: 128); flags "
                        "given here override it; recipes/ holds the papers' ImageNet recipes")
    _add_common(p)
    p.add_argument("--output", default=None, help="run folder (default: runs/MODEL)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs to train")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step and process")
    p.add_argument("--accum-steps", type=int, default=d.accum_steps,
                   help="gradient accumulation: micro-batches of --batch-size per optimizer update")
    p.add_argument("--eval-batch-size", type=int, default=None, help="validation batch (default: 2 x --batch-size)")
    p.add_argument("--opt", default=d.opt, help="timm optimizer name")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--lr-base", type=float, default=None,
                   help="set: lr = LR_BASE x global batch / --lr-base-size, the global batch being batch size x "
                        "accum steps x processes (DeiT: 5e-4 per 512)")
    p.add_argument("--lr-base-size", type=int, default=d.lr_base_size, help="images --lr-base is given for")
    p.add_argument("--warmup-lr-base", type=float, default=None, help="set: --warmup-lr scaled as --lr-base")
    p.add_argument("--min-lr-base", type=float, default=None, help="set: --min-lr scaled as --lr-base")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="decoupled weight decay")
    p.add_argument("--sched", default=d.sched, help="timm scheduler name, stepped per update")
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs, help="linear warm-up from --warmup-lr")
    p.add_argument("--warmup-lr", type=float, default=d.warmup_lr, help="learning rate at the start of warm-up")
    p.add_argument("--min-lr", type=float, default=d.min_lr, help="learning rate at the end of the schedule")
    p.add_argument("--clip-grad", type=_optional_float, default=None, help="gradient clipping threshold "
                   "(default: none, no clipping)")
    p.add_argument("--clip-mode", default=d.clip_mode, choices=("norm", "value", "agc"), help="what --clip-grad clips")
    p.add_argument("--smoothing", type=float, default=d.smoothing, help="label smoothing")
    p.add_argument("--mixup", type=float, default=d.mixup, help="mixup alpha (0: off)")
    p.add_argument("--cutmix", type=float, default=d.cutmix, help="cutmix alpha (0: off)")
    p.add_argument("--mixup-prob", type=float, default=d.mixup_prob, help="probability of mixing a batch")
    p.add_argument("--mixup-switch-prob", type=float, default=d.mixup_switch_prob,
                   help="probability of cutmix instead of mixup when both are on")
    p.add_argument("--aa", default=None, help="RandAugment spec such as rand-m9-mstd0.5-inc1, or none "
                                             "(default: rand-m6-mstd0.5-inc1 for digits, rand-m9-mstd0.5-inc1 else)")
    p.add_argument("--hflip", type=float, default=None, help="flip probability (default: 0 for digits, 0.5 else)")
    p.add_argument("--scale", type=_scale, default=None, help="random-resized-crop scale range, e.g. 0.08,1.0 "
                   "(default: 0.6,1.0 for digits, 0.08,1.0 else)")
    p.add_argument("--color-jitter", type=float, default=None, help="colour jitter (default: 0 for digits, 0.3 else)")
    p.add_argument("--reprob", type=float, default=d.reprob, help="random erasing probability")
    p.add_argument("--remode", default=d.remode, choices=("pixel", "rand", "const"), help="random erasing fill")
    p.add_argument("--recount", type=int, default=d.recount, help="random erasing boxes per image")
    _on_off(p, "--repeated-aug", "DeiT's repeated augmentation (timm's RepeatAugSampler)", d.repeated_aug)
    p.add_argument("--repeated-aug-repeats", type=int, default=d.repeated_aug_repeats,
                   help="copies of each image per epoch with --repeated-aug")
    p.add_argument("--drop-path", type=float, default=None,
                   help="stochastic depth rate (the model's drop_path_rate; default: the model's own)")
    _on_off(p, "--model-ema", "keep an exponential moving average of the weights")
    p.add_argument("--model-ema-decay", type=float, default=d.model_ema_decay, help="EMA decay (reached after warm-up)")
    p.add_argument("--amp-dtype", default=d.amp_dtype, choices=("float16", "bfloat16"), help="--amp type on CUDA")
    p.add_argument("--teacher", default=None, help="teacher model name for knowledge distillation")
    p.add_argument("--teacher-checkpoint", default=None, help="the teacher's trained weights")
    p.add_argument("--teacher-kwargs", nargs="+", default=None, metavar="KEY=VALUE",
                   help="teacher constructor arguments (default: those its checkpoint records)")
    p.add_argument("--distillation-type", default=d.distillation_type, choices=("none", "soft", "hard"),
                   help="DeiT's distillation loss")
    p.add_argument("--distillation-alpha", type=float, default=d.distillation_alpha,
                   help="weight of the distillation term")
    p.add_argument("--distillation-tau", type=float, default=d.distillation_tau, help="soft distillation temperature")
    p.add_argument("--pretrained-file", default=None,
                   help="initialise from these weights through the model's checkpoint filter")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="FILE|auto",
                   help="continue a run: its folder, last.state.pth, or auto (the newest complete checkpoint in "
                        "OUTPUT, a fresh start when there is none); bare --resume means auto")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the weights, data order and augmentation")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap on steps per epoch (quick runs)")
    p.add_argument("--limit-val-batches", type=int, default=None, help="cap on validation batches (quick runs)")
    p.add_argument("--log-interval", type=int, default=d.log_interval, help="steps between loss reads")
    p.add_argument("--save-every-steps", type=int, default=None,
                   help="also checkpoint every N steps inside epochs (default: at the end of each epoch only)")
    p.add_argument("--no-measure", dest="measure", action="store_false",
                   help="skip GMACs and throughput in the summary")
    p.add_argument("--throughput-batch-size", type=int, default=None,
                   help="batch of the summary's throughput (default: 16 on CPU, 64 on GPU)")
    _on_off(p, "--find-unused-parameters", "DDP option for models with unused branches")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                   help="no progress bar (default: one when stderr is a terminal)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    # test hooks
    p.add_argument("--debug-nan-at-step", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug-stop-at-step", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug-weights-hash", action="store_true", help=argparse.SUPPRESS)
    from .config_file import RecordingParser
    p.__class__ = RecordingParser  # keeps its argv: a --config file must never override a given flag
    p.set_defaults(func=_cmd_train, train_parser=p)

    e = sub.add_parser("eval", help="top-1 / top-5 and loss of a checkpoint",
                       description="Evaluate a checkpoint on the val split; --model-kwargs may change the "
                                   "compressed grid or token count of the same weights.",
                       formatter_class=HelpFormatter)
    _add_common(e)
    e.add_argument("--checkpoint", required=True, help="weights (.safetensors or .pth), or a run folder (its last.safetensors)")
    e.add_argument("--batch-size", type=int, default=128, help="images per batch")
    e.add_argument("--limit-batches", "--limit-val-batches", type=int, default=None, help="cap on batches (default: the whole val split)")
    e.add_argument("--views", default=None, metavar="CLIPSxCROPS",
                   help="multi-view testing of video models: e.g. 4x3 = 4 temporal clips x 3 spatial crops per "
                        "clip, probabilities averaged (as Video Swin is tested); --batch-size counts clips")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=_cmd_eval)


def _resolve_args(args) -> argparse.Namespace:
    """The options as they apply: flags given on the command line, then the ``--config`` file's
    values, then the defaults (``model_kwargs`` / ``teacher_kwargs`` merged key by key)."""
    from .config_file import given_dests, load_config_file
    skip = ("func", "train_parser", "given_argv")
    values = {k: v for k, v in vars(args).items() if k not in skip}
    parser = getattr(args, "train_parser", None)
    if values.get("config") and parser is not None:
        given = given_dests(parser, getattr(args, "given_argv", []))
        for dest, value in load_config_file(values["config"], parser).items():
            if dest not in given:
                values[dest] = value
            elif dest in ("model_kwargs", "teacher_kwargs") and value:  # the command line's keys win
                values[dest] = {**value, **parse_model_kwargs(values[dest])}
    return argparse.Namespace(**values)


def config_from_args(args):
    from .engine import TrainConfig
    from ..cli import UsageError
    args = _resolve_args(args)
    if not args.model:
        raise UsageError("no model given; pass --model NAME (`condensevit models` lists ours), or --config FILE")
    return TrainConfig(
        model=args.model, data=args.data, model_kwargs=parse_model_kwargs(args.model_kwargs), output=args.output,
        epochs=args.epochs, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        accum_steps=args.accum_steps, opt=args.opt, lr=args.lr, lr_base=args.lr_base,
        lr_base_size=args.lr_base_size, warmup_lr_base=args.warmup_lr_base, min_lr_base=args.min_lr_base,
        weight_decay=args.weight_decay, sched=args.sched, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
        smoothing=args.smoothing, mixup=args.mixup, cutmix=args.cutmix, mixup_prob=args.mixup_prob,
        mixup_switch_prob=args.mixup_switch_prob, aa=args.aa, hflip=args.hflip, scale=args.scale,
        color_jitter=args.color_jitter, reprob=args.reprob, remode=args.remode, recount=args.recount,
        repeated_aug=args.repeated_aug, repeated_aug_repeats=args.repeated_aug_repeats, drop_path=args.drop_path,
        model_ema=args.model_ema,
        model_ema_decay=args.model_ema_decay, amp=args.amp, amp_dtype=args.amp_dtype, teacher=args.teacher,
        teacher_checkpoint=args.teacher_checkpoint, teacher_kwargs=parse_model_kwargs(args.teacher_kwargs),
        distillation_type=args.distillation_type, distillation_alpha=args.distillation_alpha,
        distillation_tau=args.distillation_tau, pretrained_file=args.pretrained_file, resume=args.resume,
        seed=args.seed, workers=args.workers, device=args.device, strict=args.strict,
        max_steps_per_epoch=args.max_steps_per_epoch, limit_val_batches=args.limit_val_batches,
        log_interval=args.log_interval, save_every_steps=args.save_every_steps, measure=args.measure,
        throughput_batch_size=args.throughput_batch_size, find_unused_parameters=args.find_unused_parameters,
        progress=args.progress, verbose=not args.quiet, debug_nan_at_step=args.debug_nan_at_step,
        debug_stop_at_step=args.debug_stop_at_step, debug_weights_hash=args.debug_weights_hash)


def _cmd_train(args) -> int:
    from .engine import NonFiniteLossError, train
    cfg = config_from_args(args)
    try:
        result = train(cfg)
    except NonFiniteLossError as e:
        print(f"condensevit train: error: {e}", file=sys.stderr)
        return 1
    # stopped by Ctrl-C: 130, as for any program a shell's Ctrl-C ends (a script stops there too);
    # SIGTERM (a scheduler's pre-emption): 0, the checkpoint is what the scheduler needs
    return 130 if result.interrupted and result.stopped_by and "SIGINT" in result.stopped_by else 0


def _cmd_eval(args) -> int:
    from .engine import evaluate_checkpoint
    stats = evaluate_checkpoint(args.checkpoint, args.data, model=args.model,
                                model_kwargs=parse_model_kwargs(args.model_kwargs), batch_size=args.batch_size,
                                device=args.device, workers=args.workers, strict=args.strict, amp=args.amp,
                                limit_batches=args.limit_batches, views=args.views)
    if args.json:
        print(json.dumps(stats, default=list))
    else:
        kw = f" {stats['model_kwargs']}" if stats["model_kwargs"] else ""
        views = f", {stats['views']} views each" if stats.get("views", "1x1") != "1x1" else ""
        print(f"{stats['model']}{kw} on {stats['data']} ({stats['images']} images{views}): top-1 {stats['top1']:.2f}  "
              f"top-5 {stats['top5']:.2f}  loss {stats['loss']:.4f}")
    return 0
