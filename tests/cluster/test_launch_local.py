"""scripts/launch_local.sh: the recipe on N local processes through torchrun, as the README runs it.

The script's two-process run itself (TP=2 on two CPU processes) is in tests/training/test_recipe.py, where it
resumes a one-process run: one torchrun launch checks both.
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "launch_local.sh"


def launch(*args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=full_env, capture_output=True, text=True, timeout=300
    )


def test_dry_run_prints_a_standalone_torchrun_of_the_recipe_with_the_arguments_in_order():
    out = launch("4", "--config-name", "wrpo_tiny", "parallel.tensor=2", DRY_RUN="1")
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout.strip()) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
        str(ROOT / "recipes" / "wrpo.py"), "--config-name", "wrpo_tiny", "parallel.tensor=2",
    ]  # fmt: skip


def test_a_process_count_that_is_not_a_positive_integer_is_refused_with_usage():
    for bad in ([], ["0"], ["two"]):
        out = launch(*bad)
        assert out.returncode == 2 and "usage:" in out.stderr
