#!/usr/bin/env bash
# One RoT model for 3x3 to 6x6 multiplication (issue 33.2). Its CoTs render to different numbers of visual tokens, so
# the thinking length varies by question, and the model must end its own thought. Every table row is one command below,
# through the project's own commands. Parts (a part reads what the earlier ones left in $W):
#   data    generated rows of every size (the held-out valid/test questions excluded), shuffled together -> one shard set
#   train   pipelines/miniature.sh's recipe on them: Stage I, teacher-forced Stage II (reader loss, head trained), then
#           Stage II on its own rollouts until DEADLINE seconds after this script started, both Stage II runs with the
#           learned stop (--stop-weight SW); with CONTINUE=<an earlier call's export>, more of the rollout phase only
#           (run rollout-mixed-c<CALL>). Each ends with a compact copy of its export (<run>/compact, 8-bit differences,
#           ~12 MB: one file back from the device; the parts below evaluate it on any machine).
#   truth   the valid/test shards of every size (each question's visual-token count: the oracle's budget); sweep and
#           test build them first where they are missing. On its own it can run beside the training
#   sweep   per size, on valid (VLIMIT rows): (b) fixed budgets BUDGETS (default: every size's own visual-token count,
#           the only lengths a model trained on whole CoTs answers at), (c) the paper's dynamic threshold THRESHOLDS
#   test    per size, on test: (a) the oracle (each question's own visual-token count), (b) the fixed budget
#           and (c) the threshold best on valid (mean over sizes), (d) the learned stop; then the table, its picture, and
#           stops-test.md: each stop against the oracle (accuracy and mean latents; the goal: within 1 point and 5%),
#           and per size the thresholds that end every valid question at its length (rot-eval stops; their overlap)
# On a GPU machine (carry .whl): PARTS=data,train, as one job across calls of 10 minutes (pipelines/in_background.sh),
# or call by call with CONTINUE=<the last call's export or compact export> CALL=2, 3, ... (data again only on a fresh
# machine: a kept shard set is checked and reused); then PARTS=sweep,test there (EXPORT: the newest
# rollout-mixed*-s$SEED/export in W unless given), or on a CPU from the compact export brought back:
# EXPORT=<it> PARTS=truth,sweep,test bash pipelines/mixed.sh (about an hour on 2 cores: 60 min measured).
# On this CPU, at smoke scale: SMOKE=1 ANCHOR=<a micro anchor folder> bash pipelines/mixed.sh
# Knobs: SIZES, ROWS (per size), SEED, ANCHOR, W, SW (stop weight), DEADLINE (default 520), CONTINUE, CALL, CEPOCHS
# (the rollout phase's planned epochs: 4, or 6 when continuing), EXPORT, BUDGETS, THRESHOLDS, VLIMIT, and
# miniature.sh's (STEPS1, MB, EPOCHS, ROLL, ...).
set -euo pipefail
START=$(date +%s); DEADLINE=${DEADLINE:-520}
[ -f pipelines/device_env.sh ] && [ -z "${SMOKE:-}" ] && source pipelines/device_env.sh
export PYTHONPATH=$PWD/packages${PYTHONPATH:+:$PYTHONPATH}
SIZES=${SIZES:-"3 4 5 6"}; ROWS=${ROWS:-25600}; SEED=${SEED:-0}; ANCHOR=${ANCHOR:-anchor}; SW=${SW:-1}
THRESHOLDS=${THRESHOLDS:-"0.05 0.1 0.15 0.2 0.25 0.3"}; VLIMIT=${VLIMIT:-200}
export W=$(realpath -m "${W:-/tmp/mixed}"); mkdir -p "$W"
PARTS=${PARTS:-data,train,sweep,test}; EVAL_ARGS="--batch-size 256"; TEST_LIMIT=""
if [ -n "${SMOKE:-}" ]; then ROWS=8; THRESHOLDS="0.01"; VLIMIT=4; TEST_LIMIT="--limit 4"; EVAL_ARGS="--batch-size 4"; fi
part() { [[ ",$PARTS," == *",$1,"* ]]; }
run() { echo "== $*" | tee -a "$W/commands.txt"; "$@"; }
set_of() { case $1 in 4|5) echo "icot_mult_${1}x${1}";; *) echo "mult_${1}x${1}";; esac; }  # the shipped held-out sets
file_of() { local dir=packages/rot_data/data/$(set_of "$1"); [ "$2" = valid ] && echo "$dir/valid.txt" || ls "$dir"/test*.txt; }

