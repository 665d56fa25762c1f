"""A preemption signal during start-up stops training at its first step boundary with a checkpoint, and the
resumed run equals one that was never interrupted."""

import os
import signal

from tests.training.test_resume_plan import _config, train_records
from wrpo_nemo import pipeline
from wrpo_nemo.pipeline import run


def test_a_signal_during_data_preparation_stops_at_the_first_step_and_the_resume_is_exact(
    tmp_path, monkeypatch, uninterrupted
):
    straight = uninterrupted(4)

    real_prepare = pipeline.prepare_dataset

    def prepare_and_get_signalled(cfg, tokenizer):
        os.kill(os.getpid(), signal.SIGUSR1)  # Slurm's warning arrives while the data is being prepared
        return real_prepare(cfg, tokenizer)

    monkeypatch.setattr(pipeline, "prepare_dataset", prepare_and_get_signalled)
    first = run(_config(tmp_path / "split", max_steps=4))["sft"]
    assert first.preempted and first.steps == 1
    assert first.checkpoint.endswith("step_0000001")

    monkeypatch.setattr(pipeline, "prepare_dataset", real_prepare)
    from wrpo_nemo.training import preemption

    preemption.clear()  # a new process in real life
    resumed = run(_config(tmp_path / "split", max_steps=4))["sft"]
    assert resumed.steps == 4 and not resumed.preempted
    assert train_records(tmp_path / "split") == train_records(straight)
