"""Datasets: the embedded digits set and ImageFolder trees with their checks."""
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from condensevit.cli import main
from condensevit.data import (DigitsDataset, SeededAugmentation, build_dataset, build_transform,
                              model_input_size, render_digits)

TINY = ["--model", "deit_tiny_patch16_224", "--model-kwargs", "img_size=32", "patch_size=8", "embed_dim=32",
        "depth=2", "num_heads=2"]


def make_tree(root, train_classes=("cat", "dog"), val_classes=None, per_class=3, size=20):
    val_classes = train_classes if val_classes is None else val_classes
    rng = np.random.default_rng(0)
    for split, classes in (("train", train_classes), ("val", val_classes)):
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    return root


# ----------------------------------------------------------------------------------- digits

def test_digits_split_is_fixed_stratified_and_covers_all_images():
    train, val = DigitsDataset("train"), DigitsDataset("val")
    assert len(train) + len(val) == 1797
    assert len(val) == 360
    counts = np.bincount(val.targets, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of each class
    again = DigitsDataset("val")
    assert again.targets == val.targets and np.array_equal(again.images, val.images)


def test_digits_are_placed_small_on_a_mostly_empty_canvas():
    images, labels = render_digits()
    assert images.shape == (1797, 64, 64) and images.dtype == np.uint8
    assert set(labels.tolist()) == set(range(10))
    background = (images == 0).mean()
    assert background > 0.7, f"only {background:.0%} of the pixels are background"
    # positions vary: the centres of ink are spread over the canvas
    ys = [np.argwhere(im > 0)[:, 0].mean() for im in images[:200]]
    assert np.std(ys) > 5


def test_digits_items_are_rgb_pil_images_that_timm_transforms_take():
    ds = build_dataset("digits", "train")
    img, label = ds[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (64, 64)
    assert 0 <= label < 10
    ds.transform = build_transform("digits", True, (3, 32, 32))
    x, _ = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_seeded_augmentation_depends_only_on_seed_epoch_and_index_and_spares_global_rngs():
    ds = SeededAugmentation(build_dataset("digits", "train", build_transform("digits", True, (3, 64, 64))), seed=3)
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    a = ds[5][0]
    assert torch.equal(a, ds[5][0])
    ds.set_epoch(1)
    assert not torch.equal(a, ds[5][0])
    assert torch.equal(before[0], torch.get_rng_state())
    assert before[1] == random.getstate()
    assert np.array_equal(before[2], np.random.get_state()[1])


def test_model_input_size_reads_the_built_size_not_the_pretrained_config():
    import timm
    m = timm.create_model("deit_tiny_patch16_224", img_size=48, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    assert model_input_size(m) == (3, 48, 48)


# ----------------------------------------------------------------------------------- folders

def test_folder_dataset_reads_classes_in_sorted_order(tmp_path):
    make_tree(tmp_path, ("dog", "cat"))
    ds = build_dataset(str(tmp_path), "train")
    assert ds.classes == ["cat", "dog"] and len(ds) == 6 and ds.num_skipped == 0
    img, label = ds[4]
    assert img.mode == "RGB" and label == 1


def test_missing_dataset_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        build_dataset(str(tmp_path / "nope"), "train")
    os.makedirs(tmp_path / "only" / "train" / "a")
    with pytest.raises(FileNotFoundError, match="no val/ folder"):
        build_dataset(str(tmp_path / "only"), "train")


def test_empty_dataset_folder_is_a_clear_error(tmp_path):
    os.makedirs(tmp_path / "train")
    os.makedirs(tmp_path / "val")
    with pytest.raises(ValueError, match="is empty: expected one sub-folder per class"):
        build_dataset(str(tmp_path), "train")
    os.makedirs(tmp_path / "train" / "a")
    os.makedirs(tmp_path / "val" / "a")
    with pytest.raises(ValueError, match="holds no images"):
        build_dataset(str(tmp_path), "train")


def test_class_folders_that_differ_between_train_and_val_are_named(tmp_path):
    make_tree(tmp_path, ("cat", "dog"), ("cat", "emu"))
    for split in ("train", "val"):
        with pytest.raises(ValueError, match="only in train: dog; only in val: emu"):
            build_dataset(str(tmp_path), split)


def test_unreadable_images_are_skipped_and_counted_or_an_error_when_strict(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "train" / "cat" / "broken.jpg").write_bytes(b"not an image")
    ds = build_dataset(str(tmp_path), "train")
    assert len(ds) == 6 and ds.num_skipped == 1 and ds.skipped[0][0].endswith("broken.jpg")
    with pytest.raises(ValueError, match="1 unreadable image.*broken.jpg"):
        build_dataset(str(tmp_path), "train", strict=True)


# ------------------------------------------------------------------------ through the CLI

def _train_cli(tmp_path, data, *extra):
    return main(["train", *TINY, "--data", str(data), "--epochs", "1", "--max-steps-per-epoch", "1",
                 "--batch-size", "2", "--no-measure", "--quiet", "--no-progress", "--output",
                 str(tmp_path / "run"), *extra])


def test_cli_reports_a_missing_dataset_folder(tmp_path, capsys):
    assert _train_cli(tmp_path, tmp_path / "missing") == 2
    err = capsys.readouterr().err
    assert "condensevit train: error: dataset folder not found" in err and "missing" in err


def test_cli_reports_class_folders_that_differ(tmp_path, capsys):
    make_tree(tmp_path / "d", ("a", "b"), ("a",))
    assert _train_cli(tmp_path, tmp_path / "d") == 2
    assert "class folders differ between" in capsys.readouterr().err


def test_training_on_a_single_class_is_refused(tmp_path, capsys):
    make_tree(tmp_path / "d", ("a",))
    assert _train_cli(tmp_path, tmp_path / "d") == 2
    err = capsys.readouterr().err
    assert f"--data {tmp_path / 'd'} has one class (a): classification needs at least 2 classes" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run" / "last.safetensors").exists()
    assert len(build_dataset(str(tmp_path / "d"), "val")) == 3  # reading such a folder is still fine


def test_cli_reports_an_empty_dataset_folder(tmp_path, capsys):
    os.makedirs(tmp_path / "d" / "train")
    os.makedirs(tmp_path / "d" / "val")
    assert _train_cli(tmp_path, tmp_path / "d") == 2
    assert "is empty" in capsys.readouterr().err


def test_cli_skips_unreadable_images_and_fails_on_them_with_strict(tmp_path, capsys):
    make_tree(tmp_path / "d", per_class=2, size=32)
    (tmp_path / "d" / "val" / "dog" / "bad.png").write_bytes(b"\x89PNG truncated")
    assert _train_cli(tmp_path, tmp_path / "d") == 0
    assert "skipped 1 unreadable image" in capsys.readouterr().err
    assert _train_cli(tmp_path / "strict", tmp_path / "d", "--strict") == 2
    assert "unreadable image" in capsys.readouterr().err


# ------------------------------------------------------------------ images that read badly

def _png_bytes(arr) -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _corrupt_png(arr) -> bytes:
    """A PNG whose header and end are whole but whose pixel data is not: it passes the build-time
    check and fails when decoded."""
    data = bytearray(_png_bytes(arr))
    start = data.index(b"IDAT") + 20
    assert data.index(b"IEND") > start + 20
    for i in range(start, start + 10):
        data[i] ^= 0x5A
    return bytes(data)


def _eval_checkpoint(path, classes):
    import timm

    from condensevit.train.checkpoint import save_weights
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    model = timm.create_model("deit_tiny_patch16_224", num_classes=len(classes), **kw)
    save_weights(str(path), model.state_dict(), dict(format="condensevit", model="deit_tiny_patch16_224",
                                                     model_kwargs=kw, num_classes=len(classes), classes=list(classes)))
    return str(path)


def test_a_truncated_png_is_caught_when_the_set_is_built_with_its_name(tmp_path):
    make_tree(tmp_path, per_class=2)
    whole = _png_bytes(np.full((20, 20, 3), 99, np.uint8))
    (tmp_path / "train" / "cat" / "cut.png").write_bytes(whole[:len(whole) - 30])  # the header passes, the end is gone
    ds = build_dataset(str(tmp_path), "train")
    assert ds.num_skipped == 1 and ds.skipped[0][0].endswith("cut.png") and "truncated PNG" in ds.skipped[0][1]
    with pytest.raises(ValueError, match="cut.png.*truncated PNG"):
        build_dataset(str(tmp_path), "train", strict=True)


def test_an_image_that_fails_to_decode_mid_epoch_is_one_line_naming_it(tmp_path, capsys):
    make_tree(tmp_path, per_class=2)
    (tmp_path / "train" / "cat" / "bad.png").write_bytes(_corrupt_png(np.random.default_rng(1).integers(0, 255, (20, 20, 3), dtype=np.uint8)))
    ds = build_dataset(str(tmp_path), "train")
    assert ds.num_skipped == 0  # it passes the build-time check
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("bad.png")][0]
    img, _ = ds[bad]  # replaced by the next readable image
    assert img.size == (20, 20)
    err = capsys.readouterr().err
    assert err.startswith("condensevit: warning: skipping unreadable image") and "bad.png" in err
    assert len(err.strip().splitlines()) == 1 and "UserWarning" not in err


def test_strict_with_loader_workers_names_the_file_not_the_worker(tmp_path, capsys):
    make_tree(tmp_path / "d", per_class=2, size=32)
    (tmp_path / "d" / "val" / "dog" / "bad.png").write_bytes(_corrupt_png(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)))
    ckpt = _eval_checkpoint(tmp_path / "w.safetensors", ("cat", "dog"))
    assert main(["eval", "--checkpoint", ckpt, "--data", str(tmp_path / "d"), "--strict", "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "unreadable image" in err and "bad.png" in err and "DataLoader worker" not in err


def test_eval_warns_about_skipped_images_as_train_does(tmp_path, capsys):
    make_tree(tmp_path / "d", per_class=2, size=32)
    (tmp_path / "d" / "val" / "dog" / "broken.jpg").write_bytes(b"not an image")
    ckpt = _eval_checkpoint(tmp_path / "w.safetensors", ("cat", "dog"))
    assert main(["eval", "--checkpoint", ckpt, "--data", str(tmp_path / "d")]) == 0
    err = capsys.readouterr().err
    assert "condensevit eval: warning: skipped 1 unreadable image(s) (first:" in err and "broken.jpg" in err


def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    from condensevit.data.folder import to_rgb
    grey16 = np.full((8, 8), 32896, np.uint16)  # 50% grey in 16 bits
    grey16[0, 0] = 65535
    Image.fromarray(grey16).save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode.startswith("I")
        rgb = np.asarray(to_rgb(im))
    assert rgb.shape == (8, 8, 3) and rgb[1, 1].tolist() == [128, 128, 128] and rgb[0, 0].tolist() == [255] * 3
    # through an ImageFolder tree, as training reads it
    make_tree(tmp_path / "d", per_class=1)
    Image.fromarray(grey16).save(tmp_path / "d" / "train" / "cat" / "0.png")
    ds = build_dataset(str(tmp_path / "d"), "train")
    img, _ = ds[[i for i, (p, _) in enumerate(ds.samples) if p.endswith(os.path.join("cat", "0.png"))][0]]
    assert np.asarray(img)[1, 1].tolist() == [128, 128, 128]
