"""Train with WRPO on megatron-core: ``python recipes/wrpo.py --config-name NAME [key=value ...]``.

Runs the stages of the config (``sft`` then ``wrpo`` by default), then exports each stage's final weights
to a Hugging Face folder. Launch with ``torchrun --nproc-per-node N`` for tensor, pipeline and data
parallelism; one plain process runs the whole thing on a CPU machine.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from wrpo_nemo.cli import error_line
from wrpo_nemo.data.records import DataError
from wrpo_nemo.errors import InputError
from wrpo_nemo.training.config import ConfigError, RunConfig, load_run_config

# Every key of the schema, with its default, under the name the configs in conf/ list first in their
# defaults: any key can be overridden from the command line, and a misspelt one is refused by Hydra.
ConfigStore.instance().store(name="wrpo_schema", node=OmegaConf.create(dataclasses.asdict(RunConfig())))


@hydra.main(config_path="../conf", config_name="wrpo_tiny", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        run_cfg = load_run_config(OmegaConf.to_container(cfg, resolve=True))
        from wrpo_nemo.pipeline import run

        results = run(run_cfg)
    except (ConfigError, DataError, InputError) as exc:  # one line naming the key, record or file; exit 2
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(error_line(exc), file=sys.stderr)
        sys.exit(2)
    for stage, result in results.items():
        state = "preempted" if result.preempted else "done"
        print(f"[{stage}] {state} after {result.steps} steps; checkpoint {result.checkpoint}")


if __name__ == "__main__":
    main()
