"""The recipe in the pytest process: Hydra composes ``conf/<name>.yaml`` with ``key=value`` overrides exactly as
``python recipes/wrpo.py`` does (the recipe module itself registers the schema), and the pipeline runs here,
without a new interpreter paying the imports of torch, megatron-core and transformers again.

Every in-process run goes through :func:`run_recipe` (the pipeline's ``run``) or :func:`recipe_main` (the
recipe's own ``main``, for what the command line adds: its exit codes and its closing lines).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from wrpo_nemo.pipeline import run
from wrpo_nemo.training import preemption
from wrpo_nemo.training.config import RunConfig
from wrpo_nemo.training.hydra_config import to_run_config

ROOT = Path(__file__).resolve().parents[2]
# Loading the recipe registers its schema in Hydra's ConfigStore (what conf/*.yaml list first in defaults).
_spec = importlib.util.spec_from_file_location("wrpo_recipe", ROOT / "recipes" / "wrpo.py")
RECIPE = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(RECIPE)

DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
"""torchrun's variables: a lone process has none of them (other tests' leftovers are hidden during a run)."""
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""What the pipeline's ``Preemption`` takes over while it runs."""


def compose_config(run_dir: Path | str, *overrides: str, config_name: str = "wrpo_tiny") -> DictConfig:
    """The config the command line ``recipes/wrpo.py --config-name NAME run_dir=... OVERRIDES`` composes."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name=config_name, overrides=[f"run_dir={run_dir}", *overrides])


def run_config(run_dir: Path | str, *overrides: str, config_name: str = "wrpo_tiny") -> RunConfig:
    """The typed run config of :func:`compose_config`, built as the recipe builds it."""
    return to_run_config(compose_config(run_dir, *overrides, config_name=config_name))


@contextlib.contextmanager
def lone_process() -> Iterator[None]:
    """A run as a user's plain ``python`` would start it: no torchrun variables (the pipeline takes a free port
    of its own), and the preemption handlers and the environment as they were once it is over."""
    saved_env = {k: os.environ.pop(k) for k in DIST_VARS if k in os.environ}
    saved_handlers = {sig: signal.getsignal(sig) for sig in PREEMPTION_SIGNALS}
    preemption.clear()  # a new process: no preemption signal received yet
    try:
        yield
    finally:
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)
        for k in DIST_VARS:
            os.environ.pop(k, None)
        os.environ.update(saved_env)


class Tee(io.TextIOBase):
    """Writes to the stream in place (pytest's capture) and keeps a copy."""

    def __init__(self, stream) -> None:
        self.stream, self.parts = stream, []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def getvalue(self) -> str:
        return "".join(self.parts)


def run_recipe(run_dir: Path | str, *overrides: str, config_name: str = "wrpo_tiny"):
    """Run the pipeline here; returns ``(results by stage, what it printed)``."""
    cfg = run_config(run_dir, *overrides, config_name=config_name)
    tee = Tee(sys.stdout)
    with lone_process(), contextlib.redirect_stdout(tee):
        results = run(cfg)
    return results, tee.getvalue()


def recipe_main(run_dir: Path | str, *overrides: str, config_name: str = "wrpo_tiny") -> None:
    """The recipe's ``main`` body on the composed config (``SystemExit`` as the command line would exit)."""
    cfg = compose_config(run_dir, *overrides, config_name=config_name)
    with lone_process():
        RECIPE.main(cfg)  # hydra.main passes a given config straight to the function
