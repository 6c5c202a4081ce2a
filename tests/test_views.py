"""Multi-view testing (`condensevit eval --views CLIPSxCROPS`): the view sampling, the data set of views,
and evaluation averaging each clip's view scores."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader

import condensevit.models  # noqa: F401  (registers the models)
from condensevit.cli import main
from condensevit.data.video import (
    ClipFolder, MovingDigits, MultiViewClips, _resize_cover, crop_offsets, parse_views, sample_indices,
    spatial_crops, view_indices,
)
from condensevit.train.checkpoint import save_weights
from condensevit.train.loop import average_view_scores, evaluate

MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)   # no normalisation: pixel values read back directly


# ------------------------------------------------------------------------------ view sampling
def test_one_view_is_the_single_view_sampling():
    for available, frames in ((12, 4), (300, 32), (8, 8), (9, 4)):
        assert view_indices(available, frames, 1) == [sample_indices(available, frames)]


def test_temporal_views_take_evenly_spaced_phases_of_every_segment():
    views = view_indices(32, 8, 4)
    assert views[0] == list(range(0, 32, 4)) and views[3] == list(range(3, 32, 4))
    assert sorted(i for v in views for i in v) == list(range(32))    # together they take every frame once
    assert view_indices(8, 8, 3) == [list(range(8))] * 3              # too short to differ: the same view
    with pytest.raises(ValueError, match="fewer than the 8"):
        view_indices(6, 8, 2)


def test_crops_are_evenly_spaced_along_the_longer_side():
    assert crop_offsets(298, 224, 3) == [0, 37, 74] and crop_offsets(298, 224, 1) == [37]
    ramp = torch.arange(60.0).view(1, 1, 1, 60).expand(2, 3, 20, 60) / 60   # value = column / 60
    left, centre, right = spatial_crops(ramp, (20, 20), 3)
    assert [int(c[0, 0, 0, 0] * 60) for c in (left, centre, right)] == [0, 20, 40]
    tall = ramp.transpose(-1, -2)
    assert [round(float(c[0, 0, 0, 0]) * 60) for c in spatial_crops(tall, (20, 20), 3)] == [0, 20, 40]
    frames = torch.rand(3, 3, 30, 50)
    torch.testing.assert_close(spatial_crops(frames, (24, 24), 1)[0], _resize_cover(frames, (24, 24)))


@pytest.mark.parametrize("text, expect", [("4x3", (4, 3)), ("1X1", (1, 1)), ((2, 5), (2, 5))])
def test_views_parse(text, expect):
    assert parse_views(text) == expect


@pytest.mark.parametrize("bad", ["4", "4x0", "axb", "4x3x2", None])
def test_bad_views_are_value_errors_naming_the_form(bad):
    with pytest.raises(ValueError, match="CLIPSxCROPS"):
        parse_views(bad)


# ------------------------------------------------------------------------------ the data set of views
def write_tree(root, classes=("a", "b"), frames=16, size=(16, 40)):
    """root/{train,val}/<class>/clip/<k>.png: frame k has grey level 10 k in its red channel and a
    left-to-right ramp in its green channel, so a view says which frames and which columns it took."""
    h, w = size
    for split in ("train", "val"):
        for c in classes:
            folder = root / split / c / "clip"
            os.makedirs(folder)
            for k in range(frames):
                img = np.zeros((h, w, 3), dtype=np.uint8)
                img[..., 0] = 10 * k
                img[..., 1] = np.linspace(0, 255, w).astype(np.uint8)[None]
                Image.fromarray(img).save(folder / f"{k}.png")
    return root


def test_clip_folder_views_are_the_sampled_frames_and_crops(tmp_path):
    ds = ClipFolder(write_tree(tmp_path), "val", num_frames=4, size=16, mean=MEAN, std=STD)
    views = MultiViewClips(ds, 2, 3)
    x, y = views[1]
    assert x.shape == (6, 3, 4, 16, 16) and y == 1 and views.num_views == 6
    frames = (x[:, 0, :, 8, 8] * 255 / 10).round()                   # (views, T): the frame indices
    assert frames[0].tolist() == [1, 5, 9, 13] and frames[3].tolist() == [3, 7, 11, 15]   # clip 0, clip 1
    left_edge = x[:3, 1, 0, 0, 0]                                     # clip 0's crops: left, centre, right
    assert left_edge[0] < left_edge[1] < left_edge[2]
    one = MultiViewClips(ds, 1, 1)[1][0]
    torch.testing.assert_close(one[0], ds[1][0])                      # one view is the usual clip


def test_multi_view_needs_clips():
    with pytest.raises(ValueError, match="needs clips"):
        MultiViewClips([(torch.zeros(3, 8, 8), 0)], 2, 2)


# ------------------------------------------------------------------------------ evaluation
def test_average_view_scores_averages_each_samples_own_views():
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [0.0, 4.0],     # sample 0: one view for class 0, two for 1
                           [2.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    probs = average_view_scores(logits, 3)
    torch.testing.assert_close(probs, logits.softmax(-1).view(2, 3, 2).mean(1))
    assert probs.argmax(-1).tolist() == [1, 0]
    with pytest.raises(ValueError, match="whole number"):
        average_view_scores(logits, 4)


class _Counting(nn.Module):
    """Class 1 when the first pixel is positive: each view votes by its own content."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.shape[0])
        v = x.flatten(1)[:, 0]
        return torch.stack([-v, v], dim=1) * 10


