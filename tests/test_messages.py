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
