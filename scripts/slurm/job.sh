#!/usr/bin/env bash
# The body of every wrpo-nemo sbatch script (sourced by wrpo_1node.sbatch and wrpo_multinode.sbatch).
#
# One torchrun per node inside the pyxis/enroot container, rendezvous from the Slurm allocation, one log
# folder per job, and preemption that loses at most one optimizer step:
#   1. Slurm sends SIGUSR1 to every task `--signal` seconds before the time limit (or at preemption).
#   2. node.sh (the task on each node) forwards it to the trainers under torchrun; each saves a checkpoint
#      at its next step boundary, marks the stage `preempted` in summary.json and exits 0.
#   3. This script sees the preempted flag and runs `scontrol requeue`; the requeued job (same id, log folder
#      and run_dir) starts with checkpoint.resume=true, which every launch passes (a fresh run_dir just starts).
#
# Knobs (environment, all optional but CONTAINER_IMAGE):
#   CONTAINER_IMAGE   enroot image built from the repository's Dockerfile: a .sqsh file (fastest: imported once,
#                     no registry pull per node), or a registry image as pyxis hands it to enroot:
#                       nvcr.io#nvidia/pytorch:25.11-py3   REGISTRY#IMAGE:TAG, read by every enroot (portable)
#                       nvcr.io/nvidia/pytorch:25.11-py3   REGISTRY/IMAGE:TAG, read only by enroot 4.0 and newer
#                     (older enroot looks the whole name up on Docker Hub); the second form gets a warning
#   SIGNAL_LEAD       seconds between Slurm's SIGUSR1 and the time limit; must equal the sbatch's
#                     --signal=USR1@N (default: the header's N). Passed to the trainers as
#                     WRPO_SIGNAL_LEAD_S: they warn when one step plus one checkpoint save takes longer. To
#                     change it:
#                       SIGNAL_LEAD=600 sbatch --signal=USR1@600 scripts/slurm/wrpo_1node.sbatch ...
#   RUN_DIR           host path of the run folder (default: $WRPO_ROOT/runs/<job name>)
#   RUNS_ROOT         mounted at the same path in the container (default: RUN_DIR's parent), so a stage can
#                     start from another run's output (the WRPO stage from the SFT stage's checkpoint)
#   LOG_ROOT          where the per-job log folders go (default: $WRPO_ROOT/logs)
#   EXTRA_MOUNTS      more container mounts, "src:dst[,src:dst]" (models, data, an HF_HOME cache)
#   MOUNT_REPO=1      run this checkout's code (mounted over the image's copy) instead of the image's
#   GPUS_PER_NODE     default: SLURM_GPUS_ON_NODE, else 8
#   CPUS_PER_TASK     CPUs of the one task per node (its torchrun and the node's trainers). Default: the
#                     allocation's SLURM_CPUS_PER_TASK (`sbatch --cpus-per-task=N`), else every CPU the job has
#                     on its smallest node (SLURM_JOB_CPUS_PER_NODE, SLURM_CPUS_ON_NODE). Always passed to srun:
#                     since Slurm 22.05 srun does not inherit sbatch's --cpus-per-task, and a step left at one
#                     CPU per task would pin all the node's trainers to one core.
#   MAX_RESTARTS      requeue at most this many times (default 50)
#   DRY_RUN=1         print the commands instead of running them (the requeue decision too)
# Arguments are the recipe's: --config-name NAME key=value ...

set -euo pipefail

