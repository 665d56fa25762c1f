#!/usr/bin/env bash
# The GPU check: on one H100/H200 (Python 3.12, torch with CUDA, no megatron-core, no TransformerEngine, no
# internet), install the carried wheels, run the GPU-marked tests, benchmark a WRPO step on a Llama-3-8B-shaped
# model with 4 layers, and print one table. Under 8 minutes: each part has its own time limit.
#
#   bash scripts/gpu/prepare_wheels.sh           # on a machine with internet: gpu_wheels/ (about 20 MiB)
#   bash scripts/gpu_check.sh                    # on the GPU machine, from the repository root
#   bash scripts/gpu_check.sh --dry-run          # print what it would install and run
#   bash scripts/gpu_check.sh [--dry-run] --layers 2 --hidden 64 ...   # benchmark arguments pass through
#
# WHEELS (default: gpu_wheels/, else shared/wheels/) holds the wheels; only the packages that do not import
# already are installed, into a private folder (GPU_SITE) put first on PYTHONPATH, so the machine's own torch
# and numpy are never replaced. Logs and bench.json go to $OUT (the device tool's output folder) when set.

set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
# Any other arguments go to the benchmark (e.g. --layers 2 --seq 2048).
python="${PYTHON:-python3}"
out_dir="${OUT:-/tmp/wrpo-gpu-check}"
site="${GPU_SITE:-$root/.gpu_site}"
if [[ -z "${WHEELS:-}" ]]; then
  WHEELS="$root/gpu_wheels"
  compgen -G "$WHEELS/*.whl" >/dev/null || WHEELS="$root/shared/wheels"
fi
TESTS_TIMEOUT="${TESTS_TIMEOUT:-150}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-270}"
# package=module: what the GPU tests and the benchmark import beyond torch.
NEEDS=(megatron-core=megatron.core numpy=numpy packaging=packaging pytest=pytest pluggy=pluggy
  iniconfig=iniconfig pygments=pygments)

run() {
  local line
  printf -v line '%q ' "$@"
  echo "+ ${line% }"
  [[ $dry_run == 1 ]] || "$@"
}

missing=()
for need in "${NEEDS[@]}"; do
  "$python" -c "import ${need#*=}" 2>/dev/null || missing+=("${need%%=*}")
done
export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" CUDA_DEVICE_MAX_CONNECTIONS=1
mkdir -p "$out_dir"
start=$SECONDS

echo "== 1/3 environment"
[[ $dry_run == 1 ]] || { nvidia-smi -L || true; "$python" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"; }
if ((${#missing[@]})); then
  if [[ $dry_run == 0 ]] && ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "missing ${missing[*]} and no wheels in $WHEELS: run scripts/gpu/prepare_wheels.sh first" >&2
    exit 2
  fi
  run "$python" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" --target "$site" "${missing[@]}"
else
  echo "every package already imports: nothing to install"
fi

echo "== 2/3 GPU tests (limit ${TESTS_TIMEOUT}s)"
run timeout "$TESTS_TIMEOUT" "$python" -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rs \
  --junitxml="$out_dir/gpu_tests.xml" 2>&1 | tee "$out_dir/gpu_tests.log"
tests_status=${PIPESTATUS[0]}
tests_summary="$(tail -n 1 "$out_dir/gpu_tests.log" 2>/dev/null | tr -d '=' | xargs)"

echo "== 3/3 WRPO step benchmark (limit ${BENCH_TIMEOUT}s)"
run timeout "$BENCH_TIMEOUT" "$python" scripts/gpu/bench_wrpo_step.py --json "$out_dir/bench.json" "$@" \
  2>&1 | tee "$out_dir/bench.log"
bench_status=${PIPESTATUS[0]}
[[ $dry_run == 1 ]] && exit 0

echo "== result ($((SECONDS - start)) s)"
if [[ -f "$out_dir/bench.json" && $bench_status == 0 ]]; then
  "$python" scripts/gpu/bench_wrpo_step.py --table-from "$out_dir/bench.json" \
    --row "GPU tests=${tests_summary:-none ran} (exit $tests_status)" --row "check time=$((SECONDS - start)) s"
else
  echo "GPU tests  ${tests_summary:-none ran} (exit $tests_status)"
  echo "benchmark  failed (exit $bench_status): see $out_dir/bench.log"
fi
((tests_status == 0 && bench_status == 0))
