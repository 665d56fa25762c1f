"""The two training stages as objects: each owns its loss, its per-step settings and (WRPO) its reference.

A stage is what :class:`wrpo_nemo.training.loop.TrainLoop` and :class:`wrpo_nemo.training.loop.Evaluator`
need to know about SFT or WRPO, behind one small interface (:class:`Stage`):

- ``loss_func(batch)``: megatron's per-micro-batch ``loss_func(output)`` (``wrpo_nemo.training.step``);
- ``begin_step(step, total_steps)``: settings that move with the optimizer step (WRPO's alpha_t);
- ``prepare(micro_batches)``: what a global batch needs before its forward (online reference log-probs, the
  global y_ws token count of WRPO's optional NLL term);
- ``state_dict()`` / ``load_state_dict()``: the stage's part of a training checkpoint.

Nothing here reads a run config: the recipe (``wrpo_nemo.training.run_stage``) builds stages from one, the
tests and benchmarks build them directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from wrpo_nemo import compat
from wrpo_nemo.alpha import AlphaSchedule, alpha_at
from wrpo_nemo.data.layout import SOURCE_CHOSEN, PackedBatch
from wrpo_nemo.training.reference import attach_online_reference
from wrpo_nemo.training.step import WrpoLossSettings, sft_loss_func, wrpo_loss_func


class Stage(Protocol):
    name: str
    """``sft`` or ``wrpo``: the loader's stage (what a micro-batch packs)."""
    reference: Reference | None
    """WRPO's reference log-probs (``None`` for SFT)."""

    def loss_func(self, batch: PackedBatch) -> Callable: ...

    def begin_step(self, step: int, total_steps: int) -> None: ...

    def prepare(self, micro_batches: list[PackedBatch]) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class SFTStage:
    """Stage 1: NLL on y_ws, normalised by the response tokens of the whole global batch."""

    vocab_size: int
    name: str = "sft"
    reference: Reference | None = None

    def loss_func(self, batch: PackedBatch) -> Callable:
        return partial(sft_loss_func, batch, self.vocab_size)

    def begin_step(self, step: int, total_steps: int) -> None:
        pass

    def prepare(self, micro_batches: list[PackedBatch]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class Reference:
    """Where WRPO's reference log-probs come from.

    ``logps``: stored ``[len(dataset), 3]`` values the loader attaches to each micro-batch; ``model``: a frozen
    model that computes them for every global batch (``online``); neither: SimPO, which needs none.
    """

    mode: str
    """How they were obtained, for the console and the checkpoint: loaded, computed, online, none (...)."""
    logps: np.ndarray | None = None
    model: Any = None


class WRPOStage:
    """Stage 2: WRPO on (y_ws, y_wt, y_l) with alpha_t from the optimizer step (WRPO.md)."""

    name = "wrpo"

    def __init__(
        self,
        vocab_size: int,
        loss: WrpoLossSettings,
        alpha: AlphaSchedule,
        reference: Reference,
        device: torch.device,
    ) -> None:
        self.vocab_size, self.settings, self.schedule = vocab_size, loss, alpha
        self.reference, self.device = reference, device
        self.alpha = 0.0
        self._nll_tokens_per_prompt: float | None = None

    def loss_func(self, batch: PackedBatch) -> Callable:
        return partial(
            wrpo_loss_func, batch, self.alpha, self.settings, self.vocab_size,
            nll_tokens_per_prompt=self._nll_tokens_per_prompt,
        )  # fmt: skip

    def begin_step(self, step: int, total_steps: int) -> None:
        # alpha_t uses the steps completed before this update: exactly DPO on (y_wt, y_l) at the first.
        self.alpha = alpha_at(step, total_steps, self.schedule)

    def prepare(self, micro_batches: list[PackedBatch]) -> None:
        if self.reference.model is not None:
            attach_online_reference(self.reference.model, micro_batches, self.device, self.vocab_size)
        if self.settings.sft_weight:
            self._nll_tokens_per_prompt = _source_tokens_per_prompt(micro_batches)

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference.mode}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _source_tokens_per_prompt(micro_batches: list[PackedBatch]) -> float:
    """y_ws response tokens per prompt over the whole global batch (every data-parallel rank's share).

    WRPO's loss is a mean over the global batch's prompts; scaling each micro-batch's NLL sum by this makes the
    optional NLL term a mean over the global batch's y_ws tokens, whatever the micro-batch split.
    """
    from megatron.core import parallel_state

    tokens = prompts = 0
    for batch in micro_batches:
        source = batch.segment_role[batch.segment_ids.clamp(min=0)] == SOURCE_CHOSEN
        tokens += int((batch.loss_mask & source).sum())
        prompts += batch.num_prompts
    totals = torch.tensor([float(tokens), float(prompts)], dtype=torch.float64, device=compat.device())
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    return float(totals[0] / totals[1].clamp(min=1))
