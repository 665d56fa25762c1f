"""Run a test body in N real processes joined by a gloo process group.

The processes are spawned once per pytest session and kept (torch, megatron-core and transformers imported
once, not once per test): each call gets a fresh process group on a new port, and the environment, working
directory and megatron's parallel state are put back after it. A call that fails or hangs on any rank ends
the pool; the next call spawns a new one.
"""

from __future__ import annotations

import atexit
import datetime
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CALL_TIMEOUT_S = 600
"""The most one call may take on every rank together."""
STRAGGLER_S = 20
"""Once a rank has failed, how long the others get to report before the pool is ended (they may be blocked
in a collective that the failed rank never joins)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_one(
    rank: int, world_size: int, port: int, fn: Callable, args: tuple, env: dict[str, str], cwd: str
) -> None:
    """One call on one rank, in the caller's environment and working directory (as a process spawned for it
    would start); leaves the process as it found it."""
    saved_env, saved_cwd, dtype = dict(os.environ), os.getcwd(), torch.get_default_dtype()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
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
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=CALL_TIMEOUT_S)
        )
        fn(rank, world_size, *args)
    finally:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_default_dtype(dtype)


def _serve(rank: int, tasks, results, parent: int) -> None:
    """A pool process: run calls until told to stop (``None``) or the pytest process is gone. (Not a daemon:
    megatron's checkpoint writer starts processes of its own.)"""
    while os.getppid() == parent:
        try:
            task = tasks.get(timeout=2)
        except queue.Empty:
            continue
        if task is None:
            return
        try:
            _run_one(rank, *pickle.loads(task))
            results.put((rank, None))
        except BaseException:
            results.put((rank, traceback.format_exc()))


class _Pool:
    def __init__(self, size: int) -> None:
        ctx = mp.get_context("spawn")
        self.size = size
        self.tasks = [ctx.Queue() for _ in range(size)]
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(target=_serve, args=(rank, self.tasks[rank], self.results, os.getpid()))
            for rank in range(size)
        ]
        for proc in self.procs:
            proc.start()

    def call(self, fn: Callable, world_size: int, args: tuple) -> list[tuple[int, str]]:
        """Run ``fn`` on ranks ``0..world_size-1``; returns the failures ``(rank, traceback)``."""
        port = free_port()
        for rank in range(world_size):
            self.tasks[rank].put(pickle.dumps((world_size, port, fn, args, dict(os.environ), os.getcwd())))
        failures, reported = [], set()
        start, limit = time.monotonic(), CALL_TIMEOUT_S
        while len(reported) < world_size:
            try:
                rank, error = self.results.get(timeout=1)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - reported)
                dead = [r for r in missing if not self.procs[r].is_alive()]
                if dead or time.monotonic() - start > limit:
                    self.close()
                    elapsed = f"after {time.monotonic() - start:.0f} s"
                    for r in missing:
                        why = f"died (exit code {self.procs[r].exitcode})" if r in dead else "did not finish"
                        failures.append((r, f"rank {r} {why} {elapsed}"))
                    return failures
                continue
            reported.add(rank)
            if error is not None:
                failures.append((rank, error))
                limit = min(limit, time.monotonic() - start + STRAGGLER_S)
        return failures

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=10)


_POOL: _Pool | None = None


@atexit.register
def _close_pool() -> None:
    global _POOL
    if _POOL is not None:
        for tasks in _POOL.tasks:
            tasks.put(None)
        for proc in _POOL.procs:
            proc.join(timeout=10)
        _POOL.close()
        _POOL = None


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` processes; re-raise the first failure.

    ``fn`` must be importable (a module-level function) and ``args`` picklable. The default process group is
    initialised before it runs and destroyed after.
    """
    global _POOL
    if _POOL is None or _POOL.size < world_size or not _POOL.alive():
        if _POOL is not None:
            _POOL.close()
        _POOL = _Pool(max(world_size, 2))
    failures = _POOL.call(fn, world_size, args)
    if failures:
        # A failed call may have left a rank in a collective or a broken state: the next call starts afresh.
        _POOL.close()
        _POOL = None
        raise AssertionError("\n".join(f"--- rank {rank} ---\n{tb}" for rank, tb in sorted(failures)))