if part data; then
  for n in $SIZES; do
    run python3 -m rot_render.cli multiplication --n "$n" --count "$ROWS" --seed "$SEED" --out "$W/train-$n.txt" \
        --exclude "$(file_of "$n" valid)" --exclude "$(file_of "$n" test)"
  done
  python3 - "$W" "$SEED" $SIZES <<'PY'  # one file, the sizes interleaved (the stream's shuffle buffer is local)
import random, sys
folder, seed, sizes = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
lines = [line for n in sizes for line in open(f"{folder}/train-{n}.txt") if line.strip()]
random.Random(seed).shuffle(lines)
open(f"{folder}/train.txt", "w").writelines(lines)
print(f"{len(lines)} rows of sizes {', '.join(sizes)} in {folder}/train.txt")
PY
  run python3 -m rot_render.cli build --dataset "$W/train.txt" --encoder "$ANCHOR" --out "$W/shards"
fi
if part train; then  # miniature.sh's recipe on the mixed shards; its held-out files are not used here
  export SEED ANCHOR SHARDS=shards
  if [ -n "${CONTINUE:-}" ]; then  # more of the rollout phase, from an earlier call's export (later options win)
    tag=-mixed-c${CALL:-2} epochs=${CEPOCHS:-6} from="--backbone $CONTINUE --init $CONTINUE"
  else
    tag=-mixed epochs=${CEPOCHS:-4} from=""
    PARTS=stage1 bash pipelines/miniature.sh
    TAG=-mixed EXTRA="--train-head --lr 1e-3 --stop-weight $SW" PARTS=reader-tf bash pipelines/miniature.sh
  fi
  left=$(( DEADLINE - ($(date +%s) - START) - 38 ))  # ~38 s of launcher and model start-up before the clock starts
  trained=rollout$tag
  if (( left >= 60 )); then
    EPOCHS=$epochs TAG=$tag ROLL="$from --stop-weight $SW --max-seconds $left --decay-by-deadline --no-gradient-checkpointing ${ROLL:-}" \
        PARTS=rollout bash pipelines/miniature.sh
  elif [ -z "${CONTINUE:-}" ]; then  # the call's time went to the earlier phases: the rollout phase starts next call
    trained=reader-tf-mixed
    echo "no time left for the rollout phase ($left s): continue from $W/$trained-s$SEED/export (or its compact copy)"
  else
    echo "no time left for the rollout phase ($left s)"; exit 1
  fi
  # the compact copy travels to the next call (a full export is ~24 MB) before anything else spends the call's time
  run python3 -m rot_train compact "$W/$trained-s$SEED/export" --out "$W/$trained-s$SEED/compact" --base "$ANCHOR"
fi
token_counts() {  # the held-out CoTs' distinct visual-token counts: every size's oracle budget, the fixed budgets swept
  python3 - "$W" <<'PY'
import pathlib, sys
from rot_model.shard_stream import ShardSet
counts = {n for folder in pathlib.Path(sys.argv[1]).glob("truth-*") for shard in ShardSet.open(folder).row_lengths() for n in shard}
print(*sorted(counts))
PY
}
evaluate() {  # evaluate <name> <size> <split> <options...>
  local name=$1 n=$2 split=$3; shift 3
  run python3 -m rot_eval.cli run --checkpoint "$EXPORT" --dataset "$(set_of "$n")" --split "$split" $EVAL_ARGS \
      --out "$OUT/$name-$n-$split" "$@" > /dev/null
}
if part truth || part sweep || part test; then
  for n in $SIZES; do  # each held-out question's own visual-token count: the oracle's budget, and the stops' cap
    for split in valid test; do
      [ -f "$W/truth-$n-$split/manifest.json" ] || run python3 -m rot_render.cli build --dataset "$(file_of "$n" "$split")" \
          --encoder "$ANCHOR" --out "$W/truth-$n-$split" ${SMOKE:+--limit 4}
    done
  done
