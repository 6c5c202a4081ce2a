"""``condensevit bench`` (speed and cost against a baseline) and ``condensevit models`` (what is registered)."""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys

import torch

from .measure import _amp_dtype, as_input_shape, count_params, environment, gmacs

__all__ = ["add_parser", "parse_model_spec", "create_for_input", "run_bench", "format_table", "bench_figure",
           "plot_bench"]


def _usage_error(msg: str):
    from .cli import UsageError
    return UsageError(msg)


def parse_value(text: str):
    """'3x3' -> (3, 3), '1x2x4x8' -> (1, 2, 4, 8); Python literals as themselves; anything else as a string."""
    text = text.strip()
    if re.fullmatch(r"\d+(x\d+)+", text):
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
    if len(input_shape) != len(default_shape) and len(default_shape) in (3, 4):
        given = "a clip size (C, T, H, W)" if len(input_shape) == 4 else "an image size (C, H, W)"
        want = ("an image model: it takes (C, H, W) images, e.g. --input-size " + ",".join(map(str, default_shape))
                if len(default_shape) == 3 else
                "a video model: it takes (C, T, H, W) clips, e.g. --input-size " + ",".join(map(str, default_shape)))
        raise _usage_error(f"--input-size {','.join(map(str, input_shape))} is {given} but {name} is {want}")
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


# ------------------------------------------------------------------ one process per model
#
# Each model lives in its own Python process for the whole run, and the parent tells them in turn
# to run a round: the alternation keeps drift (other load, clocks) from favouring one model, and
# each process's memory is that model's alone (peak memory per model, not the whole run's).
# Commands and replies are JSON lines (commands on the worker's stdin; replies on a dup of its
# stdout, which is itself pointed at stderr so that library prints cannot corrupt the protocol).

_WORKER_CODE = "from condensevit.bench import _worker_main; _worker_main()"


class _ModelRunner:
    """Builds one model and runs its measuring rounds; the same code in a worker process or inline."""

    def __init__(self, own_process: bool = True):
        self.own_process = own_process

    def handle(self, msg: dict) -> dict:
        import traceback
        try:
            return getattr(self, msg["cmd"])(msg)
        except Exception as e:  # noqa: BLE001  (every failure goes back to the caller, which decides)
            from .cli import UsageError
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return dict(error=first, usage=isinstance(e, UsageError), traceback=traceback.format_exc())

    def build(self, msg: dict) -> dict:
        from .measure import OwnPeakMemory, make_inference_step, make_train_step
        if self.own_process:
            torch.set_num_threads(msg["threads"])
        self.dev = torch.device(msg["device"])
        self.memory = OwnPeakMemory(self.dev) if self.own_process else None  # baseline: before the model
        name, kwargs, _ = parse_model_spec(msg["spec"])
        shape = tuple(msg["shape"]) if msg["shape"] else None
        model, shape = create_for_input(name, shape, **kwargs)
        reply = dict(gmacs=gmacs(model, shape), params=count_params(model), shape=list(shape))
        opts = dict(device=self.dev, amp=msg["amp"], amp_dtype=msg["amp_dtype"], channels_last=msg["channels_last"],
                    compile=msg["compile"])
        self.batch_size = msg["batch_size"]
        if msg["mode"] == "train":
            self.step, self.step1 = make_train_step(model, shape, self.batch_size, **opts), None
        else:
            self.step = make_inference_step(model, shape, self.batch_size, **opts)
            self.step1 = make_inference_step(model, shape, 1, **opts)
        if msg["compile"]:  # compile now: the processes build in parallel, the rounds stay short
            for step in (self.step, self.step1):
                if step is not None:
                    step()
        if self.memory is not None:
            self.memory.start()
        return reply

    def run(self, msg: dict) -> dict:
        from contextlib import nullcontext

        from .measure import median_latency_ms, time_steps
        with self.memory.track() if self.memory is not None else nullcontext():
            ips = time_steps(self.step, self.batch_size, self.dev, warmup=msg["warmup"], iters=msg["iters"],
                             min_time=msg["min_time"])
            latency = float("nan")
            if msg["latency"] and self.step1 is not None:
                latency = median_latency_ms(self.step1, self.dev, warmup=max(msg["warmup"], 1),
                                            iters=msg.get("latency_iters") or max(msg["iters"], 10))
        if self.memory is None:
            return dict(images_per_s=ips, latency_ms=latency, peak_memory_mb=float("nan"),
                        memory_method="not measured (all models in one process: --in-process)")
        return dict(images_per_s=ips, latency_ms=latency, peak_memory_mb=self.memory.peak_bytes() / 2**20,
                    memory_method=self.memory.method)


