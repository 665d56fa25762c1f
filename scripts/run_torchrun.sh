#!/usr/bin/env bash
# Run a torchrun command so that a preemption signal makes the trainers save and stop, and the run ends with
# their exit status (0 after a save), wherever the signal lands:
#
#   bash scripts/run_torchrun.sh [--pid-file FILE] torchrun --signals-to-handle=SIGINT,SIGHUP,SIGQUIT ... recipes/wrpo.py ...
#
# - torchrun starts with SIGUSR1 and SIGTERM ignored (inherited across exec). Pass it
#   `--signals-to-handle=SIGINT,SIGHUP,SIGQUIT` so it does not install its own SIGTERM handler, which would
#   stop the trainers within its 30 s grace and exit 1 (SIGUSR1 would kill it outright). The trainers install
#   their own handlers for both (wrpo_nemo.training.run_stage.Preemption).
# - A SIGUSR1 or SIGTERM reaching this script is forwarded to torchrun's children, the trainers, as SIGUSR1.
# - A signal sent to every process (Slurm signalling the whole step, a process-group kill) reaches the trainers
#   directly and torchrun ignores it.
# The trainers save at their next step boundary and exit 0; torchrun then exits 0 and so does this script.

set -uo pipefail
pid_file=""
if [[ "${1:-}" == "--pid-file" ]]; then
  pid_file="$2"
  shift 2
fi

trap '' USR1 TERM
"$@" &
launcher=$!
[[ -n "$pid_file" ]] && echo "$launcher" >"$pid_file"

forward() {
  echo "${WRPO_NODE_LABEL:-launcher}: $1 received, asking the trainers to save and stop" >&2
  pkill -USR1 -P "$launcher" || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# `wait` returns early (status > 128) whenever a trapped signal arrives: keep waiting until torchrun exits.
# If it exited during the interrupted wait, one more `wait` still yields its real status (127: already had it).
status=0
while true; do
  wait "$launcher"
  status=$?
  if ((status <= 128)) || ! kill -0 "$launcher" 2>/dev/null; then
    break
  fi
done
if ((status > 128)); then
  wait "$launcher" 2>/dev/null
  again=$?
  ((again == 127)) || status=$again
fi
exit "$status"
