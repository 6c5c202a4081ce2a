"""Training, evaluation and prediction of captioners: the API behind ``condensevit caption``.

    from condensevit.caption import CaptionConfig, train_captioner, evaluate_captioner, load_captioner
    result = train_captioner(CaptionConfig(encoder="lookupvit_tiny_patch16_224",
                                           encoder_checkpoint="runs/lookup/last.safetensors",
                                           data="digit_scenes", epochs=20, output="runs/cap_lookup"))
    scores = evaluate_captioner("runs/cap_lookup/last.safetensors", split="test", beam_size=3)

A run folder holds ``encoder.safetensors`` (the frozen encoder's weights, written once, with its
model name and kwargs, so the folder is self-contained), ``last.safetensors`` (the decoder, with the
vocabulary, the decoder's configuration and the encoder's identity and weight hash in its metadata)
beside ``last.state.pth`` (optimizer, scheduler, RNG, epoch, step; written with
:func:`condensevit.train.checkpoint.save_checkpoint`, atomically), ``best.safetensors`` (highest
validation CIDEr-D), ``log.jsonl`` (one row per epoch) and ``summary.json``.

Training: teacher-forced cross-entropy with label smoothing on the decoder alone (the encoder is
frozen: eval mode, no gradient, not in the optimizer); each image contributes
``captions_per_image`` of its references per step, drawn by (seed, epoch, image), so a run resumed
mid-epoch sees the same data. AdamW, cosine schedule with warm-up per step (timm). With
``cache_tokens`` the encoder's tokens of every training and validation image are computed once and
kept in memory (augmentation is then off: the images must not change between epochs).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .data import build_caption_dataset
from .metrics import caption_scores
from .model import CaptionDecoder, Captioner, FrozenEncoder, gmacs_per_caption
from .tokenizer import WordTokenizer

__all__ = ["CaptionConfig", "CaptionResult", "train_captioner", "evaluate_captioner", "load_captioner",
           "build_encoder", "generate_captions", "captions_per_second", "FORMAT", "ENCODER_NAME"]

FORMAT = "condensevit-caption"
ENCODER_NAME = "encoder.safetensors"


class NonFiniteLossError(RuntimeError):
    """The caption loss became NaN or infinite."""


def _usage_error(msg: str):
    from ..cli import UsageError
    return UsageError(msg)


@dataclass
class CaptionConfig:
    """Everything ``condensevit caption train`` takes."""
    encoder: str | None = None                # registered model name (optional with a condensevit checkpoint)
    encoder_checkpoint: str | None = None     # `condensevit train` output or a pretrained file
    encoder_kwargs: dict = field(default_factory=dict)
    streams: str = "default"                  # LookupViT: 'both' = compressed + lookup tokens
    data: str = "digit_scenes"
    split_file: str | None = None
    strict: bool = False
    output: str | None = None                 # default runs/caption_<encoder>
    # text and decoder
    min_count: int = 1
    max_len: int = 24                         # tokens, <bos> and <eos> included
    captions_per_image: int = 5
    dim: int = 256
    depth: int = 3
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    memory_pos_embed: bool = True
    # optimisation
    epochs: int = 20
    batch_size: int = 32                      # images per step (x captions_per_image captions)
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    min_lr: float = 1e-5
    smoothing: float = 0.1
    clip_grad: float | None = 1.0
    # data pipeline
    cache_tokens: bool = False
    aug_scale: float | None = None            # random-resized-crop scale lower bound (None: no augmentation)
    workers: int = 0
    # evaluation during training
    eval_batch_size: int = 64
    limit_val_images: int | None = None
    # run
    seed: int = 0
    device: str | None = None
    resume: str | None = None
    measure: bool = True
    progress: bool | None = None
    verbose: bool = True
    # test hooks (hidden from --help): sizes of the embedded set, stop after a global step
    data_count: dict | None = None
    debug_stop_at_step: int | None = None

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=list))


@dataclass
class CaptionResult:
    val: dict
    best_val: dict
    test: dict | None
    encoder_gmacs: float | None
    decoder_gmacs: float | None
    mean_caption_words: float | None
    decoder_params: int
    encoder_params: int
    train_time_s: float
    epochs_done: int
    checkpoint: str
    output_dir: str
    interrupted: bool = False
    history: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------- encoders

def _normalize_kwargs(kwargs: dict) -> dict:
    def conv(v):
        return tuple(conv(x) for x in v) if isinstance(v, list) else v
    return {k: conv(v) for k, v in dict(kwargs or {}).items()}


def _check_model_name(name: str):
    import difflib

    import timm

    import condensevit  # noqa: F401  (registers our models)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `condensevit models` lists ours"
        raise _usage_error(f"unknown encoder {name!r}{hint}")


def build_encoder(name: str | None, checkpoint: str | None = None, kwargs: dict | None = None
                  ) -> tuple[torch.nn.Module, dict]:
    """The encoder model (eval mode) and the metadata that rebuilds it: from a checkpoint (a
    ``condensevit train`` output, which records its model and kwargs, or a pretrained file through
    the model's checkpoint filter) or, with no checkpoint, freshly initialised."""
    from ..train.checkpoint import load_model_for_inference, load_weights_file

    kwargs = _normalize_kwargs(kwargs)
    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"encoder checkpoint not found: {checkpoint!r}")
        _, meta = load_weights_file(checkpoint)
        recorded = meta.get("model") if meta.get("format") == "condensevit" else None
        if meta.get("format") == FORMAT:
            raise _usage_error(f"{checkpoint!r} is a caption checkpoint, not an encoder; give the encoder's "
                               "`condensevit train` checkpoint (or use `caption eval --checkpoint`)")
        if name:
            _check_model_name(name)
        if recorded and name and recorded != name:
            raise _usage_error(f"encoder checkpoint {checkpoint!r} holds a {recorded}, not a {name}; pass "
                               f"--encoder {recorded} (or leave --encoder out)")
        model = load_model_for_inference(name, checkpoint, **kwargs)
        name = name or recorded
        full_kwargs = {**_normalize_kwargs(meta.get("model_kwargs") or {}), **kwargs} if recorded else kwargs
    else:
        if not name:
            raise _usage_error("no encoder given; pass --encoder NAME or --encoder-checkpoint FILE")
        _check_model_name(name)
        import timm
        try:
            model = timm.create_model(name, **kwargs)
        except (TypeError, ValueError, AssertionError) as e:
            raise _usage_error(f"cannot build encoder {name} with {kwargs}: {str(e).splitlines()[0]}") from e
        full_kwargs = kwargs
    meta = dict(format="condensevit", model=name, model_kwargs=full_kwargs,
                num_classes=int(getattr(model, "num_classes", 0) or 0))
    return model.eval(), meta


