"""Training and evaluation: outputs, exact resumption, SIGTERM, divergence, distillation, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from condensevit.cli import main
from condensevit.train import TrainConfig, evaluate_checkpoint, train
from condensevit.train.checkpoint import (STATE_NAME, WEIGHTS_NAME, atomic_write, load_checkpoint,
                                          load_weights_file, weights_hash)
from condensevit.train.distill import DistillationLoss

TINY_KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
TINY = ["--model", "deit_tiny_patch16_224", "--model-kwargs", *[f"{k}={v}" for k, v in TINY_KW.items()]]
FAST = ["--batch-size", "8", "--limit-val-batches", "1", "--no-measure", "--quiet", "--no-progress"]


def run(out, *extra, epochs=1, steps=3):
    return main(["train", *TINY, *FAST, "--epochs", str(epochs), "--max-steps-per-epoch", str(steps),
                 "--output", str(out), *extra])


def file_hash(path):
    return weights_hash(load_weights_file(path)[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run through the Python API, shared by the tests that need a checkpoint."""
    out = tmp_path_factory.mktemp("trained")
    result = train(TrainConfig(model="deit_tiny_patch16_224", model_kwargs=dict(TINY_KW), output=str(out),
                               epochs=2, batch_size=8, max_steps_per_epoch=3, limit_val_batches=2,
                               throughput_batch_size=4, progress=False, verbose=False))
    return out, result


def test_train_api_returns_accuracy_cost_and_checkpoint_and_writes_its_outputs(trained):
    out, r = trained
    assert r.epochs_done == 2 and not r.interrupted
    assert 0 <= r.final_top1 <= 100 and r.best_top1 >= r.final_top1
    assert r.gmacs > 0 and r.images_per_s > 0 and r.params > 0
    assert r.checkpoint == str(out / WEIGHTS_NAME) and os.path.isfile(r.checkpoint)
    assert os.path.isfile(r.best_checkpoint)
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [row["epoch"] for row in log] == [1, 2]
    assert {"train_loss", "val_loss", "val_top1", "val_top5", "lr"} <= set(log[0])
    summary = json.load(open(out / "summary.json"))
    assert summary["final_top1"] == r.final_top1 and summary["gmacs"] == r.gmacs
    assert summary["model_kwargs"] == TINY_KW
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    _, meta = load_weights_file(r.checkpoint)
    assert meta["model"] == "deit_tiny_patch16_224" and meta["num_classes"] == 10 and meta["global_step"] == 6