def test_evaluate_scores_every_view_and_averages_per_clip():
    # 3 clips x 4 views; clip 0 votes 3:1 for class 1, clip 1 1:3 (class 0); clip 2 has one sure view for
    # class 1 and three unsure ones for class 0: the averaged probabilities say 1, a majority vote would say 0
    votes = torch.tensor([[1.0, 1.0, 1.0, -1.0], [1.0, -1.0, -1.0, -1.0], [0.5, -0.01, -0.01, -0.01]])
    x = votes[:, :, None, None, None, None].expand(3, 4, 3, 2, 4, 4).contiguous()
    y = torch.tensor([1, 0, 1])
    model = _Counting()
    stats = evaluate(model, DataLoader(list(zip(x, y)), batch_size=2), torch.device("cpu"), views=4)
    assert model.seen == [8, 4]                                       # batches of 2 then 1 clips, 4 views each
    assert stats["images"] == 3 and stats["top1"] == 100.0
    probs = average_view_scores(model(x.flatten(0, 1)), 4)
    expect = torch.nn.functional.nll_loss(probs.log(), y).item()
    assert stats["loss"] == pytest.approx(expect, rel=1e-6)
    with pytest.raises(ValueError, match="does not hold 5 views"):
        evaluate(model, DataLoader(list(zip(x, y)), batch_size=2), torch.device("cpu"), views=5)


def test_moving_digits_views_are_the_clip_itself():
    ds = MovingDigits("val", num_frames=4, size=16, digit_size=(8, 8), mean=MEAN, std=STD)
    x, _ = MultiViewClips(ds, 2, 3)[0]
    assert x.shape == (6, 3, 4, 16, 16)
    assert all(torch.equal(v, ds[0][0]) for v in x)


# ------------------------------------------------------------------------------ the command
KW = dict(img_size=16, num_frames=4, patch_size=8, embed_dim=32, depth=2, num_heads=2)
NAME = "vit_video_tiny_patch2x16_224"


@pytest.fixture
def checkpoint_and_data(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(NAME, num_classes=2, **KW)
    path = save_weights(str(tmp_path / "w.safetensors"), model.state_dict(), {"model": NAME, "model_kwargs": KW})
    return model.eval(), path, write_tree(tmp_path / "clips")


def test_eval_with_views_averages_the_views_of_every_clip(checkpoint_and_data, capsys):
    model, path, root = checkpoint_and_data
    assert main(["eval", "--checkpoint", path, "--data", str(root), "--views", "2x3", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["views"] == "2x3" and stats["images"] == 2
    cfg = timm.data.resolve_data_config({}, model=model)
    ds = ClipFolder(root, "val", num_frames=4, size=16, mean=cfg["mean"], std=cfg["std"])
    views = torch.stack([MultiViewClips(ds, 2, 3)[i][0] for i in range(2)])
    with torch.no_grad():
        probs = average_view_scores(model(views.flatten(0, 1)), 6)
    assert stats["loss"] == pytest.approx(torch.nn.functional.nll_loss(probs.log(), torch.tensor([0, 1])).item(),
                                          rel=1e-5)
    # one view is plain evaluation
    assert main(["eval", "--checkpoint", path, "--data", str(root), "--views", "1x1", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert main(["eval", "--checkpoint", path, "--data", str(root), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert one["loss"] == plain["loss"] and one["top1"] == plain["top1"]


def test_eval_views_errors_exit_2_with_the_fix(checkpoint_and_data, capsys):
    _, path, root = checkpoint_and_data
    assert main(["eval", "--checkpoint", path, "--data", str(root), "--views", "4"]) == 2
    assert "CLIPSxCROPS" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", path, "--data", "digits", "--views", "4x3"]) == 2
    assert "applies to clips" in capsys.readouterr().err


def test_eval_views_of_stvit_on_video_swin_on_moving_digits(tmp_path, capsys):
    """Every video model takes --views; the moving digits' views are the clip itself, so 2x3 views
    give the single-view figures."""
    name = "stvit_video_swin_tiny_patch2x4x4_window8x7x7"
    kw = dict(num_frames=8, img_size=64, embed_dim=16, depths=[2, 2, 6, 2], num_heads=[1, 2, 2, 4],
              window_size=[2, 4, 4])
    model = timm.create_model(name, num_classes=10, **kw)
    path = save_weights(str(tmp_path / "w.safetensors"), model.state_dict(), {"model": name, "model_kwargs": kw})
    args = ["eval", "--checkpoint", path, "--data", "moving_digits", "--batch-size", "4", "--limit-batches", "1",
            "--json"]
    assert main([*args, "--views", "2x3"]) == 0
    views = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert views["views"] == "2x3" and views["images"] == plain["images"] == 4
    assert views["top1"] == plain["top1"] and views["loss"] == pytest.approx(plain["loss"], rel=1e-5)
