"""Two CPU processes under torchrun (gloo): the same weights on both ranks, one set of outputs."""
import json
import os
import re
import subprocess
import sys

from condensevit.train.checkpoint import WEIGHTS_NAME, load_weights_file, weights_hash


def test_torchrun_two_cpu_processes_keep_the_same_weights_and_write_once(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "condensevit.cli", "train", "--model", "deit_tiny_patch16_224", "--model-kwargs", "img_size=32",
           "patch_size=8", "embed_dim=32", "depth=2", "num_heads=2", "drop_rate=0.1", "--data", "digits",
           "--epochs", "2", "--max-steps-per-epoch", "3", "--batch-size", "8", "--eval-batch-size", "64",
           "--mixup", "0.8", "--no-measure", "--no-progress", "--device", "cpu", "--output", str(out),
           "--debug-weights-hash"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hashes = dict(re.findall(r"weights-sha256 rank=(\d) ([0-9a-f]{64})", proc.stdout))
    assert set(hashes) == {"0", "1"}, proc.stdout
    assert hashes["0"] == hashes["1"]
    assert weights_hash(load_weights_file(str(out / WEIGHTS_NAME))[0]) == hashes["0"]
    # one set of outputs: one log line per epoch, one summary, no temporary files
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["val_images"] == 360 for r in rows)  # both shards of the val set, counted once
    assert rows[-1]["step"] == 6
    assert proc.stdout.count("epoch 2/2") == 1 and proc.stdout.count("done:") == 1
    summary = json.load(open(out / "summary.json"))
    assert summary["world_size"] == 2
    assert sorted(f for f in os.listdir(out) if not f.startswith("tensorboard")) == [
        "best.safetensors", "config.json", "config.yaml", "last.safetensors", "last.state.pth", "log.jsonl",
        "summary.json"]