def _worker_main():
    """A model's measuring process: JSON commands on stdin, one JSON reply per command."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    runner = _ModelRunner(own_process=True)
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            break
        replies.write(json.dumps(runner.handle(msg)) + "\n")


def _raise_for(label: str, reply: dict, where: str) -> dict:
    if "error" in reply:
        if reply["usage"]:
            raise _usage_error(reply["error"])
        raise RuntimeError(f"measuring {label} failed{where}:\n{reply['traceback']}")
    return reply


class _InlineModel:
    """``_ModelProcess``'s interface, measuring in this process (``isolate=False``)."""

    def __init__(self, label: str):
        self.label = label
        self.runner = _ModelRunner(own_process=False)
        self.reply = None

    def send(self, **msg):
        self.reply = self.runner.handle(msg)

    def recv(self) -> dict:
        return _raise_for(self.label, self.reply, "")

    def close(self):
        self.runner = None


class _ModelProcess:
    """The parent's handle on one model's measuring process."""

    def __init__(self, label: str):
        import subprocess
        import tempfile
        self.label = label
        self.stderr = tempfile.TemporaryFile(mode="w+")
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p))
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER_CODE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env)

    def send(self, **msg):
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died; recv() says how

    def recv(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.stderr.seek(0)
            tail = [l for l in self.stderr.read().strip().splitlines() if l.strip()]
            if code in (-9, 137):
                raise _usage_error(f"measuring {self.label}: its process was killed (out of memory?); "
                                   "try a smaller --batch-size")
            raise RuntimeError(f"measuring {self.label}: its process exited with code {code}"
                               + (f": {tail[-1]}" if tail else ""))
        return _raise_for(self.label, json.loads(line), " in its own process")

    def close(self):
        if self.proc.poll() is None:
            self.send(cmd="quit")
            try:
                self.proc.wait(timeout=10)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.stderr):
            f.close()


