"""Video data (issue 8): folders of clips (frame folders, GIFs, video files where a decoder exists)
and the embedded moving digits. Clip folders are written to tmp_path with a few tiny PNG frames."""
from __future__ import annotations

import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import condensevit.models  # noqa: F401  (registers the models)
from condensevit.data import video as vd
from condensevit.data.video import DIRECTIONS, ClipFolder, MovingDigits, read_video, sample_indices

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def denorm(clip: torch.Tensor) -> torch.Tensor:
    return clip * 0.25 + 0.5


# ----------------------------------------------------------------------------- sampling
def test_uniform_sampling_takes_the_middle_frame_of_equal_segments():
    assert sample_indices(8, 8) == list(range(8))
    assert sample_indices(10, 4) == [1, 3, 6, 8]
    assert sample_indices(100, 4) == [12, 37, 62, 87]
    assert sample_indices(9, 1) == [4]
    with pytest.raises(ValueError, match="fewer than the 8"):
        sample_indices(5, 8)


# ------------------------------------------------------------------------------ MovingDigits
@pytest.fixture(scope="module")
def digits():
    return MovingDigits("train", num_frames=8, size=48, label="direction", seed=0)


def test_moving_digits_are_deterministic_per_index_and_seed(digits):
    again = MovingDigits("train", num_frames=8, size=48, label="direction", seed=0)
    for i in (0, 5, 100):
        x, y = digits[i]
        x2, y2 = again[i]
        assert torch.equal(x, x2) and y == y2
    other = MovingDigits("train", num_frames=8, size=48, label="direction", seed=1)
    assert not torch.equal(digits[0][0], other[0][0])


def test_moving_digit_clips_are_normalised_grey_rgb_of_the_asked_shape():
    ds = MovingDigits("val", num_frames=6, size=40, mean=MEAN, std=STD)
    x, y = ds[3]
    assert x.shape == (3, 6, 40, 40) and x.dtype == torch.float32 and 0 <= y < 10
    raw = torch.from_numpy(ds.frames(3)).float() / 255
    for c in range(3):
        torch.testing.assert_close(denorm(x[c]), raw)
    assert raw.min() == 0 and raw.max() > 0.9                      # black canvas, white ink


def test_direction_labels_match_the_motion_and_the_digit_stays_whole(digits):
    step = {"right": (0, 1), "up-right": (-1, 1), "up": (-1, 0), "up-left": (-1, -1), "left": (0, -1),
            "down-left": (1, -1), "down": (1, 0), "down-right": (1, 1)}
    assert digits.classes == list(DIRECTIONS[8])
    for i in range(0, 400, 13):
        f = digits.frames(i).astype(np.float64)
        ink = f.sum((1, 2))
        assert np.allclose(ink, ink[0]), "the whole glyph is on the canvas in every frame"
        rows, cols = np.indices(f.shape[1:])
        cy = (f * rows).sum((1, 2)) / ink
        cx = (f * cols).sum((1, 2)) / ink
        dy, dx = np.diff(cy), np.diff(cx)
        want = step[digits.classes[digits.targets[i]]]
        for d, w in ((dy, want[0]), (dx, want[1])):
            if w == 0:
                assert np.all(d == 0)
            else:
                assert np.all(np.sign(d) * w >= 0) and abs(d.sum()) >= 0.5 * (48 - 24) / 2, "constant, long enough"


def test_digit_labels_are_sklearns_and_the_clips_do_not_depend_on_the_label_mode():
    from sklearn.datasets import load_digits
    target = load_digits().target
    by_digit = MovingDigits("val", num_frames=4, size=32, label="digit", digit_size=(12, 16))
    by_dir = MovingDigits("val", num_frames=4, size=32, label="direction", digit_size=(12, 16))
    assert by_digit.targets == target[by_digit.indices].tolist() and by_digit.classes == list("0123456789")
    common = sorted(set(by_digit.indices.tolist()) & set(by_dir.indices.tolist()))[:5]
    assert common
    for g in common:
        a = int(np.searchsorted(by_digit.indices, g))
        b = int(np.searchsorted(by_dir.indices, g))
        assert np.array_equal(by_digit.frames(a), by_dir.frames(b))


