#!/usr/bin/env bash
# One GPU (issues 5, 16): encode, train, infer, the GSM8k test through rot-eval, and decode-limit benchmarks at the Qwen3-VL-4B shape.
# On the device machine: bash pipelines/gpu_bench.sh [--parts encode,infer,limit]   (expects .whl/ carried)
set -euo pipefail
source pipelines/device_env.sh
python3 benchmarks/gpu_bench.py --size 4b --out "$OUT/bench.json" "$@"
