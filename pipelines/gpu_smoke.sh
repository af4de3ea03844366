#!/usr/bin/env bash
# GPU smoke run (issues 2 and 3): the Ray build job with the encoder on the GPU, then Stage I and
# Stage II under the deepspeed launcher with ZeRO-2 + bf16 on a tiny Qwen3-VL-architecture backbone.
# On the device machine: bash pipelines/gpu_smoke.sh   (expects .whl/ carried; see README "GPU machine")
set -euo pipefail
source pipelines/device_env.sh
WORK=/tmp/rot-smoke; mkdir -p "$WORK"
python3 -m rot_render.cli build --dataset gsm8k --split train --out "$WORK/shards" --encoder tiny 2>&1 | tail -2
python3 -m rot_render.cli inspect "$WORK/shards"
python3 -c "from rot_fixtures.tiny import save_tiny_vlm; save_tiny_vlm('$WORK/backbone', 'qwen3_vl', hidden_size=256, layers=4)" 2>/dev/null

DEEPSPEED="python3 -m deepspeed.launcher.runner"  # the launcher, also where --target installs left no 'deepspeed' on PATH
COMMON="--shards $WORK/shards --backbone $WORK/backbone --global-batch 64 --micro-batch 16 --max-steps 30 --lr 1e-3 --warmup-steps 5"
$DEEPSPEED --num_gpus 1 --module rot_train stage1 $COMMON --out "$WORK/stage1" 2>&1 | grep -E "done|error|Error" | tail -5 || true
$DEEPSPEED --num_gpus 1 --module rot_train stage2 $COMMON --init "$WORK/stage1/export" --out "$WORK/stage2" 2>&1 | grep -E "done|error|Error" | tail -5 || true
cp "$WORK/stage1/loss.png" "$OUT/stage1_loss.png"; cp "$WORK/stage2/loss.png" "$OUT/stage2_loss.png"
cp "$WORK/stage1/run.json" "$OUT/stage1_run.json"; cp "$WORK/stage2/summary.json" "$OUT/stage2_summary.json"
