#!/usr/bin/env bash
# The NeMo-Aligner CI lane: a separate environment (.venv-nemo) with NeMo 2.4.1, NeMo-Aligner 0.7.0 and
# megatron-core 0.13.1, where the WRPO model class, its loss and its datasets are tested on CPU.
#
# Idempotent: the environment is (re)installed only when requirements/nemo-lane.txt or pyproject.toml changed
# since the last successful install (a stamp inside the venv records their hash), so a warm run only tests.
# Exits non-zero when an install or a test fails, or when no test ran.
#
# Environment: PYTHON (default python3.11), NEMO_VENV (default <repo>/.venv-nemo); extra arguments go to pytest.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
venv="${NEMO_VENV:-$repo/.venv-nemo}"
python="${PYTHON:-python3.11}"
lock="requirements/nemo-lane.txt"
stamp="$venv/.nemo-lane-stamp"
# One thread per process: the CI machine has 2 cores shared with everything else.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

want="$(cat "$lock" pyproject.toml | sha256sum | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "nemo lane: $venv is up to date"
else
    start=$SECONDS
    echo "nemo lane: installing $venv from $lock"
    rm -f "$stamp"
    [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
    # Keep the environment out of git without touching the top-level .gitignore.
    echo '*' >"$venv/.gitignore"
    # -qq: errors only (this machine's pip config names local index folders that may be absent, one warning each).
    pip=("$venv/bin/python" -m pip install -qq --disable-pip-version-check)
    # --no-deps everywhere: the lock holds the whole environment, and NeMo's own requirement lists would pull
    # CUDA builds. The lock is also passed as constraints so that torch stays the 2.13.0 CPU wheel.
    "${pip[@]}" --no-deps -r "$lock" -c "$lock"
    "${pip[@]}" --no-deps -c "$lock" -e .
    echo "$want" >"$stamp"
    echo "nemo lane: installed in $((SECONDS - start)) s"
fi

start=$SECONDS
set +e
# -c tests_nemo/pytest.ini: the main pyproject's pytest options (testpaths=tests) must not apply here.
"$venv/bin/python" -m pytest -c tests_nemo/pytest.ini --rootdir tests_nemo tests_nemo -q "$@"
rc=$?
set -e
echo "nemo lane: tests took $((SECONDS - start)) s"
if [[ $rc -eq 5 ]]; then
    echo "nemo lane: no test ran" >&2
    exit 1
fi
exit $rc
