"""Errors that give the real reason, and --help that tells the truth once."""
import re

import pytest
import timm

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
