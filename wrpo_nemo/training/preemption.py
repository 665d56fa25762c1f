"""Preemption: SIGTERM/SIGUSR1 (Slurm's warning before the time limit) ask the trainer to save and stop.

:func:`install` runs first thing in the recipe's process, before anything slow (imports, data preparation,
model import, the reference pass), so a signal that arrives during start-up is kept: training stops at its
first step boundary with a checkpoint. :class:`Preemption` is what the loop asks, all ranks agreeing.
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_state = {"requested": False}


def _handle(signum, frame) -> None:
    _state["requested"] = True
    # Slurm may signal every process of the step and a launcher forward it again: one is enough, and a later
    # one arriving during shutdown must not kill the process with the default action.
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def install() -> None:
    """Catch SIGTERM/SIGUSR1 from now on. Idempotent; once a signal was received it stays recorded and later
    ones stay ignored."""
    if _state["requested"]:
        return
    for sig in SIGNALS:
        if signal.getsignal(sig) is not _handle:
            signal.signal(sig, _handle)


def requested() -> bool:
    """Whether this process received a preemption signal."""
    return _state["requested"]


def clear() -> None:
    """Forget a received signal and restore the default handlers (between runs in one process: tests)."""
    _state["requested"] = False
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


class Preemption:
    """The loop's view: whether any rank was asked to stop (a collective, so all ranks stop together)."""

    def __init__(self) -> None:
        install()

    @property
    def requested(self) -> bool:
        return requested()

    def agreed(self) -> bool:
        import torch
        import torch.distributed as dist

        from wrpo_nemo import compat

        # On the compute device: NCCL reduces CUDA tensors only.
        flag = torch.tensor([1.0 if requested() else 0.0], device=compat.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