def _input_size(model, kwargs: dict) -> tuple[int, int, int]:
    from ..data import model_input_size
    size = tuple(model_input_size(model))
    if len(size) != 3:
        raise _usage_error(f"the encoder takes clips {size}; captioning needs an image model")
    img = kwargs.get("img_size")
    if img is not None:
        img = (img, img) if isinstance(img, int) else tuple(img)
        size = (size[0], int(img[0]), int(img[1]))
    return size


def _transforms(model, input_size, aug_scale: float | None):
    """(train, eval) transforms: resize to the encoder's input size, no crop (captions speak of
    positions), no flip (left / right); ``aug_scale`` adds random-resized crops in training."""
    from timm.data import resolve_data_config
    from torchvision import transforms as T

    cfg = resolve_data_config({}, model=model)
    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}.get(
        cfg.get("interpolation"), T.InterpolationMode.BICUBIC)
    size = tuple(input_size[1:])
    norm = [T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])]
    eval_tf = T.Compose([T.Resize(size, interpolation=interp), *norm])
    if aug_scale is None:
        return eval_tf, eval_tf, cfg
    if not 0.0 < aug_scale <= 1.0:
        raise ValueError(f"--aug-scale {aug_scale} must lie in (0, 1]")
    train_tf = T.Compose([T.RandomResizedCrop(size, scale=(aug_scale, 1.0), interpolation=interp), *norm])
    return train_tf, eval_tf, cfg


# -------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def _encode_all(encoder: FrozenEncoder, dataset, batch_size: int, device, workers: int = 0, limit: int | None = None,
                desc: str = "", progress=None) -> torch.Tensor:
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm
    n = len(dataset) if limit is None else min(limit, len(dataset))
    loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, num_workers=workers)
    out = []
    for x, _ in tqdm(loader, desc=desc, leave=False, disable=None if progress is None else not progress,
                     file=sys.stderr):
        out.append(encoder(x.to(device)).cpu())
    return torch.cat(out)


