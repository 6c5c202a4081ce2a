"""The GPU figures in one run (issue 15, item 4); started by ``bash benchmarks/gpu.sh``.

On one CUDA GPU it measures each condensed model against its baseline with ``condensevit bench``
(alternating rounds, each model in its own process; every timed run at least 0.5 s). Planned to fit in
eight minutes (our estimate: it has not run on a GPU yet; ``gpu.json`` records each step's wall time
and ``--steps`` runs a subset):

1. inference, AMP (bfloat16), batch 128 (the papers' setting; video: batch 8), eager: images/s and
   the speed-up; batch-1 latency in the same run;
2. the same with ``torch.compile`` (inductor);
3. training steps (forward + loss + backward + AdamW step), AMP (bfloat16), same batches, eager:
   images/s and the speed-up, and each model's own CUDA peak memory;
4. one epoch of AMP (bfloat16) training of the three demo models on the embedded digits, which
   exercises the trainer's AMP path end to end.

It writes ``OUT/gpu.json`` (every row, every environment) and ``OUT/gpu.md`` (the tables).
``--dry-run`` runs every step on the CPU at tiny size (narrow models, batch 2, one round, all models
in one process, compile with the 'eager' backend, two training steps per model): it checks the
script, not the speed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

try:
    import condensevit  # noqa: F401
except ImportError:  # run from a clone without an install: the package is in src/
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

# (key, title, [(model, kwargs)], batch) -- the first model of each group is the baseline
GROUPS = (
    ("stvit_deit_small", "STViT-S vs DeiT-S",
     [("deit_small_patch16_224", {}), ("stvit_deit_small_patch16_224", {})], 128),
    ("lookupvit_base", "LookupViT-B vs ViT-B",
     [("vit_base_patch16_224", {})] + [("lookupvit_base_patch16_224", dict(compressed_grid=g))
                                       for g in ((3, 3), (5, 5), (7, 7))], 128),
    ("stvit_r_swin_small", "STViT-R-S vs Swin-S",
     [("swin_small_patch4_window7_224", {}), ("stvit_r_swin_small_patch4_window7_224", {})], 128),
    ("video_base", "video (16x224x224): STViT and LookupViT vs joint space-time ViT-B",
     [("vit_video_base_patch2x16_224", {}), ("stvit_video_base_patch2x16_224", {}),
      ("lookupvit_video_base_patch2x16_224", {})], 8),
)

STEPS = ("inference", "compile", "train", "demo")

# --dry-run: the same models at tiny width (and tiny clips), so every step runs in seconds on a CPU
_DRY_IMAGE = dict(embed_dim=32, num_heads=2, depth=6, img_size=112)  # 7x7 patches: every grid up to 7x7 fits
DRY_IMAGE_INPUT = (3, 112, 112)
_DRY_SWIN = dict(embed_dim=32, num_heads=(1, 2, 4, 8), depths=(2, 2, 6, 2))  # STViT-R classifies at 224 only
_DRY_VIDEO = dict(embed_dim=32, num_heads=2, depth=4, num_frames=8, img_size=48)
_DRY_VIDEO_EXTRA = {"stvit_video": dict(semantic_grid=(2, 2, 2), stgm_start=1),
                    "lookupvit_video": dict(compressed_grid=(2, 2, 2))}
DRY_VIDEO_INPUT = (3, 8, 48, 48)


def dry_kwargs(name: str) -> dict:
    if "video" in name:
        family = name.split("_video")[0] + "_video"
        return dict(_DRY_VIDEO, **_DRY_VIDEO_EXTRA.get(family, {}))
    if "swin" in name:
        return dict(_DRY_SWIN)
    return dict(_DRY_IMAGE)


def spec(name: str, kwargs: dict) -> str:
    """A ``condensevit bench`` model spec, NAME[key=value,...] with tuples written 3x3."""
    def fmt(v):
        return "x".join(str(int(t)) for t in v) if isinstance(v, (tuple, list)) else str(v)
    return f"{name}[{','.join(f'{k}={fmt(v)}' for k, v in kwargs.items())}]" if kwargs else name


def _label(name: str, kwargs: dict) -> str:
    grid = kwargs.get("compressed_grid")
    return f"{name} ({'x'.join(map(str, grid))})" if grid and "video" not in name else name


# alternating rounds per step: three where it is cheap; two where building (compiling) dominates the time
ROUNDS = dict(inference=3, compile=2, train=2)


def bench_step(step: str, mode: str, compile, dry: bool, device: str, progress: bool) -> list[dict]:
    from condensevit.bench import run_bench
    out = []
    for key, title, models, batch in GROUPS:
        specs = [spec(n, dict(kw, **dry_kwargs(n)) if dry else kw) for n, kw in models]
        video = key.startswith("video")
        t0 = time.perf_counter()
        dry_input = DRY_VIDEO_INPUT if video else None if "swin" in key else DRY_IMAGE_INPUT
        try:
            res = run_bench(specs, input_size=dry_input if dry else None,
                            batch_size=(1 if video else 2) if dry else batch, device=device, amp=True,
                            amp_dtype="bfloat16", compile=compile, mode=mode,
                            warmup=0 if dry else 3, iters=1 if dry else 10, rounds=1 if dry else ROUNDS[step],
                            min_time=0.0 if dry else 0.5, progress=progress, isolate=not dry,
                            latency_iters=1 if dry else 20)
        except Exception as e:  # noqa: BLE001  (one group failing must not cost the GPU time of the others)
            if dry:
                raise
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            out.append(dict(key=key, title=title, wall_s=time.perf_counter() - t0, error=msg))
            print(f"  {mode}{' compiled' if compile else ''}: {title}: FAILED: {msg}", flush=True)
            continue
        for row, (n, kw) in zip(res["rows"], models):
            row["label"] = _label(n, kw)
        out.append(dict(key=key, title=title, wall_s=time.perf_counter() - t0, **res))
        print(f"  {mode}{' compiled' if compile else ''}: {title}: "
              + ", ".join(f"{r['label']} {r['speedup']:.2f}x" for r in res["rows"][1:]), flush=True)
    return out


def demo_step(out: str, dry: bool, device: str) -> list[dict]:
    """One epoch of AMP (bfloat16) training of each demo model with the demo's recipe."""
    from condensevit.demo import DEMO_MODELS, RECIPE
    from condensevit.train import TrainConfig, train
    rows = []
    recipe = dict(RECIPE, epochs=1)
    if dry:
        recipe.update(max_steps_per_epoch=2, limit_val_batches=1)
    import shutil
    for short, title, name, kwargs in DEMO_MODELS:
        run_dir = os.path.join(out, "demo_amp", short)
        shutil.rmtree(run_dir, ignore_errors=True)  # this script's scratch run: always a fresh epoch
        cfg = TrainConfig(model=name, model_kwargs=dict(kwargs), output=run_dir,
                          device=device, amp=True, amp_dtype="bfloat16", measure=False, progress=False,
                          verbose=False, **recipe)
        t0 = time.perf_counter()
        try:
            r = train(cfg)
        except Exception as e:  # noqa: BLE001  (report it, keep the other models' runs)
            if dry:
                raise
            rows.append(dict(short=short, title=title, model=name, error=str(e).strip().splitlines()[-1]))
            print(f"  demo AMP epoch: {short} FAILED: {rows[-1]['error']}", flush=True)
            continue
        rows.append(dict(short=short, title=title, model=name, top1=r.final_top1, loss=r.final_loss,
                         train_time_s=r.train_time_s, wall_s=time.perf_counter() - t0, epochs=r.epochs_done))
        print(f"  demo AMP epoch: {short} top-1 {r.final_top1:.2f} loss {r.final_loss:.3f} "
              f"({r.train_time_s:.0f}s)", flush=True)
    return rows


