"""The training loop, and the components around it: evaluation, throughput accounting, checkpoint state.

:class:`TrainLoop` takes a model (megatron DDP), its optimizer and LR schedule, a loader and a
:class:`~wrpo_nemo.training.stages.Stage`, and advances one optimizer step at a time through megatron's
schedules. It is what the recipe (``run_stage``), the parity tests, ``benchmarks/wrpo_vs_trl.py`` and
``scripts/gpu/bench_wrpo_step.py`` all run. Everything else a run does between steps (logging, periodic
evaluation, preemption, periodic checkpoints) is a callback handed to :meth:`TrainLoop.run`, and each stateful
component gives its own part of the checkpoint (``state_dict`` / ``load_state_dict``, torchtitan's
``Stateful`` pattern); :func:`collect_state` merges them into the trainer state a checkpoint stores.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
import torch.distributed as dist

from wrpo_nemo import compat
from wrpo_nemo.data.layout import PackedBatch
from wrpo_nemo.training.engine import reduce_metrics, run_schedule, train_step
from wrpo_nemo.training.stages import Stage
from wrpo_nemo.training.step import make_forward_step


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Callback(Protocol):
    def __call__(self, loop: TrainLoop, metrics: dict[str, float]) -> bool | None:
        """Called after every optimizer step; returning True stops the loop."""


class Throughput:
    """Tokens/s and step time of every step; model TFLOP/s and MFU per GPU on GPUs.

    ``flops_per_token``: training FLOPs per real token (``outputs.model_flops_per_token``); an online
    reference adds one forward, a third of a training step's FLOPs.
    """

    def __init__(self, flops_per_token: float, online_reference: bool = False) -> None:
        self.flops_per_token = flops_per_token * (4.0 / 3.0 if online_reference else 1.0)

    def __call__(self, micro_batches: list[PackedBatch], seconds: float) -> dict[str, float]:
        from megatron.core import parallel_state

        local = sum(int((b.segment_ids >= 0).sum()) for b in micro_batches)
        tokens = torch.tensor([float(local)], device=compat.device())
        dist.all_reduce(tokens, group=parallel_state.get_data_parallel_group())
        result = {"tokens_per_s": float(tokens.item()) / seconds, "step_time_s": seconds}
        if compat.runtime().cuda:
            per_gpu = float(tokens.item()) * self.flops_per_token / seconds / dist.get_world_size() / 1e12
            peak = compat.peak_bf16_tflops()
            result["tflops_per_gpu"] = per_gpu
            if peak:
                result["mfu"] = per_gpu / peak
        return result


class TrainLoop:
    """Optimizer steps of one stage: next global batch -> stage settings -> forward/backward -> optimizer.

    ``step`` counts completed optimizer steps; ``total_steps`` is the length of the run the LR schedule and
    alpha_t span. The loop's own checkpoint state is the step, the total and the LR schedule.
    """

    def __init__(
        self,
        model,
        optimizer,
        scheduler,
        loader,
        stage: Stage,
        *,
        device: torch.device,
        total_steps: int,
        throughput: Throughput | None = None,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.loader, self.stage, self.device = loader, stage, device
        self.total_steps, self.throughput = total_steps, throughput
        self.step = 0
        self.last_batches: list[PackedBatch] = []

    def train_step(self) -> dict[str, float]:
        """One optimizer step on the loader's next global batch; returns its metrics (the same on every rank):
        the stage's loss metrics, ``grad_norm``, ``lr`` and, with a :class:`Throughput`, its figures."""
        start = time.perf_counter()
        batches = self.loader.next_global_batch()
        self.stage.begin_step(self.step, self.total_steps)
        self.stage.prepare(batches)
        forward_step = make_forward_step(self.stage.loss_func, self.device)
        metrics = train_step(self.model, self.optimizer, self.scheduler, forward_step, batches)
        self.step += 1
        self.last_batches = batches
        if self.throughput is not None:
            metrics.update(self.throughput(batches, time.perf_counter() - start))
        return metrics

    def run(self, callbacks: Iterable[Callback] = (), until: int | None = None) -> bool:
        """Train until ``until`` (default: ``total_steps``) completed steps; after each step every callback
        sees the loop and the step's metrics, in order. Returns True when a callback stopped the loop."""
        until = self.total_steps if until is None else until
        callbacks = list(callbacks)
        while self.step < until:
            metrics = self.train_step()
            for callback in callbacks:
                if callback(self, metrics):
                    return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "total_steps": self.total_steps, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.scheduler.load_state_dict(state["scheduler"])


class Evaluator:
    """Forward-only loss and metrics of a stage on a fixed set of held-out micro-batches.

    ``batches``: the held-out global batch (this rank's micro-batches), built once; every evaluation runs the
    same prompts with the stage's current settings (alpha_t of the last training step).
    """

    def __init__(self, batches: list[PackedBatch], stage: Stage, device: torch.device) -> None:
        self.batches, self.stage, self.device = batches, stage, device

    def __call__(self, model) -> dict[str, float]:
        if not self.batches:
            return {}
        self.stage.prepare(self.batches)
        forward_step = make_forward_step(self.stage.loss_func, self.device)
        model.eval()
        try:
            with torch.no_grad():
                outputs = run_schedule(model, forward_step, self.batches, forward_only=True)
        finally:
            model.train()
        return reduce_metrics(outputs)


def collect_state(components: dict[str, Stateful | None]) -> dict[str, Any]:
    """The trainer state of a checkpoint: each component's ``state_dict``.

    Components named ``""`` contribute their keys at the top level (the loop: ``step``, ``total_steps``,
    ``scheduler``; the stage: ``reference``); the others under their own name (``data``: the loader)."""
    state: dict[str, Any] = {}
    for name, component in components.items():
        if component is None:
            continue
        if name:
            state[name] = component.state_dict()
        else:
            state.update(component.state_dict())
    return state


def restore_state(components: dict[str, Stateful | None], state: dict[str, Any]) -> None:
    """Hand each component its part of a checkpoint's trainer state (see :func:`collect_state`)."""
    for name, component in components.items():
        if component is not None:
            component.load_state_dict(state if not name else state[name])


def every(interval: int, action: Callable[[TrainLoop, dict[str, float]], Any]):
    """A callback running ``action`` every ``interval`` steps (never when ``interval`` is 0), except at the loop's
    last step (the recipe does its final evaluation and save itself)."""

    def callback(loop: TrainLoop, metrics: dict[str, float]) -> None:
        if interval and loop.step % interval == 0 and loop.step < loop.total_steps:
            action(loop, metrics)

    return callback
