#!/usr/bin/env bash
# The 4x4 RoT recipe of docs/results.md in one GPU call (issue 13), one seed per GPU side by side:
#   the training rows and their shards once (seed 0's rows for every seed, as in the table), then per seed
#   Stage I (100 steps) -> teacher-forced Stage II (1 000 steps, head trained, lr 1e-3, reader loss) ->
#   Stage II on its own rollouts until DEADLINE seconds after this script started (--max-seconds) -> valid and test.
# On a 4-GPU machine (carry .whl):   SEEDS="0 1 2 3" bash pipelines/miniature_call.sh
# A seed whose rollout phase needs more than one call continues in the next (rot-4x4 on anchor version 3 did):
#   CONTINUE=<its compact export, carried in> SEEDS=<seed> bash pipelines/miniature_call.sh
# ("{seed}" in CONTINUE stands for each seed's number: CONTINUE=carried/s{seed}/compact SEEDS="0 1" continues two) and
# trains that export on its own rollouts for the call's time (run rollout-h2-s<seed>). CEPOCHS: the rollout phase's
# planned epochs (default 6 when continuing, 4 in a first call); the learning rate decays to zero at the deadline
# whatever the step rate (--decay-by-deadline: a GPU shared with other runs makes fewer steps). Every run
# ends with a compact copy of its export (rot-train compact --bits 4, ~7.5 MB: <run>/compact) that fits beside the
# wheels (two of them do; the 4-bit form is also what ships: rot-5x5 lost 0.2 points on test to it).
# Each part is a pipelines/miniature.sh command (the table's rows give them one by one). Knobs: SEEDS (one per GPU,
# in order), DEADLINE (default 520: a 10-minute call with the evaluation after it), EVAL (0: keep the exports in $W
# for evaluation elsewhere), and miniature.sh's (N, DATA, W, ROWS, STEPS1, ...). On this CPU, at smoke scale (one seed,
# no GPU pinning): SMOKE=1 ANCHOR=<a micro anchor folder> bash pipelines/miniature_call.sh
set -euo pipefail
START=$(date +%s); SEEDS=${SEEDS:-0}; DEADLINE=${DEADLINE:-520}; EVAL=${EVAL:-1}
export N=${N:-4} ROWS=${ROWS:-64000} STEPS1=${STEPS1:-100}
export W=$(realpath -m "${W:-/tmp/miniature-${N}x${N}}")  # miniature.sh's default
[ -f pipelines/device_env.sh ] && [ -z "${SMOKE:-}" ] && source pipelines/device_env.sh
LOGS=$W/logs; mkdir -p "$LOGS"
elapsed() { echo $(( $(date +%s) - START )); }
mini() { bash pipelines/miniature.sh; }

SEED=0 PARTS=data mini > "$LOGS/data.log" 2>&1
echo "data: $(grep -E '^done:' "$LOGS/data.log") ($(elapsed) s)"

one_seed() {  # the whole recipe for one seed on one GPU (or, with CONTINUE, more of its rollout phase)
  [ -z "${SMOKE:-}" ] && export GPU=$1
  export SEED=$2
  local run=rollout-h epochs=${CEPOCHS:-4} from=""
  if [ -n "${CONTINUE:-}" ]; then
    local export=${CONTINUE//\{seed\}/$2}
    run=rollout-h2 epochs=${CEPOCHS:-6} from="--backbone $export --init $export"
  else
    PARTS=stage1 mini
    EPOCHS=4 TAG=-h EXTRA="--train-head --lr 1e-3" PARTS=reader-tf mini
  fi
  local left=$(( DEADLINE - $(elapsed) - 38 ))  # ~38 s of launcher and model start-up before the clock starts
  EPOCHS=$epochs TAG=${run#rollout} ROLL="$from --max-seconds $(( left > 30 ? left : 30 )) --decay-by-deadline --no-gradient-checkpointing" PARTS=rollout mini
  # compact first: the export that travels to the next call is ready before the evaluation spends the call's last seconds
  python3 -m rot_train compact "$W/$run-s$SEED/export" --out "$W/$run-s$SEED/compact" --base "${ANCHOR:-anchor}" --bits 4
  if [ "$EVAL" = 1 ]; then EVAL_RUNS=$run PARTS=eval mini; fi
}
GPUS=$( [ -n "${SMOKE:-}" ] && echo 1 || nvidia-smi -L | wc -l ); i=0
for seed in $SEEDS; do  # more seeds than GPUs: they share GPUs in turn (small models leave a GPU half idle)
  one_seed $(( i % GPUS )) "$seed" > "$LOGS/seed$seed.log" 2>&1 &
  i=$((i + 1))
done
wait
for seed in $SEEDS; do  # the true summary: how far each rollout phase got, and each accuracy
  echo "seed $seed: $(grep -E '^stage 2 (done|stopped)' "$LOGS/seed$seed.log" | tail -1 | sed 's/; export in .*//')"
  grep -E '^RoT on' "$LOGS/seed$seed.log" | sed 's/ over .*//; s/^/    /' || true
done
echo "exports: $W/rollout-h${CONTINUE:+2}-s<seed>/export (and /compact); logs: $LOGS ($(elapsed) s)"
