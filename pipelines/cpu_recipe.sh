#!/usr/bin/env bash
# See RoT learn on a CPU (issue 30.4): RoT trained from the shipped anchor on 3x3 multiplication, on 2 CPU cores,
# next to SFT without a CoT given the same training time; both answer the shipped mult_3x3 test set (1000 rows).
#   bash pipelines/cpu_recipe.sh                 # from the repository root; W=<folder> moves the work folder
# Parts, each a project command:
#   data      generated 3x3 rows (no question of the shipped valid/test files) -> shards of the anchor's tower
#   stage1    RoT Stage I: the projection head, LLM frozen
#   tf        Stage II with every latent slot teacher-forced (the true visual embedding): full fine-tuning, head trained
#   rollout   Stage II on its own rollouts (the official forward), for the rest of the time
#   nocot     the baseline: SFT question -> answer, the same rows, as many seconds as stage1 + tf + rollout trained
#   eval      both on mult_3x3 test
# Knobs: ROWS (training rows), MB (global batch = micro-batch), TF_STEPS, ROLL_SECONDS, PARTS.
set -euo pipefail
W=${W:-runs/cpu-3x3}; ROWS=${ROWS:-4096}; MB=${MB:-64}; STEPS1=${STEPS1:-40}; TF_STEPS=${TF_STEPS:-150}
ROLL_SECONDS=${ROLL_SECONDS:-240}; PARTS=${PARTS:-data,stage1,tf,rollout,nocot,eval}
DATA=$(python3 -c 'from rot_data.records import PACKAGE_DATA; print(PACKAGE_DATA)')  # the shipped valid/test files
mkdir -p "$W"
part() { [[ ",$PARTS," == *",$1,"* ]]; }
seconds() { python3 -c "import json, sys; print(round(json.load(open(sys.argv[1]))['seconds']))" "$1/summary.json"; }
TRAIN="--shards $W/shards --backbone anchor --global-batch $MB --head-width 512 --warmup-steps 5 --num-workers 1"
START=$(date +%s)

if part data; then
  rot-render multiplication --n 3 --count "$ROWS" --seed 0 --out "$W/train.txt" \
      --exclude "$DATA/mult_3x3/valid.txt" --exclude "$DATA/mult_3x3/test.txt"
  rot-render build --dataset "$W/train.txt" --out "$W/shards"
fi
if part stage1; then
  rot-train stage1 $TRAIN --max-steps "$STEPS1" --lr 1e-3 --out "$W/stage1"
fi
if part tf; then
  rot-train stage2 $TRAIN --init "$W/stage1/export" --full-finetune --train-head --lr 1e-3 --vision-weight 10 \
      --curriculum-steps 1000000 --epochs 100 --max-steps "$TF_STEPS" --out "$W/tf"
fi
if part rollout; then
  rot-train stage2 $TRAIN --backbone "$W/tf/export" --init "$W/tf/export" --full-finetune --train-head --lr 3e-4 \
      --vision-weight 10 --epochs 100 --max-seconds "$ROLL_SECONDS" --decay-by-deadline --out "$W/rollout"
fi
if part nocot; then  # the same training time as RoT's three runs
  budget=$(( $(seconds "$W/stage1") + $(seconds "$W/tf") + $(seconds "$W/rollout") ))
  rot-train sft --mode sft-nocot $TRAIN --full-finetune --lr 3e-4 --epochs 100 --max-seconds "$budget" --decay-by-deadline --out "$W/nocot"
fi
if part eval; then
  rot-eval run --checkpoint "$W/rollout/export" --dataset mult_3x3 --split test --batch-size 256 --out "$W/eval-rot"
  rot-eval run --checkpoint "$W/nocot/export" --dataset mult_3x3 --split test --batch-size 256 --out "$W/eval-nocot"
  rot-eval table "$W/eval-rot" "$W/eval-nocot"
fi
echo "cpu recipe: $(( $(date +%s) - START )) s in all; work folder $W"
