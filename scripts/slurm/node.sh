#!/usr/bin/env bash
# The task Slurm starts on each node (inside the container): runs the given torchrun command through
# scripts/run_torchrun.sh, which gets Slurm's SIGUSR1/SIGTERM to the trainers (they save at their next step
# boundary and exit 0) and never lets the signal kill torchrun, whether Slurm signals only this task or every
# process of the step (cgroups). torchrun's pid goes to LOG_DIR/torchrun-node<N>.pid.
#
#   bash scripts/slurm/node.sh LOG_DIR torchrun --signals-to-handle=SIGINT,SIGHUP,SIGQUIT ... recipes/wrpo.py ...

set -uo pipefail
log_dir="$1"
shift
export WRPO_NODE_LABEL="node ${SLURM_NODEID:-0}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/../run_torchrun.sh" \
  --pid-file "$log_dir/torchrun-node${SLURM_NODEID:-0}.pid" "$@"
