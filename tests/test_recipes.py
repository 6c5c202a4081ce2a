"""recipes/: the papers' ImageNet recipes as `train --config` files; `--config` itself; and the DeiT
recipe pieces the trainer gained for them (gradient accumulation, repeated augmentation, lr scaled by
the global batch, drop path, random erasing mode)."""
import glob
import json
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from condensevit.cli import build_parser, main
from condensevit.train import TrainConfig
from condensevit.train.cli import config_from_args
from condensevit.train.config_file import RECIPES_DIR, dump_config

RECIPES = sorted(glob.glob(os.path.join(RECIPES_DIR, "*.yaml")))
NAMES = [os.path.basename(p)[:-5] for p in RECIPES]


def parse(*argv) -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_every_paper_model_has_a_recipe():
    assert set(NAMES) >= {"stvit_deit_tiny", "stvit_deit_small", "stvit_deit_base", "stvit_deit_tiny_finetune",
                          "stvit_deit_small_finetune", "stvit_deit_base_finetune", "stvit_r_swin_small",
                          "stvit_r_swin_base", "lookupvit_base_multigrid"}


@pytest.mark.parametrize("path", RECIPES, ids=NAMES)
def test_recipe_parses_cites_its_source_and_makes_a_global_batch_of_1024_on_8_gpus(path):
    cfg = parse("--config", path)
    text = open(path).read()
    assert "Source:" in text or "OUR" in text  # where the numbers come from, or that they are ours
    assert cfg.global_batch(8) == 1024
    run = cfg.resolved(8)
    name = os.path.basename(path)
    if name.startswith("stvit_r_swin"):  # Swin's code scales all three rates (changsn/STViT-R main.py)
        assert (run.lr, run.warmup_lr, run.min_lr) == pytest.approx((1e-3, 1e-6, 1e-5))
        assert cfg.drop_path == (0.3 if "small" in name else 0.4) and cfg.clip_grad == 5.0
        assert cfg.warmup_epochs == 20 and not cfg.model_ema and not cfg.repeated_aug
    elif "finetune" in name:  # ours
        assert cfg.pretrained_file and cfg.epochs == 30 and run.lr == pytest.approx(2e-4)
    else:  # DeiT's recipe: 5e-4 x 1024 / 512, warm-up and minimum rates not scaled
        assert (run.lr, run.warmup_lr, run.min_lr) == pytest.approx((1e-3, 1e-6, 1e-5))
        assert cfg.epochs == 300 and cfg.drop_path == 0.1 and cfg.repeated_aug and cfg.model_ema
        assert cfg.model_ema_decay == 0.99996 and cfg.distillation_type == "none"
    if "swin" not in name:
        assert cfg.aa == "rand-m9-mstd0.5-inc1" and cfg.reprob == 0.25 and cfg.remode == "pixel"
        assert (cfg.mixup, cfg.cutmix, cfg.mixup_switch_prob) == (0.8, 1.0, 0.5)
    if name.startswith("lookupvit"):
        assert cfg.model_kwargs["train_grids"] == [[3, 3], [5, 5], [7, 7], [10, 10]]


# ---- each recipe runs: 2 steps on a tiny generated ImageFolder, sizes overridden, all else as written

TINY = {  # the sizes a CPU test can afford; the recipe's other settings stay
    "stvit_deit": dict(img_size=64, patch_size=8, embed_dim=32, num_heads=2),
    "stvit_r_swin": dict(embed_dim=32, depths=[2, 2, 6, 2], num_heads=[1, 2, 4, 8]),  # classifies at 224 only
    "lookupvit": dict(img_size=80, patch_size=8, embed_dim=32, num_heads=2),           # 10x10: every train grid
}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 2)):
        for c in ("cat", "dog"):
            os.makedirs(root / split / c)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def _family(name: str) -> str:
    return next(f for f in TINY if name.startswith(f))