def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None or v != v else fmt.format(v)


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# condensevit on {env.get('gpu', env['device'])}{' (DRY RUN: tiny models on CPU)' if result['dry_run'] else ''}",
             "", f"torch {env['torch']}, timm {env.get('timm')}, {result['date']}; whole run "
                 f"{result['wall_s'] / 60:.1f} min. AMP is bfloat16 autocast; images/s are medians over "
                 "alternating rounds, each model in its own process.", ""]
    by_key = {}
    failed = []
    for step in ("inference", "compile", "train"):
        for g in result.get(step, []):
            if "error" in g:
                failed.append(f"- {step}: {g['title']}: failed: {g['error']}")
            else:
                by_key.setdefault(g["key"], {})[step] = g
    if by_key:
        lines += ["| group | model | GMACs ratio | batch | img/s | speed-up | b1 latency (ms) | b1 speed-up | "
                  "compiled img/s | compiled speed-up | compiled b1 speed-up | train img/s | train speed-up | "
                  "train peak mem (MiB) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, steps in by_key.items():
        first = next(iter(steps.values()))
        n = len(first["rows"])
        for i in range(n):
            cells = [first["title"] if i == 0 else "", first["rows"][i]["label"],
                     _f(first["rows"][i]["gmacs_ratio"], "{:.3f}"), str(first["environment"]["batch_size"])]
            for step in ("inference", "compile"):
                g = steps.get(step)
                if g is None:
                    cells += ["-"] * (4 if step == "inference" else 3)
                    continue
                r, b = g["rows"][i], g["rows"][0]
                b1 = b["latency_ms"] / r["latency_ms"] if r["latency_ms"] == r["latency_ms"] else float("nan")
                cells += ([_f(r["images_per_s"], "{:.0f}"), _f(r["speedup"], "{:.2f}x"), _f(r["latency_ms"], "{:.2f}"),
                           _f(b1, "{:.2f}x")] if step == "inference" else
                          [_f(r["images_per_s"], "{:.0f}"), _f(r["speedup"], "{:.2f}x"), _f(b1, "{:.2f}x")])
            g = steps.get("train")
            cells += ["-"] * 3 if g is None else [_f(g["rows"][i]["images_per_s"], "{:.0f}"),
                                                  _f(g["rows"][i]["speedup"], "{:.2f}x"),
                                                  _f(g["rows"][i]["peak_memory_mb"], "{:.0f}")]
            lines.append("| " + " | ".join(cells) + " |")
    if by_key:
        lines += ["", "Speed-ups are against the group's first model (>1: faster); b1 speed-up is the baseline's "
                      "batch-1 latency over the model's. Train: forward + loss + backward + AdamW step; peak mem: "
                      "the model's own CUDA peak allocation (weights, gradients, optimizer state, activations).", ""]
    if failed:
        lines += ["Groups that failed (their columns show '-'):", ""] + failed + [""]
    if result.get("demo"):
        lines += ["## One epoch of AMP training (the demo models, the demo recipe)", "",
                  "| model | top-1 after 1 epoch (%) | val loss | train time (s) |", "|---|---:|---:|---:|"]
        for r in result["demo"]:
            if "error" in r:
                lines.append(f"| {r['title']} | failed: {r['error']} | | |")
                continue
            lines.append(f"| {r['title']} | {_f(r['top1'])} | {_f(r['loss'], '{:.3f}')} | {_f(r['train_time_s'], '{:.1f}')} |")
        lines.append("")
    lines += ["Step wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result["step_wall_s"].items()), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/gpu.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out/gpu", help="output folder (gpu.json, gpu.md, demo runs)")
    p.add_argument("--dry-run", action="store_true", help="every step at tiny size on the CPU (checks the script)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in steps if s not in STEPS]
    if bad:
        print(f"benchmarks/gpu.sh: error: unknown step(s) {', '.join(bad)}; choose from {', '.join(STEPS)}",
              file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print(f"benchmarks/gpu.sh: error: no CUDA GPU visible (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda or 'none'}; torch.cuda.is_available() is False). Run it on a machine with one "
              "GPU (CUDA_VISIBLE_DEVICES picks which), or with --dry-run to check the steps on the CPU.",
              file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    try:
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, ".write-test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        print(f"benchmarks/gpu.sh: error: cannot write to {args.out} ({e.strerror}); pass --out a writable folder",
              file=sys.stderr)
        return 2
    from condensevit.measure import environment
    t_start = time.perf_counter()
    result = dict(dry_run=args.dry_run, date=time.strftime("%Y-%m-%d %H:%M"), environment=environment(device),
                  step_wall_s={})
    progress = not args.quiet
    print(f"benchmarks/gpu.sh: {', '.join(steps)} on {result['environment'].get('gpu', device)}"
          f"{' (dry run)' if args.dry_run else ''} -> {args.out}", flush=True)
    for step in steps:
        t0 = time.perf_counter()
        if step == "inference":
            result[step] = bench_step(step, "inference", False, args.dry_run, device, progress)
        elif step == "compile":
            result[step] = bench_step(step, "inference", "eager" if args.dry_run else True, args.dry_run, device,
                                      progress)
        elif step == "train":
            result[step] = bench_step(step, "train", False, args.dry_run, device, progress)
        elif step == "demo":
            result[step] = demo_step(args.out, args.dry_run, device)
        result["step_wall_s"][step] = time.perf_counter() - t0
        result["wall_s"] = time.perf_counter() - t_start
        with open(os.path.join(args.out, "gpu.json"), "w") as f:  # after every step: a late failure keeps the rest
            json.dump(result, f, indent=1, default=str)
        with open(os.path.join(args.out, "gpu.md"), "w") as f:
            f.write(markdown(result))
    wall = time.perf_counter() - t_start
    print(f"wrote {os.path.join(args.out, 'gpu.json')} and gpu.md in {wall / 60:.1f} min", flush=True)
    if not args.dry_run and wall > 8 * 60:
        print("note: the run took over 8 minutes; --steps runs a subset", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
