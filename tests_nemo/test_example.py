"""The NeMo-Aligner example: its config carries the paper's values and its entry point's imports resolve."""

from __future__ import annotations

import importlib.util
import os

from omegaconf import OmegaConf

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
