"""condensevit.measure: GMACs calibrated against timm's published figures, and exact on known ops."""
import json

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from condensevit.cli import main
from condensevit.measure import as_input_shape, count_params, gmacs, throughput


@pytest.mark.parametrize("name,published", [
    ("deit_tiny_patch16_224", 1.26),
    ("deit_small_patch16_224", 4.61),
    ("vit_base_patch16_224", 17.58),
    ("swin_small_patch4_window7_224", 8.77),
])
def test_gmacs_match_timm_published_figures_within_1pct(name, published):
    model = timm.create_model(name)
    assert gmacs(model) == pytest.approx(published, rel=0.01)


class _Cross(nn.Module):
    """Fused cross-attention with query and key lengths that differ, as the condensing models use."""

    def __init__(self, heads=4, lq=5, lk=49, d=8):
        super().__init__()
        self.heads, self.lq, self.lk, self.d = heads, lq, lk, d

    def forward(self, x):
        b = x.shape[0]
        q = x.new_ones(b, self.heads, self.lq, self.d)
        k = x.new_ones(b, self.heads, self.lk, self.d)
        return F.scaled_dot_product_attention(q, k, k)


def test_fused_attention_is_counted_exactly_with_different_query_and_key_lengths():
    m = _Cross(heads=4, lq=5, lk=49, d=8)
    # q k^T and attn v: 2 * heads * Lq * Lk * d multiply-adds
    assert gmacs(m, (3, 4, 4)) * 1e9 == pytest.approx(2 * 4 * 5 * 49 * 8)


def test_counts_multiply_adds_not_flops_for_conv_linear_and_video():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert gmacs(conv, (3, 10, 12)) * 1e9 == pytest.approx(8 * 3 * 9 * 10 * 12)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    assert gmacs(lin, (3, 4, 4)) * 1e9 == pytest.approx(48 * 10)
    conv3d = nn.Conv3d(3, 4, (2, 4, 4), stride=(2, 4, 4), bias=False)
    assert gmacs(conv3d, (3, 8, 16, 16)) * 1e9 == pytest.approx(4 * 3 * 32 * (4 * 4 * 4))


def test_einsum_is_counted():
    class E(nn.Module):
        def forward(self, x):
            a = x.flatten(1)[:, :6].reshape(-1, 2, 3)
            return torch.einsum("bij,bjk->bik", a, a.transpose(1, 2))
    assert gmacs(E(), (3, 4, 4)) * 1e9 == pytest.approx(2 * 3 * 2)


def test_input_shapes():
    assert as_input_shape(224) == (3, 224, 224)
    assert as_input_shape((3, 16, 224, 224)) == (3, 16, 224, 224)
    with pytest.raises(ValueError, match="C, H, W"):
        as_input_shape((224, 224))


def test_count_params_and_trainable_only():
    m = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2))
    assert count_params(m) == 4 * 5 + 5 + 5 * 2 + 2
    m[0].requires_grad_(False)
    assert count_params(m, trainable_only=True) == 12


def test_throughput_reports_rate_latency_and_memory():
    m = nn.Sequential(nn.Conv2d(3, 4, 4, 4), nn.Flatten(), nn.LazyLinear(3))
    m(torch.zeros(1, 3, 16, 16))
    r = throughput(m, (3, 16, 16), batch_size=4, warmup=1, iters=2, latency_iters=3)
    assert r.images_per_s > 0 and r.latency_ms > 0 and r.peak_memory_mb > 10
    assert r.batch_size == 4 and r.device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_throughput_on_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        throughput(nn.Identity(), (3, 8, 8), device="cuda")


# ---- condensevit bench / models ------------------------------------------------------------------

def test_bench_writes_table_json_and_plot(tmp_path, capsys):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = main(["bench", "--models", "deit_tiny_patch16_224,deit_tiny_patch16_224[depth=6]",
               "--input-size", "3,32,32", "--batch-size", "2", "--iters", "1", "--warmup", "1",
               "--rounds", "2", "--quiet", "--json", str(js), "--plot", str(png)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "deit_tiny_patch16_224[depth=6]" in out and "speed-up" in out and "torch" in out
    data = json.loads(js.read_text())
    rows = data["rows"]
    assert [r["model"] for r in rows] == ["deit_tiny_patch16_224", "deit_tiny_patch16_224[depth=6]"]
    assert rows[0]["speedup"] == pytest.approx(1.0)
    # half the blocks: clearly fewer GMACs, same width
    assert 0.4 < rows[1]["gmacs_ratio"] < 0.6
    assert rows[1]["params"] < rows[0]["params"]
    assert data["environment"]["batch_size"] == 2 and "torch" in data["environment"]
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("args,message", [
    (["--models", "deit_smal_patch16_224"], "did you mean deit_small_patch16_224"),
    (["--models", "deit_tiny_patch16_224", "--input-size", "3,30,30"], "cannot take input size"),
    (["--models", "deit_tiny_patch16_224[nonsense]"], "key=value"),
])
def test_bench_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert main(["bench", *args, "--quiet", "--iters", "1"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bench_cuda_without_gpu_is_exit_2(capsys):
    assert main(["bench", "--models", "deit_tiny_patch16_224", "--device", "cuda", "--quiet"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_models_lists_the_library_models(capsys):
    import condensevit
    names = condensevit.list_models()
    if not names:
        pytest.skip("no model family registered yet")
    assert main(["models", names[0], "--no-gmacs", "--quiet"]) == 0
    assert names[0] in capsys.readouterr().out
    assert main(["models", "no_such_model*", "--quiet"]) == 2


def test_train_throughput_runs_forward_backward_and_optimizer_steps():
    from condensevit.measure import train_throughput
    m = timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                          num_classes=5)
    before = m.head.weight.detach().clone()
    r = train_throughput(m, (3, 16, 16), batch_size=4, warmup=1, iters=2)
    assert r.mode == "train" and r.images_per_s > 0 and r.latency_ms != r.latency_ms  # NaN: no latency
    assert m.training and not torch.equal(before, m.head.weight)  # the optimizer stepped
    # a model without classifier (num_classes=0) still trains through a stand-in loss
    m0 = timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                           num_classes=0)
    assert train_throughput(m0, (3, 16, 16), batch_size=2, warmup=0, iters=1).images_per_s > 0


def test_own_peak_memory_counts_what_the_model_adds():
    # OwnPeakMemory measures a model in its own fresh process (bench runs one process per model):
    # in a test worker that has run other tests, freed heap pages kept by the allocator would absorb
    # the new tensors and the reading would depend on test order. So: a fresh interpreter.
    import subprocess
    import sys
    code = """
import time, torch
from condensevit.measure import OwnPeakMemory
mem = OwnPeakMemory("cpu")
w = torch.ones(64, 2**18)  # 64 MiB of float32, "the weights"
mem.start()
with mem.track():
    tmp = w * 2  # another 64 MiB at the peak, "the activations", held a while as a step holds them
    time.sleep(0.1)
    del tmp
print(mem.peak_bytes() / 2**20)
print(mem.method)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    peak = float(out[0])
    assert 120 < peak < 200, peak
    assert "own process" in out[1]
