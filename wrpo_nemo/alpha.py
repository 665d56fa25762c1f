"""Schedules for WRPO's fusion coefficient alpha_t (layer 1: pure Python).

alpha_t is a pure function of the number of optimizer steps completed and the run's total number of
optimizer steps, so it is the same for every micro-batch of one global batch, independent of how many GPUs
share that batch, and reproducible on resume from the step counter alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

AlphaScheduleKind = Literal["linear", "constant", "linear_until"]


@dataclass(frozen=True)
class AlphaSchedule:
    """How alpha moves over a run."""

    kind: AlphaScheduleKind = "linear"
    """``linear``: 0 -> alpha_max over the whole run (the paper); ``constant``: alpha_max throughout;
    ``linear_until``: 0 -> alpha_max over the first ``ramp_fraction`` of the run, then flat."""
    alpha_max: float = 0.1
    """The value alpha reaches (0.1 in the paper)."""
    ramp_fraction: float = 1.0
    """For ``linear_until``: the fraction of the run's optimizer steps over which alpha ramps up."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "") -> None:
        """Raise ``ValueError`` naming the offending field, written as ``prefix + field`` (the run config
        passes ``wrpo.alpha.``)."""
        if self.kind not in ("linear", "constant", "linear_until"):
            raise ValueError(f"{prefix}kind must be linear, constant or linear_until, got {self.kind!r}")
        if not 0.0 <= self.alpha_max <= 1.0:
            raise ValueError(f"{prefix}alpha_max must lie in [0, 1], got {self.alpha_max}")
        if not 0.0 < self.ramp_fraction <= 1.0:
            raise ValueError(f"{prefix}ramp_fraction must lie in (0, 1], got {self.ramp_fraction}")


def alpha_at(step: int, total_steps: int, schedule: AlphaSchedule) -> float:
    """alpha after ``step`` optimizer steps of a run of ``total_steps`` (step 0 -> 0 for the ramps).

    The paper's schedule is ``alpha_max * step / total_steps``: the loss at step 0 is exactly DPO on
    (y_wt, y_l). Steps past the end (an extended run) keep alpha at its final value.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if schedule.kind == "constant":
        return schedule.alpha_max
    ramp_steps = total_steps if schedule.kind == "linear" else schedule.ramp_fraction * total_steps
    return schedule.alpha_max * min(step / ramp_steps, 1.0)
