"""The table of benchmarks/caption_digits.sh: test-split BLEU-4 / CIDEr-D of each trained captioner,
encoder and decoder GMACs per caption, and CPU speed measured in alternating rounds (the machine
may be shared: ratios between models measured in the same rounds are more robust than absolutes).

Usage: python benchmarks/caption_report.py OUT NAME [NAME ...]   (runs in OUT/captioners/NAME)
Writes OUT/report.json and OUT/report.md.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch


def main(out: str, names: list[str], rounds: int = 3, batch: int = 32) -> None:
    from condensevit.caption import evaluate_captioner, load_captioner
    from condensevit.caption.data import DigitScenes
    from condensevit.caption.engine import _transforms, captions_per_second
    from condensevit.caption.model import gmacs_per_caption
    from condensevit.measure import environment

    rows, models = {}, {}
    for name in names:
        ckpt = os.path.join(out, "captioners", name, "last.safetensors")
        captioner, tok, meta = load_captioner(ckpt)
        scores = evaluate_captioner(ckpt, split="test", progress=False)
        beam = evaluate_captioner(ckpt, split="test", beam_size=3, progress=False)
        _, tf, _ = _transforms(captioner.encoder.model, tuple(meta["input_size"]), None)
        test = DigitScenes("test", tf)
        images = torch.stack([test[i][0] for i in range(batch)])
        enc_g, dec_g, words = gmacs_per_caption(captioner, images[:16], bos_id=tok.bos_id, eos_id=tok.eos_id)
        with open(os.path.join(out, "captioners", name, "summary.json")) as f:
            summary = json.load(f)
        enc_ckpt = summary.get("encoder_checkpoint")
        enc_summary = os.path.join(os.path.dirname(enc_ckpt), "summary.json") if enc_ckpt else ""
        top1 = None
        if os.path.isfile(enc_summary):
            with open(enc_summary) as f:
                top1 = json.load(f).get("final_top1")
        rows[name] = dict(encoder=meta["encoder"], encoder_kwargs=meta.get("encoder_kwargs"),
                          encoder_tokens=summary["encoder_tokens"], encoder_top1=top1,
                          bleu4=scores["bleu4"], cider=scores["cider"], bleu4_beam3=beam["bleu4"],
                          cider_beam3=beam["cider"], encoder_gmacs=enc_g, decoder_gmacs=dec_g,
                          caption_words=words, best_val_cider=summary["best_val"].get("cider"),
                          train_time_s=summary["train_time_s"], example=scores["examples"][0])
        models[name] = (captioner, tok, images)
        print(f"{name}: test BLEU-4 {scores['bleu4']:.4f} CIDEr-D {scores['cider']:.4f} (beam 3: "
              f"{beam['cider']:.4f}), encoder {enc_g * 1e3:.2f} MMACs, decoder {dec_g * 1e3:.2f} MMACs", flush=True)

    speed = {n: [] for n in names}
    enc_speed = {n: [] for n in names}
    for r in range(rounds):  # alternating: every model once per round
        for n in names:
            captioner, tok, images = models[n]
            speed[n].append(captions_per_second(captioner, images, warmup=1, iters=3, bos_id=tok.bos_id,
                                                eos_id=tok.eos_id))
            with torch.no_grad():
                captioner.encode(images)
                t0 = time.perf_counter()
                for _ in range(3):
                    captioner.encode(images)
                enc_speed[n].append(3 * len(images) / (time.perf_counter() - t0))
    base = names[0]
    for n in names:
        rows[n]["captions_per_s"] = sorted(speed[n])[len(speed[n]) // 2]
        rows[n]["encoder_images_per_s"] = sorted(enc_speed[n])[len(enc_speed[n]) // 2]
    for n in names:
        rows[n]["gmacs_ratio"] = rows[n]["encoder_gmacs"] / rows[base]["encoder_gmacs"]
        rows[n]["cider_rel"] = rows[n]["cider"] / rows[base]["cider"] if rows[base]["cider"] else None
        rows[n]["speedup"] = rows[n]["captions_per_s"] / rows[base]["captions_per_s"]
    report = dict(rows=rows, environment=environment("cpu"), threads=torch.get_num_threads(), batch=batch,
                  rounds=rounds)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    lines = ["| captioner | encoder tokens | encoder top-1 (digits) | test BLEU-4 | test CIDEr-D | CIDEr-D vs base | "
             "beam 3 CIDEr-D | encoder MMACs | vs base | decoder MMACs / caption | captions/s | speed-up | "
             "encoder images/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in names:
        r = rows[n]
        rel = f"{r['cider_rel']:.3f}" if r["cider_rel"] is not None else "n/a"
        top1 = f"{r['encoder_top1']:.2f}" if r["encoder_top1"] is not None else "n/a"
        lines.append(f"| {n} | {r['encoder_tokens']} | {top1} | {r['bleu4']:.4f} | {r['cider']:.4f} | {rel} | "
                     f"{r['cider_beam3']:.4f} | {r['encoder_gmacs'] * 1e3:.2f} | {r['gmacs_ratio']:.3f} | "
                     f"{r['decoder_gmacs'] * 1e3:.2f} | {r['captions_per_s']:.0f} | {r['speedup']:.2f}x | "
                     f"{r['encoder_images_per_s']:.0f} |")
    text = "\n".join(lines) + f"\n\nCPU: {torch.get_num_threads()} thread(s), batch {batch}, median of {rounds} " \
                              "alternating rounds, greedy decoding for speed.\n"
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
