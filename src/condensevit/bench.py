"""``condensevit bench`` (speed and cost against a baseline) and ``condensevit models`` (what is registered)."""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys

import torch

from .measure import as_input_shape, count_params, environment, gmacs, throughput

__all__ = ["add_parser", "parse_model_spec", "create_for_input", "run_bench", "format_table"]


def _usage_error(msg: str):
    from .cli import UsageError
    return UsageError(msg)


def parse_value(text: str):
    """'3x3' -> (3, 3); Python literals as themselves; anything else as a string."""
    text = text.strip()
    if re.fullmatch(r"\d+x\d+(x\d+)?", text):
        return tuple(int(t) for t in text.split("x"))
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_kwargs(items) -> dict:
    """['a=1', 'grid=5x5'] or 'a=1,grid=5x5' -> {'a': 1, 'grid': (5, 5)}."""
    if isinstance(items, str):
        items = _split_top_level(items)
    out = {}
    for item in items:
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise _usage_error(f"model argument {item!r} is not of the form key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_value(v)
    return out


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p for p in (p.strip() for p in parts) if p]


def parse_model_spec(spec: str) -> tuple[str, dict, str]:
    """'lookupvit_base_patch16_224[compressed_grid=3x3]' -> (name, kwargs, label)."""
    m = re.fullmatch(r"\s*([\w.\-]+)\s*(?:\[(.*)\])?\s*", spec)
    if not m:
        raise _usage_error(f"cannot read model {spec!r}; write NAME or NAME[key=value,...]")
    name, args = m.group(1), m.group(2)
    return name, parse_kwargs(args or ""), spec.strip()


def _check_model_name(name: str):
    from .models.factory import check_model_name  # the one check, shared with train / eval / viz
    check_model_name(name)


def create_for_input(name: str, input_shape: tuple[int, ...] | None, **kwargs):
    """Build ``name`` for an input shape (C, H, W) / (C, T, H, W), or its default when None."""
    import timm
    _check_model_name(name)
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError) as e:
        raise _usage_error(f"cannot build {name} with {kwargs}: {e}") from e
    default_shape = tuple(model.pretrained_cfg.get("input_size") or (3, 224, 224))
    if input_shape is None or tuple(input_shape) == default_shape:
        return model, default_shape
    # a different size: build for it where the model takes img_size, else try as is
    size_kw = {}
    if len(input_shape) == 3:
        size_kw["img_size"] = tuple(input_shape[1:])
    elif len(input_shape) == 4:
        size_kw["img_size"] = tuple(input_shape[2:])
        size_kw["num_frames"] = input_shape[1]
    if input_shape[0] != default_shape[0]:
        size_kw["in_chans"] = input_shape[0]
    errors = []  # why the fuller attempts failed: a size the model refuses beats a later symptom
    for kw in (size_kw, {k: v for k, v in size_kw.items() if k != "num_frames"}, {}):
        try:
            model = timm.create_model(name, pretrained=False, **{**kwargs, **kw})
            break
        except (TypeError, ValueError, AssertionError) as e:
            errors.append(e)
    else:
        raise _usage_error(f"{name} cannot take input size {input_shape}: {_first_line(_cause(errors))}")
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None:
        patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
        if any(s % p for s, p in zip(input_shape[-2:], patch[-2:])):
            raise _usage_error(f"{name} cannot take input size {tuple(input_shape)}: its patch size {patch} "
                               "does not divide the height and width; pick a multiple of the patch size")
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    except Exception as e:  # noqa: BLE001  (any failure means the size does not fit)
        # built without the size (a fallback): the reason the model refused the size is the real one
        raise _usage_error(f"{name} cannot take input size {tuple(input_shape)}: "
                           f"{_first_line(_cause(errors) if errors else e)}") from e
    return model, tuple(input_shape)