fi
if part sweep || part test; then
  EXPORT=${EXPORT:-$(ls -td "$W"/rollout-mixed*-s"$SEED"/export | head -1)}
  OUT=$W/eval-$(basename "$(dirname "$EXPORT")"); mkdir -p "$OUT"  # each export's evaluations apart: never mixed
  echo "evaluating $EXPORT into $OUT" | tee -a "$W/commands.txt"
  COUNTS=$(token_counts); MAX=$(( ${COUNTS##* } + 8 ))  # the stops' cap: the longest CoT + 8 (a stop that runs late shows)
  BUDGETS=${BUDGETS:-$COUNTS}
fi
sweep_size() {
  for budget in $BUDGETS; do evaluate "fixed$budget" "$1" valid --latents "$budget" --limit "$VLIMIT"; done
  for threshold in $THRESHOLDS; do evaluate "dyn$threshold" "$1" valid --latents "$MAX" --dynamic-threshold "$threshold" --limit "$VLIMIT"; done
}
if part sweep; then for n in $SIZES; do sweep_size "$n"; done; fi  # one evaluation at a time: each s/question its own
if part test; then
  best() {  # the sweep's setting with the best mean valid accuracy over the sizes
    python3 - "$OUT" "$1" <<'PY'
import json, pathlib, sys
scores = {}
for summary in pathlib.Path(sys.argv[1]).glob(f"{sys.argv[2]}*-valid/summary.json"):
    setting = summary.parent.name[len(sys.argv[2]):].rsplit("-", 2)[0]
    scores.setdefault(setting, []).append(json.loads(summary.read_text())["accuracy"])
print(max(scores, key=lambda s: sum(scores[s]) / len(scores[s])))
PY
  }
  budget=$(best fixed); threshold=$(best dyn)
  echo "chosen on valid: fixed budget $budget, dynamic threshold $threshold" | tee -a "$W/commands.txt"
  test_size() {
    # on test only: valid's summaries stay the sweep's, so a later test part chooses among the same runs
    evaluate oracle "$1" test --oracle-latents --truth-shards "$W/truth-$1-test" $TEST_LIMIT
    evaluate "fixed$budget" "$1" test --latents "$budget" $TEST_LIMIT
    evaluate "dyn$threshold" "$1" test --latents "$MAX" --dynamic-threshold "$threshold" $TEST_LIMIT
    evaluate learned "$1" test --latents "$MAX" --learned-stop $TEST_LIMIT
    # where the two signals put each valid question's stop, against its own length (rot-eval stops)
    run python3 -m rot_eval.cli stops --checkpoint "$EXPORT" --dataset "$(set_of "$1")" --truth-shards "$W/truth-$1-valid" \
        --limit "$VLIMIT" --out "$OUT/stops-$1" > /dev/null
  }
  for n in $SIZES; do test_size "$n"; done
  run python3 -m rot_eval.cli table "$OUT"/*-test --plot "$OUT/mixed-test.png"
  python3 - "$OUT" "$budget" "$threshold" $SIZES <<'PY' | tee "$OUT/stops-test.md"  # each stop against the oracle
import json, sys
out, budget, threshold, sizes = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
stops = {"(a) oracle": "oracle", f"(b) fixed {budget}": f"fixed{budget}", f"(c) dynamic {threshold}": f"dyn{threshold}",
         "(d) learned stop": "learned"}
print("| size | stop | test accuracy | mean latents | s/question | vs oracle: accuracy, latents | goal (within 1 point, 5%) |")
print("|---|---|---|---|---|---|---|")
for n in sizes:
    runs = {name: json.load(open(f"{out}/{folder}-{n}-test/summary.json")) for name, folder in stops.items()}
    oracle = runs["(a) oracle"]
    for name, run in runs.items():
        gap = 100 * (run["accuracy"] - oracle["accuracy"])
        ratio = run["mean_reasoning_tokens"] / oracle["mean_reasoning_tokens"] - 1
        met = "" if name == "(a) oracle" else ("yes" if gap >= -1 and abs(ratio) <= 0.05 else "no")
        print(f"| {n}x{n} | {name} | {100 * run['accuracy']:.1f}% | {run['mean_reasoning_tokens']:.1f} | "
              f"{run['seconds_per_sample']:.4f} | {gap:+.1f} points, {100 * ratio:+.0f}% | {met} |")
print("\n| size (valid) | length | the thresholds that end every question at its length | the learned stop there |")
print("|---|---|---|---|")
windows = {n: json.load(open(f"{out}/stops-{n}/stops.json")) for n in sizes}
for n, signals in windows.items():
    window = signals["dynamic_window"]
    shown = f"({window['low']:.4g}, {window['high']:.4g}]" if window["separates"] else f"none ({window['low']:.4g} >= {window['high']:.4g})"
    print(f"| {n}x{n} | {'/'.join(map(str, signals['lengths']))} | {shown} | {100 * signals['learned_stop_at_length']:.1f}% |")
low = max(signals["dynamic_window"]["low"] for signals in windows.values())
high = min(signals["dynamic_window"]["high"] for signals in windows.values())
print(f"\none threshold for every size: {f'any in ({low:.4g}, {high:.4g}]' if low < high else f'none ({low:.4g} >= {high:.4g})'}")
PY
fi
