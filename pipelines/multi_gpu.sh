#!/usr/bin/env bash
# Issue 6 on a 2-GPU machine (issue 16: 4 GPUs, see --build-gpus/--scaling-gpus): builds on 1, 2 GPUs, Stage I/II with ZeRO-2 and ZeRO-3 on 2 GPUs vs 1,
# checkpoints moved 2 -> 1 and 1 -> 2 GPUs, on the Qwen3-VL-4B shape with random weights.
# On the device machine: bash pipelines/multi_gpu.sh [--parts ...]   (expects .whl/ carried)
set -uo pipefail
source pipelines/device_env.sh
nvidia-smi topo -m | head -4
python3 benchmarks/multi_gpu.py --size 4b --work /tmp/rot-multi-gpu --out "$OUT/multi_gpu.json" --budget 540 "$@"
status=$?  # copy what exists, then report the script's own status
for stats in /tmp/rot-multi-gpu/shards-*/build-stats.txt; do  # the builds' Ray Data stats (shards-1gpu_1actor, -1gpu, -2gpu, ...)
  [ -f "$stats" ] && cp "$stats" "$OUT/build-stats-$(basename "$(dirname "$stats")" | sed 's/^shards-//').txt"
done
cp /tmp/rot-multi-gpu/s1-z2/two/loss.png "$OUT/stage1_zero2_2gpu_loss.png" 2>/dev/null
exit $status
