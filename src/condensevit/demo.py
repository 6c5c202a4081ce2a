"""``condensevit demo``: the whole story on the embedded digits, on a CPU, in about ten minutes.

It trains three small models with one recipe on the embedded ``digits`` set (scikit-learn's real
handwritten digits placed at random on a 64x64 canvas, so most of the 64 patch tokens are
background): a DeiT-style baseline, an STViT and a LookupViT of the same width and depth. It then
measures their cost (GMACs) and speed in one alternating benchmark run, draws what the few tokens
of the two condensed models look at, and writes ``OUT/report.md`` with the table, the
accuracy-against-GMACs plot and the token-map figures.

Choices (ours; the papers train on ImageNet with pretrained DeiT / ViT):
  * the three models share width 128, depth 6, 4 heads, patch 8 at 64x64 (64 tokens) and average
    pooling of the final tokens (the condensed models have no class token, so the baseline drops
    it too: the comparison is then only about condensing);
  * STViT puts its token generation module after the second layer (``stgm_start=2``; DeiT-S: after
    the fourth of twelve) and condenses the 64 image tokens into 4 semantic tokens (DeiT-S: 196
    into 16), and LookupViT uses a 3x3 compressed grid: with only six layers at 64 tokens, that is
    what brings both under half the baseline's GMACs (0.44x and 0.47x);
  * the recipe (:data:`RECIPE`) was tuned on the baseline only (learning rate, batch size,
    augmentation), then used unchanged for all three. Of the STViT settings under half the cost we
    tried (start 1 with 16 tokens, start 2 with 9 or 4), 4 tokens after layer 2 did best.

Each training run lives in ``OUT/runs/<name>`` (seed 0) or ``OUT/runs/<name>_seed<k>``; running the
demo again reuses runs that finished with the same settings (``--fresh`` retrains) and resumes
interrupted ones from their last checkpoint (SIGTERM or Ctrl-C saves one). ``--seeds N`` trains
each model with seeds 0..N-1 and reports the mean and standard deviation of top-1.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

__all__ = ["DEMO_MODELS", "RECIPE", "run_demo", "run_dir_for", "DemoInterrupted", "add_parser"]

COMMON = dict(img_size=64, patch_size=8, embed_dim=128, depth=6, num_heads=4)

# (short name, title, timm model name, model kwargs)
DEMO_MODELS = (
    ("baseline", "DeiT-style ViT (baseline)", "deit_tiny_patch16_224",
     dict(COMMON, global_pool="avg", class_token=False)),
    ("stvit", "STViT (4 semantic tokens after layer 2)", "stvit_deit_tiny_patch16_224",
     dict(COMMON, stgm_start=2, num_semantic_tokens=4)),
    ("lookupvit", "LookupViT (3x3 compressed grid)", "lookupvit_tiny_patch16_224",
     dict(COMMON, compressed_grid=(3, 3))),
)

# one recipe for the three (TrainConfig fields)
RECIPE = dict(data="digits", epochs=20, batch_size=16, lr=5e-4, weight_decay=0.05, warmup_epochs=1,
              min_lr=1e-5, smoothing=0.1, aa="none", scale=(0.85, 1.0))

# --quick: a smoke run of the whole pipeline (tests, and a first look in under a minute)
QUICK = dict(epochs=1, max_steps_per_epoch=3, limit_val_batches=2)


def _spec(name: str, kwargs: dict) -> str:
    """A ``condensevit bench`` model spec: NAME[key=value,...] with tuples as 3x3."""
    def fmt(v):
        return "x".join(str(int(t)) for t in v) if isinstance(v, (tuple, list)) else repr(v) if isinstance(v, str) \
            else str(v)
    return f"{name}[{','.join(f'{k}={fmt(v)}' for k, v in kwargs.items())}]"


def _finished_run(out_dir: str, cfg) -> dict | None:
    """The summary of a finished run in ``out_dir`` trained with the same settings, else None."""
    summary, config = os.path.join(out_dir, "summary.json"), os.path.join(out_dir, "config.json")
    if not (os.path.isfile(summary) and os.path.isfile(config)):
        return None
    try:
        with open(config) as f:
            old = json.load(f)
        with open(summary) as f:
            done = json.load(f)
    except (OSError, ValueError):
        return None
    new = cfg.to_json()
    defaults = type(cfg)(model="").to_json()  # an option newer than the run: it ran with the default
    keys = [k for k in new if k not in ("output", "progress", "verbose", "measure", "resume")]
    if any(old.get(k, defaults.get(k)) != new[k] for k in keys):
        return None
    return done


class DemoInterrupted(Exception):
    """A demo training run stopped on SIGTERM / Ctrl-C after saving its checkpoint in ``run_dir``."""

    def __init__(self, run_dir: str | None):
        super().__init__(run_dir)
        self.run_dir = run_dir


def run_dir_for(out: str, short: str, seed: int) -> str:
    """``OUT/runs/<short>`` for seed 0 (the single-seed demo's folder), ``OUT/runs/<short>_seed<k>`` else."""
    return os.path.join(out, "runs", short if seed == 0 else f"{short}_seed{seed}")


def _val_images(run_dir: str) -> int | None:
    """How many validation images the run's last evaluation used (its log.jsonl), if known."""
    try:
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            rows = [json.loads(l) for l in f if l.strip()]
    except (OSError, ValueError):
        return None
    return next((int(r["val_images"]) for r in reversed(rows) if "val_images" in r), None)


def _train_one(short: str, name: str, kwargs: dict, out: str, recipe: dict, fresh: bool, progress, log,
               seed: int = 0) -> dict:
    import shutil

    from .train import TrainConfig, train
    run_dir = run_dir_for(out, short, seed)
    cfg = TrainConfig(model=name, model_kwargs=dict(kwargs), output=run_dir, measure=False, progress=progress,
                      verbose=False, **dict(recipe, seed=seed))
    if fresh and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    done = _finished_run(run_dir, cfg)
    if done is not None:
        log(f"  {short} (seed {seed}): reusing the finished run in {run_dir} (--fresh retrains)")
        return dict(done, val_images=_val_images(run_dir), reused=True)
    if os.path.isdir(run_dir):
        if os.path.isfile(os.path.join(run_dir, "last.state.pth")) and \
                not os.path.isfile(os.path.join(run_dir, "summary.json")):
            cfg.resume = "auto"  # interrupted: go on from its last checkpoint
            log(f"  {short} (seed {seed}): resuming the interrupted run in {run_dir}")
        else:  # finished with other settings, or never reached its first checkpoint
            shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    result = train(cfg)
    if result.interrupted:
        raise DemoInterrupted(run_dir)
    log(f"  {short} (seed {seed}): top-1 {result.final_top1:.2f} after {result.epochs_done} epochs "
        f"({time.perf_counter() - t0:.0f}s)")
    with open(os.path.join(run_dir, "summary.json")) as f:
        return dict(json.load(f), val_images=_val_images(run_dir), resumed=cfg.resume == "auto")


def _token_map_figures(out: str, runs: dict, index: int = 0) -> dict:
    """Token maps of the trained condensed models on one validation digit; PNG paths by short name."""
    import numpy as np

    from .data import DigitsDataset
    from .train.checkpoint import load_model_for_inference
    from .viz import load_image, render, token_maps

    val = DigitsDataset("val")
    gray = val.images[index]
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    paths = {}
    for short, summary in runs.items():
        model = load_model_for_inference(None, summary["checkpoint"])
        if not hasattr(model, "token_maps"):
            continue
        cfg = model.pretrained_cfg
        x, rgb_in = load_image(rgb, gray.shape, cfg.get("mean", (0.5,) * 3), cfg.get("std", (0.5,) * 3))
        tm = token_maps(model, x)
        path = os.path.join(out, f"token_maps_{short}.png")
        render(rgb_in, tm, path, title=f"{summary['model']} on a validation digit (label {val.targets[index]})")
        paths[short] = path
    return paths


def _plot(rows: list[dict], path: str):
    """Top-1 against MMACs: each seed a small dot, the mean a large one with a +-1 std bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    seeds = len(rows[0]["top1_seeds"])
    for i, r in enumerate(rows):
        x = r["gmacs"] * 1000
        color = f"C{i}"
        ax.scatter([x] * len(r["top1_seeds"]), r["top1_seeds"], s=12, color=color, alpha=0.5, zorder=2)
        ax.errorbar(x, r["top1"], yerr=r["top1_std"] if seeds > 1 else None, fmt="o", ms=7, color=color,
                    capsize=4, zorder=3)
        ax.annotate(f"{r['short']} ({r['speedup']:.2f}x speed)", (x, r["top1"]), fontsize=8,
                    xytext=(7, 4), textcoords="offset points")
    ax.set_xlabel("MMACs per image (64x64)")
    ax.set_ylabel("validation top-1 (%)" + (f": mean ± std over {seeds} seeds" if seeds > 1 else ""))
    ax.set_title("digits: accuracy against cost" + (f" ({seeds} seeds; dots: each seed)" if seeds > 1 else ""),
                 fontsize=10)
    ax.grid(alpha=0.3)
    lo = min(min(r["top1_seeds"]) for r in rows)
    hi = max(max(r["top1_seeds"]) for r in rows)
    ax.set_ylim(max(0.0, lo - 5), min(100.0, hi + 3))
    ax.set_xlim(0, max(r["gmacs"] for r in rows) * 1000 * 1.25)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


CHANCE = 10.0  # ten digit classes


def _verdict(row: dict, base: dict, quick: bool = False) -> str:
    """Whether a condensed model meets the aim: within 1.0 point of the baseline's (mean) top-1 at no
    more than half its GMACs. Not judged on a quick run, nor when the baseline is near chance."""
    if quick:
        return "not judged (quick run: a few steps, accuracies near chance mean nothing)"
    if base["top1"] < 2 * CHANCE:
        return f"not judged: the baseline is near chance ({base['top1']:.2f}%, chance {CHANCE:.0f}%); train longer"
    gap = row["top1"] - base["top1"]
    cost_ok = row["gmacs_ratio"] <= 0.5
    acc_ok = gap >= -1.0
    met = "meets the aim" if cost_ok and acc_ok else "misses the aim"
    why = []
    if not acc_ok:
        why.append(f"{-gap:.2f} points below the baseline (aim: within 1.0)")
    if not cost_ok:
        why.append(f"{row['gmacs_ratio']:.2f}x the GMACs (aim: at most 0.5x)")
    return f"{met}" + (f": {'; '.join(why)}" if why else "")


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def _pm(row: dict, key: str) -> str:
    return f"{row[key]:.2f} ± {row[key + '_std']:.2f}" if len(row["top1_seeds"]) > 1 else f"{row[key]:.2f}"


def _report(out: str, rows: list[dict], bench: dict, figures: dict, recipe: dict, wall_s: float, quick: bool,
            seeds: list[int], val_total: int) -> str:
    env = bench["environment"]
    base = rows[0]
    n = len(seeds)
    val_used = base.get("val_images") or val_total
    lines = ["# condensevit demo: condensing tokens on the digits", ""]
    if quick:
        lines += ["**Quick run** (`--quick`): a few training steps only; the accuracies mean nothing and are not "
                  "judged. Run `condensevit demo` without `--quick` for the real figures.", ""]
    lines += [
        "Three models of the same width (128), depth (6) and heads (4) trained with one recipe on the "
        "embedded digits set: scikit-learn's 1,797 real handwritten digits, each scaled to 16-28 px and "
        f"placed at random on a 64x64 black canvas (1,437 train / {val_total} validation images, fixed seeded "
        "split). With 8x8 patches an image is 64 tokens, most of them background.",
        "",
    ]
    if n > 1:
        lines += [f"Each model was trained {n} times (seeds {', '.join(map(str, seeds))}); top-1, best and top-5 "
                  "are the mean ± the sample standard deviation over the seeds, train time the mean.", ""]
    lines += [
        "| model | top-1 (%) | best (%) | top-5 (%) | params | MMACs | GMACs ratio | images/s | speed-up | "
        "train time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['title']} | {_pm(r, 'top1')} | {_pm(r, 'best')} | {_pm(r, 'top5')} | {r['params']:,} | "
                     f"{r['gmacs'] * 1000:.2f} | {r['gmacs_ratio']:.3f} | {r['images_per_s']:.0f} | "
                     f"{r['speedup']:.2f}x | {r['train_time_s']:.0f} |")
    if n > 1:
        lines += ["", "Top-1 of each seed (%):", ""]
        for r in rows:
            lines.append(f"- {r['short']}: " + ", ".join(f"{v:.2f} (seed {s})" for v, s in zip(r["top1_seeds"], seeds)))
    resumed = [r["short"] for r in rows if r.get("resumed")]
    lines += ["", "Train time: each run's seconds of training (its summary.json's `train_time_s`), summed over its "
              "sessions: a run that was interrupted and resumed counts the time before the interruption up to the "
              "checkpoint it resumed from"
              + (f" (here: {', '.join(resumed)})" if resumed else "") + "."]
    lines += ["", "Aim: each condensed model within 1.0 point of the baseline's top-1"
                  f"{' (means over the seeds)' if n > 1 else ''} at no more than half its GMACs.", ""]
    for r in rows[1:]:
        spread = ""
        if n > 1:
            se = math.sqrt((r["top1_std"] ** 2 + base["top1_std"] ** 2) / n)
            spread = f" (standard error of the difference {se:.2f})"
        lines.append(f"- **{r['short']}**: {r['top1'] - base['top1']:+.2f} points{spread} at {r['gmacs_ratio']:.2f}x "
                     f"the GMACs and {r['speedup']:.2f}x the speed: {_verdict(r, base, quick)}.")
    of_total = f" of the {val_total}" if val_used != val_total else ""
    lines += [
        "",
        f"Validation used {val_used}{of_total} images, so one image is {100 / val_used:.2f} points"
        + ("; expect a point or two of spread between seeds." if n == 1 else "."),
        "",
        "![accuracy against GMACs](accuracy_vs_gmacs.png)",
        "",
    ]
    for short, path in figures.items():
        lines += [f"## What the few tokens of {short} look at", "", f"![{short} token maps]({os.path.basename(path)})",
                  ""]
    if figures:
        lines += [
            f"Models of seed {seeds[0]}. Left: which token owns each patch (STViT: the semantic token that attends "
            "to it most in the last token generation layer; LookupViT: the compressed token each patch reads most "
            "in the scatter). Right: each token's map over the 64 patches.", ""]
    lines += [
        "## How it was measured", "",
        f"- Recipe (all three): {', '.join(f'{k}={v}' for k, v in recipe.items())}; AdamW, cosine schedule "
        "with warm-up, label smoothing (timm's). Accuracy: the last epoch's weights on the validation split.",
        f"- GMACs: `condensevit.measure.gmacs` at 3x64x64, batch 1. Speed: `condensevit bench` on the same "
        f"models, alternating rounds, batch {env['batch_size']}, {env['device']}, fp32, {env['torch_threads']} "
        f"thread{'' if env['torch_threads'] == 1 else 's'} on {env['processor']} ({env['cpu_count']} cpus), torch {env['torch']}.",
        f"- This `demo` invocation: {wall_s / 60:.1f} minutes"
        + ("" if not any(r.get("reused") or r.get("resumed") for r in rows) else
           " (runs found finished were reused and resumed runs' earlier sessions ran before it: neither is in "
           "this figure)")
        + ". Runs, logs and checkpoints: `runs/`; raw figures: `results.json`.",
        "",
    ]
    text = "\n".join(lines)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    return text


def run_demo(out: str = "demo_out", *, quick: bool = False, fresh: bool = False, epochs: int | None = None,
             threads: int | None = None, bench_batch_size: int = 32, progress=None, verbose: bool = True,
             seeds: int = 1) -> dict:
    """Train the three demo models (each with seeds 0..``seeds``-1), measure them, draw their token
    maps and write the report. Returns the rows of the table (also in ``OUT/results.json``).
    Raises :class:`DemoInterrupted` when a training run was stopped (its checkpoint saved)."""
    import torch

    from .bench import run_bench
    from .data import DigitsDataset

    def log(msg):
        if verbose:
            print(msg, flush=True)

    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1 (got {seeds})")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1 (got {threads}); omit it for torch's choice")
    if epochs is not None and epochs < 1:
        raise ValueError(f"--epochs must be at least 1 (got {epochs})")
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    recipe = dict(RECIPE, **(QUICK if quick else {}))
    if epochs is not None:
        recipe["epochs"] = epochs
    seed_list = list(range(seeds))
    log(f"condensevit demo: training {len(DEMO_MODELS)} models on the embedded digits "
        f"({recipe['epochs']} epochs each{f', {seeds} seeds' if seeds > 1 else ''}"
        f"{', quick smoke run' if quick else ''}) -> {out}")
    runs = {short: [] for short, *_ in DEMO_MODELS}
    for seed in seed_list:  # seed by seed: an interrupted demo holds whole comparisons
        for short, title, name, kwargs in DEMO_MODELS:
            log(f"- {title}: {name}{f' (seed {seed})' if seeds > 1 else ''}")
            runs[short].append(_train_one(short, name, kwargs, out, recipe, fresh, progress, log, seed=seed))

    log("- measuring GMACs and speed (alternating benchmark rounds)")
    bench = run_bench([_spec(name, dict(kwargs, num_classes=10)) for _, _, name, kwargs in DEMO_MODELS],
                      input_size=(3, 64, 64), batch_size=8 if quick else bench_batch_size, device="cpu",
                      iters=2 if quick else 10, rounds=1 if quick else 3, warmup=1 if quick else 3,
                      progress=progress is not False and not quick, isolate=not quick)
    rows = []
    for (short, title, name, kwargs), b in zip(DEMO_MODELS, bench["rows"]):
        ss = runs[short]
        row = dict(short=short, title=title, model=name, model_kwargs=kwargs, seeds=seed_list,
                   params=ss[0]["params"], gmacs=b["gmacs"], gmacs_ratio=b["gmacs_ratio"],
                   images_per_s=b["images_per_s"], speedup=b["speedup"],
                   train_time_s=sum(s["train_time_s"] for s in ss) / len(ss), val_images=ss[0].get("val_images"),
                   checkpoint=ss[0]["checkpoint"], checkpoints=[s["checkpoint"] for s in ss],
                   resumed=any(s.get("resumed") for s in ss), reused=any(s.get("reused") for s in ss))
        for key, field in (("top1", "final_top1"), ("best", "best_top1"), ("top5", "final_top5")):
            row[f"{key}_seeds"] = [s[field] for s in ss]
            row[key], row[f"{key}_std"] = _mean_std(row[f"{key}_seeds"])
        rows.append(row)
    _plot(rows, os.path.join(out, "accuracy_vs_gmacs.png"))
    log("- drawing token maps")
    figures = _token_map_figures(out, {short: ss[0] for short, ss in runs.items()})
    wall = time.perf_counter() - t0
    val_total = len(DigitsDataset("val"))
    _report(out, rows, bench, figures, recipe, wall, quick, seed_list, val_total)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(rows=rows, environment=bench["environment"], recipe=recipe, seeds=seed_list, wall_s=wall,
                       quick=quick, val_images_total=val_total), f, indent=2, default=list)
    base = rows[0]
    for r in rows:
        log(f"  {r['short']:<10} top-1 {_pm(r, 'top1'):>14}  {r['gmacs'] * 1000:6.2f} MMACs ({r['gmacs_ratio']:.2f}x)  "
            f"{r['images_per_s']:6.0f} img/s ({r['speedup']:.2f}x)"
            + ("" if r is base else f"  {_verdict(r, base, quick)}"))
    log(f"wrote {os.path.join(out, 'report.md')} in {wall / 60:.1f} min")
    return dict(rows=rows, figures=figures, wall_s=wall)


def _cmd_demo(args) -> int:
    from .outputs import check_output_dir
    check_output_dir(args.out, "--out")  # before any training
    try:
        run_demo(args.out, quick=args.quick, fresh=args.fresh, epochs=args.epochs, threads=args.threads,
                 progress=False if args.no_progress else None, seeds=args.seeds)
    except (DemoInterrupted, KeyboardInterrupt) as e:
        saved = f"the interrupted run's checkpoint is in {e.run_dir}; " if isinstance(e, DemoInterrupted) else ""
        again = " ".join(["demo", "--out", args.out] + (["--quick"] if args.quick else [])
                         + ([f"--seeds {args.seeds}"] if args.seeds != 1 else [])
                         + ([f"--epochs {args.epochs}"] if args.epochs else []))
        print(f"condensevit demo: stopped; {saved}run `condensevit {again}` again to continue: finished runs are "
              "reused and an interrupted one resumes from its last checkpoint", file=sys.stderr, flush=True)
        return 130
    return 0


def add_parser(sub: argparse._SubParsersAction):
    from .cli import HelpFormatter
    p = sub.add_parser(
        "demo", formatter_class=HelpFormatter, help="train a baseline, an STViT and a LookupViT on the embedded digits and report",
        description="Train a DeiT-style baseline, an STViT and a LookupViT with one recipe on the embedded "
                    "digits, measure their GMACs and speed, draw their token maps, and write OUT/report.md. "
                    "About ten minutes on a 2-core CPU per seed. Running it again with the same --out reuses "
                    "finished runs and resumes an interrupted one (Ctrl-C or SIGTERM saves a checkpoint).")
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--quick", action="store_true", help="a few steps per model: checks the pipeline in a minute")
    p.add_argument("--fresh", action="store_true", help="retrain even when finished runs are in OUT/runs")
    p.add_argument("--resume", nargs="?", const="auto", choices=("auto",), default="auto",
                   help="continue interrupted runs in OUT/runs from their last checkpoint (always on unless --fresh; "
                        "accepted so that the trainer's hint `--resume auto` works here too)")
    p.add_argument("--seeds", type=int, default=1, help="train each model with seeds 0..N-1 and report mean ± std "
                                                       "top-1 (N times the time)")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs per model (default {RECIPE['epochs']}, about 8 "
                   "minutes on 2 cores; 40 takes about 16 and is where the condensed models caught up in our runs)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
