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
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from wrpo_nemo import compat
from wrpo_nemo.checkpoint.atomic import remove_tree, replace_path
from wrpo_nemo.checkpoint.damage import checkpoint_read_error, find_damage, read_failures
from wrpo_nemo.checkpoint.model import (
    CONFIG_FILE,
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


class AsyncSaves:
    """Checkpoint writes in the background (megatron's asynchronous dist-checkpoint save): the step loop goes
    on while a forked writer stores the tensors; at most one save is in flight.

    A checkpoint is published (renamed from its hidden ``.partial`` folder, then verified) only when its write
    has finished on every rank, in :meth:`poll` after a later step or in :meth:`wait`; until then it is never
    listed, so a crash or kill during the write leaves the previous checkpoint the newest. Every rank calls
    :meth:`poll` after each step (a collective) and :meth:`wait` before the final save and before exiting.
    """

    def __init__(self) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue()
        self.in_flight: Path | None = None
        self.published: list[tuple[Path, float]] = []
        """(checkpoint, seconds from the save call to its publication) of every finished save."""
        self._started = 0.0

    def schedule(self, request, final: Path) -> None:
        with compat.redirect_cuda_to_cpu():
            self.queue.schedule_async_request(request)
        self.in_flight, self._started = final, time.perf_counter()

    def poll(self, blocking: bool = False) -> None:
        """Publish the save in flight if its write has finished on every rank (``blocking``: wait for it)."""
        if self.in_flight is None:
            return
        final, self.in_flight = self.in_flight, None
        try:
            with compat.redirect_cuda_to_cpu():
                done = self.queue.maybe_finalize_async_calls(blocking=blocking)
        except Exception as exc:
            stage_dir = final.parent.parent
            if not dist.is_initialized() or dist.get_rank() == 0:
                shutil.rmtree(_staging(final), ignore_errors=True)
            raise _save_failure(exc, stage_dir, final) from exc
        if done or blocking:
            self.published.append((final, time.perf_counter() - self._started))
        else:
            self.in_flight = final

    def wait(self) -> None:
        self.poll(blocking=True)

    def close(self) -> None:
        self.wait()
        self.queue.close()


def _staging(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


def remove_stale_partials(stage_dir: str | Path) -> list[Path]:
    """Delete hidden ``.partial`` / ``.deleting`` folders a killed run left in the stage's checkpoint folder
    (call on rank 0 when a stage starts, before any save of its own); returns them."""
    root = checkpoint_root(stage_dir)
    stale = [p for p in root.iterdir() if p.name.startswith(".step_")] if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


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
    async_saves: AsyncSaves | None = None,
) -> Path:
    """Save everything needed to continue after ``step`` (a collective over all ranks); returns its path.

    Written into a hidden ``.partial`` folder, flushed, renamed into place and verified; only then are
    checkpoints beyond ``keep_last`` deleted (renamed away first). With ``async_saves`` the tensors are written
    in the background and all of that happens when the write has finished (:class:`AsyncSaves`); the path
    returned does not exist before.
    """
    from megatron.core import dist_checkpointing

    if async_saves is not None:
        async_saves.wait()  # one save in flight at a time
    root = checkpoint_root(stage_dir)
    final = root / f"step_{step:07d}"
    staging = _staging(final)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        weights_dir(staging).mkdir(parents=True)
    _barrier()
    state = model_sharded_state_dict(model)
    state[OPTIMIZER_KEY] = optimizer.sharded_state_dict(model_sharded_state_dict(model))
    state[TRAINER_KEY] = {**trainer_state, "rng": _rng_state()}
    publish = partial(_publish, Path(stage_dir), final, model_cfg, hf_assets, keep_last)
    failure = None
    try:
        with compat.redirect_cuda_to_cpu():
            request = dist_checkpointing.save(
                state, str(weights_dir(staging)), async_sharded_save=async_saves is not None
            )
        if async_saves is not None:
            request.add_finalize_fn(publish)
            async_saves.schedule(request, final)
            return final
        if rank == 0:
            _write_extras(staging, model_cfg, hf_assets)
    except Exception as exc:
        failure = _save_failure(exc, Path(stage_dir), final)
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
    if _any_rank(failure is not None):
        raise failure or CheckpointSaveError(f"saving checkpoint {final} failed on another rank")
    publish()
    return final


def _write_extras(staging: Path, model_cfg: ModelConfig, hf_assets) -> None:
    write_model_config(staging, model_cfg)
    if hf_assets is not None and Path(hf_assets).is_dir():
        copy_hf_assets(hf_assets, staging / "hf_assets")


def _publish(stage_dir: Path, final: Path, model_cfg: ModelConfig, hf_assets, keep_last: int) -> None:
    """Rename the written checkpoint into place (flushed first), verify it, then apply ``keep_last``
    (collective; after an asynchronous write megatron calls it on every rank once all have finished)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    staging = _staging(final)
    failure = None
    if rank == 0:
        try:
            if not (staging / CONFIG_FILE).is_file():
                _write_extras(staging, model_cfg, hf_assets)
            replace_path(staging, final)  # flushed to disk, then published
            if (problem := damage(final)) is not None:
                failure = CheckpointSaveError(
                    f"checkpoint {final} was written but does not verify: {problem}"
                )
        except Exception as exc:
            failure = _save_failure(exc, stage_dir, final)
            shutil.rmtree(staging, ignore_errors=True)
    if _any_rank(failure is not None):
        raise failure or CheckpointSaveError(f"saving checkpoint {final} failed on another rank")
    # The new checkpoint verified: deleting older ones never removes the only loadable one.
    if rank == 0 and keep_last > 0:
        # Renamed out of the way before deletion: a crash never leaves a half-deleted step_N behind.
        for old in list_checkpoints(stage_dir)[:-keep_last]:
            remove_tree(old)
    _barrier()


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
