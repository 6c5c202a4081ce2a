"""benchmarks/gpu.sh: fails fast without a GPU, and every step runs at tiny size with --dry-run."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu.sh")


def _gpu_module():
    spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(ROOT, "benchmarks", "gpu.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=os.path.join(ROOT, "src"))
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_a_gpu_it_stops_at_once_with_a_clear_message(tmp_path):
    proc = _run("--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "no CUDA GPU visible" in proc.stderr and "--dry-run" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()  # nothing started


def test_unknown_step_is_a_clear_error(tmp_path):
    assert _gpu_module().main(["--dry-run", "--steps", "inference,fly", "--out", str(tmp_path)]) == 2


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_json_and_markdown(tmp_path, capsys):
    gpu = _gpu_module()
    assert gpu.main(["--dry-run", "--out", str(tmp_path), "--quiet"]) == 0
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["dry_run"] and set(result["step_wall_s"]) == set(gpu.STEPS)
    groups = {key: models for key, _, models, _ in gpu.GROUPS}
    for step in ("inference", "compile", "train"):
        assert [g["key"] for g in result[step]] == list(groups)
        for g in result[step]:
            assert len(g["rows"]) == len(groups[g["key"]]) and g["rows"][0]["speedup"] == pytest.approx(1.0)
            assert all(r["images_per_s"] > 0 for r in g["rows"])
            env = g["environment"]
            assert env["amp"] and env["amp_dtype"] == "bfloat16"
            assert env["mode"] == ("train" if step == "train" else "inference")
            assert env["compile"] == ("eager" if step == "compile" else False)
    # batch-1 latency in the inference runs
    assert all(r["latency_ms"] > 0 for g in result["inference"] for r in g["rows"])
    assert [r["short"] for r in result["demo"]] == ["baseline", "stvit", "lookupvit"]
    md = (tmp_path / "gpu.md").read_text()
    assert "DRY RUN" in md and "lookupvit_base_patch16_224 (7x7)" in md and "One epoch of AMP training" in md
    assert md.count("\n| ") >= 11 + 3  # a row per model of every group, and per demo model


def test_a_failed_group_is_reported_not_fatal_in_the_table():
    gpu = _gpu_module()
    env = dict(device="cuda", gpu="H", torch="2", timm="1")
    result = dict(dry_run=False, date="d", wall_s=60.0, environment=env, step_wall_s={"compile": 60.0},
                  compile=[dict(key="stvit_r_swin_small", title="STViT-R-S vs Swin-S", wall_s=1.0,
                                error="RuntimeError: inductor failed")],
                  demo=[dict(short="stvit", title="STViT", model="m", error="out of memory")])
    md = gpu.markdown(result)
    assert "compile: STViT-R-S vs Swin-S: failed: RuntimeError: inductor failed" in md
    assert "| STViT | failed: out of memory |" in md
