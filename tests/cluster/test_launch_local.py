"""scripts/launch_local.sh: the recipe on N local processes through torchrun, as the README runs it."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "launch_local.sh"
TINY = [
    "data.toy_examples=120", "stages=[sft]", "sft.global_batch_size=8", "sft.micro_batch_size=4",
    "sft.max_steps=2", "logging.eval_prompts=4", "logging.plots=false", "logging.tensorboard=false",
    "export.hf=false", "data.source.num_workers=1",
]  # fmt: skip


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


@pytest.mark.slow
def test_two_cpu_processes_train_the_tiny_recipe_with_tensor_parallelism(tmp_path):
    out = launch("2", f"run_dir={tmp_path / 'run'}", "parallel.tensor=2", *TINY)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "[sft] done after 2 steps" in out.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["sft"]["steps"] == 2 and summary["sft"]["preempted"] is False
    config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert config["parallel"]["tensor"] == 2