def _middle(values: list[float]) -> float:
    """The median; the mean of the middle two for an even count."""
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def _cause(errors: list) -> BaseException:
    """The first error that is about the values (not an unknown keyword, which only says the model
    takes no such argument)."""
    return next((e for e in errors if not isinstance(e, TypeError)), errors[0])


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def run_bench(specs, input_size=None, batch_size=32, device="cpu", amp=False, compile=False,
              channels_last=False, warmup=2, iters=5, rounds=2, progress=True, mode="inference",
              amp_dtype=None, min_time=0.0, isolate=True, latency_iters=None) -> dict:
    """Measure each model alternately ``rounds`` times; the first model is the baseline.

    ``mode``: ``'inference'`` (eval, no grad; images/s at ``batch_size`` and batch-1 latency) or
    ``'train'`` (forward + loss + backward + AdamW step; images/s). Batch-1 latency is the median
    of ``latency_iters`` runs (default: ``max(iters, 10)``) in the first round. Each model runs in its own
    process (see :class:`condensevit.measure.OwnPeakMemory` for what its peak memory counts; with
    ``isolate=False`` all run in this process, which starts quicker, and peak memory is NaN); its
    images/s is the median over rounds (the mean of the middle two for an even count), GMACs are
    its forward multiply-accumulates per image at batch 1. Returns ``dict(environment, rows)``.
    """
    from tqdm.auto import tqdm
    if mode not in ("inference", "train"):
        raise _usage_error(f"--mode {mode!r} must be inference or train")
    from .train.config import check_range
    for flag, value in (("--rounds", rounds), ("--iters", iters), ("--batch-size", batch_size)):
        check_range(flag, value, lo=1)
    check_range("--warmup", warmup, lo=0)
    check_range("--min-time", min_time, lo=0, fix="0 times exactly --iters batches")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise _usage_error("--device cuda was asked for but no CUDA GPU is available here; use --device cpu")
    shape = as_input_shape(input_size) if input_size is not None else None
    parsed = [parse_model_spec(spec) for spec in specs]
    for name, _, _ in parsed:
        _check_model_name(name)  # before any process starts
    threads = torch.get_num_threads()
    total = len(parsed) * (rounds + 1)
    bar = tqdm(total=total, desc=f"bench {mode}", disable=not progress, leave=False, file=sys.stderr)
    procs = []
    try:
        for _, _, label in parsed:
            procs.append(_ModelProcess(label) if isolate else _InlineModel(label))
        bar.set_postfix_str("building the models (one process each)")
        for p in procs:  # they build in parallel; nothing is timed yet
            p.send(cmd="build", spec=p.label, shape=list(shape) if shape else None, device=str(dev), threads=threads,
                   mode=mode, batch_size=batch_size, amp=amp, amp_dtype=amp_dtype, channels_last=channels_last,
                   compile=compile)
        entries = []
        for p in procs:
            built = p.recv()
            entries.append(dict(proc=p, label=p.label, shape=tuple(built["shape"]), gmacs=built["gmacs"],
                                params=built["params"], runs=[]))
            bar.update(1)
        for r in range(rounds):
            for e in (entries if r % 2 == 0 else entries[::-1]):  # alternate so drift favours no one
                bar.set_postfix_str(f"round {r + 1}/{rounds} {e['label']}")
                e["proc"].send(cmd="run", warmup=warmup if r == 0 else 1, iters=iters, min_time=min_time,
                               latency=r == 0 and mode == "inference", latency_iters=latency_iters)
                e["runs"].append(e["proc"].recv())
                bar.update(1)
    finally:
        bar.close()
        for p in procs:
            p.close()
    rows = []
    base = None
    for e in entries:
        runs = e["runs"]
        row = dict(
            model=e["label"], params_m=e["params"] / 1e6, params=e["params"], gmacs=e["gmacs"],
            images_per_s=_middle([x["images_per_s"] for x in runs]), latency_ms=runs[0]["latency_ms"],
            peak_memory_mb=runs[-1]["peak_memory_mb"],
            input_size=list(e["shape"]), rounds=[x["images_per_s"] for x in runs],
        )
        base = base or row
        row["speedup"] = row["images_per_s"] / base["images_per_s"]
        # each round's ratio to the baseline's run in the same round (back to back: drift largely cancels)
        row["round_speedups"] = [x / b for x, b in zip(row["rounds"], base["rounds"])]
        row["speedup_paired"] = _middle(row["round_speedups"])
        row["gmacs_ratio"] = row["gmacs"] / base["gmacs"] if base["gmacs"] else float("nan")
        row["memory_ratio"] = row["peak_memory_mb"] / base["peak_memory_mb"] \
            if base["peak_memory_mb"] and base["peak_memory_mb"] == base["peak_memory_mb"] else float("nan")
        rows.append(row)
    env = environment(dev)
    env.update(mode=mode, batch_size=batch_size, amp=amp, amp_dtype=str(_amp_dtype(dev, amp_dtype)).replace("torch.", "")
               if amp else None, compile=compile, channels_last=channels_last, warmup=warmup, iters=iters,
               rounds=rounds, peak_memory=entries[0]["runs"][-1]["memory_method"] + (" (MiB)" if isolate else ""),
               images_per_s="median over rounds (mean of the middle two for an even count)")
    return dict(environment=env, rows=rows)


def _fmt_latency(v) -> str:
    return "-" if v is None or v != v else f"{v:.1f}"