@pytest.mark.parametrize("path", RECIPES, ids=NAMES)
def test_recipe_runs_two_steps_with_its_settings(path, tiny_folder, tmp_path):
    name = os.path.basename(path)[:-5]
    recipe = yaml.safe_load(open(path))
    tiny = TINY[_family(name)]
    extra = []
    if recipe.get("pretrained_file"):  # a DeiT of the same tiny size stands for timm's weights
        import timm
        from safetensors.torch import save_file
        deit = timm.create_model(recipe["model"].replace("stvit_", ""), num_classes=2, **tiny)
        save_file(deit.state_dict(), str(tmp_path / "deit.safetensors"))
        extra = ["--pretrained-file", str(tmp_path / "deit.safetensors")]
    out = tmp_path / "run"
    argv = ["train", "--config", path, "--data", str(tiny_folder), "--output", str(out), "--device", "cpu",
            "--model-kwargs", json.dumps(tiny), "--batch-size", "4", "--epochs", "1", "--max-steps-per-epoch", "2",
            "--limit-val-batches", "1", "--no-measure", "--no-progress", "--quiet", *extra]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    ran = summary["config"]
    # every setting of the recipe ran as written, except the ones overridden for size
    overridden = {"data", "output", "device", "batch_size", "epochs", "max_steps_per_epoch", "limit_val_batches",
                  "measure", "progress", "quiet", "pretrained_file", "lr", "warmup_lr", "min_lr"}
    for key, value in recipe.items():
        if key in overridden:
            continue
        if key == "model_kwargs":
            assert ran[key] == {**value, **tiny}
        else:
            assert ran[key] == value, key
    assert summary["global_batch"] == 4 * recipe.get("accum_steps", 1)
    # the learning rates as they ran: scaled by this run's global batch
    assert ran["lr"] == pytest.approx(recipe["lr_base"] * summary["global_batch"] / 512)
    assert summary["epochs_done"] == 1 and (out / "config.yaml").is_file()
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2


# ---- --config itself ---------------------------------------------------------------------------------

def test_flags_on_the_command_line_override_the_file_and_model_kwargs_merge(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: lookupvit_tiny_patch16_224\nbatch-size: 32\nlr: 5e-4\nscale: [0.5, 1]\n"
                 "model_kwargs: {compressed_grid: [3, 3], img_size: 64}\nmodel_ema: true\nno_measure: true\n")
    cfg = parse("--config", str(f))
    assert (cfg.model, cfg.batch_size, cfg.lr, cfg.scale) == ("lookupvit_tiny_patch16_224", 32, 5e-4, (0.5, 1.0))
    assert cfg.model_ema and not cfg.measure and cfg.model_kwargs == {"compressed_grid": [3, 3], "img_size": 64}
    # given flags win, even when they equal the parser's default (64 is --batch-size's default)
    cfg = parse("--batch-size", "64", "--config", str(f), "--no-model-ema", "--model-kwargs", "compressed_grid=5x5")
    assert cfg.batch_size == 64 and not cfg.model_ema
    assert cfg.model_kwargs == {"compressed_grid": (5, 5), "img_size": 64}