@pytest.mark.parametrize("label, n", [("digit", 10), ("direction", 8)])
def test_split_is_stratified_disjoint_and_complete(label, n):
    tr = MovingDigits("train", num_frames=4, size=32, label=label, digit_size=(12, 16), seed=3)
    va = MovingDigits("val", num_frames=4, size=32, label=label, digit_size=(12, 16), seed=3)
    assert not set(tr.indices.tolist()) & set(va.indices.tolist())
    assert len(tr) + len(va) == 1797 and abs(len(va) - 0.2 * 1797) <= 1
    counts_tr, counts_va = np.bincount(tr.targets, minlength=n), np.bincount(va.targets, minlength=n)
    assert np.all(np.abs(counts_va / len(va) - counts_tr / len(tr)) < 0.01)
    if label == "direction":   # directions are dealt out evenly over the whole set
        assert (counts_tr + counts_va).max() - (counts_tr + counts_va).min() <= 1


def test_four_directions():
    ds = MovingDigits("val", num_frames=4, size=32, label="direction", num_directions=4, digit_size=(12, 16))
    assert ds.classes == ["right", "up", "left", "down"] and set(ds.targets) == {0, 1, 2, 3}


@pytest.mark.parametrize("kw, match", [
    (dict(label="colour"), "label"), (dict(split="test"), "split"), (dict(num_frames=1), "at least 2"),
    (dict(size=24), "digit_size"), (dict(num_directions=6), "4 or 8"), (dict(val_fraction=1.0), "val_fraction"),
])
def test_moving_digits_bad_arguments_are_value_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        MovingDigits(**kw)


def test_moving_digit_batches_run_through_a_video_model():
    ds = MovingDigits("val", num_frames=8, size=64, label="direction")
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    m = timm.create_model("stvit_video_tiny_patch2x16_224", embed_dim=32, depth=4, num_heads=2, num_frames=8,
                          img_size=64, semantic_grid=(2, 2, 2), stgm_start=1, num_classes=len(ds.classes)).eval()
    with torch.no_grad():
        assert m(x).shape == (3, 8)
    assert y.shape == (3,)


# -------------------------------------------------------------------------------- ClipFolder
def write_frames(folder, n, size=(24, 32), start=0, step=10):
    """Frames frame_1.png .. frame_n.png whose grey level encodes their index (10 per frame)."""
    os.makedirs(folder, exist_ok=True)
    for k in range(n):
        Image.new("RGB", size[::-1], (start + step * k,) * 3).save(os.path.join(folder, f"frame_{k + 1}.png"))


def make_tree(root, classes=("cat", "dog"), clips=2, frames=12, size=(24, 32)):
    for split in ("train", "val"):
        for c in classes:
            for j in range(clips):
                write_frames(root / split / c / f"clip{j}", frames, size)
    return root


def test_clip_folder_samples_frames_uniformly_in_natural_name_order(tmp_path):
    ds = ClipFolder(make_tree(tmp_path), "train", num_frames=4, size=(24, 32), mean=MEAN, std=STD)
    assert ds.classes == ["cat", "dog"] and ds.targets == [0, 0, 1, 1] and len(ds) == 4
    x, y = ds[2]
    assert x.shape == (3, 4, 24, 32) and y == 1
    levels = denorm(x).mean((0, 2, 3)) * 255
    # frame_1 .. frame_12 sorted as numbers (frame_10 after frame_9), middle of 4 segments: 1, 4, 7, 10
    torch.testing.assert_close(levels, torch.tensor([10.0, 40.0, 70.0, 100.0]), atol=0.5, rtol=0)