def format_table(result: dict) -> str:
    env = result["environment"]
    mode = env.get("mode", "inference")
    amp = f"amp {env.get('amp_dtype') or env['amp']}" if env["amp"] else "fp32"
    head = (f"machine: {env['processor']} ({env['cpu_count']} cpus, {env['torch_threads']} torch threads)"
            f"{'  gpu: ' + env['gpu'] if 'gpu' in env else ''} | torch {env['torch']} | device {env['device']}"
            f" | {mode} | batch {env['batch_size']} | {amp} | compile {env['compile']}")
    ips = "train img/s" if mode == "train" else "img/s"
    cols = ["model", "params (M)", "GMACs", ips, "speed-up", "paired", "GMACs ratio", "latency b1 (ms)",
            "peak mem (MiB)", "mem ratio"]
    lines = []
    for r in result["rows"]:
        mem, ratio = r["peak_memory_mb"], r.get("memory_ratio", float("nan"))
        paired = r.get("speedup_paired")
        ips_v = r["images_per_s"]
        lines.append([r["model"], f"{r['params_m']:.2f}", f"{r['gmacs']:.3f}",
                      f"{ips_v:.1f}" if ips_v >= 10 else f"{ips_v:.3f}", f"{r['speedup']:.2f}x",
                      "-" if paired is None else f"{paired:.2f}x", f"{r['gmacs_ratio']:.3f}", _fmt_latency(r["latency_ms"]),
                      "-" if mem != mem else f"{mem:.0f}", "-" if ratio != ratio else f"{ratio:.2f}x"])
    widths = [max(len(c), *(len(l[i]) for l in lines)) for i, c in enumerate(cols)]
    fmt = lambda vals: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    out = [head, fmt(cols), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines]
    what = ("train img/s: images per second through forward + loss + backward + AdamW step"
            if mode == "train" else "img/s: inference images per second")
    out.append(f"{what}, {env.get('images_per_s', 'median over rounds')}; speed-up, GMACs and memory ratios "
               "are against the first model (paired: the median of each round's ratio to the baseline's run in the "
               "same round); GMACs = forward multiply-accumulates per image.")
    if "peak_memory" in env:
        out.append(f"peak mem: {env['peak_memory']}.")
    return "\n".join(out)


