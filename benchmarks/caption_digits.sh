#!/usr/bin/env bash
# Captioning with a frozen condensed encoder on the embedded digit scenes (docs/captioning.md).
#  1. encoders trained for classification on the embedded digits (same 64x64 canvas) with
#     `condensevit train`, one recipe (the demo's, 20 epochs): a ViT baseline, STViT, LookupViT,
#     the three at once with one thread each (on a loaded machine one thread per process wastes
#     less than two threads waiting on each other);
#  2. each encoder frozen, a caption decoder trained on its tokens with one recipe;
#  3. BLEU-4 / CIDEr-D on the test split, encoder GMACs, decoder GMACs per caption, captions/s.
# Finished steps are reused (delete OUT to start again). About 25 minutes of CPU time on 2 cores;
# it took about 2 hours of wall time on our 2-core machine shared with five other engineers.
# Usage: bash benchmarks/caption_digits.sh [OUT_DIR]   (CONDENSEVIT / PYTHON: the command and interpreter to use)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench_out/caption}
mkdir -p "$out"
cv=${CONDENSEVIT:-.venv/bin/condensevit}
read -r -a CV <<< "$cv"

# ---- 1. encoders: classification on the embedded digits (64x64, patch 8 = 64 tokens, width 128, depth 6)
COMMON="img_size=64 patch_size=8 embed_dim=128 depth=6 num_heads=4"
RECIPE="--data digits --epochs 20 --batch-size 16 --lr 5e-4 --weight-decay 0.05 --warmup-epochs 1 --min-lr 1e-5
        --smoothing 0.1 --aa none --scale 0.85,1.0 --no-progress"
train_encoder() {  # short-name model kwargs...
    local short=$1 model=$2; shift 2
    if [ -f "$out/encoders/$short/summary.json" ]; then echo "encoder $short: done already"; return; fi
    local resume=()
    [ -f "$out/encoders/$short/last.state.pth" ] && resume=(--resume auto)
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=1 "${CV[@]}" train --model "$model" --model-kwargs $COMMON "$@" $RECIPE --output "$out/encoders/$short" "${resume[@]}"
}
mkdir -p "$out/encoders"
train_encoder vit deit_tiny_patch16_224 global_pool=avg class_token=False > "$out/encoders/vit.log" 2>&1 &
train_encoder stvit stvit_deit_tiny_patch16_224 stgm_start=2 num_semantic_tokens=9 > "$out/encoders/stvit.log" 2>&1 &
train_encoder lookupvit lookupvit_tiny_patch16_224 compressed_grid=3x3 "train_grids=[(2,2),(3,3),(4,4)]" \
    > "$out/encoders/lookupvit.log" 2>&1 &
wait
for e in vit stvit lookupvit; do
    [ -f "$out/encoders/$e/summary.json" ] || { echo "encoder $e failed: see $out/encoders/$e.log"; exit 1; }
done

# ---- 2. captioners: the encoder frozen, one decoder recipe for all (tokens cached: the encoder is frozen)
CAP_RECIPE="--data digit_scenes --epochs 15 --batch-size 32 --lr 1e-3 --warmup-epochs 1 --dim 128 --depth 2
            --num-heads 4 --dropout 0.1 --smoothing 0.1 --cache-tokens --no-progress"
train_captioner() {  # short-name encoder-run [extra caption-train options...]
    local short=$1 enc=$2; shift 2
    if [ -f "$out/captioners/$short/summary.json" ]; then echo "captioner $short: done already"; return; fi
    local resume=()
    [ -f "$out/captioners/$short/last.state.pth" ] && resume=(--resume auto)
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=1 "${CV[@]}" caption train --encoder-checkpoint "$out/encoders/$enc/last.safetensors" \
        $CAP_RECIPE "$@" --output "$out/captioners/$short" "${resume[@]}"
}
mkdir -p "$out/captioners"
train_captioner vit vit > "$out/captioners/vit.log" 2>&1 &
train_captioner stvit stvit > "$out/captioners/stvit.log" 2>&1 &
train_captioner lookupvit_3x3 lookupvit --encoder-kwargs compressed_grid=3x3 > "$out/captioners/lookupvit_3x3.log" 2>&1 &
wait
train_captioner lookupvit_2x2 lookupvit --encoder-kwargs compressed_grid=2x2 > "$out/captioners/lookupvit_2x2.log" 2>&1 &
train_captioner lookupvit_4x4 lookupvit --encoder-kwargs compressed_grid=4x4 > "$out/captioners/lookupvit_4x4.log" 2>&1 &
wait
# both LookupViT streams (9 compressed + 64 lookup tokens) to the decoder: the best LookupViT row
train_captioner lookupvit_3x3_both lookupvit --encoder-kwargs compressed_grid=3x3 --streams both \
    > "$out/captioners/lookupvit_3x3_both.log" 2>&1

# ---- 3. test-split scores, GMACs per caption, captions/s in alternating rounds -> OUT/report.md
read -r -a PY <<< "${PYTHON:-.venv/bin/python}"
OMP_NUM_THREADS=1 "${PY[@]}" benchmarks/caption_report.py "$out" vit stvit lookupvit_2x2 lookupvit_3x3 lookupvit_4x4 lookupvit_3x3_both
