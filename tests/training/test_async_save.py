"""Background (asynchronous) checkpoint saves: the same checkpoints and an exact resume as synchronous ones; a
preemption signal or a kill -9 during a background save leaves the last published checkpoint to resume from."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.training.test_resume_plan import _config, train_records
from wrpo_nemo.pipeline import run
from wrpo_nemo.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]
_train = train_records


def _steps(run_dir: Path) -> list[str]:
    return [p.name for p in ckpt.list_checkpoints(run_dir / "sft")]


def test_background_saves_publish_the_same_checkpoints_and_resume_exactly(tmp_path, uninterrupted):
    straight = uninterrupted(6)
    background = tmp_path / "async"
    assert run(_config(background, max_steps=6, async_save=True))["sft"].steps == 6
    assert _steps(background) == _steps(straight) == ["step_0000002", "step_0000004", "step_0000006"]
    assert _train(background) == _train(straight)
    records = [json.loads(x) for x in (background / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in records if "checkpoint_async_s" in r} == {2, 4}
    # Resume from the background-written step 4.
    ckpt.remove_tree(ckpt.list_checkpoints(background / "sft")[-1])
    assert _steps(background) == ["step_0000002", "step_0000004"]
    assert run(_config(background, max_steps=6, async_save=True))["sft"].steps == 6
    assert _train(background) == _train(straight)


def test_a_signal_during_a_background_save_stops_after_it_is_published(tmp_path, monkeypatch, uninterrupted):
    straight = uninterrupted(6)
    real_schedule = ckpt.AsyncSaves.schedule

    def schedule_and_get_signalled(self, request, final):
        real_schedule(self, request, final)
        os.kill(os.getpid(), signal.SIGUSR1)  # Slurm's warning while step 2's checkpoint is being written

    monkeypatch.setattr(ckpt.AsyncSaves, "schedule", schedule_and_get_signalled)
    split = tmp_path / "split"
    first = run(_config(split, max_steps=6, async_save=True))["sft"]
    assert first.preempted and first.steps == 3
    assert _steps(split) == ["step_0000002", "step_0000003"]
    monkeypatch.setattr(ckpt.AsyncSaves, "schedule", real_schedule)
    from wrpo_nemo.training import preemption

    preemption.clear()
    assert run(_config(split, max_steps=6, async_save=True))["sft"].steps == 6
    assert _train(split) == _train(straight)


DRIVER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.training.test_resume_plan import _config, train_records
from wrpo_nemo.pipeline import run
from wrpo_nemo.training import checkpoint as ckpt

real_schedule = ckpt.AsyncSaves.schedule

def schedule(self, request, final):
    real_schedule(self, request, final)
    if final.name == "step_0000004":  # the writer is busy: the trainer is killed before it is published
        Path(sys.argv[2]).write_text("scheduled")
        time.sleep(600)

ckpt.AsyncSaves.schedule = schedule

if __name__ == "__main__":
    run(_config(Path(sys.argv[1]), max_steps=6, async_save=True))
"""


def test_a_kill_during_a_background_save_resumes_from_the_last_published_checkpoint(tmp_path, uninterrupted):
    straight = uninterrupted(6)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT)))
    killed, marker = tmp_path / "killed", tmp_path / "scheduled"
    env = {
        k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    proc = subprocess.Popen(
        [sys.executable, str(driver), str(killed), str(marker)], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 240
    while not marker.exists():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    root = ckpt.checkpoint_root(killed / "sft")
    assert _steps(killed) == ["step_0000002"]
    assert (root / ".step_0000004.partial").exists(), "the unfinished save must stay hidden, not published"
    assert run(_config(killed, max_steps=6, async_save=True))["sft"].steps == 6
    assert not (root / ".step_0000004.partial").exists()
    assert _train(killed) == _train(straight)
