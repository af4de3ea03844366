#!/usr/bin/env bash
# The miniature reproduction of RoT on N x N multiplication (issue 13): every table row is one command below,
# through the project's own commands (rot-render, the deepspeed launcher, rot-eval). Run it in parts
# (PARTS=data,stage1,stage2,sft,eval,controls,readback; profile: the trainer's step timed; the ablations: nostage1, tiny, detached) so each piece fits a 10-minute GPU call; a part reads
# what the earlier parts left in $W.
#   On the GPU machine (carry .whl for ray/deepspeed):  N=4 SEED=0 PARTS=data,stage1,stage2 bash pipelines/miniature.sh
#   On this CPU, at smoke scale:  SMOKE=1 ANCHOR=<a micro anchor folder> bash pipelines/miniature.sh
# Knobs: N (digits), SEED, ANCHOR (encoder and backbone: 'anchor' = the shipped one), DATA (shared data), W (work dir),
# STEPS1/STEPS2 (optimizer steps of Stage I / Stage II and the SFT baselines), MB (micro-batch), LIMIT (eval rows).
set -euo pipefail
[ -f pipelines/device_env.sh ] && [ -z "${SMOKE:-}" ] && source pipelines/device_env.sh
export PYTHONPATH=$PWD/packages${PYTHONPATH:+:$PYTHONPATH}
N=${N:-4}; SEED=${SEED:-0}; ANCHOR=${ANCHOR:-anchor}; DATA=$(realpath "${DATA:-../shared/data}")
W=$(realpath -m "${W:-/tmp/miniature-${N}x${N}}"); OUT=${OUT:-$W/out}; mkdir -p "$W" "$OUT"
STEPS1=${STEPS1:-300}; STEPS2=${STEPS2:-600}; MB=${MB:-256}; LIMIT=${LIMIT:-}
PARTS=${PARTS:-data,stage1,stage2,sft,eval,controls,readback}
if [ -n "${SMOKE:-}" ]; then STEPS1=2; STEPS2=2; MB=4; LIMIT=4; fi
SET=icot_mult_${N}x${N}
DS="python3 -m deepspeed.launcher.runner --num_gpus 1"  # the launcher (also where --target installs left no 'deepspeed' script)
part() { [[ ",$PARTS," == *",$1,"* ]]; }
log() { echo "== $*" | tee -a "$OUT/commands.txt"; }
run() { log "$*"; "$@"; }
TRAIN="--backbone $ANCHOR --micro-batch $MB --grad-accum 1 --seed $SEED --warmup-steps 20 --head-width 512 --num-workers 2"
ROWS2=$((STEPS2 * MB))

if part data; then  # training rows: one epoch of Stage II; held-out questions never generated
  run python3 -m rot_render.cli multiplication --n "$N" --count "$ROWS2" --seed "$SEED" --out "$W/train.txt" \
      --exclude "$DATA/$SET/valid.txt" --exclude "$DATA/$SET/test_bigbench.txt"
  run python3 -m rot_render.cli build --dataset "$W/train.txt" --encoder "$ANCHOR" --out "$W/shards"
  run python3 -m rot_render.cli build --dataset "$SET" --split test --data-dir "$DATA" --encoder "$ANCHOR" --out "$W/test-shards"
fi
cd packages
if part stage1; then  # RoT Stage I: head only, LLM frozen (vision MSE x10 + LM loss)
  run $DS rot_train/stage1.py --shards "$W/shards" $TRAIN --max-steps "$STEPS1" --lr 1e-3 --out "$W/stage1-s$SEED"
fi
if part profile; then  # the trainer's step at this size (issue 13.6): eager rollout vs CUDA graph, Stage I and II
  (cd .. && run python3 benchmarks/rot_step_profile.py --shards "$W/shards" --backbone "$ANCHOR" --micro-batch "$MB" \
      --init "$W/stage1-s$SEED/export" > "$OUT/profile-s$SEED.txt" 2>&1) || echo "profile failed: see $OUT/profile-s$SEED.txt"
  grep -E "^(loader|stage)" "$OUT/profile-s$SEED.txt" || true
