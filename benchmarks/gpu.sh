#!/usr/bin/env bash
# The GPU figures in one run: AMP (bf16) inference speed-ups at batch 128 (video: 8) and batch-1
# latency, the same with torch.compile, training-step speed-ups and peak memory, and one epoch of AMP
# training of the demo models. One GPU, about 8 minutes. Writes OUT/gpu.json and OUT/gpu.md.
#
#   bash benchmarks/gpu.sh [--out OUT] [--steps inference,compile,train,demo] [--quiet]
#   bash benchmarks/gpu.sh --dry-run --out /tmp/gpu_dry   # every step at tiny size on the CPU
#
# Python: $PYTHON, else .venv/bin/python (make install), else python3. Pick the GPU with CUDA_VISIBLE_DEVICES.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py=${PYTHON:-}
if [[ -z "$py" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py=python3; fi
fi
if [[ " $* " != *" --dry-run "* ]] && command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec "$py" "$root/benchmarks/gpu.py" "$@"
