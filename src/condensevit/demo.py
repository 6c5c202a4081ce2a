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

Each training run lives in ``OUT/runs/<name>``; running the demo again reuses runs that finished
with the same settings (``--fresh`` retrains) and resumes interrupted ones.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

__all__ = ["DEMO_MODELS", "RECIPE", "run_demo", "add_parser"]

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
    keys = [k for k in new if k not in ("output", "progress", "verbose", "measure", "resume")]
    if any(old.get(k) != new[k] for k in keys):
        return None
    return done


def _train_one(short: str, name: str, kwargs: dict, out: str, recipe: dict, fresh: bool, progress, log) -> dict:
    import shutil

    from .train import TrainConfig, train
    run_dir = os.path.join(out, "runs", short)
    cfg = TrainConfig(model=name, model_kwargs=dict(kwargs), output=run_dir, measure=False, progress=progress,
                      verbose=False, **recipe)
    if fresh and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    done = _finished_run(run_dir, cfg)
    if done is not None:
        log(f"  {short}: reusing the finished run in {run_dir} (--fresh retrains)")
        return done
    if os.path.isdir(run_dir):
        if os.path.isfile(os.path.join(run_dir, "last.state.pth")) and \
                not os.path.isfile(os.path.join(run_dir, "summary.json")):
            cfg.resume = "auto"  # interrupted: go on from its last checkpoint
            log(f"  {short}: resuming the interrupted run in {run_dir}")
        else:  # finished with other settings, or never reached its first checkpoint
            shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    result = train(cfg)
    if result.interrupted:
        raise KeyboardInterrupt
    log(f"  {short}: top-1 {result.final_top1:.2f} after {result.epochs_done} epochs "
        f"({time.perf_counter() - t0:.0f}s)")
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for r in rows:
        ax.scatter(r["gmacs"] * 1000, r["top1"], s=50)
        ax.annotate(f"{r['short']} ({r['speedup']:.2f}x speed)", (r["gmacs"] * 1000, r["top1"]), fontsize=8,
                    xytext=(5, 4), textcoords="offset points")
    ax.set_xlabel("MMACs per image (64x64)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("digits: accuracy against cost", fontsize=10)
    ax.grid(alpha=0.3)
    lo = min(r["top1"] for r in rows)
    hi = max(r["top1"] for r in rows)
    ax.set_ylim(max(0.0, lo - 5), min(100.0, hi + 3))
    ax.set_xlim(0, max(r["gmacs"] for r in rows) * 1000 * 1.25)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _verdict(row: dict, base: dict) -> str:
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


def _report(out: str, rows: list[dict], bench: dict, figures: dict, recipe: dict, wall_s: float, quick: bool) -> str:
    env = bench["environment"]
    base = rows[0]
    lines = ["# condensevit demo: condensing tokens on the digits", ""]
    if quick:
        lines += ["**Quick run** (`--quick`): a few training steps only; the accuracies mean nothing. "
                  "Run `condensevit demo` without `--quick` for the real figures.", ""]
    lines += [
        "Three models of the same width (128), depth (6) and heads (4) trained with one recipe on the "
        "embedded digits set: scikit-learn's 1,797 real handwritten digits, each scaled to 16-28 px and "
        "placed at random on a 64x64 black canvas (1,437 train / 360 validation images, fixed seeded "
        "split). With 8x8 patches an image is 64 tokens, most of them background.",
        "",
        "| model | top-1 (%) | best (%) | top-5 (%) | params | MMACs | GMACs ratio | images/s | speed-up | "
        "train time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['title']} | {r['top1']:.2f} | {r['best']:.2f} | {r['top5']:.2f} | {r['params']:,} | "
                     f"{r['gmacs'] * 1000:.2f} | {r['gmacs_ratio']:.3f} | {r['images_per_s']:.0f} | "
                     f"{r['speedup']:.2f}x | {r['train_time_s']:.0f} |")
    lines += ["", "Aim: each condensed model within 1.0 point of the baseline's top-1 at no more than half its "
                  "GMACs.", ""]
    for r in rows[1:]:
        lines.append(f"- **{r['short']}**: {r['top1'] - base['top1']:+.2f} points at {r['gmacs_ratio']:.2f}x "
                     f"the GMACs and {r['speedup']:.2f}x the speed: {_verdict(r, base)}.")
    lines += [
        "",
        f"Validation has 360 images, so one image is 0.28 points; expect a point or two of spread between seeds.",
        "",
        "![accuracy against GMACs](accuracy_vs_gmacs.png)",
        "",
    ]
    for short, path in figures.items():
        lines += [f"## What the few tokens of {short} look at", "", f"![{short} token maps]({os.path.basename(path)})",
                  ""]
    if figures:
        lines += [
            "Left: which token owns each patch (STViT: the semantic token that attends to it most in the last "
            "token generation layer; LookupViT: the compressed token each patch reads most in the scatter). "
            "Right: each token's map over the 64 patches.", ""]
    lines += [
        "## How it was measured", "",
        f"- Recipe (all three): {', '.join(f'{k}={v}' for k, v in recipe.items())}; AdamW, cosine schedule "
        "with warm-up, label smoothing (timm's). Accuracy: the last epoch's weights on the validation split.",
        f"- GMACs: `condensevit.measure.gmacs` at 3x64x64, batch 1. Speed: `condensevit bench` on the same "
        f"models, alternating rounds, batch {env['batch_size']}, {env['device']}, fp32, {env['torch_threads']} "
        f"threads on {env['processor']} ({env['cpu_count']} cpus), torch {env['torch']}.",
        f"- Whole demo: {wall_s / 60:.1f} minutes. Runs, logs and checkpoints: `runs/`; raw figures: "
        "`results.json`.",
        "",
    ]
    text = "\n".join(lines)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    return text


def run_demo(out: str = "demo_out", *, quick: bool = False, fresh: bool = False, epochs: int | None = None,
             threads: int | None = None, bench_batch_size: int = 32, progress=None, verbose: bool = True) -> dict:
    """Train the three demo models, measure them, draw their token maps and write the report.
    Returns the rows of the table (also in ``OUT/results.json``)."""
    import torch

    from .bench import run_bench

    def log(msg):
        if verbose:
            print(msg, flush=True)

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    recipe = dict(RECIPE, **(QUICK if quick else {}))
    if epochs is not None:
        if epochs < 1:
            raise ValueError(f"--epochs {epochs} must be at least 1")
        recipe["epochs"] = epochs
    log(f"condensevit demo: training {len(DEMO_MODELS)} models on the embedded digits "
        f"({recipe['epochs']} epochs each{', quick smoke run' if quick else ''}) -> {out}")
    runs = {}
    for short, title, name, kwargs in DEMO_MODELS:
        log(f"- {title}: {name}")
        runs[short] = _train_one(short, name, kwargs, out, recipe, fresh, progress, log)

    log("- measuring GMACs and speed (alternating benchmark rounds)")
    bench = run_bench([_spec(name, dict(kwargs, num_classes=10)) for _, _, name, kwargs in DEMO_MODELS],
                      input_size=(3, 64, 64), batch_size=8 if quick else bench_batch_size, device="cpu",
                      iters=2 if quick else 10, rounds=1 if quick else 3, warmup=1 if quick else 3,
                      progress=progress is not False and not quick, isolate=not quick)
    rows = []
    for (short, title, name, kwargs), b in zip(DEMO_MODELS, bench["rows"]):
        s = runs[short]
        rows.append(dict(short=short, title=title, model=name, model_kwargs=kwargs, top1=s["final_top1"],
                         best=s["best_top1"], top5=s["final_top5"], params=s["params"], gmacs=b["gmacs"],
                         gmacs_ratio=b["gmacs_ratio"], images_per_s=b["images_per_s"], speedup=b["speedup"],
                         train_time_s=s["train_time_s"], checkpoint=s["checkpoint"]))
    _plot(rows, os.path.join(out, "accuracy_vs_gmacs.png"))
    log("- drawing token maps")
    figures = _token_map_figures(out, runs)
    wall = time.perf_counter() - t0
    _report(out, rows, bench, figures, recipe, wall, quick)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(rows=rows, environment=bench["environment"], recipe=recipe, wall_s=wall, quick=quick), f,
                  indent=2, default=list)
    base = rows[0]
    for r in rows:
        log(f"  {r['short']:<10} top-1 {r['top1']:6.2f}  {r['gmacs'] * 1000:6.2f} MMACs ({r['gmacs_ratio']:.2f}x)  "
            f"{r['images_per_s']:6.0f} img/s ({r['speedup']:.2f}x)"
            + ("" if r is base else f"  {_verdict(r, base)}"))
    log(f"wrote {os.path.join(out, 'report.md')} in {wall / 60:.1f} min")
    return dict(rows=rows, figures=figures, wall_s=wall)


def _cmd_demo(args) -> int:
    run_demo(args.out, quick=args.quick, fresh=args.fresh, epochs=args.epochs, threads=args.threads,
             progress=False if args.no_progress else None)
    return 0


def add_parser(sub: argparse._SubParsersAction):
    p = sub.add_parser(
        "demo", help="train a baseline, an STViT and a LookupViT on the embedded digits and report",
        description="Train a DeiT-style baseline, an STViT and a LookupViT with one recipe on the embedded "
                    "digits, measure their GMACs and speed, draw their token maps, and write OUT/report.md. "
                    "About ten minutes on a 2-core CPU.")
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--quick", action="store_true", help="a few steps per model: checks the pipeline in a minute")
    p.add_argument("--fresh", action="store_true", help="retrain even when finished runs are in OUT/runs")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs per model (default {RECIPE['epochs']}, about 8 minutes on 2 cores; 40 "
                        "takes about 16 and is where the condensed models caught up in our runs)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
