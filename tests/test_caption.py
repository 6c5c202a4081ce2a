"""Captioning with a frozen encoder: frozen means frozen, decoding, metrics, data, a short run that learns,
checkpoints and resumption, bad input."""
import json
import math
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import condensevit  # noqa: F401  (registers the models)
from condensevit.caption import (CaptionConfig, CaptionDecoder, Captioner, CocoCaptions, DigitScenes, FrozenEncoder,
                                 WordTokenizer, beam_search, build_caption_dataset, caption_scores, encoder_tokens,
                                 generate_captions, greedy, load_captioner, train_captioner)
from condensevit.caption.engine import _CaptionRun
from condensevit.cli import main
from condensevit.train.checkpoint import load_weights_file, save_weights, weights_hash

TINY_VIT = dict(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2)
TINY_LOOKUP = dict(TINY_VIT, compressed_grid=(2, 2), train_grids=((1, 1), (2, 2)))
COUNT = {"train": 256, "val": 24, "test": 24}
TINY_DEC = dict(dim=32, depth=1, num_heads=2, max_len=20)


def _encoder_file(path, name, kwargs):
    """A `condensevit train`-style encoder checkpoint (weights + the metadata that rebuilds the model)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs)
    save_weights(str(path), model.state_dict(), dict(format="condensevit", model=name, model_kwargs=kwargs,
                                                     num_classes=10))
    return str(path), model


def _config(out, encoder_file, **kw):
    base = dict(encoder_checkpoint=encoder_file, data="digit_scenes", data_count=dict(COUNT), output=str(out),
                epochs=2, batch_size=8, captions_per_image=5, lr=3e-3, warmup_epochs=0, dropout=0.0,
                eval_batch_size=24, measure=False, progress=False, verbose=False, **TINY_DEC)
    base.update(kw)
    return CaptionConfig(**base)


@pytest.fixture(scope="module")
def lookup_file(tmp_path_factory):
    return _encoder_file(tmp_path_factory.mktemp("enc") / "lookup.safetensors", "lookupvit_tiny_patch16_224",
                         TINY_LOOKUP)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, lookup_file):
    """Two epochs on the embedded scenes, the encoder run on every step (no cache)."""
    out = tmp_path_factory.mktemp("cap")
    result = train_captioner(_config(out, lookup_file[0], measure=True))
    return out, result


# ------------------------------------------------------------------------------------ frozen

def test_encoder_weights_bitwise_unchanged_and_never_in_the_optimizer(tmp_path, lookup_file):
    path, model = lookup_file
    before = weights_hash(model.state_dict())
    run = _CaptionRun(_config(tmp_path, path, epochs=1))
    run.setup()
    enc_params = {id(p) for p in run.encoder.parameters()}
    opt_params = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert enc_params and not enc_params & opt_params
    assert opt_params == {id(p) for p in run.decoder.parameters()}
    assert all(not p.requires_grad for p in run.encoder.parameters())
    run.captioner.train()
    assert not run.encoder.training and not run.encoder.model.training  # train-mode grids / dropout stay off
    run.run()
    assert weights_hash(run.encoder.model.state_dict()) == before
    assert weights_hash(load_weights_file(str(tmp_path / "encoder.safetensors"))[0]) == before
    assert all(p.grad is None for p in run.encoder.parameters())


# ---------------------------------------------------------------------------------- decoding

class _Scripted(torch.nn.Module):
    """A decoder stand-in whose most likely next token at step t is script[t] (for every image)."""

    def __init__(self, script, vocab=8):
        super().__init__()
        self.script, self.vocab = list(script), vocab

    def forward(self, memory, tokens, last_only=False):
        t = tokens.shape[1] - 1
        logits = torch.zeros(tokens.shape[0], self.vocab)
        logits[:, self.script[min(t, len(self.script) - 1)]] = 5.0
        return logits


@pytest.mark.parametrize("decode", ["greedy", "beam"])
def test_decoding_stops_at_eos_and_respects_max_len(decode):
    mem = torch.zeros(2, 3, 4)
    run = (lambda d, m: greedy(d, m, max_len=m_len)) if decode == "greedy" else \
        (lambda d, m: beam_search(d, m, max_len=m_len, beam_size=3))
    m_len = 10
    ids = run(_Scripted([5, 6, 2, 7, 7]), mem)                 # 2 = <eos> at the third step
    assert ids.tolist() == [[1, 5, 6, 2]] * 2
    ids = run(_Scripted([5, 6, 7]), mem)                       # never ends: cut at max_len tokens in all
    assert ids.shape == (2, m_len) and ids[0, 0] == 1 and 2 not in ids.tolist()[0]


def test_beam_size_one_equals_greedy():
    torch.manual_seed(3)
    dec = CaptionDecoder(30, 16, 5, dim=32, depth=2, num_heads=2, dropout=0.0, max_len=12).eval()
    with torch.no_grad():  # <eos> made likely enough that captions end at varied steps, or not at all
        dec.out_bias[2] = 2.5
    memory = dec.prepare_memory(torch.randn(8, 5, 16))
    g = greedy(dec, memory, max_len=12)
    b = beam_search(dec, memory, max_len=12, beam_size=1, length_penalty=0.7)
    lengths = {int((row == 2).nonzero()[0]) if 2 in row else -1 for row in g}
    assert len(lengths) >= 3 and -1 in lengths  # the check covers several lengths, and captions cut at max_len
    assert torch.equal(g, b)


def test_beam_search_scores_at_least_greedy():
    torch.manual_seed(4)
    dec = CaptionDecoder(20, 16, 4, dim=32, depth=1, num_heads=2, dropout=0.0, max_len=8).eval()
    with torch.no_grad():
        dec.token_embed.weight.mul_(4)
    memory = dec.prepare_memory(torch.randn(6, 4, 16))

    def logprob(ids):
        out = []
        for i in range(len(ids)):
            row = ids[i].tolist()
            end = row.index(2) + 1 if 2 in row else len(row)
            seq = torch.tensor([row[:end]])
            lp = dec(memory[i:i + 1], seq[:, :-1]).log_softmax(-1)[0].gather(1, seq[0, 1:, None]).sum()
            out.append(float(lp))
        return out

    with torch.no_grad():
        g = logprob(greedy(dec, memory, max_len=8))
        b = logprob(beam_search(dec, memory, max_len=8, beam_size=4, length_penalty=0.0))
    assert all(bb >= gg - 1e-6 for bb, gg in zip(b, g))


# ----------------------------------------------------------------------------------- metrics

def test_metric_wrapper_on_a_hand_computed_example():
    preds = {1: "The cat sat on the mat.", 2: "a dog"}
    refs = {1: ["the cat is on the mat"], 2: ["a dog runs"]}
    s = caption_scores(preds, refs)
    # clipped n-gram matches over the corpus: 1-grams 7/8, 2-grams 4/6, 3-grams 1/4, 4-grams 0/3;
    # hypothesis length 8 against the closest reference lengths 6 + 3 = 9: brevity penalty exp(1 - 9/8)
    bp = math.exp(1 - 9 / 8)
    assert s["bleu1"] == pytest.approx(bp * 7 / 8, abs=1e-6)
    assert s["bleu2"] == pytest.approx(bp * (7 / 8 * 4 / 6) ** 0.5, abs=1e-6)
    assert s["bleu3"] == pytest.approx(bp * (7 / 8 * 4 / 6 * 1 / 4) ** (1 / 3), abs=1e-6)
    assert s["bleu4"] < 1e-3
    # CIDEr-D: idf log(2 / df); image a: identical 1- and 2-gram vectors (cosine 1), none of order 3-4,
    # equal lengths -> 10 * (1 + 1) / 4 = 5; image b: "c e" vs "c d", 1-gram cosine 1/2 -> 10 * 0.5 / 4
    s = caption_scores(["a b", "c e"], [["a b"], ["c d"]])
    assert s["cider"] == pytest.approx((5 + 1.25) / 2, abs=1e-9)


def test_metric_wrapper_rejects_mismatched_sets():
    with pytest.raises(ValueError, match="one prediction per referenced image"):
        caption_scores({1: "a"}, {2: ["a"]})


def test_metrics_need_no_java(monkeypatch):
    import sys
    monkeypatch.setenv("PATH", "/nonexistent")  # no java to start, were anything to try
    assert caption_scores(["a b"], [["a b c"]])["bleu1"] > 0
    loaded = {k.split(".")[1] for k in sys.modules if k.startswith("pycocoevalcap.")}
    assert loaded == {"bleu", "cider"}  # not meteor, spice or the PTB tokenizer, which run Java


# -------------------------------------------------------------------------------------- text

def test_tokenizer_min_count_specials_and_round_trip():
    tok = WordTokenizer.build(["A seven, left.", "a seven", "one nine"], min_count=2)
    assert tok.itos[:6] == ["<pad>", "<bos>", "<eos>", "<unk>", "a", "seven"] and len(tok) == 6
    ids = tok.encode("A seven and a nine!")
    assert ids == [1, 4, 5, 3, 4, 3, 2]
    assert tok.decode(ids + [0, 0]) == "a seven <unk> a <unk>"
    assert tok.decode([1, 4, 2, 5]) == "a"  # stops at <eos>
    assert tok.encode_batch(["a seven seven seven"], max_len=4).tolist() == [[1, 4, 5, 2]]
    assert WordTokenizer.from_dict(tok.to_dict()) == tok


# -------------------------------------------------------------------------------------- data

def test_digit_scenes_are_fixed_captioned_and_split_by_handwriting():
    a, b = DigitScenes("val", count=20), DigitScenes("val", count=20)
    assert np.array_equal(a.images, b.images) and a.references == b.references
    assert all(len(r) == 5 and len(set(r)) == 5 for r in a.references)
    assert {len(lay) for lay in a.layouts} == {1, 2, 3}
    t = DigitScenes("test", count=20)
    tr = DigitScenes("train", count=200)
    glyphs = lambda d: {g["glyph"] for lay in d.layouts for g in lay}  # noqa: E731
    assert not glyphs(tr) & glyphs(a) and not glyphs(a) & glyphs(t)
    words = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    for lay, refs in zip(a.layouts, a.references):  # every caption names only digits of its scene
        named = {w for r in refs for w in r.replace(",", " ").split() if w in words}
        counts = {"one", "two", "three"} & named
        assert {("zero one two three four five six seven eight nine".split())[g["digit"]] for g in lay} \
            <= named | counts
    img, idx = a[3]
    assert img.size == (64, 64) and idx == 3


def _coco_fixture(root, *, captions=None, extra_images=()):
    img_dir = root / "images"
    img_dir.mkdir(exist_ok=True)
    for i in (1, 2):  # image 3 is named by the file but missing
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(img_dir / f"im{i}.png")
    images = [dict(id=i, file_name=f"im{i}.png") for i in (1, 2, 3)] + list(extra_images)
    anns = captions or [dict(id=10, image_id=1, caption="A red square."), dict(id=11, image_id=1, caption="red box"),
                        dict(id=12, image_id=2, caption="a green square"), dict(id=13, image_id=3, caption="blue")]
    ann = root / "captions.json"
    ann.write_text(json.dumps(dict(images=images, annotations=anns)))
    return str(ann), str(img_dir)


def test_coco_loader_on_three_images(tmp_path):
    ann, img_dir = _coco_fixture(tmp_path)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [1, "im3.png"], "val": [2]}))
    train = CocoCaptions(ann, img_dir, "train", split_file=str(split))
    assert train.image_ids == [1] and train.references == [["A red square.", "red box"]]
    assert train.num_skipped == 1 and train.skipped[0][1] == "missing"
    val = build_caption_dataset(f"coco:{ann}:{img_dir}", "val", split_file=str(split))
    assert val.image_ids == [2] and val.image(0).size == (30, 20)
    with pytest.raises(ValueError, match="image 3 .* is missing"):
        CocoCaptions(ann, img_dir, "train", split_file=str(split), strict=True)
    # Karpathy's dataset_coco.json: its own splits, restval counts as train
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps(dict(images=[
        dict(filepath="", filename="im1.png", cocoid=1, split="restval", sentences=[dict(raw="a red square")]),
        dict(filepath="", filename="im2.png", cocoid=2, split="test", sentences=[dict(raw="green")])])))
    assert CocoCaptions(str(karpathy), img_dir, "train").image_ids == [1]
    assert CocoCaptions(str(karpathy), img_dir, "test").references == [["green"]]
    assert CocoCaptions(ann, img_dir, "test", split_file=str(karpathy)).image_ids == [2]


@pytest.mark.parametrize("case,match", [
    ("empty", "annotation 11 of image 1 has an empty caption"),
    ("number", "caption that is not a string"),
    ("unknown_image", "names image 7, which the file's 'images' do not list"),
    ("no_captions", "image 4 .* has no captions"),
])
def test_coco_loader_bad_captions_are_one_line_errors(tmp_path, case, match):
    caps = [dict(id=10, image_id=1, caption="a red square"), dict(id=12, image_id=2, caption="green"),
            dict(id=13, image_id=3, caption="blue")]
    extra = ()
    if case == "empty":
        caps.append(dict(id=11, image_id=1, caption=" .. "))
    elif case == "number":
        caps.append(dict(id=11, image_id=1, caption=42))
    elif case == "unknown_image":
        caps.append(dict(id=11, image_id=7, caption="x"))
    else:
        extra = (dict(id=4, file_name="im4.png"),)
    ann, img_dir = _coco_fixture(tmp_path, captions=caps, extra_images=extra)
    with pytest.raises(ValueError, match=match):
        CocoCaptions(ann, img_dir, "train")


# ---------------------------------------------------------------------------- encoder tokens

def test_encoder_tokens_for_each_layout():
    x = torch.randn(2, 3, 64, 64)
    vit = timm.create_model("deit_tiny_patch16_224", **TINY_VIT).eval()
    assert encoder_tokens(vit, x).shape == (2, 17, 32)          # class token + 16 patches
    lookup = timm.create_model("lookupvit_tiny_patch16_224", **TINY_LOOKUP).eval()
    assert encoder_tokens(lookup, x).shape == (2, 4, 32)        # 2x2 compressed tokens
    both = FrozenEncoder(lookup, streams="both")
    assert both(x).shape == (2, 4 + 16, 32)
    assert torch.allclose(both(x)[:, :4], encoder_tokens(lookup, x), atol=1e-5)
    stvit = timm.create_model("stvit_deit_tiny_patch16_224", **TINY_VIT, stgm_start=0, num_semantic_tokens=4).eval()
    assert encoder_tokens(stvit, x).shape == (2, 4, 32)
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=56, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                             window_size=7).eval()
    nhwc = swin.forward_features(torch.randn(2, 3, 56, 56))
    assert nhwc.dim() == 4  # (B, H, W, C): flattened to (B, H * W, C)
    assert encoder_tokens(swin, torch.randn(2, 3, 56, 56)).shape == (2, nhwc.shape[1] * nhwc.shape[2], nhwc.shape[3])
    with pytest.raises(ValueError, match="applies to LookupViT"):
        encoder_tokens(vit, x, streams="both")


# ------------------------------------------------------------------------------- a short run

def test_two_epochs_improve_cider_over_the_untrained_decoder(trained_run, lookup_file):
    out, result = trained_run
    torch.manual_seed(0)
    encoder = FrozenEncoder(timm.create_model("lookupvit_tiny_patch16_224", num_classes=10, **TINY_LOOKUP))
    encoder.model.load_state_dict(lookup_file[1].state_dict())
    captioner, tok, meta = load_captioner(str(out / "last.safetensors"))
    untrained = Captioner(encoder, CaptionDecoder(len(tok), 32, 4, **TINY_DEC))
    val = build_caption_dataset("digit_scenes", "val", captioner_transform(meta), count=COUNT["val"])
    before = caption_scores(generate_captions(untrained, tok, val), val.references)["cider"]
    assert result.val["cider"] > before + 0.1, (before, result.val)
    # the reloaded checkpoint gives the scores the run reported
    after = caption_scores(generate_captions(captioner, tok, val), val.references)["cider"]
    assert after == pytest.approx(result.val["cider"], abs=1e-9)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["encoder_gmacs"] > 0 and summary["decoder_gmacs"] > 0 and summary["test"]["cider"] >= 0
    assert len(open(out / "log.jsonl").readlines()) == 2


def captioner_transform(meta):
    from condensevit.caption.engine import _transforms
    model = timm.create_model("lookupvit_tiny_patch16_224", **TINY_LOOKUP)
    return _transforms(model, tuple(meta["input_size"]), None)[1]


def test_cached_tokens_train_the_same_decoder(tmp_path, lookup_file, trained_run):
    out, _ = trained_run
    result = train_captioner(_config(tmp_path, lookup_file[0], cache_tokens=True))
    assert weights_hash(load_weights_file(str(tmp_path / "last.safetensors"))[0]) == \
        weights_hash(load_weights_file(str(out / "last.safetensors"))[0])
    assert result.epochs_done == 2


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, lookup_file, trained_run):
    out, _ = trained_run
    cfg = _config(tmp_path, lookup_file[0], cache_tokens=True, debug_stop_at_step=40)  # epoch 2, step 8 of 32
    assert train_captioner(cfg).interrupted
    result = train_captioner(_config(tmp_path, lookup_file[0], cache_tokens=True, resume="auto"))
    assert not result.interrupted and result.epochs_done == 2
    assert weights_hash(load_weights_file(str(tmp_path / "last.safetensors"))[0]) == \
        weights_hash(load_weights_file(str(out / "last.safetensors"))[0])


# ------------------------------------------------------------------------------ command line

def test_cli_eval_and_predict(trained_run, tmp_path, capsys):
    out, _ = trained_run
    scores = tmp_path / "scores.json"
    assert main(["caption", "eval", "--checkpoint", str(out / "last.safetensors"), "--beam-size", "2",
                 "--debug-data-count", "8", "--json", str(scores)]) == 0
    s = json.loads(scores.read_text())
    assert s["images"] == 8 and s["beam_size"] == 2 and 0 <= s["cider"] <= 10
    capsys.readouterr()
    png = tmp_path / "viz.png"
    assert main(["caption", "predict", "--checkpoint", str(out / "last.safetensors"), "--image",
                 "sample:digit_scenes:1", "--viz", str(png)]) == 0
    assert capsys.readouterr().out.strip()  # the caption
    assert png.stat().st_size > 1000


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_cli_bad_input_one_line_errors(trained_run, tmp_path, capsys, lookup_file):
    out, _ = trained_run
    # an encoder checkpoint of another model
    err = _error(capsys, ["caption", "train", "--encoder", "stvit_deit_tiny_patch16_224", "--encoder-checkpoint",
                          lookup_file[0], "--output", str(tmp_path / "x")])
    assert "holds a lookupvit_tiny_patch16_224, not a stvit_deit_tiny_patch16_224" in err
    # a decoder checkpoint whose vocabulary does not match its decoder
    weights, meta = load_weights_file(str(out / "last.safetensors"))
    meta["vocab"]["words"] = meta["vocab"]["words"][:-3]
    bad = tmp_path / "bad"
    bad.mkdir()
    save_weights(str(bad / "last.safetensors"), weights, meta)
    os.link(out / "encoder.safetensors", bad / "encoder.safetensors")
    err = _error(capsys, ["caption", "eval", "--checkpoint", str(bad / "last.safetensors")])
    assert "vocabulary" in err and "does not match" in err
    # a classification checkpoint where a caption checkpoint is expected
    err = _error(capsys, ["caption", "predict", "--checkpoint", lookup_file[0], "--image", "sample:digit_scenes"])
    assert "classification checkpoint" in err
    # missing image folder; resuming with other captions (another vocabulary)
    err = _error(capsys, ["caption", "train", "--encoder-checkpoint", lookup_file[0], "--data",
                          f"coco:{tmp_path / 'c.json'}:{tmp_path / 'nope'}", "--output", str(tmp_path / "y")])
    assert "image folder not found" in err
    err = _error(capsys, ["caption", "train", "--encoder-checkpoint", lookup_file[0], "--output", str(out),
                          "--resume", "auto", "--min-count", "200", "--dim", "32", "--depth", "1", "--num-heads", "2",
                          "--debug-data-count", json.dumps(COUNT), "--no-progress", "--quiet"])
    assert "another vocabulary" in err
