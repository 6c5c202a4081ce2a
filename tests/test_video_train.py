"""Video recognition through the command line: `condensevit train / eval / viz` on clips, as on images.

Tiny video models (4 frames of 32x32 or 16x16, 8x8 patches, width 32, depth 2) on the embedded
moving digits and on folders of tiny PNG frames; one training run is shared by the tests that need
a checkpoint."""
from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from condensevit.cli import main
from condensevit.train.checkpoint import WEIGHTS_NAME, load_model_for_inference, load_weights_file
from condensevit.viz import figure_size, token_maps

STVIT_KW = dict(img_size=32, num_frames=4, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                semantic_grid="1x2x2", stgm_start=0)
STVIT = ["--model", "stvit_video_tiny_patch2x16_224", "--model-kwargs", *[f"{k}={v}" for k, v in STVIT_KW.items()]]
LOOKUP_KW = ["img_size=16", "num_frames=4", "patch_size=8", "embed_dim=32", "depth=2", "num_heads=2",
             "compressed_grid=1x1x1"]
FAST = ["--epochs", "1", "--limit-val-batches", "1", "--no-measure", "--quiet", "--no-progress"]


def write_clip_tree(root, classes=("a", "b"), clips=2, frames=4, size=16):
    """root/{train,val}/<class>/clip<j>/<k>.png: tiny frame folders whose brightness tells the class."""
    for split in ("train", "val"):
        for ci, c in enumerate(classes):
            for j in range(clips):
                folder = root / split / c / f"clip{j}"
                os.makedirs(folder)
                for k in range(frames):
                    Image.new("RGB", (size, size), (40 + 120 * ci + 10 * k,) * 3).save(folder / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def video_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("video_run")
    rc = main(["train", *STVIT, "--data", "moving_digits", *FAST, "--batch-size", "8", "--max-steps-per-epoch", "2",
               "--output", str(out)])
    assert rc == 0
    return out


# ------------------------------------------------------------------------------------- train

def test_a_video_model_trains_on_moving_digits_and_writes_its_outputs(video_run):
    summary = json.load(open(video_run / "summary.json"))
    assert summary["data"] == "moving_digits" and summary["num_classes"] == 10
    assert summary["input_size"] == [3, 4, 32, 32]
    assert summary["epochs_done"] == 1 and 0 <= summary["final_top1"] <= 100
    state_dict, meta = load_weights_file(str(video_run / WEIGHTS_NAME))
    assert meta["model"] == "stvit_video_tiny_patch2x16_224" and meta["input_size"] == [3, 4, 32, 32]
    assert meta["global_step"] == 2 and all(torch.isfinite(v).all() for v in state_dict.values())
    assert os.path.isfile(video_run / "best.safetensors")


def test_eval_of_a_video_checkpoint_matches_training(video_run, capsys):
    # the training run's validation: its first batch of 2 x 8 clips
    assert main(["eval", "--checkpoint", str(video_run / WEIGHTS_NAME), "--data", "moving_digits",
                 "--batch-size", "16", "--limit-batches", "1", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    summary = json.load(open(video_run / "summary.json"))
    assert 0 <= stats["top1"] <= 100 and stats["images"] == 16
    assert stats["top1"] == pytest.approx(summary["final_top1"])
    assert stats["input_size"] == [3, 4, 32, 32]


def test_a_folder_of_frame_folders_trains_with_mixup(tmp_path, capsys):
    data = write_clip_tree(tmp_path / "clips")
    rc = main(["train", "--model", "lookupvit_video_tiny_patch2x16_224", "--model-kwargs", *LOOKUP_KW,
               "--data", str(data), *FAST, "--batch-size", "2", "--max-steps-per-epoch", "1", "--mixup", "0.8",
               "--output", str(tmp_path / "run")])
    assert rc == 0, capsys.readouterr().err
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["num_classes"] == 2 and summary["input_size"] == [3, 4, 16, 16]
    _, meta = load_weights_file(str(tmp_path / "run" / WEIGHTS_NAME))
    assert meta["classes"] == ["a", "b"]


def test_clips_shorter_than_the_model_takes_are_skipped_with_a_warning_or_an_error_when_strict(tmp_path, capsys):
    data = write_clip_tree(tmp_path / "clips", clips=3)
    short = data / "train" / "a" / "short"
    os.makedirs(short)
    Image.new("RGB", (16, 16)).save(short / "0.png")
    args = ["train", "--model", "lookupvit_video_tiny_patch2x16_224", "--model-kwargs", *LOOKUP_KW,
            "--data", f"clips:{data}", *FAST, "--batch-size", "2", "--max-steps-per-epoch", "1"]
    assert main([*args, "--output", str(tmp_path / "run")]) == 0
    assert "skipped 1 clip(s)" in capsys.readouterr().err
    assert main([*args, "--strict", "--output", str(tmp_path / "strict")]) == 2
    assert "has 1 frames, fewer than num_frames=4" in capsys.readouterr().err


def test_cutmix_on_video_is_a_clear_error(tmp_path, capsys):
    assert main(["train", *STVIT, "--data", "moving_digits", *FAST, "--batch-size", "8", "--cutmix", "1.0",
                 "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--cutmix does not apply to video data" in err and "--mixup" in err


def test_an_image_model_on_clips_and_a_video_model_on_images_are_clear_errors(tmp_path, capsys, video_run):
    assert main(["train", "--model", "deit_tiny_patch16_224", "--data", "moving_digits", *FAST,
                 "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "deit_tiny_patch16_224 takes images (C, H, W) but moving_digits gives clips" in err
    assert "video model" in err
    assert main(["train", *STVIT, "--data", "digits", *FAST, "--output", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "stvit_video_tiny_patch2x16_224 takes clips (C, T, H, W) but digits gives images" in err
    assert "--data moving_digits" in err
    assert main(["eval", "--checkpoint", str(video_run / WEIGHTS_NAME), "--data", "digits"]) == 2
    assert "takes clips (C, T, H, W) but digits gives images" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


# --------------------------------------------------------------------------------------- viz

def _png_size(path):
    with Image.open(path) as im:
        return im.size


def test_viz_of_a_trained_video_checkpoint_draws_the_middle_slice(video_run, tmp_path, capsys):
    out = tmp_path / "v.png"
    # no --model, no --model-kwargs: the checkpoint records both
    assert main(["viz", "--checkpoint", str(video_run / WEIGHTS_NAME), "--image", "sample:moving_digits:3",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "tubelet slice 1 of 2 (frame 2 of 4)" in text and "center_pool (4, 2, 4, 4)" in text
    model = load_model_for_inference(None, str(video_run / WEIGHTS_NAME))
    tm = token_maps(model, torch.randn(1, 3, 4, 32, 32))
    assert tm.maps["center_pool"].shape == (1, 4, 2, 4, 4) and tm.owner.shape == (1, 2, 4, 4)
    torch.testing.assert_close(tm.maps["blocks.1"].sum((-3, -2, -1)), torch.ones(1, 4))
    assert _png_size(out) == figure_size(len(tm.maps), 4, 16)


def test_viz_of_a_video_model_on_a_frame_folder_at_a_chosen_slice(tmp_path, capsys):
    data = write_clip_tree(tmp_path / "clips", clips=1, frames=6, size=24)
    out = tmp_path / "v.png"
    assert main(["viz", "--model", "lookupvit_video_tiny_patch2x16_224", "--image",
                 str(data / "val" / "b" / "clip0"), "--out", str(out), "--frame", "0", "--grid", "1x2x2",
                 "--max-tokens", "4", "--model-kwargs", *LOOKUP_KW]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "tubelet slice 0 of 2 (frame 0 of 4)" in text and "gather (4, 2, 2, 2)" in text
    assert _png_size(out) == figure_size(2, 4, 4)   # gather and scatter, 1x2x2 compressed tokens


def test_viz_refuses_images_for_video_models_and_clips_for_image_models(tmp_path, capsys):
    video = ["--model", "lookupvit_video_tiny_patch2x16_224", "--model-kwargs", *LOOKUP_KW]
    assert main(["viz", *video, "--image", "sample:china", "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "takes clips (C, T, H, W) but 'sample:china' is an image" in err and "sample:moving_digits" in err
    assert main(["viz", *video, "--image", "sample:moving_digits", "--frame", "5",
                 "--out", str(tmp_path / "o.png")]) == 2
    assert "--frame 5 is out of range: the maps have 2 tubelet slices" in capsys.readouterr().err
    folder = write_clip_tree(tmp_path / "clips", clips=1) / "val" / "a" / "clip0"
    image = ["--model", "lookupvit_tiny_patch16_224", "--model-kwargs", "img_size=32", "patch_size=8",
             "embed_dim=32", "depth=1", "num_heads=2", "compressed_grid=2x2"]
    for clip in ("sample:moving_digits", str(folder)):
        assert main(["viz", *image, "--image", clip, "--out", str(tmp_path / "o.png")]) == 2
        assert "takes images (C, H, W) but" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o.png")
