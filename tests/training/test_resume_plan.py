"""A resume honours a longer run and new optimizer settings, or refuses a change it cannot honour.

In-process runs of the recipe's ``run(cfg)`` (SFT only, toy data). The learning rate each step actually used is
read from ``metrics.jsonl`` (``lr`` is the optimizer's rate during the step) and compared with megatron's cosine
schedule written out independently below.
"""

import json
import math
import shutil
from pathlib import Path

import pytest

from wrpo_nemo.pipeline import run
from wrpo_nemo.training.checkpoint import list_checkpoints
from wrpo_nemo.training.config import ConfigError, load_run_config

BASE = {
    "stages": ["sft"],
    "data": {
        "toy": True,
        "toy_examples": 200,
        "toy_max_operand": 9,
        "source": {
            "num_workers": 1,
            "tokenize": {"max_length": 64, "max_prompt_length": 40, "seq_length": 256},
        },
    },
    "sft": {
        "optim": {"lr": 1e-3, "min_lr": 1e-5, "warmup_ratio": 0.25},
        "global_batch_size": 8,
        "micro_batch_size": 8,
        "epochs": 1,
    },
    "checkpoint": {"save_interval": 2, "keep_last": 10, "resume": True},
    "logging": {
        "log_interval": 100,
        "eval_interval": 0,
        "eval_prompts": 8,
        "tensorboard": False,
        "plots": False,
    },
    "export": {"hf": False},
}


def _config(run_dir: Path, **sft):
    data = json.loads(json.dumps(BASE))
    data["run_dir"] = str(run_dir)
    data["data"]["source"]["cache_dir"] = str(run_dir / "cache")
    for key, value in sft.items():
        if key == "async_save":
            data["checkpoint"][key] = value
        elif key in ("lr", "min_lr", "warmup_ratio"):
            data["sft"]["optim"][key] = value
        else:
            data["sft"][key] = value
    return load_run_config(data)


TIMING = {"tokens_per_s", "step_time_s"}


def train_records(run_dir: Path) -> list[dict]:
    """The SFT stage's train records of ``metrics.jsonl`` without the timing fields."""
    records = [json.loads(x) for x in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records if r["split"] == "train"]


def _train_lrs(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["split"] == "train"]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["lr"] for r in records if r["split"] == "train"}


def megatron_cosine(completed: int, *, lr: float, min_lr: float, warmup: int, decay: int) -> float:
    """megatron's OptimizerParamScheduler (init_lr 0, cosine) after ``completed`` steps."""
    if warmup > 0 and completed <= warmup:
        return lr * completed / warmup
    if completed > decay:
        return min_lr
    ratio = (completed - warmup) / (decay - warmup)
    return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (lr - min_lr)


def test_a_longer_max_steps_continues_a_finished_stage_with_the_decay_spanning_the_new_total(tmp_path):
    first = run(_config(tmp_path, max_steps=4))["sft"]
    assert first.steps == 4
    second = run(_config(tmp_path, max_steps=8))["sft"]
    assert second.steps == 8
    lrs = _train_lrs(tmp_path)
    assert sorted(lrs) == list(range(1, 9))
    # The warm-up of the first plan (ceil(0.25 x 4) = 1 step), the decay re-spanned to 8 steps. Step s runs at
    # the rate after s - 1 completed steps. Before the fix steps 5-8 ran at min_lr.
    for step in range(5, 9):
        expected = megatron_cosine(step - 1, lr=1e-3, min_lr=1e-5, warmup=1, decay=8)
        assert lrs[step] == pytest.approx(expected, rel=1e-6), step
        assert lrs[step] > 1e-5
    # Steps 1-4 are the first run's, kept once.
    for step in range(1, 5):
        assert lrs[step] == pytest.approx(megatron_cosine(step - 1, lr=1e-3, min_lr=1e-5, warmup=1, decay=4))


def test_a_new_lr_takes_effect_from_the_resumed_step(tmp_path):
    run(_config(tmp_path, max_steps=6))
    # Go back to the checkpoint at step 4 (as after a crash), with a new peak and minimum rate.
    for path in list_checkpoints(tmp_path / "sft"):
        if not path.name.endswith("0000004"):
            shutil.rmtree(path)
    run(_config(tmp_path, max_steps=6, lr=5e-4, min_lr=0.0))
    lrs = _train_lrs(tmp_path)
    assert sorted(lrs) == list(range(1, 7))
    warmup = math.ceil(0.25 * 6)
    for step in (5, 6):
        expected = megatron_cosine(step - 1, lr=5e-4, min_lr=0.0, warmup=warmup, decay=6)
        assert lrs[step] == pytest.approx(expected, rel=1e-6), step
    assert lrs[4] == pytest.approx(megatron_cosine(3, lr=1e-3, min_lr=1e-5, warmup=warmup, decay=6), rel=1e-6)


def test_changes_that_cannot_be_honoured_are_refused_naming_the_key_and_both_values(tmp_path):
    run(_config(tmp_path, max_steps=6))
    for path in list_checkpoints(tmp_path / "sft"):
        if not path.name.endswith("0000004"):
            shutil.rmtree(path)
    with pytest.raises(
        ConfigError, match=r"sft\.optim\.warmup_ratio=0\.5 differs from the checkpoint's 0\.25"
    ):
        run(_config(tmp_path, max_steps=6, warmup_ratio=0.5))
    with pytest.raises(ConfigError, match=r"sft\.max_steps.*completed 4 steps, more than the 3 now planned"):
        run(_config(tmp_path, max_steps=3))
    run(_config(tmp_path, max_steps=6))  # finished at 6
    with pytest.raises(ConfigError, match=r"completed 6 steps, more than the 5 now planned"):
        run(_config(tmp_path, max_steps=5))
