"""One stage of a configured run, from its start weights to its final checkpoint.

:class:`StageRunner` turns the run config into the training layer's parts: the model loaded from its start (a
model checkpoint, or a random initialisation), the :mod:`~wrpo_nemo.training.stages` object (with WRPO's
reference log-probs), the loader, megatron's optimizer and schedule, the :class:`~wrpo_nemo.training.loop.
TrainLoop`, the evaluator and the checkpoint components. It then runs the loop with the run's callbacks
(logging, periodic evaluation, preemption, periodic checkpoints), evaluates and saves at the end.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from wrpo_nemo.checkpoint.model import load_model_checkpoint
from wrpo_nemo.data.loader import PackedBatchLoader
from wrpo_nemo.errors import InputError
from wrpo_nemo.training import checkpoint as ckpt
from wrpo_nemo.training import plan
from wrpo_nemo.training.config import ConfigError, RunConfig, StageSection
from wrpo_nemo.training.engine import build_model, build_optimizer, for_forward, wrap_ddp
from wrpo_nemo.training.loop import Evaluator, Throughput, TrainLoop, collect_state, every, restore_state
from wrpo_nemo.training.outputs import MetricsLogger, model_flops_per_token
from wrpo_nemo.training.plan import StagePlan
from wrpo_nemo.training.preemption import LeadTimeCheck, Preemption, lead_time_from_env
from wrpo_nemo.training.reference import precomputed_reference
from wrpo_nemo.training.setup import RunInputs
from wrpo_nemo.training.stages import Reference, SFTStage, Stage, WRPOStage


@dataclass
class StageResult:
    """What one stage leaves behind."""

    checkpoint: str
    steps: int
    final_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    reference: str | None = None
    """How WRPO's reference log-probs were obtained: loaded, computed (precompute) or online."""
    preempted: bool = False


@dataclass(frozen=True)
class StartWeights:
    """Where a stage's weights come from: a model checkpoint, or (``checkpoint=None``) a random initialisation
    seeded by the run's seed. ``identity`` names them in the reference log-prob store's key."""

    checkpoint: str | None
    identity: str


def build_start_model(cfg: RunConfig, inputs: RunInputs, start: StartWeights, precision: str | None = None):
    """This stage's model, loaded from its start; ``precision`` overrides ``model.precision`` (a bf16 reference
    copy)."""
    torch.manual_seed(cfg.seed)
    model = build_model(
        inputs.model_cfg,
        precision=precision or cfg.model.precision,
        fp8=cfg.model.fp8,
        recompute=cfg.model.recompute,
    )
    if start.checkpoint is not None:
        load_model_checkpoint(model, start.checkpoint)
    return model


def build_loader(
    cfg: RunConfig,
    stage: str,
    inputs: RunInputs,
    indices,
    dp: int,
    *,
    global_batch_size: int,
    micro_batch_size: int,
    rows_per_micro_batch: int | None = None,
    epochs: int = 1,
    reference=None,
) -> PackedBatchLoader:
    """This rank's loader over ``indices`` (``micro_batch_size`` prompts per micro-batch)."""
    from megatron.core import parallel_state

    return PackedBatchLoader(
        inputs.dataset,
        indices,
        stage=stage,
        seq_length=cfg.data.source.tokenize.seq_length,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=dp,
        seed=cfg.seed,
        pad_id=inputs.tokenizer.pad_token_id,
        rows_per_micro_batch=rows_per_micro_batch,
        reference_logps=reference,
        plan_epochs=epochs,
        layout=cfg.data.layout,
    )


