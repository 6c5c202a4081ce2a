#!/usr/bin/env bash
# Deployment speed on CPU: each condensed model against its baseline in eager PyTorch, torch.compile
# and ONNX Runtime (CPU execution provider), all in one alternating run per pair (fp32, batch-32
# throughput and batch-1 latency). The ONNX models are exported with a dynamic batch and verified
# against eager before timing. Needs the deploy extra (pip install 'condensevit[deploy]').
# Takes about an hour on 2 shared cores (compiling and exporting the base models dominate).
# Usage: bash benchmarks/deploy.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench_out/deploy}
mkdir -p "$out"
cv=${CONDENSEVIT:-.venv/bin/condensevit}
runtimes=${RUNTIMES:-eager,compile,onnxruntime}
common=(--runtime "$runtimes" --batch-size 32 --rounds 3 --iters 3 --quiet)
# STViT-S vs DeiT-S
$cv bench --models deit_small_patch16_224,stvit_deit_small_patch16_224 "${common[@]}" \
    --json "$out/stvit_deit_small.json" | tee "$out/stvit_deit_small.txt"
# STViT-R-Swin-S vs Swin-S
$cv bench --models swin_small_patch4_window7_224,stvit_r_swin_small_patch4_window7_224 "${common[@]}" \
    --json "$out/stvit_r_swin_small.json" | tee "$out/stvit_r_swin_small.txt"
# LookupViT-B (5x5 compressed tokens) vs ViT-B
$cv bench --models "vit_base_patch16_224,lookupvit_base_patch16_224[compressed_grid=5x5]" "${common[@]}" \
    --json "$out/lookupvit_base.json" | tee "$out/lookupvit_base.txt"
