"""scripts/launch_local.sh: the recipe on N local processes through torchrun, as the README runs it.

The script's two-process run itself (TP=2 on two CPU processes) is in tests/training/test_recipe.py, where it
resumes a one-process run: one torchrun launch checks both.
"""

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
    "sft.max_steps=400", "logging.eval_prompts=4", "logging.plots=false", "logging.tensorboard=false",
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
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT",
        "--nproc-per-node", "4",
        str(ROOT / "recipes" / "wrpo.py"), "--config-name", "wrpo_tiny", "parallel.tensor=2",
    ]  # fmt: skip


def test_a_process_count_that_is_not_a_positive_integer_is_refused_with_usage():
    for bad in ([], ["0"], ["two"]):
        out = launch(*bad)
        assert out.returncode == 2 and "usage:" in out.stderr


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_saves_a_checkpoint_and_exits_0(tmp_path):
    """As when Slurm or a user signals every process, torchrun included: the trainers save, all exit 0."""
    import signal
    import time

    run_dir = tmp_path / "run"
    args = TINY
    proc = subprocess.Popen(
        [
            "bash",
            str(SCRIPT),
            "2",
            f"run_dir={run_dir}",
            "parallel.tensor=2",
            "logging.log_interval=1",
            *args,
        ],
        env={**os.environ, "PYTHON": sys.executable},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    metrics = run_dir / "sft" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sft"]["preempted"] is True and 2 <= summary["sft"]["steps"] < 400
    assert list((run_dir / "sft" / "checkpoints").glob("step_*"))