def build_reference(cfg: RunConfig, inputs: RunInputs, start: StartWeights, policy, device) -> Reference:
    """WRPO's reference: stored log-probs (loaded, or computed by the frozen start model and stored), the
    frozen model itself (``online``), or none (SimPO). A bf16 reference runs a bf16 copy of the start weights
    whatever the policy's precision; the store's key includes the dtype."""
    if cfg.wrpo.loss.preference == "simpo" and cfg.wrpo.reference != "online":
        return Reference("none (simpo is reference-free)")
    bf16 = cfg.wrpo.reference_precision == "bf16"
    frozen = None
    if cfg.wrpo.reference == "online" or (bf16 and policy.config.params_dtype != torch.bfloat16):
        reference_model = build_start_model(cfg, inputs, start, "bf16" if bf16 else None)
        reference_model.requires_grad_(False)
        frozen = for_forward(reference_model)
    suffix = " (bf16)" if bf16 else ""
    if cfg.wrpo.reference == "online":
        return Reference("online" + suffix, model=frozen)
    model = frozen if frozen is not None else policy
    dtype = str(model.config.params_dtype)
    logps, how = precomputed_reference(
        model,
        inputs.dataset,
        np.union1d(inputs.splits["wrpo"], inputs.splits["eval"]),
        f"{start.identity}|{dtype}|{inputs.dataset.key}",
        micro_batch_size=cfg.wrpo.micro_batch_size,
        seq_length=cfg.data.source.tokenize.seq_length,
        pad_id=inputs.tokenizer.pad_token_id,
        device=device,
        vocab_size=inputs.model_cfg.vocab_size,
        layout=cfg.data.layout,
    )
    return Reference(how + suffix, logps=logps)


def build_stage(cfg: RunConfig, name: str, inputs: RunInputs, start: StartWeights, policy, device) -> Stage:
    vocab = inputs.model_cfg.vocab_size
    if name == "sft":
        return SFTStage(vocab)
    reference = build_reference(cfg, inputs, start, policy, device)
    return WRPOStage(vocab, cfg.wrpo.loss, cfg.wrpo.alpha, reference, device)


def build_evaluator(cfg: RunConfig, section: StageSection, stage: Stage, inputs: RunInputs, dp, device):
    """The held-out evaluation: up to ``logging.eval_prompts`` eval-split prompts, a whole number of passes of
    ``micro_batch_size`` x data-parallel size."""
    per_pass = section.micro_batch_size * dp
    count = min(cfg.logging.eval_prompts, len(inputs.splits["eval"])) // per_pass * per_pass
    if count == 0:
        return Evaluator([], stage, device)
    logps = stage.reference.logps if stage.reference else None
    loader = build_loader(
        cfg, stage.name, inputs, inputs.splits["eval"][:count], dp,
        global_batch_size=count, micro_batch_size=section.micro_batch_size, reference=logps,
    )  # fmt: skip
    return Evaluator(loader.next_global_batch(), stage, device)


def _extended(done: dict, section: StageSection, stage: str) -> bool:
    """Whether a finished stage's checkpoint is now planned to go on (a larger max_steps or more epochs); a
    plan shorter than the steps it completed is refused (:func:`plan.reconcile`)."""
    saved = done.get("plan")
    if saved is None:
        return False
    new = StagePlan(saved["steps_per_epoch"], section.epochs, section.max_steps, section.optim)
    plan.reconcile(None, new, done["step"], stage)
    return new.total_steps > done["step"]


