"""``condensevit caption train|eval|predict``.

Examples::

    condensevit caption train --encoder-checkpoint runs/lookup/last.safetensors --data digit_scenes \\
        --epochs 20 --cache-tokens --output runs/cap_lookup
    condensevit caption train --encoder vit_base_patch16_224 --encoder-checkpoint vit_base.pth \\
        --data coco:annotations/captions_train2014.json:train2014 --split-file dataset_coco.json
    condensevit caption eval --checkpoint runs/cap_lookup/last.safetensors --beam-size 3
    condensevit caption predict --checkpoint runs/cap_lookup/last.safetensors --image scene.png --viz scene_tokens.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["add_parser"]


def _kwargs(items) -> dict:
    from ..train.cli import parse_model_kwargs
    return parse_model_kwargs(items)


def _add_decoding(p: argparse.ArgumentParser):
    p.add_argument("--beam-size", type=int, default=1, help="1: greedy decoding (default); more: beam search")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search ranks finished captions by log-probability / length ** this (default 1)")
    p.add_argument("--max-len", type=int, default=None,
                   help="longest caption in tokens, <bos> and <eos> included (default: the decoder's)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")


def add_parser(sub: argparse._SubParsersAction):
    from .engine import CaptionConfig
    d = CaptionConfig()
    cap = sub.add_parser("caption", help="image captioning with a frozen encoder (train, eval, predict)",
                         description="Captioning with a frozen condensed encoder: the encoder (trained for "
                                     "classification) is frozen; a transformer text decoder learns to caption from "
                                     "its tokens. See docs/captioning.md.")
    csub = cap.add_subparsers(dest="caption_command", metavar="ACTION")
    cap.set_defaults(func=lambda args: (cap.print_help(), 2)[1])

    t = csub.add_parser("train", help="train a caption decoder on a frozen encoder")
    t.add_argument("--encoder", default=None, help="encoder model name, ours or timm's (optional when "
                                                   "--encoder-checkpoint is a `condensevit train` output)")
    t.add_argument("--encoder-checkpoint", default=None,
                   help="encoder weights: a `condensevit train` checkpoint or a pretrained file")
    t.add_argument("--encoder-kwargs", nargs="+", default=None, metavar="KEY=VALUE",
                   help="encoder constructor arguments on top of the checkpoint's (e.g. compressed_grid=4x4)")
    t.add_argument("--streams", choices=("default", "both"), default=d.streams,
                   help="LookupViT: 'default' = the compressed tokens, 'both' = compressed and lookup tokens")
    t.add_argument("--data", default=d.data, help="digit_scenes (embedded) or coco:ANN.json:IMG_DIR")
    t.add_argument("--split-file", default=None,
                   help="coco data: Karpathy's dataset_coco.json or {train,val,test} lists (default: 90/5/5 by seed)")
    t.add_argument("--strict", action="store_true", help="images the captions name but that are missing are an error "
                                                         "instead of skipped")
    t.add_argument("--output", default=None, help="run folder (default runs/caption_<encoder>)")
    t.add_argument("--resume", default=None, help="'auto' (OUTPUT's last checkpoint) or a run folder / state file")
    t.add_argument("--epochs", type=int, default=d.epochs)
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    t.add_argument("--captions-per-image", type=int, default=d.captions_per_image,
                   help="reference captions of each image per step")
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--weight-decay", type=float, default=d.weight_decay)
    t.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs)
    t.add_argument("--min-lr", type=float, default=d.min_lr)
    t.add_argument("--smoothing", type=float, default=d.smoothing, help="label smoothing of the cross-entropy")
    t.add_argument("--clip-grad", type=float, default=d.clip_grad, help="gradient norm clip (0: off)")
    t.add_argument("--min-count", type=int, default=d.min_count, help="words rarer than this become <unk>")
    t.add_argument("--max-len", type=int, default=d.max_len, help="longest caption in tokens, <bos>/<eos> included")
    t.add_argument("--dim", type=int, default=d.dim, help="decoder width")
    t.add_argument("--depth", type=int, default=d.depth, help="decoder layers")
    t.add_argument("--num-heads", type=int, default=d.num_heads)
    t.add_argument("--dropout", type=float, default=d.dropout)
    t.add_argument("--no-memory-pos-embed", dest="memory_pos_embed", action="store_false",
                   help="no learned position embedding on the encoder tokens")
    t.add_argument("--cache-tokens", action="store_true",
                   help="compute the frozen encoder's tokens once per image and keep them in memory (no augmentation)")
    t.add_argument("--aug-scale", type=float, default=None,
                   help="random-resized-crop scale lower bound for training images (default: no augmentation)")
    t.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    t.add_argument("--limit-val-images", type=int, default=None, help="score only the first N validation images")
    t.add_argument("--workers", type=int, default=0)
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--device", default=None)
    t.add_argument("--no-measure", dest="measure", action="store_false", help="skip GMACs in the summary")
    t.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None)
    t.add_argument("--quiet", dest="verbose", action="store_false")
    t.add_argument("--debug-stop-at-step", type=int, default=None, help=argparse.SUPPRESS)
    t.add_argument("--debug-data-count", default=None, help=argparse.SUPPRESS)  # JSON {"train": n, ...}
    t.set_defaults(func=_cmd_train)

    e = csub.add_parser("eval", help="BLEU-1..4 and CIDEr-D of a caption checkpoint")
    e.add_argument("--checkpoint", required=True, help="last.safetensors / best.safetensors of a caption run")
    e.add_argument("--data", default=None, help="default: the data the checkpoint was trained on")
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    e.add_argument("--split-file", default=None)
    e.add_argument("--strict", action="store_true")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--limit", type=int, default=None, help="only the first N images")
    e.add_argument("--predictions", default=None, help="write the captions here (JSON list of image_id, caption)")
    e.add_argument("--json", default=None, help="write the scores here")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--debug-data-count", type=int, default=None, help=argparse.SUPPRESS)
    _add_decoding(e)
    e.set_defaults(func=_cmd_eval)

    p = csub.add_parser("predict", help="caption one image")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True,
                   help="an image file, or sample:digit_scenes[:N] (test scene N of the embedded set)")
    p.add_argument("--viz", default=None, metavar="PNG",
                   help="draw the image with its caption and the encoder's token maps (STViT, LookupViT) here")
    _add_decoding(p)
    p.set_defaults(func=_cmd_predict)


def _cmd_train(args) -> int:
    from .engine import CaptionConfig, train_captioner
    count = None
    if args.debug_data_count:
        count = json.loads(args.debug_data_count)
    cfg = CaptionConfig(
        encoder=args.encoder, encoder_checkpoint=args.encoder_checkpoint, encoder_kwargs=_kwargs(args.encoder_kwargs),
        streams=args.streams, data=args.data, split_file=args.split_file, strict=args.strict, output=args.output,
        resume=args.resume, epochs=args.epochs, batch_size=args.batch_size, captions_per_image=args.captions_per_image,
        lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, min_lr=args.min_lr,
        smoothing=args.smoothing, clip_grad=args.clip_grad or None, min_count=args.min_count, max_len=args.max_len,
        dim=args.dim, depth=args.depth, num_heads=args.num_heads, dropout=args.dropout,
        memory_pos_embed=args.memory_pos_embed, cache_tokens=args.cache_tokens, aug_scale=args.aug_scale,
        eval_batch_size=args.eval_batch_size, limit_val_images=args.limit_val_images, workers=args.workers,
        seed=args.seed, device=args.device, measure=args.measure, progress=args.progress, verbose=args.verbose,
        debug_stop_at_step=args.debug_stop_at_step, data_count=count)
    result = train_captioner(cfg)
    return 0 if not result.interrupted else 143


def _cmd_eval(args) -> int:
    from ..outputs import check_output_file
    from .engine import evaluate_captioner
    for flag, path in (("--json", args.json), ("--predictions", args.predictions)):
        if path:
            check_output_file(path, flag)  # before any captioning
    out = evaluate_captioner(args.checkpoint, args.data, split=args.split, beam_size=args.beam_size,
                             length_penalty=args.length_penalty, max_len=args.max_len, batch_size=args.batch_size,
                             device=args.device, strict=args.strict, split_file=args.split_file, limit=args.limit,
                             seed=args.seed, count=args.debug_data_count, predictions_file=args.predictions)
    how = "greedy" if out["beam_size"] == 1 else f"beam {out['beam_size']}"
    print(f"{out['split']} ({out['images']} images, {how}"
          f"): BLEU-1 {out['bleu1']:.4f}  BLEU-2 {out['bleu2']:.4f}  BLEU-3 {out['bleu3']:.4f}  BLEU-4 "
          f"{out['bleu4']:.4f}  CIDEr-D {out['cider']:.4f}  ({out['captions_per_s']:.1f} captions/s)")
    for ex in out["examples"]:
        print(f"  {ex['image_id']}: {ex['caption']!r}  (reference: {ex['references'][0]!r})")
    if args.json:
        from ..train.checkpoint import atomic_write
        atomic_write(args.json, lambda f: f.write((json.dumps(out, indent=2) + "\n").encode()))
    return 0


def _load_input(spec: str, input_size, cfg) -> tuple:
    """(normalised tensor (1, C, H, W), RGB array) of an image file or sample:digit_scenes[:N]."""
    import numpy as np

    from ..viz import load_image
    mean, std = cfg["mean"], cfg["std"]
    if spec.startswith("sample:"):
        name, _, idx = spec[len("sample:"):].partition(":")
        if name != "digit_scenes":
            raise ValueError(f"no sample {name!r}; use sample:digit_scenes[:N] or an image file")
        from .data import DigitScenes
        try:
            i = int(idx or 0)
        except ValueError:
            raise ValueError(f"sample index {idx!r} must be an int") from None
        scenes = DigitScenes("test")
        if not 0 <= i < len(scenes):
            raise ValueError(f"sample:digit_scenes:{i} is out of range: the test split has {len(scenes)} scenes")
        return load_image(np.asarray(scenes.image(i)), input_size[1:], mean, std)
    return load_image(spec, input_size[1:], mean, std)


def _cmd_predict(args) -> int:
    import torch
    from timm.data import resolve_data_config

    from ..outputs import check_figure_file
    from .engine import load_captioner
    if args.viz:
        check_figure_file(args.viz, "--viz")  # before the model is loaded
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    captioner, tokenizer, meta = load_captioner(args.checkpoint, device)
    encoder = captioner.encoder.model
    cfg = resolve_data_config({}, model=encoder)
    x, rgb = _load_input(args.image, tuple(meta["input_size"]), cfg)
    ids = captioner.generate(x.to(device), bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, max_len=args.max_len,
                             beam_size=args.beam_size, length_penalty=args.length_penalty)
    caption = tokenizer.decode(ids[0].tolist())
    print(caption)
    if args.viz:
        _draw(args.viz, rgb, caption, encoder, x.to(device), meta)
        print(f"wrote {args.viz}", file=sys.stderr)
    return 0


def _draw(path: str, rgb, caption: str, encoder, x, meta: dict):
    """The image with its caption; with the encoder's token maps beside it when the family has them."""
    from ..viz import render, token_maps
    title = f"\"{caption}\"\n{meta.get('encoder')} (frozen)"
    if hasattr(encoder, "token_maps"):
        render(rgb, token_maps(encoder, x), path, title=title)
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4, 4.6), dpi=100)
    ax.imshow(rgb)
    ax.set_title(f"{title}\n(no condensed tokens to map)", fontsize=8)
    ax.axis("off")
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
