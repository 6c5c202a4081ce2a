"""Every training command in the README and docs/training.md runs as written, scaled down: a tiny
model of each family, two processes with gloo under torchrun, two steps; then the eval and viz
commands on what they trained. Sizes, epochs, data paths and downloaded files are the only changes
(a tiny generated ImageFolder for /data/imagenet, tiny generated checkpoints for the pretrained and
teacher files)."""
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import condensevit  # noqa: F401  (registers the models)
from condensevit.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", os.path.join("docs", "training.md"))

# family -> (model, tiny kwargs); the video families take clips
FAMILIES = {
    "deit": ("deit_tiny_patch16_224", dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2)),
    "stvit": ("stvit_deit_tiny_patch16_224",
              dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, stgm_start=2, num_semantic_tokens=4)),
    "lookupvit": ("lookupvit_tiny_patch16_224",
                  dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, compressed_grid=(3, 3))),
    "stvit_r": ("stvit_r_swin_tiny_patch4_window7_224", dict(embed_dim=16, depths=(1, 1, 6, 1), num_heads=(1, 1, 2, 2))),
    "vit_video": ("vit_video_tiny_patch2x16_224",
                  dict(img_size=32, num_frames=4, patch_size=8, embed_dim=32, depth=2, num_heads=2)),
    "stvit_video": ("stvit_video_tiny_patch2x16_224",
                    dict(img_size=32, num_frames=4, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                         semantic_grid=(1, 2, 2), stgm_start=0)),
    "lookupvit_video": ("lookupvit_video_tiny_patch2x16_224",
                        dict(img_size=32, num_frames=4, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             compressed_grid=(1, 2, 2))),
}
VIDEO = ("vit_video", "stvit_video", "lookupvit_video")
TEACHER = ("deit_tiny_patch16_224", FAMILIES["deit"][1])


def family_of(model: str) -> str:
    for prefix, fam in (("stvit_r_", "stvit_r"), ("stvit_video", "stvit_video"), ("lookupvit_video", "lookupvit_video"),
                        ("vit_video", "vit_video"), ("stvit_", "stvit"), ("lookupvit_", "lookupvit")):
        if model.startswith(prefix):
            return fam
    return "deit"


def documented_commands():
    """(where, argv after `condensevit`, launched with torchrun) of every condensevit command in the
    bash blocks of the docs."""
    out = []
    for doc in DOCS:
        text = open(os.path.join(ROOT, doc)).read()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                tokens = shlex.split(line, comments=True)
                if not tokens:
                    continue
                if tokens[0] == "condensevit":
                    out.append((doc, tokens[1:], False))
                elif tokens[0] == "torchrun" and "condensevit.cli" in tokens:
                    out.append((doc, tokens[tokens.index("condensevit.cli") + 1:], True))
    return out


def _model_of(opts) -> str:
    """The command's model: its --model, else the model of its --config file (a recipe)."""
    if "--model" in opts:
        return opts["--model"][0]
    import yaml
    with open(os.path.join(ROOT, opts["--config"][0])) as f:
        return yaml.safe_load(f)["model"]


def _options(argv):
    """argv -> (subcommand, {flag: [values]}) in order."""
    opts, flag = {}, None
    for t in argv[1:]:
        if t.startswith("--"):
            flag = t
            opts[flag] = []
        elif flag is not None:
            opts[flag].append(t)
    return argv[0], opts


def _kw(kwargs: dict) -> list[str]:
    def fmt(v):
        if isinstance(v, tuple):
            return "x".join(map(str, v)) if len(v) in (2, 3) else repr(v).replace(" ", "")
        return str(v)
    return [f"{k}={fmt(v)}" for k, v in kwargs.items()]