def _cause(errors: list) -> BaseException:
    """The first error that is about the values (not an unknown keyword, which only says the model
    takes no such argument)."""
    return next((e for e in errors if not isinstance(e, TypeError)), errors[0])


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def run_bench(specs, input_size=None, batch_size=32, device="cpu", amp=False, compile=False,
              channels_last=False, warmup=2, iters=5, rounds=2, progress=True) -> dict:
    """Measure each model alternately ``rounds`` times; the first model is the baseline."""
    from tqdm.auto import tqdm
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise _usage_error("--device cuda was asked for but no CUDA GPU is available here; use --device cpu")
    shape = as_input_shape(input_size) if input_size is not None else None
    entries = []
    for spec in specs:
        name, kwargs, label = parse_model_spec(spec)
        model, in_shape = create_for_input(name, shape, **kwargs)
        entries.append(dict(label=label, name=name, kwargs=kwargs, model=model.eval().to(dev), shape=in_shape))
    total = len(entries) * (rounds + 1)
    bar = tqdm(total=total, desc="bench", disable=not progress, leave=False, file=sys.stderr)
    for e in entries:
        bar.set_postfix_str(f"GMACs {e['label']}")
        e["gmacs"] = gmacs(e["model"], e["shape"])
        e["params"] = count_params(e["model"])
        e["runs"] = []
        bar.update(1)
    for r in range(rounds):
        for e in (entries if r % 2 == 0 else entries[::-1]):  # alternate so drift favours no one
            bar.set_postfix_str(f"round {r + 1}/{rounds} {e['label']}")
            e["runs"].append(throughput(e["model"], e["shape"], batch_size=batch_size, device=dev, amp=amp,
                                        compile=compile, channels_last=channels_last,
                                        warmup=warmup if r == 0 else 1, iters=iters,
                                        latency_iters=None if r == 0 else 0))
            bar.update(1)
    bar.close()
    rows = []
    base = None
    for e in entries:
        runs = e["runs"]
        ips = sorted(x.images_per_s for x in runs)[len(runs) // 2] if len(runs) % 2 else \
            sum(x.images_per_s for x in runs) / len(runs)
        row = dict(
            model=e["label"], params_m=e["params"] / 1e6, params=e["params"], gmacs=e["gmacs"],
            images_per_s=ips, latency_ms=runs[0].latency_ms,
            peak_memory_mb=max(x.peak_memory_mb for x in runs),
            input_size=list(e["shape"]), rounds=[x.images_per_s for x in runs],
        )
        base = base or row
        row["speedup"] = row["images_per_s"] / base["images_per_s"]
        row["gmacs_ratio"] = row["gmacs"] / base["gmacs"] if base["gmacs"] else float("nan")
        rows.append(row)
    env = environment(dev)
    env.update(batch_size=batch_size, amp=amp, compile=compile, channels_last=channels_last,
               warmup=warmup, iters=iters, rounds=rounds)
    return dict(environment=env, rows=rows)


def format_table(result: dict) -> str:
    env = result["environment"]
    head = (f"machine: {env['processor']} ({env['cpu_count']} cpus, {env['torch_threads']} torch threads)"
            f"{'  gpu: ' + env['gpu'] if 'gpu' in env else ''} | torch {env['torch']} | device {env['device']}"
            f" | batch {env['batch_size']} | amp {env['amp']} | compile {env['compile']}")
    cols = ["model", "params (M)", "GMACs", "img/s", "speed-up", "GMACs ratio", "latency b1 (ms)", "peak mem (MB)"]
    lines = []
    for r in result["rows"]:
        lines.append([r["model"], f"{r['params_m']:.2f}", f"{r['gmacs']:.3f}", f"{r['images_per_s']:.1f}",
                      f"{r['speedup']:.2f}x", f"{r['gmacs_ratio']:.3f}", f"{r['latency_ms']:.1f}",
                      f"{r['peak_memory_mb']:.0f}"])
    widths = [max(len(c), *(len(l[i]) for l in lines)) for i, c in enumerate(cols)]
    fmt = lambda vals: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    out = [head, fmt(cols), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines]
    out.append("speed-up and GMACs ratio are against the first model; GMACs = multiply-accumulates per image.")
    return "\n".join(out)


def plot_bench(result: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for r in result["rows"]:
        ax.scatter(r["gmacs"], r["images_per_s"], s=40)
        ax.annotate(r["model"], (r["gmacs"], r["images_per_s"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    env = result["environment"]
    ax.set_xlabel("GMACs per image")
    ax.set_ylabel("images / s")
    ax.set_title(f"throughput vs cost ({env['device']}, batch {env['batch_size']})", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _cmd_bench(args) -> int:
    from .outputs import check_output_file
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_output_file(path, flag)  # before any model is built
    specs = _split_top_level(args.models)
    if not specs:
        raise _usage_error("--models is empty; give a comma-separated list, the baseline first")
    input_size = None
    if args.input_size:
        try:
            input_size = as_input_shape(tuple(int(v) for v in re.split(r"[,x ]+", args.input_size.strip())))
        except ValueError as e:
            raise _usage_error(f"--input-size {args.input_size!r}: {e}") from e
        if len(input_size) == 1:
            input_size = (3, input_size[0], input_size[0])
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_bench(specs, input_size=input_size, batch_size=args.batch_size, device=args.device,
                       amp=args.amp, compile=args.compile, channels_last=args.channels_last,
                       warmup=args.warmup, iters=args.iters, rounds=args.rounds, progress=not args.quiet)
    print(format_table(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot_bench(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _cmd_models(args) -> int:
    from tqdm.auto import tqdm
    import timm
    from .models import list_models
    names = list_models(args.pattern or "*")
    if not names:
        raise _usage_error(f"no model of this library matches {args.pattern!r}; try `condensevit models`")
    rows = []
    for name in tqdm(names, desc="models", leave=False, disable=args.quiet, file=sys.stderr):
        m = timm.create_model(name).eval()
        shape = tuple(m.pretrained_cfg.get("input_size") or (3, 224, 224))
        rows.append((name, f"{count_params(m) / 1e6:.2f}", "-" if args.no_gmacs else f"{gmacs(m, shape):.3f}",
                     "x".join(str(s) for s in shape)))
    cols = ("model", "params (M)", "GMACs", "input")
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    for line in [cols, tuple("-" * w for w in widths), *rows]:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))))
    return 0


def add_parser(sub: argparse._SubParsersAction):
    from .cli import HelpFormatter
    p = sub.add_parser(
        "bench", help="throughput, latency, memory and GMACs of models against a baseline", formatter_class=HelpFormatter,
        description="Measure models alternately in one process. The first model is the baseline. "
                    "A model may carry arguments: NAME[key=value,...], e.g. lookupvit_base_patch16_224[compressed_grid=3x3].")
    p.add_argument("--models", required=True, help="comma-separated model names, the baseline first")
    p.add_argument("--input-size", default=None,
                   help="C,H,W (or C,T,H,W for video, or a single size); default: each model's own")
    p.add_argument("--batch-size", type=int, default=32, help="images per timed batch")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    p.add_argument("--amp", action="store_true", help="autocast (float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches before each timed run")
    p.add_argument("--iters", type=int, default=5, help="timed batches per run")
    p.add_argument("--rounds", type=int, default=2,
                   help="timed runs per model, the models taking turns; images/s is the median of the rounds (with "
                        "an even number, their mean)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="write the rows and the environment here")
    p.add_argument("--plot", default=None, help="write a throughput-vs-GMACs PNG here")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=_cmd_bench)

    q = sub.add_parser("models", help="the models of this library, with parameters and GMACs",
                       formatter_class=HelpFormatter)
    q.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern, e.g. 'stvit*'")
    q.add_argument("--no-gmacs", action="store_true", help="skip counting GMACs (faster)")
    q.add_argument("--quiet", action="store_true", help="no progress display")
    q.set_defaults(func=_cmd_models)
