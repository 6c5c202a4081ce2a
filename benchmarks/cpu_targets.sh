#!/usr/bin/env bash
# The speed figures the issues set, measured on CPU (fp32, batch 32; batch 4 for video), each
# condensed model against its baseline in one alternating run. Takes about 10 minutes on 2 cores.
# Usage: bash benchmarks/cpu_targets.sh [OUT_DIR]     (GPU: add --device cuda --amp to each line)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench_out}
mkdir -p "$out"
cv=${CONDENSEVIT:-.venv/bin/condensevit}
# STViT-S vs DeiT-S (target >= 2.0x; paper +105% on a V100)
$cv bench --models deit_small_patch16_224,stvit_deit_small_patch16_224 --batch-size 32 --rounds 3 --iters 5 \
    --quiet --json "$out/stvit_deit_small.json" --plot "$out/stvit_deit_small.png"
# LookupViT-B at 3x3/5x5/7x7 vs ViT-B (target at 5x5 >= 1.8x)
$cv bench --models "vit_base_patch16_224,lookupvit_base_patch16_224,lookupvit_base_patch16_224[compressed_grid=3x3],lookupvit_base_patch16_224[compressed_grid=7x7]" \
    --batch-size 32 --rounds 3 --iters 3 --quiet --json "$out/lookupvit_base.json" --plot "$out/lookupvit_base.png"
# STViT-R-Swin-S vs Swin-S (target >= 1.3x)
$cv bench --models swin_small_patch4_window7_224,stvit_r_swin_small_patch4_window7_224 --batch-size 32 --rounds 3 \
    --iters 3 --quiet --json "$out/stvit_r_swin_small.json" --plot "$out/stvit_r_swin_small.png"
# video at 16x224x224, batch 4
$cv bench --models vit_video_base_patch2x16_224,stvit_video_base_patch2x16_224,lookupvit_video_base_patch2x16_224 \
    --batch-size 4 --rounds 3 --iters 2 --quiet --json "$out/video_base.json" --plot "$out/video_base.png"
