#!/usr/bin/env bash
# The miniature reproduction of RoT on N x N multiplication (issue 13): every table row is one command below,
# through the project's own commands (rot-render, the deepspeed launcher, rot-eval). Run it in parts so each piece
# fits a 10-minute GPU call; a part reads what the earlier parts left in $W. Parts:
#   data        generated training rows (held-out questions excluded) -> shards
#   stage1      RoT Stage I: the head, LLM frozen
#   stage2      RoT Stage II as the official code trains it (answer loss only, official gradient)
#   vision      Stage II keeping Stage I's vision loss (MSE x10 on every latent)
#   curriculum  Stage II with the vision loss and a curriculum: the latents start as the true visual embeddings
#               (teacher forcing) and are handed to the model's own rollout 4 at a time every CSTEPS steps
#   curriculum-lora  the same with LoRA on every projection (r 64): the export that ships
#   reader      the curriculum plus the reader loss: a frozen copy of the anchor reads the predicted latents, and its
#               cross-entropy on the drawn CoT (weight RW) rewards latents that read as the right characters
#   reader-tf   the reader loss with the latents teacher-forced throughout (the model never trains on its own rollout)
#   reader-lora the reader run with LoRA (r 64 on every projection)
#   rollout     the reader-tf run (same TAG) trained on with every latent its own rollout (the official forward),
#               head trained: the teacher-forced model learns to continue from its own latents
#   sft         the baselines SFT-CoT and SFT-noCoT (same rows, same steps, full fine-tuning)
#   nostage1    control: a random head (Stage I at learning rate 0) to start the recipe from, without Stage I:
#               then  S1=random-head TAG=-nostage1 PARTS=reader-tf,rollout
#   tiny        control: shards of the untrained 'tiny' tower (an adapter maps 64 -> the LLM's size); the recipe on them:
#               SHARDS=shards-tiny S1=tiny-stage1 TAG=-tiny RW=0 PARTS=stage1,reader-tf,rollout
#   detached    ablation: latents.detach() in the answer pass
#   eval        rot-eval on valid and test for every run in EVAL_RUNS that exists
#   controls    zeros / another question's latents / the true embeddings (the test set's shards) in the latents' place (run CONTROL_RUN)
#   readback    the latents of CONTROL_RUN read back as text by the anchor
#   profile     the trainer's step timed (eager rollout vs CUDA graph)
#   On the GPU machine (carry .whl for ray/deepspeed):  N=4 SEED=0 PARTS=data,stage1,stage2,eval bash pipelines/miniature.sh
#   Parts side by side on a 4-GPU machine: PARTS=data first, then one process per GPU with GPU=<index> set.
#   On this CPU, at smoke scale:  SMOKE=1 ANCHOR=<a micro anchor folder> bash pipelines/miniature.sh
# Knobs: N (digits), SEED, ANCHOR (encoder and backbone: 'anchor' = the shipped one), DATA (valid/test files: the shipped ones), W (work dir),
# ROWS (generated training rows), EPOCHS (Stage II / SFT epochs over them), STEPS1 (Stage I steps), CSTEPS (optimizer
# steps per curriculum stage), VW / RW (vision / reader loss weights of the reader runs), MB (micro-batch), LIMIT (eval
# rows), GPU (pin this process's parts to one GPU), MERGE (visual tokens per latent: 2 halves the latents, issue 33.3;
# the reader loss then defaults off, RW=0: it reads one latent per visual token); for the reader runs EXTRA (more trainer options, e.g. --train-head)
# and TAG (a suffix to the run's name, so variants sit side by side); ROLL (more options for the rollout run, e.g.
# --max-steps 300 --lr 1e-3: later options win); SHARDS (the shard folder in $W that Stage I and II train on) and S1 (the
# Stage I run, in $W, that Stage II starts from), for the controls; SFT_EXTRA (more options for the baselines, e.g.
# --max-seconds 300 --decay-by-deadline); SFT_MODES (the baselines the sft part trains, in turn:
# default both; one each in two processes side by side after PARTS=data: SFT_MODES=sft-cot EVAL_RUNS=sft-cot PARTS=sft,eval).
set -euo pipefail
[ -f pipelines/device_env.sh ] && [ -z "${SMOKE:-}" ] && source pipelines/device_env.sh
export PYTHONPATH=$PWD/packages${PYTHONPATH:+:$PYTHONPATH}
N=${N:-4}; SEED=${SEED:-0}; ANCHOR=${ANCHOR:-anchor}; DATA=$(realpath "${DATA:-packages/rot_data/data}")  # the shipped valid/test files
W=$(realpath -m "${W:-/tmp/miniature-${N}x${N}}"); OUT=${OUT:-$W/out}; mkdir -p "$W" "$OUT"
STEPS1=${STEPS1:-300}; MB=${MB:-256}; ROWS=${ROWS:-102400}; EPOCHS=${EPOCHS:-3}; CSTEPS=${CSTEPS:-100}; LIMIT=${LIMIT:-}
VW=${VW:-10}; RW=${RW:-$( [ "${MERGE:-1}" = 1 ] && echo 1 || echo 0 )}; EXTRA=${EXTRA:-}; TAG=${TAG:-}; ROLL=${ROLL:-}; SHARDS=${SHARDS:-shards}; S1=${S1:-stage1}
PARTS=${PARTS:-data,stage1,stage2,sft,eval,controls,readback}
EVAL_RUNS=${EVAL_RUNS:-stage2 vision curriculum curriculum-lora reader reader-tf reader-lora rollout sft-cot sft-nocot rollout-nostage1 rollout-tiny detached}; CONTROL_RUN=${CONTROL_RUN:-stage2}
if [ -n "${SMOKE:-}" ]; then STEPS1=2; MB=4; ROWS=16; EPOCHS=1; CSTEPS=1; LIMIT=4; fi
SET=icot_mult_${N}x${N}
ds() {  # one `deepspeed --module rot_train <args>` launch on a port free at this moment: a port picked once at the
  # script's start can be taken minutes later by another run's sockets (a mixed run beside a 5x5 one failed so)
  local port; port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
  if [ -n "${GPU:-}" ]; then  # one GPU for this process: runs on other GPUs go on beside it
    run python3 -m deepspeed.launcher.runner --include "localhost:$GPU" --master_port "$port" --module rot_train "$@"
  else  # the launcher (also where --target installs left no 'deepspeed' script)
    run python3 -m deepspeed.launcher.runner --num_gpus 1 --master_port "$port" --module rot_train "$@"
  fi
}
part() { [[ ",$PARTS," == *",$1,"* ]]; }
log() { echo "== $*" | tee -a "$OUT/commands.txt"; }
run() { local shown="$*"; log "${shown#on_gpu }"; "$@"; }
on_gpu() { if [ -n "${GPU:-}" ]; then CUDA_VISIBLE_DEVICES=$GPU "$@"; else "$@"; fi; }
COMMON="--backbone $ANCHOR --global-batch $MB --micro-batch $MB --seed $SEED --warmup-steps 20 --head-width 512 --num-workers 2"
TRAIN="$COMMON --merge-latents ${MERGE:-1}"  # the RoT runs (the SFT baselines have no latents to merge)
STAGE2="$TRAIN --epochs $EPOCHS --lr 3e-4 --full-finetune"

