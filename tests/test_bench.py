"""``condensevit bench``: alternating rounds, one process per model, inference and training modes."""
import json

import pytest

from condensevit.bench import _middle, bench_figure, run_bench
from condensevit.cli import main

# two widths of one family at a small input: the wide one has ~100x the parameters
SMALL = "deit_tiny_patch16_224[embed_dim=32,depth=1,num_heads=2]"
WIDE = "deit_tiny_patch16_224[embed_dim=384,depth=6,num_heads=6]"


def test_train_mode_reports_each_models_own_peak_memory(tmp_path, capsys):
    js = tmp_path / "t.json"
    assert main(["bench", "--mode", "train", "--models", f"{SMALL},{WIDE}", "--input-size", "3,32,32",
                 "--batch-size", "2", "--iters", "1", "--warmup", "1", "--rounds", "2", "--quiet",
                 "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "train img/s" in out and "forward + loss + backward" in out and "own process" in out
    data = json.loads(js.read_text())
    small, wide = data["rows"]
    assert data["environment"]["mode"] == "train" and "MiB" in data["environment"]["peak_memory"]
    assert wide["params"] > 50 * small["params"]
    # AdamW training holds weights, gradients and two moments: at least 16 bytes a parameter
    assert wide["peak_memory_mb"] > 16 * wide["params"] / 2**20
    # each model's own peak, not the process's: the small model's is far below the wide one's
    assert small["peak_memory_mb"] < wide["peak_memory_mb"] / 2
    assert wide["memory_ratio"] == pytest.approx(wide["peak_memory_mb"] / small["peak_memory_mb"])
    assert all(r["latency_ms"] != r["latency_ms"] for r in data["rows"])  # no latency in train mode
    assert len(small["rounds"]) == 2
    assert wide["round_speedups"] == pytest.approx([w / s for w, s in zip(wide["rounds"], small["rounds"])])
    assert wide["speedup_paired"] == pytest.approx(sum(wide["round_speedups"]) / 2)


def test_inference_mode_peak_memory_holds_the_weights():
    res = run_bench([SMALL, WIDE], input_size=(3, 32, 32), batch_size=2, iters=1, warmup=0, rounds=1,
                    progress=False)
    small, wide = res["rows"]
    assert wide["peak_memory_mb"] > 4 * wide["params"] / 2**20 > small["peak_memory_mb"]
    assert wide["latency_ms"] > 0 and res["environment"]["mode"] == "inference"


def test_plot_starts_at_zero_and_marks_the_baseline():
    rows = [dict(model="base", gmacs=2.0, images_per_s=100.0, speedup=1.0),
            dict(model="fast", gmacs=1.0, images_per_s=180.0, speedup=1.8)]
    fig = bench_figure(dict(environment=dict(device="cpu", batch_size=8, mode="train"), rows=rows))
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0 and ax.get_xlim()[0] == 0
    assert any("baseline: base" in t.get_text() for t in ax.get_legend().get_texts())
    assert any(list(line.get_ydata()) == [100.0, 100.0] for line in ax.get_lines())  # dashed baseline level
    assert "training" in ax.get_ylabel()


def test_median_of_rounds():
    assert _middle([3.0, 1.0, 2.0]) == 2.0
    assert _middle([1.0, 4.0, 2.0, 3.0]) == 2.5


def test_model_process_failure_is_one_clear_line(capsys):
    # a model that builds but cannot take the input comes back from its process as a usage error
    assert main(["bench", "--mode", "train", "--models", "deit_tiny_patch16_224", "--input-size", "3,30,30",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot take input size" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_mode_is_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--mode", "fly", "--models", "deit_tiny_patch16_224"])
    assert e.value.code == 2


def test_in_process_mode_measures_speed_but_not_memory(capsys):
    assert main(["bench", "--models", f"{SMALL},{SMALL}", "--input-size", "3,32,32", "--batch-size", "2",
                 "--iters", "1", "--warmup", "0", "--rounds", "1", "--quiet", "--in-process"]) == 0
    out = capsys.readouterr().out
    assert "peak mem: not measured" in out
    row = out.splitlines()[3].split()
    assert row[-2:] == ["-", "-"] and float(row[3]) > 0
