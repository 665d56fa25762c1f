"""The NeMo-Aligner example: its config carries the paper's values, its entry point's imports resolve, and it
names the container of the stack the lane tests."""

from __future__ import annotations

import importlib.util
import os

from omegaconf import OmegaConf

from wrpo_nemo.integrations.nemo_aligner import stack
from wrpo_nemo.integrations.nemo_aligner.config import WRPOLossConfig
from wrpo_nemo.integrations.nemo_aligner.dataset import data_configs

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "nemo_aligner")


def _config() -> object:
    OmegaConf.register_new_resolver("multiply", lambda x, y: x * y, replace=True)
    return OmegaConf.load(os.path.join(EXAMPLE, "conf", "gpt_wrpo.yaml"))


def test_example_config_has_the_papers_wrpo_hyperparameters() -> None:
    cfg = _config()
    loss = WRPOLossConfig.from_dpo_section(cfg.model.dpo)
    assert (loss.beta, loss.preference, loss.label_smoothing, loss.sft_weight) == (0.01, "dpo", 0.0, 0.0)
    assert (loss.schedule.kind, loss.schedule.alpha_max) == ("linear", 0.1)
    assert cfg.model.optim.lr == 3e-7
    assert (cfg.model.optim.sched.name, cfg.model.optim.sched.warmup_ratio) == ("CosineAnnealing", 0.1)
    assert cfg.model.global_batch_size == 128
    assert (cfg.trainer.dpo.max_epochs, cfg.model.seed) == (1, 42)


def test_example_data_section_reads_as_the_data_layers_configs() -> None:
    cfg = _config()
    read, tokenize = data_configs(cfg.model.data, cfg.model.data.seq_length, packed=False)
    assert (read.layout, read.on_invalid) == ("released", "error")
    assert (tokenize.max_length, tokenize.max_prompt_length, tokenize.length_policy) == (2048, 1800, "drop")


def test_entry_point_imports_every_name_it_uses_from_nemo_aligner() -> None:
    spec = importlib.util.spec_from_file_location(
        "train_gpt_wrpo", os.path.join(EXAMPLE, "train_gpt_wrpo.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # runs the imports; main() needs CUDA and is not called
    assert callable(module.main)


def _lock_pins() -> dict[str, str]:
    pins = {}
    with open(os.path.join(EXAMPLE, "..", "..", "requirements", "nemo-lane.txt"), encoding="utf-8") as lock:
        for line in lock:
            name, sep, version = line.strip().partition("==")
            if sep and not name.startswith("#"):
                pins[name.lower().replace("_", "-")] = version
    return pins


def test_the_lane_installs_the_stack_the_example_checks_against() -> None:
    pins = _lock_pins()
    assert {
        "nemo": pins["nemo-toolkit"],
        "nemo_aligner": pins["nemo-aligner"],
        "megatron.core": pins["megatron-core"],
    } == stack.TESTED
    assert stack.installed() == stack.TESTED
    assert stack.differences(stack.installed()) == []


def test_versions_off_the_tested_minor_are_reported() -> None:
    versions = {"nemo": "2.4.0", "nemo_aligner": "0.7.0", "megatron.core": "0.14.0rc7"}
    assert stack.differences(versions) == ["megatron.core 0.14.0rc7 (the CI lane tests 0.13.1)"]


def test_the_sbatch_and_readme_name_the_tested_container_in_both_notations() -> None:
    docker = stack.CONTAINER
    enroot = docker.replace("/", "#", 1)  # REGISTRY#IMAGE:TAG
    assert enroot == "nvcr.io#nvidia/nemo:25.07"
    with open(os.path.join(EXAMPLE, "slurm_wrpo.sbatch"), encoding="utf-8") as handle:
        sbatch = handle.read()
    with open(os.path.join(EXAMPLE, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    assert f'CONTAINER="${{CONTAINER:-{enroot}}}"' in sbatch
    assert f"nemo-aligner=={stack.TESTED['nemo_aligner']}" in sbatch
    assert docker in readme and enroot in readme
    assert f"nemo-aligner=={stack.TESTED['nemo_aligner']}" in readme