def test_clip_folder_resizes_to_cover_then_centre_crops(tmp_path):
    folder = tmp_path / "train" / "a" / "clip"
    os.makedirs(folder)
    for k in range(2):
        img = np.zeros((40, 80, 3), dtype=np.uint8)
        img[:, 16:64] = 255                                         # a white band, black at both sides
        Image.fromarray(img).save(folder / f"{k}.png")
    write_frames(tmp_path / "val" / "a" / "clip", 2)
    x, _ = ClipFolder(tmp_path, "train", num_frames=2, size=20, mean=MEAN, std=STD)[0]
    assert x.shape == (3, 2, 20, 20)
    # 40x80 -> 20x40 keeps the aspect (the band: columns 8-31); the centre 20 columns (10-29) are white.
    # Squashing to 20x20 would have kept the black sides.
    assert denorm(x).min() > 0.99


def test_clip_folder_reads_animated_gifs(tmp_path):
    folder = tmp_path / "train" / "a"
    os.makedirs(folder)
    frames = [Image.new("RGB", (16, 16), (20 * k,) * 3) for k in range(10)]
    frames[0].save(folder / "clip.gif", save_all=True, append_images=frames[1:], duration=40, loop=0)
    write_frames(tmp_path / "val" / "a" / "clip", 5)
    video = read_video(str(folder / "clip.gif"))
    assert video.shape == (10, 3, 16, 16) and video.dtype == torch.uint8
    x, _ = ClipFolder(tmp_path, "train", num_frames=5, size=16, mean=MEAN, std=STD)[0]
    levels = denorm(x).mean((0, 2, 3)) * 255
    torch.testing.assert_close(levels, torch.tensor([20.0, 60.0, 100.0, 140.0, 180.0]), atol=1.0, rtol=0)


