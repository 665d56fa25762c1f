#!/usr/bin/env bash
# Prepare, on a machine with internet, the Python wheels the GPU check installs on an offline GPU machine
# (Python 3.12, torch 2.11 with CUDA 13; no megatron-core, no TransformerEngine, nothing downloadable there).
#
#   bash scripts/gpu/prepare_wheels.sh [DEST]        # DEST default: gpu_wheels/ at the repository root
#
# Only what the GPU tests and the benchmark import and the GPU machine may lack: megatron-core (a cp312
# manylinux wheel), its numpy and packaging, and pytest with its dependencies. Never torch: the machine's own
# CUDA build is the one under test. Wheels are fetched without dependencies, for CPython 3.12 on x86_64
# Linux, binary only (no build can run on the offline side). The total must stay under 64 MiB, the most a
# call to the GPU machine carries.

set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dest="${1:-$root/gpu_wheels}"
python="${PYTHON:-python3}"
[[ -x "$root/.venv/bin/python" && -z "${PYTHON:-}" ]] && python="$root/.venv/bin/python"
limit_mib=64

# Pinned so that the offline install is the one tested here (numpy 2.x wheels for cp312 exist from 2.0 on).
WHEELS=(
  megatron-core==0.16.1
  numpy==2.4.6
  packaging==26.4
  pytest==9.2.0
  pluggy==1.7.0
  iniconfig==2.3.1
  pygments==2.21.0
)

mkdir -p "$dest"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$dest" \
  --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  "${WHEELS[@]}"

total_bytes=$(du -cb "$dest"/*.whl | tail -n 1 | cut -f 1)
ls -l "$dest"/*.whl | awk '{printf "%8.2f MiB  %s\n", $5 / 1048576, $NF}'
printf 'total %.2f MiB in %s (limit %d MiB)\n' "$(echo "$total_bytes / 1048576" | bc -l)" "$dest" "$limit_mib"
if ((total_bytes > limit_mib * 1048576)); then
  echo "the wheels exceed ${limit_mib} MiB: they cannot travel with one call to the GPU machine" >&2
  exit 1
fi