WRPO_ROOT="${WRPO_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
CONTAINER_WORKDIR="${CONTAINER_WORKDIR:-/workspace/wrpo-nemo}"
JOB_NAME="${SLURM_JOB_NAME:-wrpo}"
JOB_ID="${SLURM_JOB_ID:?run this through sbatch (or set SLURM_* for a dry run)}"
RESTART="${SLURM_RESTART_COUNT:-0}"
NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
RUN_DIR="${RUN_DIR:-$WRPO_ROOT/runs/$JOB_NAME}"
RUNS_ROOT="${RUNS_ROOT:-$(dirname "$RUN_DIR")}"
LOG_DIR="${LOG_ROOT:-$WRPO_ROOT/logs}/$JOB_NAME-$JOB_ID"
MAX_RESTARTS="${MAX_RESTARTS:-50}"
DRY_RUN="${DRY_RUN:-0}"
CONTAINER_IMAGE="${CONTAINER_IMAGE:?set CONTAINER_IMAGE to the enroot image of the Dockerfile}"
SIGNAL_LEAD="${SIGNAL_LEAD:?set SIGNAL_LEAD to the N of the sbatch option --signal=USR1@N}"

fail() {
  echo "job.sh: $*" >&2
  exit 2
}

in_range() {
  # Whether $1 is an integer from $2 to $3.
  [[ "$1" =~ ^[0-9]+$ ]] && (($2 <= 10#$1 && 10#$1 <= $3))
}

smallest_node_cpus() {
  # The CPUs the job has on its smallest node: SLURM_JOB_CPUS_PER_NODE reads like "112(x3),96".
  local spec="${SLURM_JOB_CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-}}" part smallest=""
  local -a parts
  IFS=, read -ra parts <<<"$spec"
  for part in "${parts[@]}"; do
    part="${part%%(*}"
    if [[ -z "$smallest" ]] || ((part < smallest)); then
      smallest="$part"
    fi
  done
  echo "$smallest"
}

warn_about_image() {
  # pyxis hands --container-image to enroot; enroot before 4.0 reads only REGISTRY#IMAGE and looks REGISTRY/IMAGE
  # up on Docker Hub. A registry host has a dot or a port, or is localhost.
  local image="$1" first="${1%%/*}"
  case "$image" in
    *'#'* | *://* | /* | ./* | ../* | *.sqsh | *.squashfs) return 0 ;;
  esac
  if [[ "$image" == */* && ("$first" == *.* || "$first" == *:* || "$first" == localhost) ]]; then
    echo "warning: CONTAINER_IMAGE=$image names its registry with '/', which enroot before 4.0 does not" \
      "understand; the portable form is CONTAINER_IMAGE=$first#${image#*/}" >&2
  fi
}

in_range "$SIGNAL_LEAD" 1 86400 || fail "SIGNAL_LEAD=$SIGNAL_LEAD must be the seconds of --signal=USR1@N"
CPUS_PER_TASK="${CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-$(smallest_node_cpus)}}"
in_range "$CPUS_PER_TASK" 1 100000 ||
  fail "cannot tell the CPUs per node (CPUS_PER_TASK='$CPUS_PER_TASK'; Slurm sets SLURM_JOB_CPUS_PER_NODE)"
warn_about_image "$CONTAINER_IMAGE"

# The first node of the allocation hosts the c10d rendezvous; a port derived from the job id keeps two jobs
# sharing a node apart.
# (Read whole: `| head -n 1` could kill scontrol with SIGPIPE, which pipefail turns into a failed job.)
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR="${hosts[0]:?scontrol returned no hosts for SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST}"
MASTER_PORT="${MASTER_PORT:-$((20000 + JOB_ID % 20000))}"

# NCCL and CUDA settings for megatron-core on InfiniBand/NVLink clusters. CUDA_DEVICE_MAX_CONNECTIONS=1 keeps
# megatron's tensor-parallel communication ordered with compute; async error handling turns a hung collective
# into an error that ends the job instead of burning its allocation. The two InfiniBand settings are fields of
# each queue pair's attributes (InfiniBand spec vol. 1): NCCL_IB_TIMEOUT is the 5-bit Local Ack Timeout
# exponent (4.096 us x 2^N per try; NCCL accepts 1-31, default 20; 22 waits about 17 s) and NCCL_IB_RETRY_CNT
# the 3-bit retry count (0-7; 7, NCCL's default, is the most). A value outside its field is refused here rather
# than left to the verbs driver.
export CUDA_DEVICE_MAX_CONNECTIONS=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
export NCCL_IB_RETRY_CNT="${NCCL_IB_RETRY_CNT:-7}"
in_range "$NCCL_IB_TIMEOUT" 1 31 || fail "NCCL_IB_TIMEOUT=$NCCL_IB_TIMEOUT is outside 1-31 (a 5-bit exponent)"
in_range "$NCCL_IB_RETRY_CNT" 0 7 || fail "NCCL_IB_RETRY_CNT=$NCCL_IB_RETRY_CNT is outside 0-7 (a 3-bit count)"
# The node's CPUs shared by its trainers.
threads=$((CPUS_PER_TASK / GPUS_PER_NODE))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((threads > 0 ? threads : 1))}"
export WRPO_SIGNAL_LEAD_S="$SIGNAL_LEAD"
export PYTHONUNBUFFERED=1

mounts="$RUNS_ROOT:$RUNS_ROOT,$LOG_DIR:$LOG_DIR${EXTRA_MOUNTS:+,$EXTRA_MOUNTS}"
if [[ "${MOUNT_REPO:-0}" == 1 ]]; then
  mounts+=",$WRPO_ROOT:$CONTAINER_WORKDIR"
fi

srun_cmd=(
  srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1
  --container-image="$CONTAINER_IMAGE"
  --container-mounts="$mounts" --container-workdir="$CONTAINER_WORKDIR"
  --output="$LOG_DIR/restart$RESTART-node%n.log"
  bash scripts/slurm/node.sh "$LOG_DIR"
  torchrun --signals-to-handle=SIGINT,SIGHUP,SIGQUIT --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE"
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$JOB_ID-$RESTART"
  recipes/wrpo.py "$@" "run_dir=$RUN_DIR" checkpoint.resume=true
)

run() {
  # Print (dry run) or log and execute one command.
  local line
  printf -v line '%q ' "$@"
  echo "${line% }" | tee -a "$LOG_DIR/commands.txt"
  if [[ "$DRY_RUN" != 1 ]]; then
    "$@"
  fi
}

preempted() {
  # True when the run just written says a stage stopped early on a signal (summary.json newer than start).
  local summary="$RUN_DIR/summary.json"
  [[ -f "$summary" && "$summary" -nt "$LOG_DIR/restart$RESTART.start" ]] &&
    grep -Eq '"preempted": *true' "$summary"
}

mkdir -p "$LOG_DIR" "$RUN_DIR" "$RUNS_ROOT"
touch "$LOG_DIR/restart$RESTART.start"
echo "job $JOB_ID ($JOB_NAME) restart $RESTART: $NNODES node(s) x $GPUS_PER_NODE GPUs, $CPUS_PER_TASK CPUs" \
  "per node, rendezvous $MASTER_ADDR:$MASTER_PORT, run_dir $RUN_DIR, logs $LOG_DIR"
env | grep -E '^(SLURM|NCCL|TORCH|CUDA|OMP|WRPO)_' | sort >"$LOG_DIR/restart$RESTART.env"

set +e
run "${srun_cmd[@]}"
status=$?
set -e
if [[ $status -ne 0 ]]; then
  echo "training failed with exit status $status (logs: $LOG_DIR)" >&2
  exit "$status"
fi
if preempted; then
  if ((RESTART >= MAX_RESTARTS)); then
    echo "preempted, but MAX_RESTARTS=$MAX_RESTARTS requeues are spent; resume by resubmitting" >&2
    exit 1
  fi
  echo "preempted: checkpoint saved; requeueing job $JOB_ID to resume"
  run scontrol requeue "$JOB_ID"
else
  echo "finished: $(cat "$RUN_DIR/summary.json" 2>/dev/null | tr -d '\n ' | head -c 300)"
fi