@torch.no_grad()
def generate_captions(captioner: Captioner, tokenizer: WordTokenizer, dataset=None, *, tokens: torch.Tensor | None = None,
                      batch_size: int = 64, beam_size: int = 1, length_penalty: float = 1.0, max_len: int | None = None,
                      limit: int | None = None, device=None, workers: int = 0, progress=None) -> list[str]:
    """Captions of the images of ``dataset`` (or of precomputed encoder ``tokens`` (N, n, C))."""
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm
    device = device or next(captioner.decoder.parameters()).device
    kw = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, max_len=max_len, beam_size=beam_size,
              length_penalty=length_penalty)
    out = []
    if tokens is not None:
        n = len(tokens) if limit is None else min(limit, len(tokens))
        batches = (tokens[i:i + batch_size] for i in range(0, n, batch_size))
        total = math.ceil(n / batch_size)
    else:
        n = len(dataset) if limit is None else min(limit, len(dataset))
        batches = (x for x, _ in DataLoader(Subset(dataset, range(n)), batch_size=batch_size, num_workers=workers))
        total = math.ceil(n / batch_size)
    for b in tqdm(batches, total=total, desc="captioning", leave=False,
                  disable=None if progress is None else not progress, file=sys.stderr):
        b = b.to(device)
        ids = captioner.generate(encoder_tokens=b, **kw) if tokens is not None else captioner.generate(b, **kw)
        out.extend(tokenizer.decode(row) for row in ids.tolist())
    return out


def _score(predictions: list[str], dataset) -> dict:
    refs = dataset.references[:len(predictions)]
    return caption_scores(predictions, refs)


# ------------------------------------------------------------------------------------ loading

def _encoder_hash(model: torch.nn.Module) -> str:
    from ..train.checkpoint import weights_hash
    return weights_hash(model.state_dict())


def load_captioner(checkpoint: str, device: str | torch.device = "cpu") -> tuple[Captioner, WordTokenizer, dict]:
    """A trained captioner (eval mode), its tokenizer and the checkpoint's metadata, from the
    ``last.safetensors`` / ``best.safetensors`` of a ``caption train`` run (or the run folder).

    Raises:
        FileNotFoundError: the checkpoint or the encoder weights beside it are missing.
        CheckpointError: not a caption checkpoint, a vocabulary that does not match the decoder's
            embedding, weights that do not fit, or encoder weights changed since training.
    """
    from ..models._builder import CheckpointError
    from ..train.checkpoint import WEIGHTS_NAME, load_weights_file

    path = os.fspath(checkpoint)
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption checkpoint not found: {path!r}; give the last.safetensors of a "
                                "`condensevit caption train` run")
    state_dict, meta = load_weights_file(path)
    if meta.get("format") != FORMAT:
        what = f"a {meta.get('model')} classification checkpoint" if meta.get("format") == "condensevit" else \
            "not a caption checkpoint"
        raise CheckpointError(f"{path!r} is {what}; give the last.safetensors of a `condensevit caption train` run")
    try:
        tokenizer = WordTokenizer.from_dict(meta["vocab"])
        dcfg = dict(meta["decoder"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path!r} has no usable vocabulary / decoder configuration in its metadata ({e}); "
                              "it was not written by `condensevit caption train`") from e
    rows = state_dict.get("token_embed.weight")
    if rows is None or rows.shape[0] != len(tokenizer) or dcfg.get("vocab_size") != len(tokenizer):
        got = None if rows is None else rows.shape[0]
        raise CheckpointError(f"{path!r}: its vocabulary has {len(tokenizer)} tokens but the decoder's embedding has "
                              f"{got} rows; the vocabulary does not match this decoder (an edited or mixed-up "
                              "checkpoint): retrain, or use the checkpoint the vocabulary came with")
    enc_path = os.path.join(os.path.dirname(os.path.abspath(path)), meta.get("encoder_file", ENCODER_NAME))
    if not os.path.isfile(enc_path):
        raise FileNotFoundError(f"the frozen encoder's weights {enc_path!r} are not beside {path!r}; keep the run "
                                "folder together (it holds encoder.safetensors)")
    encoder, _ = build_encoder(meta.get("encoder"), enc_path, {})
    if meta.get("encoder_hash") and _encoder_hash(encoder) != meta["encoder_hash"]:
        raise CheckpointError(f"{enc_path!r} is not the encoder this decoder was trained on (its weights differ); "
                              "restore the run's encoder.safetensors")
    decoder = CaptionDecoder(**{k: v for k, v in dcfg.items() if k in (
        "vocab_size", "encoder_dim", "num_memory_tokens", "dim", "depth", "num_heads", "mlp_ratio", "dropout",
        "max_len", "pad_id")})
    missing, unexpected = decoder.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path!r} does not fit its recorded decoder: missing {list(missing)[:4]}, "
                              f"unexpected {list(unexpected)[:4]}")
    captioner = Captioner(FrozenEncoder(encoder, streams=meta.get("streams", "default")), decoder).to(device).eval()
    return captioner, tokenizer, meta


