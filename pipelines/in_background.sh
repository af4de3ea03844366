#!/usr/bin/env bash
# Long GPU work on a device lent in calls of at most 10 minutes: a job started here runs in its own process session
# (setsid), so it outlives the call that started it, and later calls on the same warm machine (kept 30 s between
# calls) wait on it and bring back its logs. It runs in a copy of the repository made at the first start (a later
# call's upload of the tree cannot change files under a running job), with the carried wheels installed once.
#   bash pipelines/in_background.sh start <name> '<command>'   # e.g. start mixed 'PARTS=data,train bash pipelines/mixed.sh'
#   bash pipelines/in_background.sh wait <seconds> [<path>...]  # until every job has ended or the seconds have passed;
#       then each job's last lines, and $OUT/jobs.tgz: the logs, plus the paths given (globs, relative to /tmp)
# A job's output goes to /tmp/jobs/<name>.log; its exit status to /tmp/jobs/<name>.exit when it ends.
set -uo pipefail
JOBS=/tmp/jobs; OUT=${OUT:-/tmp/out}; mkdir -p "$JOBS" "$OUT"
case ${1:-} in
  start)
    name=$2 command=$3
    [ -d "$JOBS/repo" ] || cp -r "$PWD" "$JOBS/repo"
    rm -f "$JOBS/$name.exit"
    # the command as a script of its own: any quoting in it reaches bash as written
    printf 'source pipelines/device_env.sh\n( %s )\necho $? > %s\n' "$command" "$JOBS/$name.exit" > "$JOBS/$name.sh"
    (cd "$JOBS/repo" && setsid nohup bash "$JOBS/$name.sh" > "$JOBS/$name.log" 2>&1 < /dev/null &)
    echo "started $name in $JOBS/repo: $command";;
  wait)
    seconds=$2; shift 2; end=$(( $(date +%s) + seconds ))
    running() { for log in "$JOBS"/*.log; do [ -e "$log" ] && [ ! -f "${log%.log}.exit" ] && return 0; done; return 1; }
    while running && (( $(date +%s) < end )); do sleep 5; done
    for log in "$JOBS"/*.log; do
      name=$(basename "$log" .log)
      echo "== $name: $( [ -f "$JOBS/$name.exit" ] && echo "exit $(cat "$JOBS/$name.exit")" || echo running)"
      tail -n 4 "$log"
    done
    (cd /tmp && tar czf "$OUT/jobs.tgz" jobs/*.log "$@" 2>/dev/null)
    ls -la "$OUT";;
  *) echo "usage: $0 start <name> '<command>' | wait <seconds> [<path>...]" >&2; exit 2;;
esac
