"""Token maps (API and `condensevit viz`): what the few tokens see."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

import condensevit  # noqa: F401
from condensevit.cli import main
from condensevit.viz import figure_size, load_image, models_with_token_maps, render, token_maps

SMALL = {
    "stvit_deit_tiny_patch16_224": dict(embed_dim=64, depth=6, num_heads=2, img_size=(96, 128)),
    "stvit_r_swin_tiny_patch4_window7_224": dict(embed_dim=32, depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8)),
    "stvit_r_det_swin_tiny_patch4_window7": dict(embed_dim=32, depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8)),
    "lookupvit_tiny_patch16_224": dict(embed_dim=64, depth=3, num_heads=2, img_size=(96, 128)),
}


def _input(name, model):
    if "det" in name:  # the dense form takes any size; at sizes that need padding, see below
        return torch.randn(2, 3, 224, 224)
    return torch.randn(2, *model.pretrained_cfg["input_size"]) if "stvit_r" in name else torch.randn(2, 3, 96, 128)


@pytest.mark.parametrize("name", list(SMALL))
def test_each_token_map_is_a_distribution_over_the_image_tokens(name):
    model = timm.create_model(name, **SMALL[name])
    x = _input(name, model)
    tm = token_maps(model, x)
    assert tm.maps
    for key, m in tm.maps.items():
        assert m.dim() == 4 and m.shape[0] == 2, key
        assert (m >= 0).all()
        torch.testing.assert_close(m.sum((-2, -1)), torch.ones(m.shape[:2]), msg=key)
        assert tm.owner.shape == (2, *m.shape[-2:])
        assert int(tm.owner.max()) < m.shape[1]
    assert model.training  # token_maps leaves the mode alone


def test_dense_stvit_r_maps_at_a_padded_size_are_distributions_or_empty():
    # the released padding mask can hide a semantic token from every image token (documented in
    # STViTR.token_maps): its recovery map is all zero; every other map is a distribution
    name = "stvit_r_det_swin_tiny_patch4_window7"
    tm = token_maps(timm.create_model(name, **SMALL[name]), torch.randn(1, 3, 100, 150))
    for key, m in tm.maps.items():
        sums = m.sum((-2, -1))
        assert ((sums - 1).abs() < 1e-4).logical_or(sums == 0).all(), key
        assert (sums > 0).any()
    assert (tm.maps["semantic"].sum((-2, -1)) > 0).all()


def test_lookupvit_maps_follow_the_asked_grid():
    model = timm.create_model("lookupvit_tiny_patch16_224", **SMALL["lookupvit_tiny_patch16_224"])
    tm = token_maps(model, torch.randn(1, 3, 96, 128), compressed_grid=(2, 3))
    assert tm.maps["gather"].shape == (1, 6, 6, 8)
    assert "scatter" in tm.owner_title


def test_stvit_initial_pooling_map_is_confined_to_its_window():
    model = timm.create_model("stvit_deit_tiny_patch16_224", embed_dim=64, depth=6, num_heads=2, img_size=128)
    tm = token_maps(model, torch.randn(1, 3, 128, 128))
    pool = tm.maps["center_pool"][0]   # 16 tokens over an 8x8 map: 2x2 windows
    for t in range(16):
        r, c = divmod(t, 4)
        inside = pool[t, 2 * r:2 * r + 2, 2 * c:2 * c + 2].sum()
        torch.testing.assert_close(inside, torch.tensor(1.0))


def test_render_writes_a_png_of_the_expected_size(tmp_path):
    model = timm.create_model("lookupvit_tiny_patch16_224", **SMALL["lookupvit_tiny_patch16_224"])
    cfg = model.pretrained_cfg
    x, rgb = load_image(load_sample_image("china.jpg"), (96, 128), cfg["mean"], cfg["std"])
    assert x.shape == (1, 3, 96, 128) and rgb.shape == (96, 128, 3)
    tm = token_maps(model, x)
    out = tmp_path / "maps.png"
    size = render(rgb, tm, str(out), max_tokens=9)
    assert size == figure_size(len(tm.maps), 25, 9, aspect=96 / 128)
    with Image.open(out) as im:
        assert im.size == size
        arr = np.asarray(im.convert("RGB"))
    assert arr.std() > 10  # something was drawn


def test_viz_command_on_a_real_photograph(tmp_path, capsys):
    out = tmp_path / "v.png"
    rc = main(["viz", "--model", "stvit_deit_tiny_patch16_224", "--image", "sample:china", "--out", str(out),
               "--size", "96x128", "--model-kwargs", "embed_dim=64", "depth=6", "num_heads=2"])
    assert rc == 0, capsys.readouterr().err
    assert "center_pool" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.size[0] > 400


def test_viz_command_with_an_image_file_and_a_grid(tmp_path, capsys):
    img = tmp_path / "photo.png"
    Image.fromarray(load_sample_image("flower.jpg")).save(img)
    out = tmp_path / "v.png"
    rc = main(["viz", "--model", "lookupvit_tiny_patch16_224", "--image", str(img), "--out", str(out),
               "--grid", "3x3", "--size", "96x96", "--model-kwargs", "embed_dim=64", "depth=2", "num_heads=2"])
    assert rc == 0, capsys.readouterr().err
    assert "gather (9, 6, 6)" in capsys.readouterr().out


def test_viz_bad_input_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    args = ["--model-kwargs", "embed_dim=64", "depth=6", "num_heads=2", "--size", "96x96"]
    assert main(["viz", "--model", "stvit_deit_tiny_patch16_224", "--image", str(bad),
                 "--out", str(tmp_path / "o.png"), *args]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert main(["viz", "--model", "stvit_deit_tiny_patch16_224", "--image", str(tmp_path / "missing.jpg"),
                 "--out", str(tmp_path / "o.png"), *args]) == 2
    assert "image not found" in capsys.readouterr().err
    assert main(["viz", "--model", "deit_tiny_patch16_224", "--image", "sample:china",
                 "--out", str(tmp_path / "o.png"), "--model-kwargs", "depth=1"]) == 2
    err = capsys.readouterr().err
    assert "no condensed tokens" in err and "stvit_deit_small_patch16_224" in err


def test_models_with_token_maps_lists_the_condensing_families():
    names = models_with_token_maps()
    assert "stvit_deit_small_patch16_224" in names and "lookupvit_base_patch16_224" in names
    assert "stvit_r_swin_small_patch4_window7_224" in names


def test_viz_rebuilds_a_trained_image_model_from_its_checkpoint(tmp_path, capsys):
    from condensevit.train.checkpoint import load_model_for_inference
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_semantic_tokens=4, stgm_start=0)
    run = tmp_path / "run"
    assert main(["train", "--model", "stvit_deit_tiny_patch16_224", "--model-kwargs",
                 *[f"{k}={v}" for k, v in kw.items()], "--epochs", "1", "--max-steps-per-epoch", "1",
                 "--batch-size", "4", "--limit-val-batches", "1", "--no-measure", "--quiet", "--no-progress",
                 "--output", str(run)]) == 0
    ckpt = str(run / "last.safetensors")
    model = load_model_for_inference(None, ckpt)
    n_kinds = len(token_maps(model, torch.randn(1, 3, 32, 32)).maps)   # the model takes 32x32, not 224
    # with and without --model, never --model-kwargs: the checkpoint records the model and its kwargs
    for args in (["--model", "stvit_deit_tiny_patch16_224"], []):
        out = tmp_path / f"v{len(args)}.png"
        assert main(["viz", *args, "--checkpoint", ckpt, "--image", "sample:flower", "--out", str(out)]) == 0, \
            capsys.readouterr().err
        assert "center_pool (4, 4, 4)" in capsys.readouterr().out
        with Image.open(out) as im:
            assert im.size == figure_size(n_kinds, 4)
    assert main(["viz", "--image", "sample:flower", "--out", str(tmp_path / "o.png")]) == 2
    assert "no model given" in capsys.readouterr().err


# ------------------------------------------------------------------ built-in images, input, figures

def test_sample_digit_is_a_built_in_image(tmp_path, capsys):
    from condensevit.data import DigitsDataset
    from condensevit.viz import sample_image
    digit = sample_image("sample:digit")
    assert digit.shape == (64, 64, 3) and digit.dtype == np.uint8
    assert np.array_equal(digit[..., 0], DigitsDataset("val").images[0])
    assert np.array_equal(sample_image("sample:digits:5")[..., 1], DigitsDataset("val").images[5])
    for bad in ("sample:digit:360", "sample:digit:x", "sample:nope"):
        with pytest.raises(ValueError, match="sample:digit"):
            sample_image(bad)
    out = tmp_path / "d.png"
    assert main(["viz", "--model", "stvit_deit_tiny_patch16_224", "--image", "sample:digit:3", "--out", str(out),
                 "--size", "64x64", "--model-kwargs", "embed_dim=32", "depth=6", "num_heads=2", "patch_size=8"]) == 0
    assert out.exists()


def test_16_bit_greyscale_images_are_drawn_grey_not_white(tmp_path):
    grey16 = np.full((32, 32), 32896, np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g.png")
    x, rgb = load_image(tmp_path / "g.png", (32, 32), (0.5,) * 3, (0.5,) * 3)
    assert abs(int(rgb.mean()) - 128) <= 1
    assert abs(float(x.mean())) < 0.02  # (128/255 - 0.5) / 0.5


def test_the_photograph_keeps_its_aspect_ratio():
    # a 100x200 (HxW) picture with a 50x50 white square in the middle: cropped to fit, never squashed
    img = np.zeros((100, 200, 3), np.uint8)
    img[25:75, 75:125] = 255
    _, rgb = load_image(img, (64, 64), (0.5,) * 3, (0.5,) * 3)
    ys, xs = np.nonzero(rgb[..., 0] > 128)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert abs(h - w) <= 1 and abs(h - 32) <= 2


def test_figures_have_colour_scales_and_titles_in_the_papers_terms(tmp_path, monkeypatch):
    import matplotlib.figure

    from condensevit.viz import panel_title
    bars = []
    real = matplotlib.figure.Figure.colorbar
    monkeypatch.setattr(matplotlib.figure.Figure, "colorbar",
                        lambda self, *a, **k: bars.append(k.get("orientation")) or real(self, *a, **k))
    for name in ("stvit_deit_tiny_patch16_224", "lookupvit_tiny_patch16_224"):
        model = timm.create_model(name, **SMALL[name])
        tm = token_maps(model, _input(name, model)[:1])
        titles = [panel_title(k, list(tm.maps)) for k in tm.maps]
        assert not any("blocks." in t for t in titles), titles
        bars.clear()
        render(np.zeros((*_input(name, model).shape[-2:], 3), np.uint8), tm, str(tmp_path / f"{name}.png"))
        assert bars == ["horizontal"] * len(tm.maps)  # one colour scale per kind of map
    assert panel_title("blocks.4", ["center_pool", "blocks.4", "blocks.5"]).startswith("STGM layer 1 (layer 5)")
    assert "global centres" in panel_title("blocks.5", ["center_pool", "blocks.4", "blocks.5"])
    assert panel_title("gather").startswith("MHBC gather")
    assert panel_title("recovery").startswith("recovery") and panel_title("semantic").startswith("semantic tokens")


def test_viz_grid_errors_name_the_grid(tmp_path, capsys):
    for grid in ("0x0", "3", "axb"):
        assert main(["viz", "--model", "lookupvit_tiny_patch16_224", "--image", "sample:china", "--grid", grid,
                     "--out", str(tmp_path / "o.png"), "--model-kwargs", "embed_dim=32", "depth=1",
                     "num_heads=2"]) == 2
        err = capsys.readouterr().err
        assert f"--grid {grid!r}: the compressed grid is HxW" in err and "size" not in err