def test_eval_reports_the_same_accuracy_as_training(trained, capsys):
    out, r = trained
    assert main(["eval", "--checkpoint", str(out / WEIGHTS_NAME), "--data", "digits", "--batch-size", "16",
                 "--limit-batches", "2", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["top1"] == pytest.approx(r.final_top1) and stats["loss"] == pytest.approx(r.final_loss, rel=1e-5)
    assert stats["model"] == "deit_tiny_patch16_224" and 0 <= stats["top5"] <= 100


def test_eval_builds_the_checkpoint_with_other_kwargs_when_the_weights_fit(trained):
    out, _ = trained
    # another image size: the model family's checkpoint filter resizes the position embedding
    stats = evaluate_checkpoint(str(out / WEIGHTS_NAME), "digits", model_kwargs=dict(img_size=48), limit_batches=1)
    assert stats["input_size"] == [3, 48, 48] and stats["images"] > 0


def test_eval_with_kwargs_the_weights_cannot_fit_is_a_clear_error(trained, capsys):
    out, _ = trained
    assert main(["eval", "--checkpoint", str(out / WEIGHTS_NAME), "--model-kwargs", "embed_dim=48"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "mismatched" in err and "model kwargs" in err


def test_a_checkpoint_whose_classes_do_not_match_the_data_names_both_counts(trained, tmp_path, capsys):
    out, _ = trained
    for split in ("train", "val"):
        for c in ("a", "b", "c"):
            os.makedirs(tmp_path / "d" / split / c)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "d" / split / c / "0.png")
    assert main(["eval", "--checkpoint", str(out / WEIGHTS_NAME), "--data", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "trained for 10 classes but the data" in err and "has 3" in err


def test_interrupted_then_resumed_run_ends_with_the_same_weights(tmp_path):
    # dropout, mixup/cutmix, RandAugment and EMA all draw random numbers: all must be restored
    extra = ["--mixup", "0.8", "--cutmix", "1.0", "--model-ema", "--model-kwargs",
             *[f"{k}={v}" for k, v in TINY_KW.items()], "drop_rate=0.1", "drop_path_rate=0.1"]
    assert run(tmp_path / "full", *extra, epochs=2, steps=4) == 0
    # stopped mid-epoch (step 3 of 4 in epoch 1), then resumed
    assert run(tmp_path / "split", *extra, "--debug-stop-at-step", "3", epochs=2, steps=4) == 0
    _, state, _ = load_checkpoint(str(tmp_path / "split" / STATE_NAME))
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 3, 3)
    assert run(tmp_path / "split", *extra, "--resume", "auto", epochs=2, steps=4) == 0
    full, split = tmp_path / "full", tmp_path / "split"
    assert file_hash(full / WEIGHTS_NAME) == file_hash(split / WEIGHTS_NAME)
    ema_full = load_checkpoint(str(full / STATE_NAME))[1]["ema"]
    ema_split = load_checkpoint(str(split / STATE_NAME))[1]["ema"]
    assert weights_hash(ema_full) == weights_hash(ema_split)
    assert open(full / "log.jsonl").read().count("\n") == open(split / "log.jsonl").read().count("\n") == 2
    rows = [json.loads(x) for x in open(split / "log.jsonl")]
    assert [r["val_loss"] for r in rows] == [json.loads(x)["val_loss"] for x in open(full / "log.jsonl")]


def test_a_new_run_into_a_used_output_folder_asks_for_resume(trained, capsys):
    out, _ = trained
    assert run(out) == 2
    assert "--resume auto" in capsys.readouterr().err


def test_sigterm_saves_a_resumable_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "condensevit.cli", "train", *TINY, *FAST, "--epochs", "1000",
           "--max-steps-per-epoch", "2", "--output", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CONDENSEVIT_TEST_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while not (out / STATE_NAME).exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "continue with --resume auto" in stderr
    weights, state, meta = load_checkpoint(str(out / STATE_NAME))
    assert state["global_step"] >= 2 and meta["global_step"] == state["global_step"]
    assert all(torch.isfinite(v).all() for v in weights.values())
    # resumable: finish the epoch it was in
    stopped_epoch = state["epoch"] + (1 if state["step_in_epoch"] else 0)
    assert run(out, "--resume", "auto", epochs=max(stopped_epoch, 1), steps=2) == 0
    assert load_checkpoint(str(out / STATE_NAME))[1]["epoch"] == max(stopped_epoch, 1)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, epochs=1, steps=3) == 0
    good = (out / WEIGHTS_NAME).read_bytes(), (out / STATE_NAME).read_bytes()
    assert run(out, "--resume", "auto", "--debug-nan-at-step", "5", epochs=3, steps=3) == 1
    err = capsys.readouterr().err
    assert "the training loss became nan in epoch 2" in err and "last good checkpoint" in err
    assert (out / WEIGHTS_NAME).read_bytes() == good[0] and (out / STATE_NAME).read_bytes() == good[1]
    weights, state, _ = load_checkpoint(str(out / STATE_NAME))
    assert state["global_step"] == 3 and all(torch.isfinite(v).all() for v in weights.values())


def test_atomic_write_leaves_the_old_file_whole_when_writing_fails(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(str(path), lambda f: f.write(b"old"))

    def failing(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(str(path), failing)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_pretrained_file_initialises_through_the_checkpoint_filter(trained, tmp_path, capsys):
    out, _ = trained
    # a different image size: the position embedding is resized by timm's filter
    assert run(tmp_path / "ft", "--pretrained-file", str(out / WEIGHTS_NAME), "--model-kwargs",
               "img_size=48", "patch_size=8", "embed_dim=32", "depth=2", "num_heads=2", steps=1) == 0
    assert run(tmp_path / "bad", "--pretrained-file", str(out / WEIGHTS_NAME), "--model-kwargs",
               "img_size=32", "patch_size=8", "embed_dim=48", "depth=2", "num_heads=2", steps=1) == 2
    assert "pretrained file" in capsys.readouterr().err
    (tmp_path / "empty.pth").write_bytes(b"")
    assert run(tmp_path / "bad2", "--pretrained-file", str(tmp_path / "empty.pth"), steps=1) == 2
    assert "is empty" in capsys.readouterr().err


def test_distillation_from_a_teacher_checkpoint_trains(trained, tmp_path):
    out, _ = trained
    for kind in ("soft", "hard"):
        assert run(tmp_path / kind, "--teacher", "deit_tiny_patch16_224", "--teacher-checkpoint",
                   str(out / WEIGHTS_NAME), "--distillation-type", kind, steps=2) == 0


def test_distillation_loss_mixes_base_and_teacher_terms_as_deit_does():
    torch.manual_seed(0)
    teacher = torch.nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    out = torch.randn(5, 3)
    base = torch.nn.CrossEntropyLoss()
    t_logits = teacher(x).detach()
    hard = DistillationLoss(base, teacher, "hard", alpha=0.5)(x, out, y).item()
    expected = 0.5 * base(out, y) + 0.5 * torch.nn.functional.cross_entropy(out, t_logits.argmax(1))
    assert hard == pytest.approx(expected.item())
    soft = DistillationLoss(base, teacher, "soft", alpha=1.0, tau=2.0)(x, out, y).item()
    p_t = (t_logits / 2).softmax(1)
    kl = (p_t * (p_t.log() - (out / 2).log_softmax(1))).sum() * 4 / out.numel()
    assert soft == pytest.approx(kl.item(), rel=1e-5)
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillationLoss(base, None, "soft")


def test_unknown_model_and_bad_kwargs_are_clear_errors(tmp_path, capsys):
    assert main(["train", "--model", "deit_tiny_patch16_2244", "--output", str(tmp_path / "a")]) == 2
    assert "unknown model 'deit_tiny_patch16_2244'; did you mean" in capsys.readouterr().err
    assert main(["train", "--model", "deit_tiny_patch16_224", "--model-kwargs", "{bad", "--output",
                 str(tmp_path / "b")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("model,trained_kw,eval_kw", [
    ("lookupvit_tiny_patch16_224", dict(compressed_grid=(3, 3)), dict(compressed_grid=(2, 2))),
    ("stvit_deit_tiny_patch16_224", dict(stgm_start=1, num_semantic_tokens=4), dict(num_semantic_tokens=1)),
])
def test_eval_runs_a_checkpoint_at_another_grid_or_token_count(tmp_path, model, trained_kw, eval_kw):
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
    r = train(TrainConfig(model=model, model_kwargs=dict(kw, **trained_kw), output=str(tmp_path), epochs=1,
                          batch_size=8, max_steps_per_epoch=2, limit_val_batches=1, measure=False, progress=False,
                          verbose=False))
    same = evaluate_checkpoint(r.checkpoint, "digits", limit_batches=1)
    other = evaluate_checkpoint(r.checkpoint, "digits", model_kwargs=eval_kw, limit_batches=1)
    assert 0 <= other["top1"] <= 100 and other["input_size"] == same["input_size"] == [3, 32, 32]
    assert other["model_kwargs"] == dict(kw, **{**trained_kw, **eval_kw}) and other["images"] == same["images"]