class StageRunner:
    """The parts of one configured stage; :meth:`run` trains it to its end or to a preemption."""

    def __init__(self, cfg: RunConfig, name: str, inputs: RunInputs, start: StartWeights, dp: int, device):
        self.cfg, self.name, self.inputs = cfg, name, inputs
        section: StageSection = getattr(cfg, name)
        self.stage_dir = Path(cfg.run_dir) / name
        # self.model holds the weights (checkpoints read and write it); self.ddp is what the schedules run.
        self.model = build_start_model(cfg, inputs, start)
        self.ddp = wrap_ddp(self.model)
        self.stage = build_stage(cfg, name, inputs, start, self.ddp, device)
        reference = self.stage.reference
        logps = reference.logps if reference else None
        self.loader = build_loader(
            cfg, name, inputs, inputs.splits[name], dp,
            global_batch_size=section.global_batch_size, micro_batch_size=section.micro_batch_size,
            rows_per_micro_batch=section.rows_per_micro_batch, epochs=section.epochs, reference=logps,
        )  # fmt: skip
        self.plan = StagePlan(self.loader.steps_per_epoch, section.epochs, section.max_steps, section.optim)
        total = self.plan.total_steps
        self.optimizer, scheduler = build_optimizer(self.ddp, section.optim, total)
        online = reference is not None and reference.model is not None
        throughput = Throughput(
            model_flops_per_token(inputs.model_cfg, cfg.data.source.tokenize.max_length / 2), online
        )
        self.loop = TrainLoop(
            self.ddp, self.optimizer, scheduler, self.loader, self.stage,
            device=device, total_steps=total, throughput=throughput,
        )  # fmt: skip
        self.evaluate = build_evaluator(cfg, section, self.stage, inputs, dp, device)
        self.dp = dp
        self.metrics: dict[str, float] = {}
        self.save_seconds: list[float] = []
        self.lead_time = LeadTimeCheck(lead_time_from_env())
        self.logger: MetricsLogger | None = None
        self.async_saves = ckpt.AsyncSaves() if cfg.checkpoint.async_save else None
        if dist.get_rank() == 0:
            for stale in ckpt.remove_stale_partials(self.stage_dir):
                print(f"[{name}] removed {stale}, left by an interrupted save", flush=True)

    def resume_from(self, path: Path) -> None:
        """Continue from a training checkpoint: weights, optimizer, data position and RNG as saved; the plan
        (length, optimizer settings) as configured where it may change (:mod:`wrpo_nemo.training.plan`)."""
        state = ckpt.load_training_checkpoint(path, self.model, self.optimizer)
        try:
            restore_state(self._stateful(), state)
        except ValueError as exc:  # the data settings changed since the checkpoint: a config error (exit 2)
            raise ConfigError(f"cannot resume {path}: {exc}") from None
        changes = plan.reconcile(state.get("plan"), self.plan, self.loop.step, self.name)
        plan.apply(self.plan, self.optimizer, self.loop.scheduler)
        self.loop.total_steps = self.plan.total_steps
        if changes and dist.get_rank() == 0:
            for line in changes:
                print(f"[{self.name}] resume with a changed plan: {line}", flush=True)

    def _stateful(self) -> dict[str, Any]:
        return {"": self.loop, "data": self.loader}

    def save(self, finished: bool, background: bool = False) -> str:
        """Save a training checkpoint (collective). Its blocking time is printed and logged as
        ``checkpoint_save_s`` (the preemption lead time must cover one step plus one save: checked against
        ``WRPO_SIGNAL_LEAD_S``); with ``background`` (``checkpoint.async_save``) the tensors are written while
        training goes on and the checkpoint is published later (:meth:`_poll_saves`), whose time to publish
        stands for the synchronous save a preemption makes."""
        state = {
            **collect_state(self._stateful()),
            **self.stage.state_dict(),
            "finished": finished,
            "final_metrics": self.metrics,
            "plan": self.plan.to_dict(),
        }
        async_saves = self.async_saves if background else None
        if async_saves is None and self.async_saves is not None:
            self._poll_saves(blocking=True)  # a synchronous save comes after the one in flight
        start = time.perf_counter()
        path = ckpt.save_training_checkpoint(
            self.stage_dir, self.loop.step, self.model, self.optimizer, state, self.inputs.model_cfg,
            keep_last=self.cfg.checkpoint.keep_last, hf_assets=self.inputs.hf_assets, async_saves=async_saves,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        self.save_seconds.append(seconds)
        if self.logger is not None:
            self.logger.log(self.loop.step, {"checkpoint_save_s": seconds}, split="checkpoint")
        how = "started in the background after" if async_saves is not None else "saved in"
        _report(f"[{self.name}] checkpoint {path.name} {how} {seconds:.1f} s")
        if async_saves is None:
            self._check_lead_time(save_s=seconds)
        return str(path)

    def _check_lead_time(self, step_s: float | None = None, save_s: float | None = None) -> None:
        """Warn (once, rank 0) when one step plus one save outlasts the preemption lead time."""
        warning = self.lead_time.observe(step_s=step_s, save_s=save_s)
        if warning is not None and dist.get_rank() == 0:
            print(f"[{self.name}] warning: {warning}", file=sys.stderr, flush=True)

    def _poll_saves(self, blocking: bool = False) -> None:
        """Publish a background save whose write has finished (collective)."""
        if self.async_saves is None:
            return
        self.async_saves.poll(blocking=blocking)
        for path, seconds in self.async_saves.published:
            _report(
                f"[{self.name}] checkpoint {path.name} written in the background and published after {seconds:.1f} s"
            )
            if self.logger is not None:
                self.logger.log(
                    int(path.name.split("_")[-1]), {"checkpoint_async_s": seconds}, split="checkpoint"
                )
            self._check_lead_time(save_s=seconds)
        self.async_saves.published.clear()

    def announce(self) -> None:
        if dist.get_rank() == 0:
            from wrpo_nemo.data.packing import effective_layout
            from wrpo_nemo.models.builder import use_transformer_engine

            mode = self.stage.reference.mode if self.stage.reference else None
            layout = effective_layout(self.name, self.cfg.data.layout)
            attention = (
                "TransformerEngine (THD)" if use_transformer_engine() else "per-span SDPA (local layers)"
            )
            dtype = str(self.model.config.params_dtype).removeprefix("torch.")
            print(
                f"[{self.name}] {self.loop.total_steps} optimizer steps, {self.loader.rows_per_micro_batch} rows "
                f"x {self.cfg.data.source.tokenize.seq_length} tokens per micro-batch, data-parallel {self.dp}; "
                f"{layout} layout, attention {attention}, {dtype}; reference log-probs: {mode or 'n/a'}; "
                f"starting at step {self.loop.step}",
                flush=True,
            )

    def run(self, preemption: Preemption) -> StageResult:
        self.announce()
        log = self.cfg.logging
        logger = MetricsLogger(
            self.stage_dir, self.name, self.loop.total_steps, enabled=dist.get_rank() == 0,
            log_interval=log.log_interval, tensorboard=log.tensorboard, wandb_project=log.wandb_project,
            run_name=Path(self.cfg.run_dir).name, start_step=self.loop.step, config=asdict(self.cfg),
        )  # fmt: skip
        self.logger = logger

        def record(loop: TrainLoop, metrics: dict[str, float]) -> None:
            self.metrics = metrics
            logger.log(loop.step, metrics)
            self._check_lead_time(step_s=metrics.get("step_time_s"))

        def evaluate(loop: TrainLoop, _) -> None:
            logger.log(loop.step, self.evaluate(self.ddp), split="eval")

        background = self.async_saves is not None
        callbacks = [
            record,
            lambda loop, _: self._poll_saves(),
            every(log.eval_interval, evaluate),
            lambda loop, _: preemption.agreed(),
            every(
                self.cfg.checkpoint.save_interval,
                lambda loop, _: self.save(finished=False, background=background),
            ),
        ]
        try:
            preempted = self.loop.run(callbacks)
        finally:  # a background save always finishes (and is published) before the stage ends
            self._poll_saves(blocking=True)
        eval_metrics = {} if preempted else self.evaluate(self.ddp)
        if eval_metrics:
            logger.log(self.loop.step, eval_metrics, split="eval")
        path = self.save(finished=not preempted)
        logger.close()
        mode = self.stage.reference.mode if self.stage.reference else None
        return StageResult(path, self.loop.step, self.metrics, eval_metrics, mode, preempted)


def _report(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def run_stage(
    cfg: RunConfig, stage: str, inputs: RunInputs, start: StartWeights, dp: int, device, preemption
) -> StageResult:
    """Train one stage to its end (or to a preemption); a finished stage on resume is only reported.

    With ``checkpoint.resume`` the newest checkpoint that verifies and loads is used: a damaged one (a file
    missing or shorter than the checkpoint's index says, a truncated ``common.pt``, a failing load) is
    reported, naming the file, and the previous complete one is tried.
    """
    candidates = ckpt.list_checkpoints(Path(cfg.run_dir) / stage)[::-1] if cfg.checkpoint.resume else []
    runner, problems = None, []
    for path in candidates:
        try:
            if (problem := ckpt.damage(path)) is not None:
                raise problem
            done = ckpt.read_trainer_state(path)
            if done.get("finished") and not _extended(done, getattr(cfg, stage), stage):
                return StageResult(
                    str(path), done["step"], done.get("final_metrics", {}), reference=done.get("reference")
                )
            runner = runner or StageRunner(cfg, stage, inputs, start, dp, device)
            runner.resume_from(path)
        except InputError as exc:
            problems.append(f"{path.name}: {exc}")
            _report(f"[{stage}] checkpoint {path} cannot be resumed from: {exc}; trying the previous one")
            continue
        return runner.run(preemption)
    if candidates:
        raise InputError(
            ckpt.checkpoint_root(Path(cfg.run_dir) / stage),
            "no checkpoint of this stage can be resumed from ("
            + "; ".join(problems)
            + "): remove them or set "
            "checkpoint.resume=false to start the stage again",
        )
    return StageRunner(cfg, stage, inputs, start, dp, device).run(preemption)
