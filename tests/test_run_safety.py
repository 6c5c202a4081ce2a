"""Runs that never lose work: the checkpoint pair survives a kill between its two writes and a full
disk, one training per folder (a lock), Ctrl-C saves like SIGTERM, a finished run is left alone,
files get the user's umask."""
import errno
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from condensevit.cli import main
from condensevit.train import checkpoint as ckpt
from condensevit.train.checkpoint import (PREV_STATE_NAME, PREV_WEIGHTS_NAME, STATE_NAME, WEIGHTS_NAME,
                                          load_checkpoint, load_weights_file, newest_pair, weights_hash)
from condensevit.train.run_lock import LOCK_NAME

TINY = ["--model", "deit_tiny_patch16_224", "--model-kwargs", "img_size=32", "patch_size=8", "embed_dim=32",
        "depth=2", "num_heads=2", "drop_rate=0.1"]
FAST = ["--batch-size", "8", "--limit-val-batches", "1", "--no-measure", "--quiet", "--no-progress"]


def run(out, *extra, epochs=2, steps=2):
    return main(["train", *TINY, *FAST, "--epochs", str(epochs), "--max-steps-per-epoch", str(steps),
                 "--output", str(out), *extra])


def weights_of(path):
    return weights_hash(load_weights_file(str(path))[0])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-epoch run (2 steps each)."""
    out = tmp_path_factory.mktemp("reference")
    assert run(out) == 0
    return out


def _kill_at_state_publication(monkeypatch, which: int):
    """Simulate a kill right after the ``which``-th checkpoint's weights are published, before its state."""
    real = ckpt._publish
    seen = {"state": 0}

    def publish(tmp, path):
        if path.endswith(STATE_NAME):
            seen["state"] += 1
            if seen["state"] == which:
                raise KeyboardInterrupt  # the process dies here: nothing after this runs
        real(tmp, path)

    monkeypatch.setattr(ckpt, "_publish", publish)


# ------------------------------------------------------------------------------ 12.1 the pair