def test_video_files_decode_with_pyav_when_installed(tmp_path):
    av = pytest.importorskip("av")
    folder = tmp_path / "train" / "a"
    os.makedirs(folder)
    path = str(folder / "clip.mp4")
    with av.open(path, mode="w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for k in range(12):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * k, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    write_frames(tmp_path / "val" / "a" / "clip", 4)
    assert read_video(path).shape == (12, 3, 32, 32)
    x, _ = ClipFolder(tmp_path, "train", num_frames=4, size=32, mean=MEAN, std=STD)[0]
    levels = denorm(x).mean((0, 2, 3)) * 255
    torch.testing.assert_close(levels, torch.tensor([20.0, 80.0, 140.0, 200.0]), atol=6.0, rtol=0)


def test_video_files_without_a_decoder_fail_when_the_set_is_built(tmp_path, monkeypatch):
    folder = tmp_path / "train" / "a"
    os.makedirs(folder)
    (folder / "clip.mp4").write_bytes(b"\x00" * 64)
    write_frames(tmp_path / "val" / "a" / "clip", 4)
    monkeypatch.setattr(vd, "video_backends", lambda: [])
    with pytest.raises(RuntimeError, match="no video decoder is installed.*pip install torchcodec.*extract the frames"):
        ClipFolder(tmp_path, "train", num_frames=4, size=16)


def test_too_few_frames_is_an_error_or_skipped_when_asked(tmp_path):
    make_tree(tmp_path, frames=12)
    write_frames(tmp_path / "train" / "cat" / "short", 3)
    with pytest.raises(ValueError, match=r"short' has 3 frames, fewer than num_frames=8.*short_clips='skip'"):
        ClipFolder(tmp_path, "train", num_frames=8, size=16)
    ds = ClipFolder(tmp_path, "train", num_frames=8, size=16, short_clips="skip")
    assert len(ds) == 4 and ds.num_skipped == 1 and ds.skipped[0][0].endswith("short")


def test_frames_of_mixed_sizes_are_an_error_naming_the_frames(tmp_path):
    make_tree(tmp_path, frames=4)
    Image.new("RGB", (20, 20)).save(tmp_path / "train" / "cat" / "clip0" / "frame_3.png")
    ds = ClipFolder(tmp_path, "train", num_frames=4, size=16)
    match = r"mixed sizes in clip .*clip0.*'frame_1.png' is 32x24, 'frame_3.png' is 20x20"
    with pytest.raises(ValueError, match=match):
        ds[0]
    ds[1]                                                           # the other clips load


def test_unreadable_frames_are_an_error_naming_the_file(tmp_path):
    make_tree(tmp_path, frames=4)
    (tmp_path / "train" / "dog" / "clip1" / "frame_2.png").write_bytes(b"not a png")
    ds = ClipFolder(tmp_path, "train", num_frames=4, size=16)
    with pytest.raises(ValueError, match=r"unreadable frame .*frame_2.png"):
        ds[3]


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="clip folder not found"):
        ClipFolder(tmp_path / "nope", "train", num_frames=4, size=16)
    os.makedirs(tmp_path / "train")
    with pytest.raises(FileNotFoundError, match="has no val/ folder"):
        ClipFolder(tmp_path, "val", num_frames=4, size=16)
    with pytest.raises(ValueError, match="is empty"):
        ClipFolder(tmp_path, "train", num_frames=4, size=16)
    os.makedirs(tmp_path / "train" / "a" / "clip")
    with pytest.raises(ValueError, match="holds no frames"):
        ClipFolder(tmp_path, "train", num_frames=4, size=16)
    os.rmdir(tmp_path / "train" / "a" / "clip")
    (tmp_path / "train" / "a" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no clips"):
        ClipFolder(tmp_path, "train", num_frames=4, size=16)


def test_train_and_val_must_hold_the_same_classes(tmp_path):
    make_tree(tmp_path, frames=4)
    write_frames(tmp_path / "val" / "bird" / "clip", 4)
    with pytest.raises(ValueError, match="class folders differ.*bird"):
        ClipFolder(tmp_path, "train", num_frames=4, size=16)


def test_clip_folder_bad_arguments_are_value_errors(tmp_path):
    make_tree(tmp_path, frames=4)
    for kw, match in [(dict(num_frames=0), "num_frames"), (dict(size=0), "size"), (dict(short_clips="loop"),
                      "short_clips"), (dict(split="test"), "split"), (dict(std=(0.0,)), "std")]:
        args = dict(dict(split="train", num_frames=4, size=16), **kw)
        with pytest.raises(ValueError, match=match):
            ClipFolder(tmp_path, **args)


# ------------------------------------------------------------------------- build_dataset
def test_is_video_data_tells_clips_from_images(tmp_path):
    from condensevit.data import is_video_data
    assert is_video_data("moving_digits") and is_video_data("moving_digits_direction")
    assert not is_video_data("digits") and not is_video_data(str(tmp_path / "missing"))
    clips = make_tree(tmp_path / "clips", frames=2)
    assert is_video_data(str(clips)) and is_video_data(clips)
    images = tmp_path / "images"
    for split in ("train", "val"):
        os.makedirs(images / split / "cat")
        Image.new("RGB", (8, 8)).save(images / split / "cat" / "0.png")
    assert not is_video_data(str(images))
    gifs = tmp_path / "gifs" / "train" / "cat"
    os.makedirs(gifs)
    Image.new("RGB", (8, 8)).save(gifs / "clip.gif")
    assert is_video_data(str(tmp_path / "gifs"))
    # the prefixes decide whatever the folder holds
    assert is_video_data(f"clips:{images}") and not is_video_data(f"images:{clips}")


def test_build_dataset_sizes_the_video_sets_for_the_model():
    from condensevit.data import build_dataset
    ds = build_dataset("moving_digits_direction", "val", input_size=(3, 4, 32, 32),
                       data_config=dict(mean=MEAN, std=STD))
    assert isinstance(ds, MovingDigits) and ds.classes == list(DIRECTIONS[8])
    x, _ = ds[0]
    assert x.shape == (3, 4, 32, 32)
    torch.testing.assert_close(denorm(x[0]), torch.from_numpy(ds.frames(0)).float() / 255)
    default = build_dataset("moving_digits", "val")
    assert default.classes == list("0123456789") and default[0][0].shape == (3, 16, 64, 64)
    small = build_dataset("moving_digits", "val", input_size=(3, 2, 16, 16))   # smaller digits fit the canvas
    assert small[0][0].shape == (3, 2, 16, 16)
    with pytest.raises(ValueError, match="square"):
        build_dataset("moving_digits", "val", input_size=(3, 4, 32, 48))
    with pytest.raises(ValueError, match=r"must be \(C, T, H, W\)"):
        build_dataset("moving_digits", "val", input_size=(3, 32, 32))


def test_build_dataset_reads_clip_folders_and_skips_short_clips_unless_strict(tmp_path):
    from condensevit.data import build_dataset
    make_tree(tmp_path, frames=6)
    write_frames(tmp_path / "train" / "dog" / "short", 2)
    ds = build_dataset(str(tmp_path), "train", input_size=(3, 4, 16, 20), data_config=dict(mean=MEAN, std=STD))
    assert isinstance(ds, ClipFolder) and ds.classes == ["cat", "dog"] and ds.num_skipped == 1
    assert ds[0][0].shape == (3, 4, 16, 20) and ds.mean == MEAN
    with pytest.raises(ValueError, match="fewer than num_frames=4"):
        build_dataset(f"clips:{tmp_path}", "train", input_size=(3, 4, 16, 16), strict=True)


def test_images_prefix_reads_class_folders_of_image_folders_as_images(tmp_path):
    from condensevit.data import ImageFolderDataset, build_dataset
    for split in ("train", "val"):
        os.makedirs(tmp_path / split / "cat" / "album")
        Image.new("RGB", (8, 8)).save(tmp_path / split / "cat" / "album" / "0.png")
    assert isinstance(build_dataset(str(tmp_path), "val", input_size=(3, 1, 8, 8)), ClipFolder)
    ds = build_dataset(f"images:{tmp_path}", "val")
    assert isinstance(ds, ImageFolderDataset) and len(ds) == 1


def test_model_input_size_of_a_video_model_keeps_the_frames():
    from condensevit.data import build_transform, model_input_size
    from condensevit.train.engine import _input_size
    m = timm.create_model("lookupvit_video_tiny_patch2x16_224", img_size=32, num_frames=4, patch_size=8,
                          embed_dim=32, depth=1, num_heads=2, compressed_grid=(1, 2, 2))
    assert model_input_size(m) == (3, 4, 32, 32)
    assert _input_size(m, dict(img_size=32, num_frames=4)) == (3, 4, 32, 32)
    assert _input_size(timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1),
                       dict(img_size=32)) == (3, 32, 32)
    with pytest.raises(ValueError, match="not an image size"):
        build_transform("moving_digits", False, (3, 4, 32, 32))


def test_load_clip_reads_one_frame_folder_as_clip_folder_does(tmp_path):
    from condensevit.data import load_clip
    make_tree(tmp_path, frames=12)
    frames = load_clip(tmp_path / "train" / "cat" / "clip0", 4, (24, 32))
    x, _ = ClipFolder(tmp_path, "train", num_frames=4, size=(24, 32), mean=MEAN, std=STD)[0]
    torch.testing.assert_close(frames.permute(1, 0, 2, 3), denorm(x))
    with pytest.raises(ValueError, match="fewer than the 16"):
        load_clip(tmp_path / "train" / "cat" / "clip0", 16, 24)
    with pytest.raises(ValueError, match="is not a clip"):
        load_clip(tmp_path / "train" / "cat" / "clip0" / "frame_1.png", 1, 24)
    with pytest.raises(FileNotFoundError, match="clip not found"):
        load_clip(tmp_path / "nope", 1, 24)