fi
if part stage2; then  # RoT Stage II: the LLM fine-tuned, head frozen, official gradient through the latents
  run $DS rot_train/stage2.py --shards "$W/shards" $TRAIN --epochs 1 --lr 3e-4 --full-finetune \
      --init "$W/stage1-s$SEED/export" --out "$W/stage2-s$SEED"
fi
if part sft; then  # the baselines, same rows and at least as many steps, full fine-tuning
  for mode in sft-cot sft-nocot; do
    run $DS rot_train/sft.py --mode "$mode" --shards "$W/shards" $TRAIN --epochs 1 --lr 3e-4 --full-finetune --out "$W/$mode-s$SEED"
  done
fi
if part nostage1; then  # control: Stage II from a random head (a Stage I run with learning rate 0 exports it)
  run $DS rot_train/stage1.py --shards "$W/shards" $TRAIN --max-steps 1 --lr 0 --out "$W/random-head-s$SEED"
  run $DS rot_train/stage2.py --shards "$W/shards" $TRAIN --epochs 1 --lr 3e-4 --full-finetune \
      --init "$W/random-head-s$SEED/export" --out "$W/nostage1-s$SEED"
fi
if part detached; then  # ablation: Stage II with latents.detach() in the answer pass (the previous trainer)
  run $DS rot_train/stage2.py --shards "$W/shards" $TRAIN --epochs 1 --lr 3e-4 --full-finetune --latent-gradient detached \
      --init "$W/stage1-s$SEED/export" --out "$W/detached-s$SEED"
fi
if part tiny; then  # control: the untrained 'tiny' tower's embeddings as targets (an adapter maps 64 -> the LLM's size)
  (cd .. && run python3 -m rot_render.cli build --dataset "$W/train.txt" --encoder tiny --out "$W/shards-tiny")
  run $DS rot_train/stage1.py --shards "$W/shards-tiny" $TRAIN --max-steps "$STEPS1" --lr 1e-3 --out "$W/tiny-stage1-s$SEED"
  run $DS rot_train/stage2.py --shards "$W/shards-tiny" $TRAIN --epochs 1 --lr 3e-4 --full-finetune \
      --init "$W/tiny-stage1-s$SEED/export" --out "$W/tiny-s$SEED"
fi
cd ..
EVAL="--dataset $SET --data-dir $DATA --batch-size 256 ${LIMIT:+--limit $LIMIT}"  # a decode step costs the same at 64 or 256 rows
if part eval; then  # checkpoints are chosen on valid; the table is on test
  for run_dir in stage2 sft-cot sft-nocot; do
    [ -d "$W/$run_dir-s$SEED/export" ] || { log "skip $run_dir-s$SEED: not trained"; continue; }
    for split in valid test; do
      run python3 -m rot_eval.cli run --checkpoint "$W/$run_dir-s$SEED/export" $EVAL --split "$split" --out "$OUT/$run_dir-s$SEED-$split"
    done
  done
fi
for ablation in nostage1 detached tiny; do
  if part "$ablation"; then
    run python3 -m rot_eval.cli run --checkpoint "$W/$ablation-s$SEED/export" $EVAL --split test --out "$OUT/$ablation-s$SEED-test"
  fi
done
if part controls; then  # zeros / another question's latents / the true visual embeddings in the latents' place
  for control in zeros shuffled truth; do
    run python3 -m rot_eval.cli run --checkpoint "$W/stage2-s$SEED/export" $EVAL --split test --control "$control" \
        --truth-shards "$W/test-shards" --out "$OUT/stage2-s$SEED-test-$control"
  done
fi
if part readback; then  # the latents read back as text by the anchor
  run python3 -m rot_eval.cli readback --checkpoint "$W/stage2-s$SEED/export" --dataset "$SET" --data-dir "$DATA" --shards "$W/shards" \
      --reader "$ANCHOR" ${LIMIT:+--limit $LIMIT} --out "$OUT/readback-s$SEED"
fi
ls "$OUT"