def test_a_kill_between_the_two_writes_keeps_a_complete_pair_and_resume_takes_it(reference, tmp_path, monkeypatch,
                                                                                 capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _kill_at_state_publication(m, which=2)  # the end of epoch 2
        assert run(out) == 130
    # the new weights (step 4) are published, the state is not: the previous pair (step 2) is kept
    assert load_weights_file(str(out / WEIGHTS_NAME))[1]["global_step"] == 4
    assert (out / PREV_WEIGHTS_NAME).exists() and (out / PREV_STATE_NAME).exists()
    state_path, weights_path, step = newest_pair(str(out))
    assert step == 2
    _, state, meta = load_checkpoint(str(out / STATE_NAME))  # the state of step 2 finds its weights
    assert state["global_step"] == meta["global_step"] == 2
    # killed the same way again after resuming from the kept pair: still a complete pair
    with monkeypatch.context() as m:
        _kill_at_state_publication(m, which=1)
        assert run(out, "--resume", "auto") == 130
    assert newest_pair(str(out))[2] == 2
    capsys.readouterr()
    assert run(out, "--resume", "auto") == 0
    assert "resumed" not in capsys.readouterr().err  # --quiet
    assert weights_of(out / WEIGHTS_NAME) == weights_of(reference / WEIGHTS_NAME)
    assert not (out / PREV_WEIGHTS_NAME).exists() and not (out / PREV_STATE_NAME).exists()
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_a_full_disk_is_one_line_naming_the_folder_and_the_space_and_keeps_the_last_pair(reference, tmp_path,
                                                                                      monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def full_disk_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint's training state: the disk fills up mid-write
            f.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(ckpt.torch, "save", full_disk_save)
        assert run(out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"no space left in {out} to write the checkpoint: it needs about" in err
    assert re.search(r"needs about \d+\.\d MB, \d+\.\d [MG]B free; free some space or pass another --output", err)
    assert "the last complete checkpoint (step 2) is kept" in err
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert newest_pair(str(out))[2] == 2 and not (out / PREV_STATE_NAME).exists()
    assert not (out / LOCK_NAME).exists()
    # the log keeps only the epochs of the kept checkpoint, and the run goes on from it
    assert run(out, "--resume", "auto") == 0
    assert [json.loads(x)["epoch"] for x in open(out / "log.jsonl")] == [1, 2]
    assert weights_of(out / WEIGHTS_NAME) == weights_of(reference / WEIGHTS_NAME)


def test_too_little_free_space_is_found_before_anything_is_written(tmp_path, monkeypatch, capsys):
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 50_000, 50_000))
    assert run(tmp_path / "run", epochs=1, steps=1) == 2
    err = capsys.readouterr().err
    assert "no space left in" in err and "0.0 MB free" in err
    assert not (tmp_path / "run" / WEIGHTS_NAME).exists() and not (tmp_path / "run" / STATE_NAME).exists()


# ------------------------------------------------------------------------------ 12.2 the lock

def _hold_lock(folder):
    code = ("import sys, time; from condensevit.train.run_lock import RunLock; RunLock.acquire(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_training_into_a_folder_in_use_fails_at_once_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = _hold_lock(out)
    try:
        t0 = time.perf_counter()
        for extra in ((), ("--resume", "auto")):
            assert run(out, *extra, epochs=1, steps=1) == 2
            err = capsys.readouterr().err
            assert f"{out} is in use by process {holder.pid}" in err and "another --output" in err
        assert time.perf_counter() - t0 < 30  # at once: no data read, no model built
        assert os.listdir(out) == [LOCK_NAME]
    finally:
        holder.kill()  # SIGKILL: the lock file stays, naming a dead process
        holder.wait()
    assert json.load(open(out / LOCK_NAME))["pid"] == holder.pid
    assert run(out, epochs=1, steps=1) == 0
    err = capsys.readouterr().err
    assert f"was locked by process {holder.pid}" in err and "no longer running" in err and "taking the lock over" in err
    assert not (out / LOCK_NAME).exists()


# ------------------------------------------------------------------------------ 12.4 Ctrl-C

def test_ctrl_c_saves_a_resumable_checkpoint_and_prints_the_hint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "condensevit.cli", "train", *TINY, *FAST, "--epochs", "1000",
           "--max-steps-per-epoch", "2", "--workers", "2", "--output", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CONDENSEVIT_TEST_THREADS="1")
    # its own process group, as a shell's job: Ctrl-C reaches the trainer and its data workers
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / STATE_NAME).exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "stopped by Ctrl-C (SIGINT)" in stderr and "continue with --resume auto" in stderr
    assert "Traceback" not in stderr
    weights, state, meta = load_checkpoint(str(out / STATE_NAME))
    assert meta["global_step"] == state["global_step"] >= 2
    assert not (out / LOCK_NAME).exists()


# ------------------------------------------------------------------------------ 12.5 finished

def test_resume_auto_on_a_finished_run_says_so_and_changes_nothing(reference, capsys):
    def snapshot():
        return {f: (os.stat(reference / f).st_mtime_ns, (reference / f).read_bytes())
                for f in sorted(os.listdir(reference)) if os.path.isfile(reference / f)}

    before = snapshot()
    capsys.readouterr()
    assert run(reference, "--resume", "auto") == 0
    err = capsys.readouterr().err
    assert f"{reference} has already finished its 2 epochs" in err and "nothing changed" in err
    assert "--epochs above 2" in err
    assert snapshot() == before
    # the API returns the run's summary
    from condensevit.train import TrainConfig, train
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, drop_rate=0.1)
    r = train(TrainConfig(model="deit_tiny_patch16_224", model_kwargs=kw, output=str(reference), epochs=2,
                          batch_size=8, resume="auto", verbose=False, progress=False))
    summary = json.load(open(reference / "summary.json"))
    assert r.final_top1 == summary["final_top1"] and r.epochs_done == 2 and len(r.history) == 2
    assert snapshot() == before


# ------------------------------------------------------------------------------ 12.15 umask

def test_run_files_are_created_with_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        assert run(tmp_path / "run", "--model-ema", epochs=1, steps=1) == 0
    finally:
        os.umask(old)
    out = tmp_path / "run"
    names = ["last.safetensors", "last.state.pth", "best.safetensors", "ema.safetensors", "config.json",
             "summary.json", "log.jsonl"]
    modes = {n: stat.S_IMODE(os.stat(out / n).st_mode) for n in names}
    assert modes == {n: 0o640 for n in names}


def test_a_run_that_fails_before_writing_leaves_no_folder_and_no_lock(tmp_path, capsys):
    assert run(tmp_path / "a" / "b" / "run", "--data", str(tmp_path / "missing"), epochs=1, steps=1) == 2
    assert "dataset folder not found" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
