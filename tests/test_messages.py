"""Errors that give the real reason, and --help that tells the truth once."""
import re

import pytest
import timm
import torch

import condensevit  # noqa: F401
from condensevit.cli import build_parser, main
from condensevit.layers.pooling import window_grid
from condensevit.models import CheckpointError
from condensevit.train.checkpoint import save_weights

TINY_LOOKUP = dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2)


# ------------------------------------------------------------------------- the real reason

def test_a_grid_that_does_not_split_the_token_map_says_what_fits():
    with pytest.raises(ValueError) as e:
        window_grid((8, 8), (7, 7))
    msg = str(e.value)
    assert "a token map of 8x8 does not split into a 7x7 grid" in msg
    assert "8 tokens take 1-5 or 8 windows" in msg and "7 windows need 7, 12, 13, 14, or 17 or more tokens" in msg
    assert "at least 7 tokens" not in msg
    window_grid((8, 8), (5, 5))  # what the message offers does fit
    with pytest.raises(ValueError, match="a token map of 1x1 is too small for a 2x2 grid"):
        window_grid((1, 1), (2, 2))


def test_stvit_with_49_tokens_on_an_8x8_map_names_the_grids_that_fit(tmp_path, capsys):
    assert main(["train", "--model", "stvit_deit_tiny_patch16_224", "--model-kwargs", "img_size=64", "patch_size=8",
                 "embed_dim=32", "depth=4", "num_heads=2", "stgm_start=2", "num_semantic_tokens=49", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "8 tokens take 1-5 or 8 windows" in err and "a 5x5 grid: 25 tokens" in err


def test_a_checkpoint_of_another_family_is_named_from_its_metadata(tmp_path, capsys):
    lookup = timm.create_model("lookupvit_tiny_patch16_224", num_classes=10, **TINY_LOOKUP)
    path = tmp_path / "lookup.safetensors"
    save_weights(str(path), lookup.state_dict(), dict(format="condensevit", model="lookupvit_tiny_patch16_224",
                                                      model_kwargs=TINY_LOOKUP, num_classes=10))
    assert main(["train", "--model", "stvit_deit_tiny_patch16_224", "--model-kwargs", "img_size=64", "patch_size=8",
                 "embed_dim=32", "depth=4", "num_heads=2", "stgm_start=2", "--pretrained-file", str(path),
                 "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "holds a lookupvit_tiny_patch16_224 (LookupViT, says its metadata)" in err
    assert "initialises from DeiT / ViT checkpoints or STViT ones" in err and "pos_embed" not in err
    # the same through the Python API, and a file of the right family still loads
    from condensevit.models.factory import create_model
    with pytest.raises(CheckpointError, match="holds a lookupvit"):
        create_model("stvit_deit_tiny_patch16_224", num_classes=10, pretrained_file=str(path),
                     model_kwargs=dict(TINY_LOOKUP, depth=4, stgm_start=2))
    create_model("lookupvit_tiny_patch16_224", num_classes=10, pretrained_file=str(path), model_kwargs=TINY_LOOKUP)


def test_bench_names_the_grid_not_the_channels_when_the_input_is_too_small(capsys):
    assert main(["bench", "--models", "lookupvit_tiny_patch16_224", "--input-size", "1,64,64", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "compressed_grid=(5, 5) is larger than the lookup-token grid (4, 4)" in err
    assert "expected images" not in err


# ------------------------------------------------------------------------------------ --help

def _parsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices


def _option_helps(parser) -> dict:
    """Each option's help line as --help prints it (defaults expanded)."""
    fmt = parser._get_formatter()
    return {a.option_strings[-1]: fmt._expand_help(a) for a in parser._actions if a.option_strings and a.help}


def test_help_shows_each_default_once_and_truthfully():
    parsers = _parsers()
    for name, p in parsers.items():
        flat = re.sub(r"\s+", " ", p.format_help())
        assert "(default: None)" not in flat, name
        assert not re.search(r"\(default: [^)]*\) \(default:", flat), name
        assert "(default: False)" not in flat and "(default: True)" not in flat, name
    train = _option_helps(parsers["train"])
    for flag, default in (("--epochs", "30"), ("--lr", "0.001"), ("--warmup-epochs", "2"), ("--batch-size", "64"),
                          ("--min-lr", "1e-05")):
        assert train[flag].endswith(f"(default: {default})"), (flag, train[flag])
    assert train["--no-measure"] == "skip GMACs and throughput in the summary"
    assert train["--device"] == "cpu, cuda or cuda:N (default: cuda when available, else cpu)"
    bench = _option_helps(parsers["bench"])
    assert bench["--rounds"].endswith("images/s is the median of the rounds (with an even number, the mean of the "
                                      "middle two) (default: 2)")


# ------------------------------------------------------------- options checked before any work

BAD_TRAIN_OPTIONS = [
    (["--aa", "foo"], "--aa 'foo' is not an augmentation timm knows (Unknown AA policy foo); e.g. rand-m9-mstd0.5-inc1"),
    (["--aa", "rand-mfoo"], "--aa 'rand-mfoo' is not an augmentation timm knows: section 'mfoo' is not a setting"),
    (["--aa", "rand-m9foo"], "--aa 'rand-m9foo' is not an augmentation timm knows"),
    (["--smoothing", "1.5"], "--smoothing must be in [0, 1) (got 1.5)"),
    (["--clip-grad", "-1"], "--clip-grad must be > 0 (got -1); omit it for no clipping"),
    (["--model-ema-decay", "2"], "--model-ema-decay must be in [0, 1) (got 2)"),
    (["--warmup-epochs", "-3"], "--warmup-epochs must be >= 0 (got -3)"),
    (["--scale", "1.0,0.1"], "--scale 1,0.1 is not a crop-area range: give the smaller first: 0.1,1"),
    (["--scale", "0.5,2"], "--scale 0.5,2 is not a crop-area range: two area fractions 0 < MIN <= MAX <= 1"),
    (["--hflip", "2"], "--hflip must be in [0, 1] (got 2)"),
    (["--mixup", "-1"], "--mixup must be >= 0 (got -1)"),
    (["--cutmix", "-1"], "--cutmix must be >= 0 (got -1)"),
    (["--mixup-prob", "1.5"], "--mixup-prob must be in [0, 1] (got 1.5)"),
    (["--reprob", "5"], "--reprob must be in [0, 1] (got 5)"),
    (["--save-every-steps", "0"], "--save-every-steps must be at least 1 (got 0)"),
    (["--epochs", "0"], "--epochs must be at least 1 (got 0)"),
    (["--batch-size", "0"], "--batch-size must be at least 1 (got 0)"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be at least 1 (got 0)"),
    (["--lr", "-1"], "--lr must be > 0 (got -1)"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0 (got -0.1)"),
    (["--color-jitter", "-1"], "--color-jitter must be >= 0 (got -1)"),
    (["--repeated-aug-repeats", "0"], "--repeated-aug-repeats must be at least 1 (got 0)"),
    (["--distillation-alpha", "2"], "--distillation-alpha must be in [0, 1] (got 2)"),
    (["--distillation-tau", "0"], "--distillation-tau must be > 0 (got 0)"),
    (["--workers", "-1"], "--workers must be >= 0 (got -1)"),
    (["--log-interval", "0"], "--log-interval must be at least 1 (got 0)"),
    (["--opt", "foo"], "--opt 'foo' is not a timm optimizer; e.g. adamw, sgd"),
    (["--sched", "foo"], "--sched 'foo' is not a timm scheduler this trainer can use; e.g. cosine"),
    (["--sched", "plateau"], "steps once per epoch on a validation metric"),
]


@pytest.mark.parametrize("extra,message", BAD_TRAIN_OPTIONS, ids=[" ".join(e) for e, _ in BAD_TRAIN_OPTIONS])
def test_train_options_out_of_range_are_one_line_errors_before_any_work(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main(["train", "--model", "deit_tiny_patch16_224", "--output", str(out), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()  # nothing was started


def test_a_yaml_recipe_gets_the_same_range_errors(tmp_path, capsys):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("model: deit_tiny_patch16_224\nclip_grad: -1\n")
    assert main(["train", "--config", str(cfg), "--output", str(tmp_path / "o")]) == 2
    assert "--clip-grad must be > 0 (got -1); omit it for no clipping" in capsys.readouterr().err
    cfg.write_text("model: deit_tiny_patch16_224\naa: rand-mfoo\n")
    assert main(["train", "--config", str(cfg), "--output", str(tmp_path / "o")]) == 2
    assert "--aa 'rand-mfoo'" in capsys.readouterr().err


def test_train_config_check_accepts_good_values_and_the_papers_recipes():
    from condensevit.train.config import TrainConfig, check_aa
    TrainConfig(model="x", clip_grad=5.0, smoothing=0.0, scale=(0.08, 1.0), hflip=0.5, mixup=0.8, cutmix=1.0,
                reprob=0.25, model_ema_decay=0.99996, opt="lamb", sched="step").check()
    for spec in ("rand-m9-mstd0.5-inc1", "rand-m6-n3-mstd0.5", "augmix-m5-w4-d2", "v0", "original", "none", None):
        check_aa(spec)
    with pytest.raises(ValueError, match="--lr must be > 0"):
        TrainConfig(model="x", lr=0.0).check()


@pytest.mark.parametrize("argv,message", [
    (["caption", "train", "--smoothing", "1.5"], "--smoothing must be in [0, 1) (got 1.5)"),
    (["caption", "train", "--clip-grad", "-1"], "--clip-grad must be >= 0 (got -1); 0 turns clipping off"),
    (["caption", "train", "--lr", "0"], "--lr must be > 0 (got 0)"),
    (["bench", "--models", "deit_tiny_patch16_224", "--threads", "-2"], "--threads must be >= 1 (got -2)"),
    (["bench", "--models", "deit_tiny_patch16_224", "--min-time", "-1"], "--min-time must be >= 0 (got -1)"),
    (["bench", "--models", "deit_tiny_patch16_224", "--iters", "0"], "--iters must be at least 1 (got 0)"),
    (["demo", "--threads", "0"], "--threads must be at least 1 (got 0)"),
    (["eval", "--checkpoint", "x.safetensors", "--batch-size", "0"], "--batch-size must be at least 1 (got 0)"),
    (["viz", "--model", "stvit_deit_tiny_patch16_224", "--image", "sample:china", "--max-tokens", "0"],
     "--max-tokens must be at least 1 (got 0)"),
])
def test_other_commands_check_their_numbers_first(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    if argv[0] in ("demo", "viz"):
        argv = argv + ["--out", str(tmp_path / ("d" if argv[0] == "demo" else "v.png"))]
    if argv[:2] == ["caption", "train"]:
        argv = argv + ["--output", str(tmp_path / "c")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ------------------------------------------------------------------ figure files named truly

@pytest.mark.parametrize("argv,flag", [
    (["bench", "--models", "deit_tiny_patch16_224", "--quiet", "--plot"], "--plot"),
    (["viz", "--model", "stvit_deit_tiny_patch16_224", "--image", "sample:china", "--out"], "--out"),
    (["caption", "predict", "--checkpoint", "missing.safetensors", "--image", "sample:digit_scenes", "--viz"], "--viz"),
])
def test_figure_outputs_need_a_format_matplotlib_writes_checked_first(tmp_path, capsys, argv, flag):
    assert main(argv + [str(tmp_path / "x.txt")]) == 2
    err = capsys.readouterr().err
    assert f"{flag} {tmp_path / 'x.txt'}: matplotlib cannot write .txt figures; use one of" in err
    assert "png" in err and "svg" in err and "Traceback" not in err
    assert main(argv + [str(tmp_path / "noext")]) == 2  # savefig would write noext.png: refused, not guessed
    err = capsys.readouterr().err
    assert f"{flag} {tmp_path / 'noext'} has no extension; name the figure's format, e.g. {tmp_path / 'noext'}.png" in err
    assert not list(tmp_path.iterdir())


def test_figure_file_check_accepts_matplotlibs_formats(tmp_path):
    from condensevit.outputs import check_figure_file, figure_formats
    assert {"png", "pdf", "svg", "jpg"} <= set(figure_formats())
    for ext in ("png", "PDF", "svg"):
        check_figure_file(str(tmp_path / f"f.{ext}"), "--out")


# ---------------------------------------------------------------- the reason, not a symptom

def _lookup_run(folder):
    """A run folder as training leaves it: last.safetensors (with metadata) and last.state.pth."""
    import torch
    lookup = timm.create_model("lookupvit_tiny_patch16_224", num_classes=10, **TINY_LOOKUP)
    folder.mkdir()
    save_weights(str(folder / "last.safetensors"), lookup.state_dict(),
                 dict(format="condensevit", model="lookupvit_tiny_patch16_224", model_kwargs=TINY_LOOKUP,
                      num_classes=10))
    torch.save({"optimizer": {"state": {}}, "global_step": 3, "epoch": 1, "weights_file": "last.safetensors"},
               folder / "last.state.pth")
    return folder


def test_eval_takes_a_run_folder_and_names_the_state_file_as_such(tmp_path, capsys):
    run = _lookup_run(tmp_path / "run")
    assert main(["eval", "--checkpoint", str(run), "--limit-batches", "1", "--batch-size", "8", "--json"]) == 0
    assert str(run / "last.safetensors") in capsys.readouterr().out  # the folder stands for its last.safetensors
    assert main(["eval", "--checkpoint", str(run / "last.state.pth")]) == 2
    err = capsys.readouterr().err
    assert "it is a training run's state (optimizer, schedule, random generators), not its weights; pass " \
           f"'{run / 'last.safetensors'}' beside it" in err and "holds no tensors" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", "--checkpoint", str(empty)]) == 2
    assert "is a folder that holds no checkpoint" in capsys.readouterr().err
    (empty / "w.pth").write_bytes(b"")
    assert main(["eval", "--checkpoint", str(empty)]) == 2
    assert f"is a folder, not a checkpoint file; pass one of its files, e.g. '{empty / 'w.pth'}'" in \
        capsys.readouterr().err


def test_pretrained_file_takes_a_run_folder(tmp_path):
    from condensevit.models.factory import create_model
    run = _lookup_run(tmp_path / "run")
    model = create_model("lookupvit_tiny_patch16_224", num_classes=10, pretrained_file=str(run),
                         model_kwargs=TINY_LOOKUP)
    from safetensors.torch import load_file
    import torch
    saved = load_file(str(run / "last.safetensors"))
    assert torch.equal(model.state_dict()["head.weight"], saved["head.weight"])


def test_viz_names_a_folder_without_frames(tmp_path, capsys):
    (tmp_path / "frames").mkdir()
    assert main(["viz", "--model", "stvit_deit_tiny_patch16_224", "--image", str(tmp_path / "frames"),
                 "--out", str(tmp_path / "v.png")]) == 2
    err = capsys.readouterr().err
    assert f"--image '{tmp_path / 'frames'}' is a folder without frames" in err and "is a clip" not in err


def test_a_non_integer_img_size_is_named_not_a_formatting_error(tmp_path, capsys):
    assert main(["train", "--model", "stvit_deit_tiny_patch16_224", "--model-kwargs", "img_size=abc",
                 "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "img_size='abc' must be 2 positive ints, e.g. 224 or (224, 224)" in err
    assert "string formatting" not in err


def test_bench_says_an_image_model_was_given_a_clip_size(capsys):
    assert main(["bench", "--models", "deit_tiny_patch16_224", "--input-size", "3,4,64,64", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--input-size 3,4,64,64 is a clip size (C, T, H, W) but deit_tiny_patch16_224 is an image model" in err
    assert "num_frames" not in err


def test_caption_data_without_images_says_so(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    (tmp_path / "a.json").write_text('{"images": [], "annotations": []}')
    assert main(["caption", "train", "--encoder", "stvit_deit_tiny_patch16_224", "--encoder-kwargs", "img_size=64",
                 "patch_size=8", "embed_dim=32", "depth=4", "num_heads=2", "stgm_start=2",
                 "--data", f"coco:{tmp_path / 'a.json'}:{tmp_path / 'img'}", "--output", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "the captions file has no images" in err and "--split-file" not in err


# ------------------------------------------------------------------------- model input checks

TINY_IMAGE_FAMILIES = {
    "stvit_deit_tiny_patch16_224": dict(embed_dim=32, depth=3, num_heads=2, img_size=64, num_semantic_tokens=4,
                                        stgm_start=1),
    "stvit_r_swin_tiny_patch4_window7_224": dict(embed_dim=16, depths=(1, 1, 6, 1), num_heads=(1, 1, 2, 2)),
    "lookupvit_tiny_patch16_224": dict(embed_dim=32, depth=2, num_heads=2, img_size=64, compressed_grid=(2, 2)),
    "stvit_swin_tiny_patch4_window7_224": dict(embed_dim=16, depths=(1, 1, 6, 1), num_heads=(1, 1, 2, 2),
                                               stgm_start=2),
}


@pytest.mark.parametrize("name", list(TINY_IMAGE_FAMILIES))
def test_image_models_name_channels_last_integer_and_empty_input(name):
    import torch
    model = timm.create_model(name, num_classes=5, **TINY_IMAGE_FAMILIES[name]).eval()
    size = model.pretrained_cfg["input_size"][1:] if "img_size" not in TINY_IMAGE_FAMILIES[name] else (64, 64)
    with pytest.raises(ValueError, match=r"looks channels-last \(B, H, W, C\); images are \(B, C, H, W\): pass "
                                         r"x.permute\(0, 3, 1, 2\)"):
        model(torch.zeros(1, *size, 3))
    with pytest.raises(ValueError, match=r"input of dtype torch.uint8 holds integer pixels; .* x.float\(\) / 255"):
        model(torch.zeros(1, 3, *size, dtype=torch.uint8))
    with torch.no_grad():
        assert model(torch.zeros(0, 3, *size)).shape == (0, 5)  # an empty batch gives an empty batch


def test_video_models_name_channels_last_and_integer_clips():
    import torch
    model = timm.create_model("stvit_video_tiny_patch2x16_224", img_size=32, num_frames=4, embed_dim=32, depth=3,
                              num_heads=2, stgm_start=1, semantic_grid=(2, 2, 2), num_classes=5).eval()
    with pytest.raises(ValueError, match=r"looks channels-last \(B, T, H, W, C\)"):
        model(torch.zeros(1, 4, 32, 32, 3))
    with pytest.raises(ValueError, match="holds integer pixels"):
        model(torch.zeros(1, 3, 4, 32, 32, dtype=torch.uint8))


def test_stvit_swin_suggests_a_size_it_takes():
    import torch
    model = timm.create_model("stvit_swin_tiny_patch4_window7_224",
                              **TINY_IMAGE_FAMILIES["stvit_swin_tiny_patch4_window7_224"]).eval()
    with pytest.raises(ValueError) as e:
        model(torch.zeros(1, 3, 225, 225))
    assert "225x225 is not a multiple of the 4x4 patches: resize or crop the input to 224x224" in str(e.value)
    assert "img_size=(225, 225)" not in str(e.value)


@pytest.mark.parametrize("name", ["stvit_deit_tiny_patch16_224", "lookupvit_tiny_patch16_224",
                                  "stvit_video_tiny_patch2x16_224", "stvit_swin_tiny_patch4_window7_224",
                                  "stvit_r_swin_tiny_patch4_window7_224"])
@pytest.mark.parametrize("kwargs", [dict(patch_size=0), dict(img_size="abc"), dict(img_size=(0, 64))],
                         ids=["patch0", "img_abc", "img0"])
def test_constructor_sizes_are_value_errors_in_every_family(name, kwargs):
    from condensevit.models.factory import create_model
    with pytest.raises(ValueError, match=r"(patch_size|img_size)"):
        create_model(name, num_classes=2, model_kwargs=dict(kwargs, device="meta"))


@pytest.mark.parametrize("argv, usage", [
    (["eval", "--checkpoint", "x", "--bogus", "1"], "usage: condensevit eval"),
    (["caption", "train", "--bogus"], "usage: condensevit caption train"),
])
def test_an_unknown_option_is_reported_with_the_commands_own_usage(argv, usage, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert usage in err and "unrecognized arguments: --bogus" in err and "--help" in err


def test_eval_takes_trains_name_for_the_validation_cap():
    args = build_parser().parse_args(["eval", "--checkpoint", "x", "--limit-val-batches", "2"])
    assert args.limit_batches == 2


def test_stvit_swin_size_message_is_one_sentence_with_a_size_it_takes():
    m = timm.create_model("test_stvit_swin").eval()
    size = m.pretrained_cfg["input_size"][-1]
    with pytest.raises(ValueError) as e:
        m(torch.randn(1, 3, size + 1, size + 1))
    msg = str(e.value)
    assert f"resize or crop the input to {size}x{size}" in msg and "or build" not in msg