@pytest.mark.parametrize("text,message", [
    ("batch_sise: 8\n", "unknown option 'batch_sise'; did you mean batch_size"),
    ("lr: fast\n", "lr: 'fast' is not valid"),
    ("model_ema: 1\n", "model_ema: 1 must be true or false"),
    ("remode: blur\n", "remode: 'blur' must be one of pixel, rand, const"),
    ("- 1\n- 2\n", "must be a mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    assert main(["train", "--config", str(f), "--model", "deit_tiny_patch16_224", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_missing_config_file_names_the_closest_recipe(tmp_path, capsys):
    assert main(["train", "--config", "stvit_deit_smal.yaml", "--output", str(tmp_path / "o")]) == 2
    assert "did you mean recipes/stvit_deit_small.yaml" in capsys.readouterr().err


def test_the_resolved_config_a_run_writes_reads_back_as_the_same_config(tmp_path):
    cfg = TrainConfig(model="deit_tiny_patch16_224", model_kwargs={"img_size": 32}, lr_base=5e-4, batch_size=8,
                      accum_steps=4, scale=(0.5, 1.0), model_ema=True, measure=False, verbose=False,
                      progress=False).resolved(world_size=2)
    assert cfg.lr == pytest.approx(5e-4 * 64 / 512)
    f = tmp_path / "config.yaml"
    f.write_text(dump_config(cfg))
    back = parse("--config", str(f))
    assert back.resolved(2) == cfg


# ---- the DeiT pieces in the trainer ---------------------------------------------------------------------

def _digits(out, *extra, steps=2):
    return main(["train", "--model", "deit_tiny_patch16_224", "--model-kwargs", "img_size=32", "patch_size=8",
                 "embed_dim=32", "depth=2", "num_heads=2", "--data", "digits", "--epochs", "1",
                 "--max-steps-per-epoch", str(steps), "--limit-val-batches", "1", "--output", str(out),
                 "--no-measure", "--no-progress", "--quiet", "--log-interval", "1", *extra])


def test_accumulating_two_half_batches_is_one_full_batch_update(tmp_path):
    # the same images with the same augmentation (seeded per image), no dropout, plain SGD: the
    # half-batch gradients, each divided by 2, sum to the full batch's
    common = ["--opt", "sgd", "--weight-decay", "0", "--warmup-epochs", "0", "--lr", "0.1"]
    from safetensors.torch import load_file
    assert _digits(tmp_path / "full", "--batch-size", "8", *common) == 0
    assert _digits(tmp_path / "accum", "--batch-size", "4", "--accum-steps", "2", *common) == 0
    a = load_file(str(tmp_path / "full" / "last.safetensors"))
    b = load_file(str(tmp_path / "accum" / "last.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    rows = [json.loads(l) for l in (tmp_path / "accum" / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2  # two updates of 2 x 4 images


def test_repeated_augmentation_gives_each_copy_its_own_augmentation():
    from condensevit.data import SeededAugmentation
    from condensevit.train.repeat_aug import RepeatAugmentSampler

    s = RepeatAugmentSampler(10, num_replicas=1, rank=0, seed=0, num_repeats=3)
    s.set_epoch(0)
    items = list(s)
    assert len(items) == len(s) == 10 and len({k for k, _ in items}) == 10  # one key per copy
    idx = [i for _, i in items]
    assert any(idx.count(i) > 1 for i in idx)  # copies of an image come together (3 per image)
    s.set_start(4)
    assert list(s) == items[4:] and len(s) == 6  # resumable
    other = RepeatAugmentSampler(10, seed=1)
    other.set_epoch(0)
    assert [i for _, i in other] != idx  # the run's seed changes the order

    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.rand(()).item(), i

    aug = SeededAugmentation(Noise(), seed=0)
    key, i = items[0]
    same_image = [k for k, j in items if j == i]
    assert len({aug[(k, i)][0] for k in same_image}) == len(same_image)  # different draws per copy
    assert aug[(key, i)] == aug[(key, i)]  # and the same draw again


def test_repeated_aug_drop_path_and_lr_base_run_and_are_recorded(tmp_path):
    assert _digits(tmp_path / "r", "--batch-size", "8", "--repeated-aug", "--drop-path", "0.1", "--lr-base", "5e-4",
                   "--reprob", "0.25", "--remode", "pixel") == 0
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["repeated_aug"] and cfg["drop_path"] == 0.1 and cfg["lr"] == pytest.approx(5e-4 * 8 / 512)
    meta_kwargs = json.loads((tmp_path / "r" / "summary.json").read_text())["model_kwargs"]
    assert "drop_path_rate" not in meta_kwargs  # a training setting, not part of the model's description


@pytest.mark.parametrize("extra,message", [
    (["--accum-steps", "0"], "--accum-steps must be at least 1 (got 0)"),
    (["--drop-path", "1.5"], "--drop-path must be in [0, 1) (got 1.5)"),
    (["--drop-path", "0.1", "--model-kwargs", "drop_path_rate=0.2"], "both set the drop path rate"),
    (["--batch-size", "1000", "--accum-steps", "2"], "--batch-size 1000 x --accum-steps 2 is larger than"),
])
def test_bad_recipe_options_are_clear_errors(tmp_path, capsys, extra, message):
    argv = ["train", "--model", "deit_tiny_patch16_224", "--output", str(tmp_path / "o"), "--no-progress", *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
