#!/usr/bin/env bash
# Several pipelines/miniature_call.sh runs on one GPU at once: the anchor-sized model leaves most of the GPU idle (5x5
# made 6.5 rollout steps/s on an H100 beside a 4x4 run, 7.1 alone on an H200), so a 10-minute call trains two.
# Each argument is one run's settings (miniature_call.sh's and miniature.sh's knobs, NAME=value with no spaces in a
# value: one seed per run):
#   bash pipelines/together.sh "N=5 SEEDS=1" "MERGE=2 N=4 SEEDS=0 CONTINUE=$PWD/carried/m2/compact"     (carry .whl and carried)
# Run i works in /tmp/together-<i> and logs to $OUT/run<i>.log; a run starts once the one before it has built its data
# (two Ray builds at once compete for the host), and all end DEADLINE seconds (default 545) after this script started.
# Their compact exports come back as $OUT/run<i>-compact.tar (4 bits, ~7.5 MB: one fits beside the wheels and the
# anchor in the next call's 64 MiB upload, two do not; unpack it and pass its folder as CONTINUE). On this CPU, at smoke scale: SMOKE=1 ANCHOR=<a micro
# anchor folder> bash pipelines/together.sh "N=3 SEEDS=0" "MERGE=2 N=3 SEEDS=0"
set -uo pipefail
START=$(date +%s); DEADLINE=${DEADLINE:-545}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
rm -rf /tmp/together-*  # an earlier invocation's folders would mix into this one's logs
i=0
for settings in "$@"; do
  W=/tmp/together-$i; mkdir -p "$W"; : > "$OUT/run$i.log"
  left=$(( DEADLINE - ($(date +%s) - START) ))
  ( env $settings W="$W" OUT="$W/out" DEADLINE="$left" bash pipelines/miniature_call.sh >> "$OUT/run$i.log" 2>&1 &
    pid=$!  # the compact export is tarred as soon as it is written, before the evaluation: it survives a killed call
    until grep -qs '^compact export in' "$W"/logs/seed*.log || ! kill -0 $pid 2>/dev/null; do sleep 3; done
    run=$(ls -d "$W"/rollout-h*-s*/compact 2>/dev/null | head -1)
    [ -n "$run" ] && tar cf "$OUT/run$i-compact.tar" -C "$(dirname "$run")" compact
    wait $pid; echo "run $i ($settings): exit $?" >> "$OUT/run$i.log" ) &
  until grep -qE '^data:' "$OUT/run$i.log" 2>/dev/null || ! kill -0 $! 2>/dev/null; do sleep 2; done
  i=$((i + 1))
done
wait
for ((j = 0; j < i; j++)); do  # the true summary: each run's own (miniature_call.sh's last lines)
  echo "== run $j: $(sed -n "$((j + 1))p" <(printf '%s\n' "$@"))"
  grep -E '^(data:|seed |    RoT|exports:|run [0-9]+ )' "$OUT/run$j.log"
done
tar czf "$OUT/together-logs.tgz" -C /tmp $(cd /tmp && ls -d together-*/logs together-*/out 2>/dev/null) 2>/dev/null
echo "together: $i runs in $(( $(date +%s) - START )) s"
