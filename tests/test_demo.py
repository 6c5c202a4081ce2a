"""The README's main job, ``condensevit demo``, end to end in its quick form."""
import json
import os

import pytest
from PIL import Image

from condensevit import demo
from condensevit.cli import main
from condensevit.demo import DEMO_MODELS, _spec


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    # two seeds: the fixture also checks the --seeds path (the second seed costs 3 quick trainings)
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--seeds", "2", "--out", str(out), "--no-progress"]) == 0
    return out


def test_quick_demo_writes_report_plot_token_maps_and_results(quick_demo):
    out = quick_demo
    report = (out / "report.md").read_text()
    for _, title, _, _ in DEMO_MODELS:
        assert f"| {title} |" in report
    assert "![accuracy against GMACs](accuracy_vs_gmacs.png)" in report
    for name in ("accuracy_vs_gmacs.png", "token_maps_stvit.png", "token_maps_lookupvit.png"):
        with Image.open(out / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    results = json.loads((out / "results.json").read_text())
    rows = {r["short"]: r for r in results["rows"]}
    assert set(rows) == {"baseline", "stvit", "lookupvit"}
    # the demo's configurations are chosen to be at most half the baseline's cost
    assert rows["stvit"]["gmacs_ratio"] <= 0.5 and rows["lookupvit"]["gmacs_ratio"] <= 0.5
    assert rows["baseline"]["gmacs_ratio"] == 1.0
    for r in rows.values():
        assert 0.0 <= r["top1"] <= 100.0 and os.path.isfile(r["checkpoint"])


def test_seeds_are_separate_runs_reported_as_mean_and_std(quick_demo):
    results = json.loads((quick_demo / "results.json").read_text())
    assert results["seeds"] == [0, 1]
    for r in results["rows"]:
        # seed 0 in the single-seed demo's folder, seed 1 beside it
        assert r["checkpoints"] == [str(quick_demo / "runs" / r["short"] / "last.safetensors"),
                                    str(quick_demo / "runs" / f"{r['short']}_seed1" / "last.safetensors")]
        a, b = r["top1_seeds"]
        assert r["top1"] == pytest.approx((a + b) / 2)
        assert r["top1_std"] == pytest.approx(abs(a - b) / 2 ** 0.5)
        cfg = json.loads((quick_demo / "runs" / f"{r['short']}_seed1" / "config.json").read_text())
        assert cfg["seed"] == 1
    report = (quick_demo / "report.md").read_text()
    assert "seeds 0, 1" in report and " ± " in report and "Top-1 of each seed" in report


def test_quick_demo_is_not_judged_and_counts_the_validation_images_it_used(quick_demo):
    report = (quick_demo / "report.md").read_text()
    assert "meets the aim" not in report and "misses the aim" not in report
    assert report.count("not judged (quick run") == 2
    results = json.loads((quick_demo / "results.json").read_text())
    used = results["rows"][0]["val_images"]
    assert used == 2 * 2 * demo.RECIPE["batch_size"] < results["val_images_total"] == 360  # 2 batches of 32
    assert f"Validation used {used} of the 360 images" in report


def test_demo_run_again_reuses_finished_runs(quick_demo, capsys):
    before = {p: os.path.getmtime(p) for p in quick_demo.glob("runs/*/last.safetensors")}
    assert len(before) == 6
    assert main(["demo", "--quick", "--seeds", "2", "--out", str(quick_demo), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 6
    assert {p: os.path.getmtime(p) for p in before} == before


def test_verdict_needs_a_trained_baseline():
    base = dict(top1=80.0, gmacs_ratio=1.0)
    assert demo._verdict(dict(top1=79.5, gmacs_ratio=0.45), base) == "meets the aim"
    assert demo._verdict(dict(top1=77.0, gmacs_ratio=0.45), base).startswith("misses the aim: 3.00 points")
    assert demo._verdict(dict(top1=80.0, gmacs_ratio=0.6), base).startswith("misses the aim: 0.60x")
    chance = dict(top1=9.38, gmacs_ratio=1.0)
    assert demo._verdict(dict(top1=7.81, gmacs_ratio=0.45), chance).startswith("not judged: the baseline is near chance")
    assert demo._verdict(dict(top1=79.5, gmacs_ratio=0.45), base, quick=True).startswith("not judged (quick run")


def test_mean_and_sample_std():
    assert demo._mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert demo._mean_std([5.0]) == (5.0, 0.0)


def test_interrupted_demo_says_how_to_continue_and_resumes(tmp_path, monkeypatch, capsys):
    # the trainer's stop (what SIGTERM / Ctrl-C trigger) at step 2 of the first model
    monkeypatch.setattr(demo, "QUICK", dict(demo.QUICK, debug_stop_at_step=2))
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert f"run `condensevit demo --out {tmp_path} --quick` again to continue" in err
    assert os.path.isfile(tmp_path / "runs" / "baseline" / "last.state.pth")
    monkeypatch.undo()
    # the trainer's own hint, --resume auto, works for the demo too
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress", "--resume", "auto"]) == 0
    assert "baseline (seed 0): resuming the interrupted run" in capsys.readouterr().out
    report = (tmp_path / "report.md").read_text()
    # the resumed run's train time includes its first session: the report says so, and what this run's minutes cover
    assert "counts the time before the interruption up to the checkpoint it resumed from (here: baseline)" in report
    assert "resumed runs' earlier sessions ran before it" in report
    rows = {r["short"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert rows["baseline"]["resumed"] and not rows["stvit"]["resumed"]


def test_report_counts_threads_in_words(quick_demo):
    import re
    report = (quick_demo / "report.md").read_text()
    n = int(re.search(r"fp32, (\d+) thread", report).group(1))
    assert f"fp32, {n} thread{'' if n == 1 else 's'} on " in report and "1 threads" not in report
    assert "This `demo` invocation:" in report
