"""The README's main job, ``condensevit demo``, end to end in its quick form."""
import json
import os

import pytest
from PIL import Image

from condensevit.cli import main
from condensevit.demo import DEMO_MODELS, _spec


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
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


def test_demo_run_again_reuses_finished_runs(quick_demo, capsys):
    before = {p: os.path.getmtime(p) for p in quick_demo.glob("runs/*/last.safetensors")}
    assert len(before) == 3
    assert main(["demo", "--quick", "--out", str(quick_demo), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 3
    assert {p: os.path.getmtime(p) for p in before} == before


def test_demo_models_are_bench_specs_that_parse_back():
    from condensevit.bench import parse_model_spec
    for _, _, name, kwargs in DEMO_MODELS:
        parsed_name, parsed, _ = parse_model_spec(_spec(name, kwargs))
        assert parsed_name == name and parsed == {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def test_demo_bad_epochs_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--epochs", "0", "--out", str(tmp_path)]) == 2
    assert "--epochs 0 must be at least 1" in capsys.readouterr().err