# -------------------------------------------------------------------------------------- train

def _log(cfg: CaptionConfig, msg: str):
    if cfg.verbose:
        print(msg, flush=True)


class _CaptionRun:
    def __init__(self, cfg: CaptionConfig):
        self.cfg = cfg
        dev = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
        self.device = torch.device(dev)

    def setup(self):
        from ..train import checkpoint as ckpt
        cfg = self.cfg
        for name, v, lo in (("--epochs", cfg.epochs, 1), ("--batch-size", cfg.batch_size, 1),
                            ("--captions-per-image", cfg.captions_per_image, 1), ("--min-count", cfg.min_count, 1),
                            ("--max-len", cfg.max_len, 3)):
            if v < lo:
                raise ValueError(f"{name} must be at least {lo} (got {v})")
        from ..train.config import check_range
        for name, v in (("--dim", cfg.dim), ("--depth", cfg.depth), ("--num-heads", cfg.num_heads),
                        ("--eval-batch-size", cfg.eval_batch_size)):
            check_range(name, v, lo=1)
        check_range("--limit-val-images", cfg.limit_val_images, lo=1, optional=True)
        check_range("--workers", cfg.workers, lo=0, fix="0 loads data in the training process")
        check_range("--lr", cfg.lr, lo=0, lo_open=True, fix="e.g. 5e-4")
        for name, v in (("--weight-decay", cfg.weight_decay), ("--min-lr", cfg.min_lr), ("--seed", cfg.seed)):
            check_range(name, v, lo=0)
        check_range("--warmup-epochs", cfg.warmup_epochs, lo=0, fix="0 for no warm-up")
        check_range("--clip-grad", cfg.clip_grad, lo=0, optional=True, fix="0 turns clipping off")
        check_range("--smoothing", cfg.smoothing, lo=0, hi=1, hi_open=True, fix="e.g. 0.1, or 0 for none")
        check_range("--dropout", cfg.dropout, lo=0, hi=1, hi_open=True, fix="e.g. 0.1")
        check_range("--mlp-ratio", cfg.mlp_ratio, lo=0, lo_open=True)
        if cfg.cache_tokens and cfg.aug_scale is not None:
            print("condensevit caption train: warning: --cache-tokens turns augmentation off (--aug-scale ignored): "
                  "cached tokens are of the unaugmented images", file=sys.stderr, flush=True)
            cfg.aug_scale = None
        torch.manual_seed(cfg.seed)
        model, self.encoder_meta = build_encoder(cfg.encoder, cfg.encoder_checkpoint, cfg.encoder_kwargs)
        self.encoder_name = self.encoder_meta["model"]
        self.output = os.path.abspath(cfg.output or os.path.join("runs", f"caption_{self.encoder_name}"))
        self.resume_path = ckpt.find_resume(cfg.resume, self.output)
        if self.resume_path is None and os.path.isfile(os.path.join(self.output, ckpt.STATE_NAME)):
            raise _usage_error(f"{self.output} already holds a caption run; pass --resume auto to continue it, or "
                               "another --output")
        self.input_size = _input_size(model, self.encoder_meta["model_kwargs"])
        self.encoder = FrozenEncoder(model, streams=cfg.streams).to(self.device)
        self.encoder_hash = _encoder_hash(model)
        train_tf, eval_tf, self.data_config = _transforms(model, self.input_size, cfg.aug_scale)
        counts = cfg.data_count or {}
        self.sets = {}
        for split, tf in (("train", train_tf), ("val", eval_tf)):
            self.sets[split] = build_caption_dataset(cfg.data, split, tf, seed=cfg.seed, strict=cfg.strict,
                                                     split_file=cfg.split_file, count=counts.get(split))
            if len(self.sets[split]) == 0:
                raise ValueError(f"the {split} split of {cfg.data} has no images; give a split file (--split-file) "
                                 "that assigns images to it")
        skipped = sum(s.num_skipped for s in self.sets.values())
        if skipped:
            first = next(s.skipped[0] for s in self.sets.values() if s.num_skipped)
            print(f"condensevit caption train: warning: skipped {skipped} image(s) named by the captions file "
                  f"(first: {first[0]}: {first[1]}); --strict makes this an error", file=sys.stderr, flush=True)
        train_set = self.sets["train"]
        if len(train_set) < cfg.batch_size:
            raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {len(train_set)} training images; "
                             "lower it")
        self.tokenizer = WordTokenizer.build([c for refs in train_set.references for c in refs], cfg.min_count)
        with torch.no_grad():
            probe = self.encoder(self.sets["val"][0][0][None].to(self.device))
        self.num_tokens, self.encoder_dim = int(probe.shape[1]), int(probe.shape[2])
        torch.manual_seed(cfg.seed)
        self.decoder = CaptionDecoder(
            len(self.tokenizer), self.encoder_dim, self.num_tokens if cfg.memory_pos_embed else 0, dim=cfg.dim,
            depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout,
            max_len=cfg.max_len, pad_id=self.tokenizer.pad_id).to(self.device)
        self.captioner = Captioner(self.encoder, self.decoder)
        self.steps_per_epoch = len(train_set) // cfg.batch_size
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        # the decoder alone: no encoder parameter ever reaches the optimizer
        self.optimizer = create_optimizer_v2(self.decoder, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched="cosine", num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, warmup_lr=1e-6,
            min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=self.steps_per_epoch)
        self.start_epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history, self.best = [], dict(cider=None, epoch=None)
        self.elapsed = 0.0
        os.makedirs(self.output, exist_ok=True)
        if self.resume_path:
            self._resume()
        else:
            with open(os.path.join(self.output, "config.json"), "w") as f:
                json.dump(cfg.to_json(), f, indent=2)
            ckpt.save_weights(os.path.join(self.output, ENCODER_NAME), model.state_dict(),
                              {**self.encoder_meta, "input_size": list(self.input_size)})
        self.cache = None
        if cfg.cache_tokens:
            t0 = time.perf_counter()
            self.cache = {s: _encode_all(self.encoder, self.sets[s], cfg.eval_batch_size, self.device, cfg.workers,
                                         limit=cfg.limit_val_images if s == "val" else None,
                                         desc=f"encoding {s}", progress=cfg.progress)
                          for s in ("train", "val")}
            mb = sum(t.numel() * t.element_size() for t in self.cache.values()) / 2**20
            _log(cfg, f"cached the frozen encoder's tokens: {tuple(self.cache['train'].shape)} train, "
                      f"{tuple(self.cache['val'].shape)} val, {mb:.0f} MiB, {time.perf_counter() - t0:.1f}s")

    def _metadata(self, **extra) -> dict:
        return dict(format=FORMAT, encoder=self.encoder_name, encoder_kwargs=self.encoder_meta["model_kwargs"],
                    encoder_file=ENCODER_NAME, encoder_hash=self.encoder_hash, streams=self.cfg.streams,
                    decoder=self.decoder.config(), vocab=self.tokenizer.to_dict(), data=self.cfg.data,
                    input_size=list(self.input_size), **extra)

    def _resume(self):
        from ..models._builder import CheckpointError
        from ..train import checkpoint as ckpt
        weights, state, meta = ckpt.load_checkpoint(self.resume_path)
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{self.resume_path} is not a caption run; resume a `condensevit caption train` "
                                  "output")
        if meta.get("encoder_hash") != self.encoder_hash or meta.get("streams", "default") != self.cfg.streams:
            raise _usage_error(f"{self.resume_path} was trained on another encoder ({meta.get('encoder')} "
                               f"{meta.get('encoder_kwargs')}, streams {meta.get('streams')}); resume with the same "
                               "--encoder / --encoder-checkpoint / --streams, or another --output")
        if WordTokenizer.from_dict(meta.get("vocab") or {}) != self.tokenizer:
            raise _usage_error(f"{self.resume_path} has another vocabulary than the captions of {self.cfg.data} with "
                               f"--min-count {self.cfg.min_count} give; resume with the same --data and --min-count")
        if meta.get("decoder") != self.decoder.config():
            raise _usage_error(f"{self.resume_path} has decoder {meta.get('decoder')}, not {self.decoder.config()}; "
                               "resume with the same decoder options")
        self.decoder.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.restore_rng(state["rng"])
        self.start_epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step, self.elapsed = int(state["global_step"]), float(state.get("elapsed_s", 0.0))
        self.history, self.best = json.loads(state["history"]), dict(state["best"])
        _log(self.cfg, f"resuming {self.resume_path} at epoch {self.start_epoch + 1}, step {self.step_in_epoch}")

    def save(self, epoch: int, step_in_epoch: int):
        from ..train import checkpoint as ckpt
        state = dict(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                     rng=ckpt.capture_rng(), epoch=epoch, step_in_epoch=step_in_epoch, global_step=self.global_step,
                     elapsed_s=self.elapsed, history=json.dumps(self.history), best=self.best,
                     config=json.dumps(self.cfg.to_json()))
        ckpt.save_checkpoint(self.output, self.decoder.state_dict(), state,
                             self._metadata(epoch=epoch, step_in_epoch=step_in_epoch))

    def _captions(self, index: list[int], epoch: int) -> torch.Tensor:
        """(len(index) * K, max_len) token ids: K references per image, drawn by (seed, epoch, image)."""
        K, refs, out = self.cfg.captions_per_image, self.sets["train"].references, []
        for i in index:
            r = refs[i]
            rng = np.random.default_rng([self.cfg.seed, epoch, i])
            pick = rng.choice(len(r), size=K, replace=len(r) < K)
            out.extend(r[j] for j in pick)
        return self.tokenizer.encode_batch(out, self.cfg.max_len)

    def _batches(self, epoch: int):
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.sets["train"]), generator=g)
        bs = self.cfg.batch_size
        for s in range(self.step_in_epoch, self.steps_per_epoch):
            yield perm[s * bs:(s + 1) * bs].tolist()

    def _train_epoch(self, epoch: int, stop) -> str:
        from timm.utils import dispatch_clip_grad
        from tqdm import tqdm
        cfg, dec = self.cfg, self.decoder
        dec.train()
        loss_acc = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        t0 = time.perf_counter()
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   leave=False, dynamic_ncols=True, disable=None if cfg.progress is None else not cfg.progress,
                   file=sys.stderr)
        status = "done"
        data = self.sets["train"]
        try:
            for index in self._batches(epoch):
                if self.cache is not None:
                    tokens = self.cache["train"][index].to(self.device)
                else:
                    images = torch.stack([data[i][0] for i in index]).to(self.device)
                    tokens = self.encoder(images)
                ids = self._captions(index, epoch)
                ids = ids[:, :int(ids.ne(self.tokenizer.pad_id).sum(1).max())].to(self.device)
                memory = dec.prepare_memory(tokens).repeat_interleave(cfg.captions_per_image, dim=0)
                logits = dec(memory, ids[:, :-1])
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                       ignore_index=self.tokenizer.pad_id, label_smoothing=cfg.smoothing)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad:
                    dispatch_clip_grad(list(dec.parameters()), cfg.clip_grad)
                self.optimizer.step()
                self.global_step += 1
                self.step_in_epoch += 1
                self.scheduler.step_update(num_updates=self.global_step)
                loss_acc += loss.detach().double()
                count += 1
                bar.update(1)
                if count % 50 == 0 or self.step_in_epoch == self.steps_per_epoch:
                    value = float(loss_acc) / count
                    if not math.isfinite(value):
                        raise NonFiniteLossError(f"the caption loss became {value} in epoch {epoch + 1}; lower --lr "
                                                 "or set --clip-grad")
                    bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                if stop.requested or (cfg.debug_stop_at_step is not None and self.global_step >= cfg.debug_stop_at_step):
                    status = "stopped"
                    break
        finally:
            bar.close()
        self.elapsed += time.perf_counter() - t0
        self.epoch_loss = float(loss_acc) / max(count, 1)
        if not math.isfinite(self.epoch_loss):
            raise NonFiniteLossError(f"the caption loss became {self.epoch_loss} in epoch {epoch + 1}; lower --lr")
        return status

    def _validate(self) -> dict:
        cfg = self.cfg
        preds = generate_captions(self.captioner, self.tokenizer, self.sets["val"],
                                  tokens=self.cache["val"] if self.cache else None, batch_size=cfg.eval_batch_size,
                                  limit=cfg.limit_val_images, device=self.device, workers=cfg.workers,
                                  progress=cfg.progress)
        return _score(preds, self.sets["val"])

    def run(self) -> CaptionResult:
        from ..train import checkpoint as ckpt
        cfg = self.cfg
        t_start = time.perf_counter()
        n_dec = sum(p.numel() for p in self.decoder.parameters())
        n_enc = sum(p.numel() for p in self.encoder.parameters())
        _log(cfg, f"captioning with frozen {self.encoder_name} ({self.num_tokens} tokens of width {self.encoder_dim}"
                  f"{', both streams' if cfg.streams == 'both' else ''}; {n_enc / 1e6:.2f}M params, none trained) on "
                  f"{cfg.data}: {len(self.sets['train'])} train / {len(self.sets['val'])} val images, vocabulary "
                  f"{len(self.tokenizer)}, decoder {n_dec / 1e6:.2f}M params, {self.steps_per_epoch} steps/epoch -> "
                  f"{self.output}")
        interrupted = False
        with ckpt.GracefulStop() as stop:
            for epoch in range(self.start_epoch, cfg.epochs):
                status = self._train_epoch(epoch, stop)
                if status == "stopped":
                    self.save(epoch, self.step_in_epoch)
                    interrupted = True
                    print(f"condensevit caption train: stopped at epoch {epoch + 1}, step {self.global_step}: "
                          f"checkpoint saved in {self.output}; continue with --resume auto", file=sys.stderr, flush=True)
                    break
                val = self._validate()
                row = dict(epoch=epoch + 1, step=self.global_step, lr=self.optimizer.param_groups[0]["lr"],
                           train_loss=self.epoch_loss, **{f"val_{k}": v for k, v in val.items()},
                           elapsed_s=round(self.elapsed, 2))
                self.history.append(row)
                self.step_in_epoch = 0
                if self.best["cider"] is None or val["cider"] > self.best["cider"]:
                    self.best = dict(cider=val["cider"], epoch=epoch + 1)
                    ckpt.save_weights(os.path.join(self.output, "best.safetensors"), self.decoder.state_dict(),
                                      self._metadata(epoch=epoch + 1, val_cider=val["cider"]))
                with open(os.path.join(self.output, "log.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")
                self.save(epoch + 1, 0)
                _log(cfg, f"epoch {epoch + 1}/{cfg.epochs}  loss {self.epoch_loss:.4f}  val BLEU-4 {val['bleu4']:.4f}"
                          f"  CIDEr-D {val['cider']:.4f}  lr {row['lr']:.2e}  {self.elapsed:.0f}s")
        return self._finish(time.perf_counter() - t_start, interrupted, n_dec, n_enc)

    def _finish(self, train_time: float, interrupted: bool, n_dec: int, n_enc: int) -> CaptionResult:
        from ..train import checkpoint as ckpt
        cfg = self.cfg
        last = self.history[-1] if self.history else {}
        val = {k[4:]: v for k, v in last.items() if k.startswith("val_")}
        best_row = next((r for r in self.history if r["epoch"] == self.best.get("epoch")), {})
        best_val = {k[4:]: v for k, v in best_row.items() if k.startswith("val_")}
        test = enc_g = dec_g = words = None
        if not interrupted:
            try:
                test_set = build_caption_dataset(cfg.data, "test", self.sets["val"].transform, seed=cfg.seed,
                                                 split_file=cfg.split_file, count=(cfg.data_count or {}).get("test"))
            except ValueError:
                test_set = None
            if test_set is not None and len(test_set):
                preds = generate_captions(self.captioner, self.tokenizer, test_set, batch_size=cfg.eval_batch_size,
                                          device=self.device, workers=cfg.workers, progress=cfg.progress)
                test = _score(preds, test_set)
            if cfg.measure:
                images = torch.stack([self.sets["val"][i][0] for i in range(min(8, len(self.sets["val"])))])
                enc_g, dec_g, words = gmacs_per_caption(self.captioner, images.to(self.device),
                                                        bos_id=self.tokenizer.bos_id, eos_id=self.tokenizer.eos_id)
        result = CaptionResult(val=val, best_val=best_val, test=test, encoder_gmacs=enc_g, decoder_gmacs=dec_g,
                               mean_caption_words=words, decoder_params=n_dec, encoder_params=n_enc,
                               train_time_s=round(train_time, 2), epochs_done=len(self.history),
                               checkpoint=os.path.join(self.output, ckpt.WEIGHTS_NAME), output_dir=self.output,
                               interrupted=interrupted, history=list(self.history))
        if not interrupted:
            summary = {k: v for k, v in result.as_dict().items() if k != "history"}
            summary.update(encoder=self.encoder_name, encoder_kwargs=self.encoder_meta["model_kwargs"],
                           encoder_checkpoint=cfg.encoder_checkpoint, streams=cfg.streams, encoder_tokens=self.num_tokens,
                           data=cfg.data, vocab_size=len(self.tokenizer), input_size=list(self.input_size),
                           best_epoch=self.best.get("epoch"), device=str(self.device),
                           metrics_note="BLEU-1..4 and CIDEr-D from pycocoevalcap, corpus-level, greedy decoding; "
                                        "METEOR and SPICE (Java) not computed")
            ckpt.atomic_write(os.path.join(self.output, "summary.json"),
                              lambda f: f.write((json.dumps(summary, indent=2, default=str) + "\n").encode()))
            t = f"test BLEU-4 {test['bleu4']:.4f} CIDEr-D {test['cider']:.4f}, " if test else ""
            g = (f"encoder {enc_g:.4f} + decoder {dec_g:.4f} GMACs per caption, " if enc_g is not None else "")
            _log(cfg, f"done: val BLEU-4 {val.get('bleu4', float('nan')):.4f} CIDEr-D {val.get('cider', float('nan')):.4f}"
                      f", {t}{g}trained in {train_time:.0f}s; summary in {os.path.join(self.output, 'summary.json')}")
        return result


def train_captioner(config: CaptionConfig) -> CaptionResult:
    """Train a caption decoder on a frozen encoder as ``condensevit caption train`` does."""
    run = _CaptionRun(config)
    run.setup()
    try:
        return run.run()
    except NonFiniteLossError as e:
        raise NonFiniteLossError(f"{e}; stopped without saving, the last good checkpoint in {run.output} is kept") \
            from None


def evaluate_captioner(checkpoint: str, data: str | None = None, *, split: str = "test", beam_size: int = 1,
                       length_penalty: float = 1.0, max_len: int | None = None, batch_size: int = 64,
                       device: str | None = None, strict: bool = False, split_file: str | None = None,
                       limit: int | None = None, seed: int = 0, count: int | None = None,
                       predictions_file: str | None = None, progress=None) -> dict:
    """BLEU-1..4 and CIDEr-D of a caption checkpoint on a split (default: the data it was trained
    on, test split). ``predictions_file`` (JSON) receives one ``{"image_id", "caption"}`` per image,
    the format of the COCO evaluation server."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    captioner, tokenizer, meta = load_captioner(checkpoint, device)
    data = data or meta.get("data") or "digit_scenes"
    _, eval_tf, _ = _transforms(captioner.encoder.model, tuple(meta["input_size"]), None)
    dataset = build_caption_dataset(data, split, eval_tf, seed=seed, strict=strict, split_file=split_file, count=count)
    if len(dataset) == 0:
        raise ValueError(f"the {split} split of {data} has no images; pick another --split or give --split-file")
    if dataset.num_skipped:
        print(f"condensevit caption eval: warning: skipped {dataset.num_skipped} image(s) (first: "
              f"{dataset.skipped[0][0]}: {dataset.skipped[0][1]}); --strict makes this an error", file=sys.stderr)
    t0 = time.perf_counter()
    preds = generate_captions(captioner, tokenizer, dataset, batch_size=batch_size, beam_size=beam_size,
                              length_penalty=length_penalty, max_len=max_len, limit=limit, device=device,
                              progress=progress)
    elapsed = time.perf_counter() - t0
    scores = _score(preds, dataset)
    if predictions_file:
        from ..train.checkpoint import atomic_write
        rows = [dict(image_id=i, caption=c) for i, c in zip(dataset.image_ids, preds)]
        atomic_write(predictions_file, lambda f: f.write(json.dumps(rows, indent=1).encode()))
    return dict(scores, images=len(preds), split=split, data=data, beam_size=beam_size, length_penalty=length_penalty,
                checkpoint=os.path.abspath(checkpoint), encoder=meta.get("encoder"),
                captions_per_s=round(len(preds) / max(elapsed, 1e-9), 2), skipped_images=dataset.num_skipped,
                examples=[dict(image_id=dataset.image_ids[i], caption=preds[i], references=dataset.references[i])
                          for i in range(min(3, len(preds)))])


@torch.no_grad()
def captions_per_second(captioner: Captioner, images: torch.Tensor, *, warmup: int = 1, iters: int = 3,
                        **generate_kwargs) -> float:
    """Images captioned per second, end to end (encoder and greedy / beam decoding) on the batch
    ``images``, after ``warmup`` untimed runs; the median of ``iters`` timed runs."""
    for _ in range(warmup):
        captioner.generate(images, **generate_kwargs)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        captioner.generate(images, **generate_kwargs)
        times.append(time.perf_counter() - t0)
    return len(images) / sorted(times)[len(times) // 2]