def plot_bench(result: dict, path: str):
    """Write :func:`bench_figure` as a PNG."""
    import matplotlib.pyplot as plt
    fig = bench_figure(result)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def bench_figure(result: dict):
    """Throughput against GMACs, both axes from 0, the baseline (first model) marked with a star
    and a dashed line at its throughput. Returns the matplotlib figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    env = result["environment"]
    mode = env.get("mode", "inference")
    rows = result["rows"]
    base = rows[0]
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    ax.axhline(base["images_per_s"], color="0.5", lw=0.8, ls="--", zorder=0)
    ax.scatter(base["gmacs"], base["images_per_s"], s=90, marker="*", color="k", zorder=3,
               label=f"baseline: {base['model']}")
    ax.annotate("baseline", (base["gmacs"], base["images_per_s"]), fontsize=7, xytext=(4, -10),
                textcoords="offset points")
    for r in rows[1:]:
        ax.scatter(r["gmacs"], r["images_per_s"], s=40, zorder=3)
        ax.annotate(f"{r['model']} ({r['speedup']:.2f}x)", (r["gmacs"], r["images_per_s"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("GMACs per image (forward)")
    ax.set_ylabel("training images / s" if mode == "train" else "images / s")
    ax.set_xlim(0, max(r["gmacs"] for r in rows) * 1.3)
    ax.set_ylim(0, max(r["images_per_s"] for r in rows) * 1.2)
    ax.set_title(f"{mode} throughput vs cost ({env['device']}, batch {env['batch_size']})", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _cmd_bench(args) -> int:
    from .outputs import check_figure_file, check_output_file
    if args.json:
        check_output_file(args.json, "--json")  # before any model is built
    if args.plot:
        check_figure_file(args.plot, "--plot")
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
    if args.threads < 0:
        raise _usage_error(f"--threads must be >= 1 (got {args.threads}); omit it (or 0) for torch's choice")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.runtime != "eager":   # ONNX Runtime / torch.compile next to eager: condensevit.deploy
        return _cmd_bench_runtimes(args, specs, input_size)
    result = run_bench(specs, input_size=input_size, batch_size=args.batch_size, device=args.device,
                       amp=args.amp, amp_dtype=args.amp_dtype, compile=args.compile,
                       channels_last=args.channels_last, warmup=args.warmup, iters=args.iters,
                       rounds=args.rounds, progress=not args.quiet, mode=args.mode, min_time=args.min_time,
                       isolate=not args.in_process)
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


def _cmd_bench_runtimes(args, specs, input_size) -> int:
    from .deploy import MissingDependencyError, format_runtime_table, parse_runtimes, run_runtime_bench
    if args.device != "cpu":
        raise _usage_error("--runtime other than eager is measured on the CPU (ONNX Runtime's CPU execution "
                           "provider); drop --device cuda")
    try:
        runtimes = parse_runtimes(args.runtime)
        result = run_runtime_bench(specs, runtimes, input_size=input_size, batch_size=args.batch_size,
                                   warmup=args.warmup, iters=args.iters, rounds=args.rounds, progress=not args.quiet)
    except MissingDependencyError as e:
        raise _usage_error(str(e)) from e
    print(format_runtime_table(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
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
        "bench", help="throughput, latency, memory and GMACs of models against a baseline",
        formatter_class=HelpFormatter,
        description="Measure models in alternating rounds, each model in its own process (so its peak memory "
                    "is its own). The first model is the baseline. A model may carry arguments: "
                    "NAME[key=value,...], e.g. lookupvit_base_patch16_224[compressed_grid=3x3]. "
                    "--mode train times training steps (forward + loss + backward + AdamW step).")
    p.add_argument("--models", required=True, help="comma-separated model names, the baseline first")
    p.add_argument("--mode", default="inference", choices=("inference", "train"),
                   help="inference: eval forward passes; train: forward + loss + backward + optimizer step")
    p.add_argument("--input-size", default=None,
                   help="C,H,W (or C,T,H,W for video, or a single size); default: each model's own")
    p.add_argument("--batch-size", type=int, default=32, help="images per timed batch")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    p.add_argument("--amp", action="store_true", help="autocast (default dtype: float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--amp-dtype", default=None, choices=("float16", "bfloat16"), help="autocast dtype with --amp")
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.add_argument("--runtime", default="eager",
                   help="runtimes to measure, comma-separated: eager (default), compile (torch.compile), onnxruntime "
                        "(exported to ONNX, CPU execution provider; needs condensevit[deploy]); with more than one, "
                        "each model is also compared with itself in eager, in the same alternating run")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed batches before the first round (1 before each later round)")
    p.add_argument("--iters", type=int, default=5, help="timed batches per run")
    p.add_argument("--rounds", type=int, default=2,
                   help="timed runs per model, the models taking turns; images/s is the median of the rounds (with "
                        "an even number, the mean of the middle two)")
    p.add_argument("--min-time", type=float, default=0.0,
                   help="seconds: repeat the timed batches of a run until at least this long (fast GPUs)")
    p.add_argument("--in-process", action="store_true",
                   help="measure every model in this process (starts quicker; peak memory is then not measured)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="write the rows and the environment here")
    p.add_argument("--plot", default=None, help="write a throughput-vs-GMACs figure here (.png, .pdf, .svg, ...)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=_cmd_bench)

    q = sub.add_parser("models", help="the models of this library, with parameters and GMACs",
                       formatter_class=HelpFormatter)
    q.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern, e.g. 'stvit*'")
    q.add_argument("--no-gmacs", action="store_true", help="skip counting GMACs (faster)")
    q.add_argument("--quiet", action="store_true", help="no progress display")
    q.set_defaults(func=_cmd_models)
