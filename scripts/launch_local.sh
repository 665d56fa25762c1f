#!/usr/bin/env bash
# The recipe on N processes of this machine (GPUs with NCCL, or CPU processes with gloo), through torchrun.
#
#   bash scripts/launch_local.sh N [--config-name NAME] [key=value ...]
#   bash scripts/launch_local.sh 2 parallel.tensor=2                       # TP=2 on two CPU processes
#   bash scripts/launch_local.sh 8 --config-name wrpo_llama3_8b model.checkpoint=ckpt/llama3-8b-sft
#
# PYTHON picks the interpreter (default: the repository's .venv when present, else python3); DRY_RUN=1 prints
# the command instead of running it. One thread per process unless OMP_NUM_THREADS says otherwise: on a
# small CPU machine the processes would otherwise fight over the cores. A SIGTERM or SIGUSR1 to this script (or
# to the whole process group) makes the trainers save a checkpoint and exit 0; the script then exits 0.

set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NPROC [--config-name NAME] [key=value ...]" >&2
  exit 2
fi
nproc="$1"
shift
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  [[ -x "$root/.venv/bin/python" ]] && PYTHON="$root/.venv/bin/python"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# --standalone: a private rendezvous on a free local port, so two local runs never collide. SIGTERM is left
# to the trainers (scripts/run_torchrun.sh): they save and exit 0, and so does torchrun.
cmd=("$PYTHON" -m torch.distributed.run --standalone --signals-to-handle=SIGINT,SIGHUP,SIGQUIT
  --nproc-per-node "$nproc" "$root/recipes/wrpo.py" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf -v line '%q ' "${cmd[@]}"
  echo "${line% }"
  exit 0
fi
cd "$root"
exec bash "$root/scripts/run_torchrun.sh" "${cmd[@]}"
