"""Run a test body in N real processes joined by a gloo process group (torch.multiprocessing, spawn)."""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, errors) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        fn(rank, world_size, *args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` processes; re-raise the first failure.

    ``fn`` must be importable (a module-level function). The default process group is initialised
    before it runs and destroyed after.
    """
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    try:
        mp.start_processes(
            _worker, args=(world_size, port, fn, args, errors), nprocs=world_size, start_method="spawn"
        )
    except mp.ProcessRaisedException as exc:
        messages = []
        while not errors.empty():
            rank, tb = errors.get()
            messages.append(f"--- rank {rank} ---\n{tb}")
        raise AssertionError("\n".join(messages) or str(exc)) from None
