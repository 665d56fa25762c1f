"""Process groups for megatron-core: torch.distributed from torchrun's environment, then TP/PP/CP/DP groups."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from wrpo_nemo import compat


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def initialize_parallel(
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    context_parallel_size: int = 1,
    *,
    seed: int | None = None,
) -> torch.device:
    """Join the job (torchrun's ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``; a lone process needs none of them),
    build megatron's model-parallel groups (data parallelism takes the remaining ranks), and prepare this
    process for megatron-core on its machine. Returns the compute device.
    """
    from megatron.core import parallel_state

    if not dist.is_initialized():
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            # A lone process needs no agreed port: take a free one, so runs side by side do not collide.
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(
            compat.default_backend(), rank=int(os.environ.get("RANK", "0")), world_size=world_size
        )
    model_parallel = tensor_parallel_size * pipeline_parallel_size * context_parallel_size
    if dist.get_world_size() % model_parallel:
        raise ValueError(
            f"world size {dist.get_world_size()} is not divisible by TP x PP x CP = {tensor_parallel_size} x "
            f"{pipeline_parallel_size} x {context_parallel_size}"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        context_parallel_size=context_parallel_size,
    )
    return compat.prepare_runtime(seed)


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default process group (safe to call when not initialised)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
