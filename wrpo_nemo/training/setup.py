"""From a validated run config to the things a stage trains on: model config, tokenizer, dataset, splits."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from wrpo_nemo import compat
from wrpo_nemo.data.cache import TokenizedDataset, build_or_load
from wrpo_nemo.models.config import ModelConfig
from wrpo_nemo.training.config import ConfigError, RunConfig
from wrpo_nemo.training.validate import validate_config, validate_model


@dataclass
class RunInputs:
    """What the stages share."""

    model_cfg: ModelConfig
    tokenizer: Any
    dataset: TokenizedDataset
    splits: dict[str, np.ndarray]
    hf_assets: str | None
    """An HF folder whose tokenizer and configs are copied into checkpoints and exports."""


def resolve_model_config(cfg: RunConfig, tokenizer: Any | None) -> ModelConfig:
    """The architecture: from ``model.hf_path``, a checkpoint's config, or a preset sized to the tokenizer.

    With ``tokenizer=None`` (start-up checks, before the toy tokenizer exists) a preset keeps its own vocabulary.
    """
    from wrpo_nemo.checkpoint.model import read_model_config
    from wrpo_nemo.models import get_preset, model_config_from_hf

    if cfg.model.hf_path:
        return model_config_from_hf(cfg.model.hf_path)
    if cfg.model.checkpoint:
        return read_model_config(cfg.model.checkpoint)
    if not cfg.model.preset:
        raise ConfigError("set one of model.preset, model.hf_path or model.checkpoint")
    try:
        preset = get_preset(cfg.model.preset)
    except KeyError as exc:
        raise ConfigError(f"model.preset: {exc.args[0]}") from None
    if cfg.data.toy and tokenizer is not None:
        # The toy task's word-level vocabulary is tiny; the preset's embedding follows it.
        return dataclasses.replace(preset, vocab_size=len(tokenizer))
    return preset


def validate_layout(cfg: RunConfig, model_cfg: ModelConfig, world_size: int) -> int:
    """Every start-up check (:mod:`wrpo_nemo.training.validate`) on the resolved model; returns the
    data-parallel size. The recipe has already run them before writing anything; this keeps :func:`run` safe
    for other callers."""
    dp = validate_config(cfg, world_size, compat.runtime().cuda)
    validate_model(cfg, model_cfg)
    return dp


def load_tokenizer(cfg: RunConfig) -> tuple[Any, str | None]:
    """The tokenizer and the HF folder it came from (``None`` for the toy tokenizer)."""
    if cfg.data.toy:
        from wrpo_nemo.data.toy import build_toy_tokenizer

        folder = Path(cfg.run_dir) / "toy" / "tokenizer"
        # Only the first process writes the folder; the others build the same tokenizer in memory.
        first = int(os.environ.get("RANK", "0")) == 0
        return build_toy_tokenizer(str(folder) if first else None), str(folder)
    path = cfg.data.tokenizer or cfg.model.hf_path
    if not path:
        raise ConfigError("data.tokenizer (or model.hf_path) must name a tokenizer folder")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path), path


def prepare_dataset(cfg: RunConfig, tokenizer: Any) -> TokenizedDataset:
    """Build (rank 0 first) or load the tokenised cache; every rank returns the same dataset."""
    source = cfg.data.source
    if cfg.data.toy:
        from wrpo_nemo.data.toy import build_toy_dataset

        # Written once per (size, seed): rewriting would change the file's mtime, hence the cache key, and a
        # resumed run would no longer match its checkpoint's data order.
        d = cfg.data
        folder = Path(cfg.run_dir) / "toy" / f"records-{d.toy_examples}-{d.toy_max_operand}-{cfg.seed}"
        records = folder / "train.jsonl"
        if dist.get_rank() == 0 and not records.is_file():
            build_toy_dataset(str(folder), d.toy_examples, seed=cfg.seed, max_operand=d.toy_max_operand)
        source = dataclasses.replace(source, sources=[str(records)])
    # Rank 0 builds or finds the cache (hashing the records for its key); the others open the folder it names
    # instead of hashing every data file again.
    found = [build_or_load(source, tokenizer).path if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(found, src=0)
    return TokenizedDataset(found[0])


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
