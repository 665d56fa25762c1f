"""Train with WRPO on megatron-core: ``python recipes/wrpo.py --config-name NAME [key=value ...]``.

Runs the stages of the config (``sft`` then ``wrpo`` by default), then exports each stage's final weights
to a Hugging Face folder. Launch with ``torchrun --nproc-per-node N`` for tensor, pipeline and data
parallelism; one plain process runs the whole thing on a CPU machine.

A bad config (a misspelt key, a wrong type, a value that cannot run on this world size) stops before anything
is written: ``config error: ...`` naming the key, exit status 2.
"""

from __future__ import annotations

import os
import sys

from wrpo_nemo.training import preemption

# Before anything slow (these imports, the data, the model): a SIGTERM/SIGUSR1 during start-up is kept, and
# training stops at its first step boundary with a checkpoint.
preemption.install()

from wrpo_nemo.cli import quiet_library_warnings  # noqa: E402

quiet_library_warnings()  # before megatron is imported: some of its warnings fire at import

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from wrpo_nemo.cli import error_line  # noqa: E402
from wrpo_nemo.data.records import DataError  # noqa: E402
from wrpo_nemo.errors import InputError  # noqa: E402
from wrpo_nemo.training.checkpoint import CheckpointSaveError  # noqa: E402
from wrpo_nemo.training.config import ConfigError  # noqa: E402
from wrpo_nemo.training.hydra_config import (  # noqa: E402
    CONFIG_ERROR_EXIT,
    check_here,
    preflight,
    register_schema,
    to_run_config,
)

CONFIG_PATH, CONFIG_NAME = "../conf", "wrpo_tiny"

# Every key of the typed schema, with its type and default, under the name the configs in conf/ list first in
# their defaults: any key can be overridden from the command line; a misspelt key or a wrong type is refused
# by Hydra at composition, naming the key.
register_schema()


@hydra.main(config_path=CONFIG_PATH, config_name=CONFIG_NAME, version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        run_cfg = to_run_config(cfg)
        check_here(run_cfg)  # again for the runs preflight leaves to Hydra (a multirun's jobs)
        from wrpo_nemo.pipeline import run

        results = run(run_cfg)
    except (
        ConfigError,
        DataError,
        InputError,
        CheckpointSaveError,
    ) as exc:  # one line naming what to fix; exit 2
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(error_line(exc), file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT)
    for stage, result in results.items():
        state = "preempted" if result.preempted else "done"
        print(f"[{stage}] {state} after {result.steps} steps; checkpoint {result.checkpoint}")


if __name__ == "__main__":
    # Every check before Hydra creates its output folder in run_dir (exit 2 on a bad config).
    preflight(sys.argv[1:], __file__, CONFIG_PATH, CONFIG_NAME)
    main()
