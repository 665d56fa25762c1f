"""A stage's plan (its length and optimizer settings), saved in every checkpoint and compared on resume.

megatron restores the LR schedule and the optimizer's hyperparameters from a checkpoint, so without this a
resumed run silently keeps the old ones: a longer ``max_steps`` trains its extra steps at ``min_lr``, a new
``lr`` is ignored. On resume :func:`reconcile` compares the saved plan with the configured one and either
honours a change or refuses it, naming the key and both values:

- honoured (printed at start): the run's length (``max_steps``, ``epochs``: the cosine decay is re-spanned to
  the new total from where the warm-up ended, and alpha_t follows the new total too), ``lr``, ``min_lr``,
  ``weight_decay``, ``adam_beta1``, ``adam_beta2``, ``adam_eps`` and ``clip_grad``, each from the next step on;
- refused: ``warmup_ratio`` (the warm-up has run as it was planned) and a total shorter than the steps already
  done. What decides the data order (global batch size, seed, data, layout) is refused by the loader, the
  model by the checkpoint's weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from wrpo_nemo.training.config import ConfigError
from wrpo_nemo.training.engine import OptimSettings

HONOURED = ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad")
"""Optimizer settings a resume may change."""


@dataclass(frozen=True)
class StagePlan:
    """What a stage was configured to do: its length and its optimizer settings."""

    steps_per_epoch: int
    epochs: int
    max_steps: int | None
    optim: OptimSettings

    @property
    def total_steps(self) -> int:
        total = self.steps_per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total_steps": self.total_steps}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StagePlan:
        return cls(
            steps_per_epoch=int(data["steps_per_epoch"]),
            epochs=int(data["epochs"]),
            max_steps=data["max_steps"],
            optim=OptimSettings(**data["optim"]),
        )


def reconcile(saved: dict[str, Any] | None, new: StagePlan, step: int, stage: str) -> list[str]:
    """Check the configured plan against a checkpoint's (``saved``: its ``plan``, ``None`` for a checkpoint
    from before plans were saved) after ``step`` completed steps. Raises :class:`ConfigError` naming the key
    for a change that cannot be honoured; returns one line per honoured change."""
    if new.total_steps < step:
        raise ConfigError(
            f"{stage}.max_steps / {stage}.epochs: the checkpoint has completed {step} steps, more than the "
            f"{new.total_steps} now planned; raise {stage}.max_steps (or {stage}.epochs) to at least {step}"
        )
    if saved is None:
        return []
    old = StagePlan.from_dict(saved)
    if old.optim.warmup_ratio != new.optim.warmup_ratio:
        raise ConfigError(
            f"{stage}.optim.warmup_ratio={new.optim.warmup_ratio} differs from the checkpoint's "
            f"{old.optim.warmup_ratio}: the warm-up has already been scheduled; resume with "
            f"{stage}.optim.warmup_ratio={old.optim.warmup_ratio}"
        )
    changes = []
    if old.total_steps != new.total_steps:
        changes.append(
            f"{stage}: total steps {old.total_steps} -> {new.total_steps} (max_steps {old.max_steps} -> "
            f"{new.max_steps}, epochs {old.epochs} -> {new.epochs}); the LR decay and alpha_t span the new total"
        )
    for name in HONOURED:
        before, after = getattr(old.optim, name), getattr(new.optim, name)
        if before != after:
            changes.append(f"{stage}.optim.{name}: {before} -> {after} from step {step + 1}")
    return changes


def apply(plan: StagePlan, optimizer, scheduler) -> None:
    """Make the restored LR schedule and optimizer follow ``plan`` (after a checkpoint was loaded into them).

    The warm-up keeps its restored length (bounded by the new total); the decay ends at the new total; the
    optimizer's param groups take the new peak/minimum LR, betas and eps; weight decay comes from the schedule.
    ``clip_grad`` needs nothing: megatron's optimizer reads it from its config, built from the current plan.
    """
    settings, total = plan.optim, plan.total_steps
    scheduler.max_lr, scheduler.min_lr = settings.lr, settings.min_lr
    scheduler.lr_warmup_steps = min(scheduler.lr_warmup_steps, total - 1)
    scheduler.lr_decay_steps = total
    scheduler.start_wd = scheduler.end_wd = settings.weight_decay
    scheduler.wd_incr_steps = total
    for group in optimizer.param_groups:
        group["max_lr"], group["min_lr"] = settings.lr, settings.min_lr
        if "betas" in group:
            group["betas"] = (settings.adam_beta1, settings.adam_beta2)
        if "eps" in group:
            group["eps"] = settings.adam_eps
    scheduler.step(increment=0)  # the next step's lr and weight decay from the updated schedule
