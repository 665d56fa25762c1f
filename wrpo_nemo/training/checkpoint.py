"""Training checkpoints: atomic megatron dist checkpoints that continue a run bit-for-bit.

A training checkpoint is a model checkpoint (``wrpo_nemo.checkpoint.model``: ``model_config.json``
and the ``weights/`` dist checkpoint, so every converter and ``load_model_checkpoint`` read it as is) whose
dist checkpoint also holds:

- ``optimizer``: megatron's sharded optimizer state (Adam moments, fp32 main params on GPU);
- ``trainer``: the step, the LR scheduler, the data loader's position and the RNG states (common state).

Checkpoints live in ``<stage_dir>/checkpoints/step_<N>``. Each is written under a hidden ``.partial`` name and
renamed when complete, so a crash during a save leaves the previous one loadable; the oldest beyond
``keep_last`` are deleted after the rename.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from wrpo_nemo import compat
from wrpo_nemo.checkpoint.atomic import replace_path
from wrpo_nemo.checkpoint.model import (
    copy_hf_assets,
    model_sharded_state_dict,
    weights_dir,
    write_model_config,
)
from wrpo_nemo.models.config import ModelConfig

_STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_KEY = "trainer"
OPTIMIZER_KEY = "optimizer"


def checkpoint_root(stage_dir: str | Path) -> Path:
    return Path(stage_dir) / "checkpoints"


def list_checkpoints(stage_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a stage, oldest first (``.partial`` folders are never listed)."""
    root = checkpoint_root(stage_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(stage_dir: str | Path) -> Path | None:
    found = list_checkpoints(stage_dir)
    return found[-1] if found else None


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_training_checkpoint(
    stage_dir: str | Path,
    step: int,
    model,
    optimizer,
    trainer_state: dict[str, Any],
    model_cfg: ModelConfig,
    *,
    keep_last: int,
    hf_assets: str | Path | None = None,
) -> Path:
    """Save everything needed to continue after ``step`` (a collective over all ranks); returns its path."""
    from megatron.core import dist_checkpointing

    root = checkpoint_root(stage_dir)
    final = root / f"step_{step:07d}"
    staging = root / f".step_{step:07d}.partial"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        weights_dir(staging).mkdir(parents=True)
    _barrier()
    state = model_sharded_state_dict(model)
    state[OPTIMIZER_KEY] = optimizer.sharded_state_dict(model_sharded_state_dict(model))
    state[TRAINER_KEY] = {**trainer_state, "rng": _rng_state()}
    with compat.redirect_cuda_to_cpu():
        dist_checkpointing.save(state, str(weights_dir(staging)))
    if rank == 0:
        write_model_config(staging, model_cfg)
        if hf_assets is not None and Path(hf_assets).is_dir():
            copy_hf_assets(hf_assets, staging / "hf_assets")
        replace_path(staging, final)
        for old in list_checkpoints(stage_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_training_checkpoint(path: str | Path, model, optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG from ``path`` into this rank's parts; returns the trainer state."""
    from megatron.core import dist_checkpointing

    state = model_sharded_state_dict(model)
    state[OPTIMIZER_KEY] = optimizer.sharded_state_dict(model_sharded_state_dict(model), is_loading=True)
    with compat.redirect_cuda_to_cpu():
        loaded = dist_checkpointing.load(state, str(weights_dir(path)))
        optimizer.load_state_dict(loaded.pop(OPTIMIZER_KEY))
    trainer = loaded.pop(TRAINER_KEY, None)
    if trainer is None:
        trainer = dist_checkpointing.load_common_state_dict(str(weights_dir(path)))[TRAINER_KEY]
    result = model.load_state_dict(loaded, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks model weights {missing[:5]}")
    _set_rng_state(trainer["rng"])
    return trainer