if part data; then  # training rows; held-out questions are never generated
  run python3 -m rot_render.cli multiplication --n "$N" --count "$ROWS" --seed "$SEED" --out "$W/train.txt" \
      --exclude "$DATA/$SET/valid.txt" --exclude "$DATA/$SET/test_bigbench.txt"
  run python3 -m rot_render.cli build --dataset "$W/train.txt" --encoder "$ANCHOR" --out "$W/shards"
fi
if part stage1; then  # RoT Stage I: head only, LLM frozen (vision MSE x10 + LM loss)
  ds stage1 --shards "$W/$SHARDS" $TRAIN --max-steps "$STEPS1" --lr 1e-3 --out "$W/$S1-s$SEED"
fi
if part profile; then  # the trainer's step at this size (issue 13.6): eager rollout vs CUDA graph, Stage I and II
  (run on_gpu python3 benchmarks/rot_step_profile.py --shards "$W/$SHARDS" --backbone "$ANCHOR" --micro-batch "$MB" --head-width 512 --full-finetune \
      --init "$W/stage1-s$SEED/export" > "$OUT/profile-s$SEED.txt" 2>&1) || echo "profile failed: see $OUT/profile-s$SEED.txt"
  grep -E "^(loader|stage)" "$OUT/profile-s$SEED.txt" || true
fi
if part stage2; then  # RoT Stage II as the official code trains it: head frozen, answer loss, official gradient
  ds stage2 --shards "$W/$SHARDS" $STAGE2 --init "$W/stage1-s$SEED/export" --out "$W/stage2-s$SEED"
fi
if part vision; then  # Stage II keeping the vision loss on every latent
  ds stage2 --shards "$W/$SHARDS" $STAGE2 --vision-weight 10 --init "$W/stage1-s$SEED/export" --out "$W/vision-s$SEED"
fi
if part curriculum; then  # Stage II with the vision loss, latents handed from teacher forcing to the rollout 4 at a time
  ds stage2 --shards "$W/$SHARDS" $STAGE2 --vision-weight 10 --curriculum-steps "$CSTEPS" --curriculum-stride 4 \
      --init "$W/stage1-s$SEED/export" --out "$W/curriculum-s$SEED"
