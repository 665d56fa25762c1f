#!/usr/bin/env bash
# The task Slurm starts on each node (inside the container): runs the given torchrun command and forwards
# Slurm's SIGUSR1/SIGTERM to the trainers themselves.
#
# torchrun does not pass SIGUSR1 on, and dies of it. So torchrun starts with SIGUSR1 ignored (inherited across
# exec; the trainers install their own handler), and the signal goes straight to torchrun's children, the
# trainers, which save at their next step boundary and exit 0; torchrun then exits with them. This holds both
# when Slurm signals only the task (this script) and when it signals every process of the step (cgroups).
#
#   bash scripts/slurm/node.sh LOG_DIR torchrun ... recipes/wrpo.py ...

set -uo pipefail
log_dir="$1"
shift

trap '' USR1
"$@" &
launcher=$!
echo "$launcher" >"$log_dir/torchrun-node${SLURM_NODEID:-0}.pid"

forward() {
  echo "node ${SLURM_NODEID:-0}: $1 received, asking the trainers to save and stop" >&2
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
