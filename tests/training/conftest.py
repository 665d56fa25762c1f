"""Fixtures of the in-process training tests."""

import signal
from pathlib import Path

import pytest

from tests.training.recipe_runner import PREEMPTION_SIGNALS
from tests.training.test_resume_plan import _config
from wrpo_nemo.pipeline import run


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """``uninterrupted(max_steps)``: the run dir of a straight, never-stopped run (made once per session, read
    only), the reference that interrupted and resumed runs must equal."""
    made = {}

    def get(max_steps: int) -> Path:
        if max_steps not in made:
            run_dir = tmp_path_factory.mktemp(f"uninterrupted-{max_steps}")
            assert run(_config(run_dir, max_steps=max_steps))["sft"].steps == max_steps
            made[max_steps] = run_dir
        return made[max_steps]

    return get


@pytest.fixture(autouse=True)
def restore_preemption_handlers():
    """A run in this process installs its preemption handlers (and a handled signal ignores the next one):
    whatever a test leaves, the next test starts with the handlers as they were."""
    saved = {sig: signal.getsignal(sig) for sig in PREEMPTION_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