fi
if part curriculum-lora; then  # the same with LoRA (r 64 on every projection) instead of full fine-tuning: an export of a few MB
  LORA="--lora-r 64 --lora-alpha 128"; for m in q k v o gate up down; do LORA="$LORA --lora-targets ${m}_proj"; done
  ds stage2 --shards "$W/$SHARDS" $TRAIN --epochs "$EPOCHS" --lr 1e-3 $LORA --vision-weight 10 \
      --curriculum-steps "$CSTEPS" --curriculum-stride 4 --init "$W/stage1-s$SEED/export" --out "$W/curriculum-lora-s$SEED"
fi
READER="--vision-weight $VW --reader-weight $RW --init $W/$S1-s$SEED/export $EXTRA"
if part reader; then  # the curriculum with the reader loss
  ds stage2 --shards "$W/$SHARDS" $STAGE2 $READER --curriculum-steps "$CSTEPS" --curriculum-stride 4 --out "$W/reader$TAG-s$SEED"
fi
if part reader-tf; then  # the reader loss, every latent slot teacher-forced with the true embedding in every step
  ds stage2 --shards "$W/$SHARDS" $STAGE2 $READER --curriculum-steps 1000000 --out "$W/reader-tf$TAG-s$SEED"
fi
if part reader-lora; then  # the reader run with LoRA (r 64 on every projection): an export of a few MB
  LORA="--lora-r 64 --lora-alpha 128"; for m in q k v o gate up down; do LORA="$LORA --lora-targets ${m}_proj"; done
  ds stage2 --shards "$W/$SHARDS" $TRAIN --epochs "$EPOCHS" --lr 1e-3 $LORA $READER --curriculum-steps "$CSTEPS" \
      --curriculum-stride 4 --out "$W/reader-lora$TAG-s$SEED"
fi
if part rollout; then  # train the teacher-forced model on its own rollouts (the export is the backbone to start from)
  FROM="$W/reader-tf$TAG-s$SEED/export"
  ds stage2 --shards "$W/$SHARDS" $STAGE2 --backbone "$FROM" --init "$FROM" --train-head --vision-weight "$VW" \
      $ROLL --out "$W/rollout$TAG-s$SEED"
fi
if part sft; then  # the baselines, same rows and steps, full fine-tuning
  for mode in ${SFT_MODES:-sft-cot sft-nocot}; do
    ds sft --mode "$mode" --shards "$W/$SHARDS" $COMMON --epochs "$EPOCHS" --lr 3e-4 --full-finetune ${SFT_EXTRA:-} --out "$W/$mode-s$SEED"
  done
fi
if part nostage1; then  # control: no Stage I (a Stage I run with learning rate 0 exports a random head)
  ds stage1 --shards "$W/$SHARDS" $TRAIN --max-steps 1 --lr 0 --out "$W/random-head-s$SEED"
fi
if part detached; then  # ablation: Stage II with latents.detach() in the answer pass (the previous trainer)
  ds stage2 --shards "$W/$SHARDS" $STAGE2 --latent-gradient detached --init "$W/stage1-s$SEED/export" --out "$W/detached-s$SEED"
fi
if part tiny; then  # control: the untrained 'tiny' tower's embeddings as targets
  [ -f "$W/shards-tiny/manifest.json" ] || run python3 -m rot_render.cli build --dataset "$W/train.txt" --encoder tiny --out "$W/shards-tiny"
fi
EVAL="--dataset $SET --data-dir $DATA --batch-size 256 ${LIMIT:+--limit $LIMIT}"  # a decode step costs the same at 64 or 256 rows
if part eval; then  # checkpoints are chosen on valid; the table is on test
  for run_dir in $EVAL_RUNS; do
    [ -d "$W/$run_dir-s$SEED/export" ] || continue
    for split in valid test; do
      run on_gpu python3 -m rot_eval.cli run --checkpoint "$W/$run_dir-s$SEED/export" $EVAL --split "$split" --out "$OUT/$run_dir-s$SEED-$split"
    done
  done
fi
if part controls; then  # zeros / another question's latents / the true visual embeddings in the latents' place
  [ -f "$W/test-shards/manifest.json" ] || run python3 -m rot_render.cli build --dataset "$SET" --split test --data-dir "$DATA" \
      --encoder "$ANCHOR" --out "$W/test-shards"
  for control in zeros shuffled truth; do
    run on_gpu python3 -m rot_eval.cli run --checkpoint "$W/$CONTROL_RUN-s$SEED/export" $EVAL --split test --control "$control" \
        --truth-shards "$W/test-shards" --out "$OUT/$CONTROL_RUN-s$SEED-test-$control"
  done
fi
if part readback; then  # the latents read back as text by the anchor
  run on_gpu python3 -m rot_eval.cli readback --checkpoint "$W/$CONTROL_RUN-s$SEED/export" --dataset "$SET" --data-dir "$DATA" \
      --shards "$W/$SHARDS" --reader "$ANCHOR" ${LIMIT:+--limit $LIMIT} --out "$OUT/$CONTROL_RUN-s$SEED-readback"
fi
ls "$OUT"
