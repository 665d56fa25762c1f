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
from wrpo_nemo.checkpoint.atomic import remove_tree, replace_path
from wrpo_nemo.checkpoint.damage import checkpoint_read_error, find_damage, read_failures
from wrpo_nemo.checkpoint.model import (
    copy_hf_assets,
    model_sharded_state_dict,
    read_model_config,
    weights_dir,
    write_model_config,
)
from wrpo_nemo.errors import InputError
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


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the message says why (disk space named when it is the cause) and
    which complete checkpoint remains."""


LOW_SPACE_FRACTION = 0.01
"""A save failing with less free space than this share of the disk (or less than the previous checkpoint's
size) is reported as a full disk: writers such as torch's zip writer report it as e.g. ``unexpected pos``."""


def _tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _save_failure(exc: BaseException, stage_dir: Path, final: Path) -> CheckpointSaveError:
    import errno

    root = checkpoint_root(stage_dir)
    previous = [p for p in list_checkpoints(stage_dir) if p != final]
    kept = f"the last complete checkpoint, {previous[-1]}, is intact" if previous else "no earlier checkpoint"
    usage = shutil.disk_usage(root if root.exists() else stage_dir)
    needed = _tree_size(previous[-1]) if previous else 0
    no_space = any(
        isinstance(e, OSError) and e.errno == errno.ENOSPC for e in _causes(exc)
    ) or usage.free < max(needed, LOW_SPACE_FRACTION * usage.total)
    if no_space:
        return CheckpointSaveError(
            f"saving checkpoint {final} failed: the disk is full ({usage.free / 2**20:.0f} MiB free of "
            f"{usage.total / 2**30:.1f} GiB; the previous checkpoint takes {needed / 2**20:.0f} MiB). Free space "
            f"or point run_dir elsewhere, then resume; {kept}. ({type(exc).__name__}: {exc})"
        )
    return CheckpointSaveError(f"saving checkpoint {final} failed: {type(exc).__name__}: {exc}; {kept}")


def _causes(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


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
    failure = None
    try:
        with compat.redirect_cuda_to_cpu():
            dist_checkpointing.save(state, str(weights_dir(staging)))
        if rank == 0:
            write_model_config(staging, model_cfg)
            if hf_assets is not None and Path(hf_assets).is_dir():
                copy_hf_assets(hf_assets, staging / "hf_assets")
            replace_path(staging, final)  # flushed to disk, then published
    except Exception as exc:
        failure = _save_failure(exc, Path(stage_dir), final)
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
    if failure is None and rank == 0 and (problem := damage(final)) is not None:
        failure = CheckpointSaveError(f"checkpoint {final} was written but does not verify: {problem}")
    if _any_rank(failure is not None):
        raise failure or CheckpointSaveError(f"saving checkpoint {final} failed on another rank")
    # The new checkpoint verified: deleting older ones never removes the only loadable one.
    if rank == 0 and keep_last > 0:
        # Renamed out of the way before deletion: a crash never leaves a half-deleted step_N behind.
        for old in list_checkpoints(stage_dir)[:-keep_last]:
            remove_tree(old)
    _barrier()
    return final


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (a collective; ``flag`` itself without a process group)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=compat.device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def damage(path: str | Path) -> InputError | None:
    """What makes the training checkpoint ``path`` unloadable, found cheaply (files present and as long as the
    checkpoint's index says, ``common.pt`` a complete archive, the model config readable), or ``None``."""
    try:
        read_model_config(path)
    except (InputError, FileNotFoundError) as exc:
        return exc if isinstance(exc, InputError) else InputError(Path(path) / "model_config.json", "missing")
    found = find_damage(weights_dir(path))
    if found:
        name, problem = found[0]
        return InputError(weights_dir(path) / name, problem)
    return None


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The trainer state (common state) of the training checkpoint ``path``; a damaged one raises
    :class:`~wrpo_nemo.errors.InputError` naming the file."""
    from megatron.core import dist_checkpointing

    try:
        with compat.redirect_cuda_to_cpu():
            return dist_checkpointing.load_common_state_dict(str(weights_dir(path)))[TRAINER_KEY]
    except read_failures() as exc:
        raise checkpoint_read_error(weights_dir(path), exc, ["common.pt"]) from exc


def load_training_checkpoint(path: str | Path, model, optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG from ``path`` into this rank's parts; returns the trainer state.

    A damaged checkpoint raises :class:`~wrpo_nemo.errors.InputError` naming the file, before anything is
    assigned to the model or the optimizer."""
    from megatron.core import dist_checkpointing

    state = model_sharded_state_dict(model)
    state[OPTIMIZER_KEY] = optimizer.sharded_state_dict(model_sharded_state_dict(model), is_loading=True)
    try:
        with compat.redirect_cuda_to_cpu():
            loaded = dist_checkpointing.load(state, str(weights_dir(path)))
    except read_failures() as exc:
        raise checkpoint_read_error(weights_dir(path), exc) from exc
    with compat.redirect_cuda_to_cpu():
        optimizer.load_state_dict(loaded.pop(OPTIMIZER_KEY))
    trainer = loaded.pop(TRAINER_KEY, None)
    if trainer is None:
        trainer = read_trainer_state(path)
    result = model.load_state_dict(loaded, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks model weights {missing[:5]}")
    _set_rng_state(trainer["rng"])
    return trainer
