"""Preemption: SIGTERM/SIGUSR1 (Slurm's warning before the time limit) ask the trainer to save and stop.

:func:`install` runs first thing in the recipe's process, before anything slow (imports, data preparation,
model import, the reference pass), so a signal that arrives during start-up is kept: training stops at its
first step boundary with a checkpoint. :class:`Preemption` is what the loop asks, all ranks agreeing.
:class:`LeadTimeCheck` says when the warning comes too late for that: the launcher's lead time (Slurm's
``--signal=USR1@N``, passed as ``WRPO_SIGNAL_LEAD_S``) shorter than one step plus one checkpoint save.
"""

from __future__ import annotations

import math
import os
import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
LEAD_TIME_ENV = "WRPO_SIGNAL_LEAD_S"
LEAD_TIME_MARGIN = 1.25
"""The lead time advised is the longest step plus the longest save seen, plus 25% for a slower file system."""
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

    def agreed(self) -> bool:
        import torch
        import torch.distributed as dist

        from wrpo_nemo import compat

        # On the compute device: NCCL reduces CUDA tensors only.
        flag = torch.tensor([1.0 if requested() else 0.0], device=compat.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def lead_time_from_env() -> float | None:
    """The seconds between the preemption signal and the kill, as the Slurm launcher passes them
    (``WRPO_SIGNAL_LEAD_S``, from ``SIGNAL_LEAD``); ``None`` when unset or not a positive number."""
    try:
        lead = float(os.environ.get(LEAD_TIME_ENV, ""))
    except ValueError:
        return None
    return lead if math.isfinite(lead) and lead > 0 else None


class LeadTimeCheck:
    """Whether the preemption lead time covers what a signal costs: the step in progress finishes, then the
    checkpoint is saved synchronously (a preemption save never runs in the background). Fed the duration of
    every step and every save; :meth:`observe` returns a warning the first time the longest step plus the
    longest save exceeds the lead time, and ``None`` otherwise (always ``None`` without a lead time)."""

    def __init__(self, lead_s: float | None) -> None:
        self.lead_s = lead_s
        self.step_s = self.save_s = 0.0
        self.warned = False

    def observe(self, *, step_s: float | None = None, save_s: float | None = None) -> str | None:
        if step_s is not None:
            self.step_s = max(self.step_s, step_s)
        if save_s is not None:
            self.save_s = max(self.save_s, save_s)
        needed = self.step_s + self.save_s
        if self.lead_s is None or self.warned or needed <= self.lead_s:
            return None
        self.warned = True
        advised = math.ceil(needed * LEAD_TIME_MARGIN)
        return (
            f"the preemption lead time ({LEAD_TIME_ENV}={self.lead_s:g} s) is shorter than the longest step "
            f"({self.step_s:.1f} s) plus the longest checkpoint save ({self.save_s:.1f} s) seen so far: a "
            "preempted or timed-out job would be killed before its checkpoint is written; raise SIGNAL_LEAD "
            f"and --signal=USR1@N to at least {advised} "
            f"(SIGNAL_LEAD={advised} sbatch --signal=USR1@{advised} ...)"
        )