def _save(model: torch.nn.Module, path):
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The stand-ins for downloaded data and weights."""
    import timm
    root = tmp_path_factory.mktemp("readme")
    imagenet = root / "imagenet"
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):  # 9 per process: two steps of 4
        for c in range(3):
            os.makedirs(imagenet / split / f"class{c}")
            for i in range(n):
                img = (rng.random((40, 48, 3)) * 80 + 60 * c).astype(np.uint8)
                Image.fromarray(img).save(imagenet / split / f"class{c}" / f"{i}.png")
    pretrained = {}
    for fam, (model, kw) in FAMILIES.items():
        if fam in VIDEO:
            continue
        if fam == "stvit_r":  # STViT-R loads the authors' STViT-R checkpoints
            src = timm.create_model(model, num_classes=1000, **kw)
        else:  # the others load DeiT / ViT checkpoints
            vit_kw = {k: v for k, v in kw.items() if k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")}
            src = timm.create_model("deit_tiny_patch16_224", num_classes=1000, **vit_kw)
        pretrained[fam] = _save(src, root / f"pretrained_{fam}.pth")
    teachers = {n: _save(timm.create_model(TEACHER[0], num_classes=n, **TEACHER[1]), root / f"teacher{n}.pth")
                for n in (3, 10)}
    return dict(root=root, imagenet=str(imagenet), pretrained=pretrained, teachers=teachers)


def scale_down(argv, fam, files, out):
    """A documented ``train`` command with a tiny model of family ``fam``, two steps, small batches,
    and local stand-ins for its data and files."""
    _, opts = _options(argv)
    model, kw = FAMILIES[fam]
    data = (opts.get("--data") or ["digits"])[0]
    if data not in ("digits", "moving_digits", "moving_digits_direction"):
        data = files["imagenet"]
    classes = 3 if data == files["imagenet"] else 10
    opts.update({"--model": [model], "--model-kwargs": _kw(kw), "--data": [data], "--epochs": ["1"],
                 "--batch-size": ["4"], "--output": [str(out)], "--device": ["cpu"],
                 "--max-steps-per-epoch": ["2"], "--limit-val-batches": ["1"]})
    opts.pop("--eval-batch-size", None)
    if "--config" in opts:  # a recipe: every other setting as the file has it
        opts["--config"] = [os.path.join(ROOT, opts["--config"][0])]
    if "--pretrained-file" in opts:
        opts["--pretrained-file"] = [files["pretrained"][fam]]
    if "--teacher" in opts:
        opts["--teacher"] = [TEACHER[0]]
        opts["--teacher-kwargs"] = _kw(TEACHER[1])
        opts["--teacher-checkpoint"] = [files["teachers"][classes]]
    args = ["train"]
    for flag, values in opts.items():
        args += [flag, *values]
    return args + ["--no-measure", "--no-progress", "--quiet"]


def _leaves_parameters_unused(fam: str) -> bool:
    """Issue 11 item 4 (branch h11c): LookupViT with pool='compressed' gives some parameters no
    gradient, which DDP refuses. True while that holds for the family's tiny model."""
    import timm

    from condensevit.data import model_input_size
    m = timm.create_model(FAMILIES[fam][0], num_classes=3, **FAMILIES[fam][1])
    m(torch.randn(2, *model_input_size(m))).sum().backward()
    return any(p.requires_grad and p.grad is None for p in m.parameters())


def test_every_documented_training_command_runs_scaled_down_for_every_family(files, tmp_path):
    commands = documented_commands()
    trains = [(doc, argv, tr) for doc, argv, tr in commands if argv[0] == "train"]
    assert len(trains) >= 3, "the README and docs/training.md should show training commands"
    jobs, by_output = [], {}
    for i, (doc, argv, _) in enumerate(trains):
        _, opts = _options(argv)
        video = (opts.get("--data") or ["digits"])[0].startswith("moving_digits") or \
            family_of(_model_of(opts)) in VIDEO
        for fam in (VIDEO if video else [f for f in FAMILIES if f not in VIDEO]):
            out = tmp_path / f"cmd{i}_{fam}"
            jobs.append(dict(id=f"{doc} #{i} {fam}", argv=scale_down(argv, fam, files, out), fam=fam))
        if "--output" in opts:  # the eval / viz commands read it: the run of the command's own family
            fam = family_of(_model_of(opts))
            by_output[opts["--output"][0]] = (tmp_path / f"cmd{i}_{fam}", f"{doc} #{i} {fam}")
    # a folder in use by another training (rank 0 holds its lock): every rank stops at once
    locked = dict(jobs[0], id="locked", lock_output=True, argv=[a if a != str(jobs[0]["argv"][
        jobs[0]["argv"].index("--output") + 1]) else str(tmp_path / "locked") for a in jobs[0]["argv"]])
    jobs.append(locked)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(ROOT, "tests", "torchrun_driver.py"), str(tmp_path / "jobs.json"), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert all(r["locked"]["rc"] == 2 for r in ranks)
    assert "is in use by process" in ranks[0]["locked"]["err"]
    assert "rank 0 stopped:" in ranks[1]["locked"]["err"] and "is in use by process" in ranks[1]["locked"]["err"]
    failed = {j["id"]: (j["fam"], ranks[0][j["id"]]["err"][-1500:] + ranks[1][j["id"]]["err"][-1500:])
              for j in jobs if j["id"] != "locked" and any(r[j["id"]]["rc"] != 0 for r in ranks)}
    known = {k for k, (fam, err) in failed.items()
             if fam in ("lookupvit", "lookupvit_video") and "did not receive grad" in err
             and _leaves_parameters_unused(fam)}
    assert set(failed) <= known, "\n\n".join(f"{k}:\n{v[1]}" for k, v in failed.items() if k not in known)

    # the eval and viz commands, on what the training commands wrote
    for doc, argv, _ in commands:
        if argv[0] not in ("eval", "viz"):
            continue
        _, opts = _options(argv)
        args = list(argv)
        if "--checkpoint" in opts:
            run_dir = os.path.dirname(opts["--checkpoint"][0])
            assert run_dir in by_output, f"{doc}: {' '.join(argv)} reads a run no documented command trains"
            run_path, job_id = by_output[run_dir]
            if job_id in known:
                continue  # its training is the known failure above
            args[args.index("--checkpoint") + 1] = str(run_path / os.path.basename(opts["--checkpoint"][0]))
        if "--out" in opts:
            args[args.index("--out") + 1] = str(tmp_path / opts["--out"][0])
        if argv[0] == "eval":
            args += ["--limit-batches", "1", "--batch-size", "8"]
        assert main(args) == 0, f"{doc}: {' '.join(argv)}"
    if known:
        pytest.xfail("LookupViT under DDP: pool='compressed' leaves the last block's scatter and lookup MLP without "
                     "gradients (issue 11 item 4, fixed on branch h11c); every other command passed: "
                     + ", ".join(sorted(known)))
