"""One training stage (SFT or WRPO) from its start weights to its final checkpoint.

A stage builds its model from where it starts (the previous stage's final checkpoint, a checkpoint, a
Hugging Face folder or a random initialisation), gets WRPO's reference log-probs, trains through megatron's
schedules with alpha_t from the optimizer step, evaluates, checkpoints, and stops cleanly on preemption.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from wrpo_nemo import compat
from wrpo_nemo.alpha import alpha_at
from wrpo_nemo.data.loader import PackedBatchLoader
from wrpo_nemo.training import checkpoint as ckpt
from wrpo_nemo.training.config import ConfigError, RunConfig, StageSection
from wrpo_nemo.training.engine import (
    build_model,
    build_optimizer,
    for_forward,
    reduce_metrics,
    run_schedule,
    train_step,
    wrap_ddp,
)
from wrpo_nemo.training.outputs import MetricsLogger, model_flops_per_token
from wrpo_nemo.training.reference import attach_online_reference, precomputed_reference
from wrpo_nemo.training.setup import RunInputs
from wrpo_nemo.training.step import make_forward_step, sft_loss_func, wrpo_loss_func


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


class Preemption:
    """SIGTERM/SIGUSR1 (Slurm's warning) set a flag; the loop saves and stops at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        # Slurm may signal every process of the step and a launcher forward it again: one is enough, and a
        # later one arriving during shutdown must not kill the process with the default action.
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)

    def agreed(self) -> bool:
        # On the compute device: NCCL reduces CUDA tensors only.
        flag = torch.tensor([1.0 if self.requested else 0.0], device=compat.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _start_weights(
    cfg: RunConfig, stage: str, previous: str | None, inputs: RunInputs, precision: str | None = None
) -> tuple[Any, str]:
    """This stage's model, loaded from where it starts; returns ``(model, identity of the start)``.

    ``precision`` overrides ``model.precision`` (a bf16 reference copy)."""
    from wrpo_nemo.converters.checkpoint_io import load_model_checkpoint
    from wrpo_nemo.converters.hf_import import load_hf_weights

    torch.manual_seed(cfg.seed)
    model = build_model(
        inputs.model_cfg,
        precision=precision or cfg.model.precision,
        fp8=cfg.model.fp8,
        recompute=cfg.model.recompute,
    )
    if previous is not None:
        load_model_checkpoint(model, previous)
        return model, f"checkpoint:{Path(previous).resolve()}"
    if cfg.model.checkpoint:
        load_model_checkpoint(model, cfg.model.checkpoint)
        return model, f"checkpoint:{Path(cfg.model.checkpoint).resolve()}"
    if cfg.model.hf_path:
        load_hf_weights(model, cfg.model.hf_path, Path(cfg.run_dir) / "imported_hf")
        return model, f"hf:{Path(cfg.model.hf_path).resolve()}"
    return model, f"random:seed={cfg.seed}:{json.dumps(inputs.model_cfg.to_dict(), sort_keys=True)}"


def _loader(
    cfg: RunConfig, section: StageSection, stage: str, inputs: RunInputs, indices, dp, reference=None
):
    from megatron.core import parallel_state

    return PackedBatchLoader(
        inputs.dataset,
        indices,
        stage=stage,
        seq_length=cfg.data.source.tokenize.seq_length,
        global_batch_size=section.global_batch_size,
        micro_batch_size=section.micro_batch_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=dp,
        seed=cfg.seed,
        pad_id=inputs.tokenizer.pad_token_id,
        rows_per_micro_batch=section.rows_per_micro_batch,
        reference_logps=reference,
        plan_epochs=section.epochs,
        layout=cfg.data.layout,
    )


def _loss_builder(cfg: RunConfig, stage: str, alpha: float, vocab_size: int):
    if stage == "sft":
        return lambda batch: partial(sft_loss_func, batch, vocab_size)
    return lambda batch: partial(wrpo_loss_func, batch, alpha, cfg.wrpo.loss, vocab_size)


def _evaluate(cfg, stage, inputs, model, dp, device, reference, alpha, ref_model=None) -> dict[str, float]:
    """Forward-only loss and metrics on (up to ``logging.eval_prompts``) held-out prompts."""
    section = getattr(cfg, stage)
    per_pass = section.micro_batch_size * dp
    count = min(cfg.logging.eval_prompts, len(inputs.splits["eval"])) // per_pass * per_pass
    if count == 0:
        return {}
    eval_section = StageSection(global_batch_size=count, micro_batch_size=section.micro_batch_size)
    loader = _loader(cfg, eval_section, stage, inputs, inputs.splits["eval"][:count], dp, reference)
    forward_step = make_forward_step(_loss_builder(cfg, stage, alpha, inputs.model_cfg.vocab_size), device)
    batches = loader.next_global_batch()
    if ref_model is not None:
        attach_online_reference(ref_model, batches, device, inputs.model_cfg.vocab_size)
    model.eval()
    with torch.no_grad():
        outputs = run_schedule(model, forward_step, batches, forward_only=True)
    model.train()
    return reduce_metrics(outputs)


def _reference_for(cfg, inputs, model, identity, dp, device) -> tuple[np.ndarray | None, str]:
    if cfg.wrpo.reference == "online" or cfg.wrpo.loss.preference == "simpo":
        return None, "online" if cfg.wrpo.reference == "online" else "none (simpo is reference-free)"
    indices = np.union1d(inputs.splits["wrpo"], inputs.splits["eval"])
    key = f"{identity}|{inputs.dataset.key}"
    return precomputed_reference(
        model,
        inputs.dataset,
        indices,
        key,
        micro_batch_size=cfg.wrpo.micro_batch_size,
        seq_length=cfg.data.source.tokenize.seq_length,
        pad_id=inputs.tokenizer.pad_token_id,
        device=device,
        vocab_size=inputs.model_cfg.vocab_size,
        layout=cfg.data.layout,
    )


def _finished(latest: Path | None) -> dict | None:
    """The trainer state of ``latest`` when it marks a finished stage."""
    if latest is None:
        return None
    from megatron.core import dist_checkpointing

    from wrpo_nemo.converters.checkpoint_io import weights_dir

    state = dist_checkpointing.load_common_state_dict(str(weights_dir(latest)))[ckpt.TRAINER_KEY]
    return state if state.get("finished") else None


def _step_tokens(batches, dp_group) -> float:
    local = torch.tensor(
        [float(sum(int((b.segment_ids >= 0).sum()) for b in batches))], device=compat.device()
    )
    dist.all_reduce(local, group=dp_group)
    return float(local.item())


class StageRun:
    """The state of one stage while it trains; :meth:`run` is the loop."""

    def __init__(self, cfg: RunConfig, stage: str, inputs: RunInputs, previous: str | None, dp: int, device):
        self.cfg, self.stage, self.inputs, self.dp, self.device = cfg, stage, inputs, dp, device
        self.section: StageSection = getattr(cfg, stage)
        self.stage_dir = Path(cfg.run_dir) / stage
        self.vocab_size = inputs.model_cfg.vocab_size
        # self.model holds the weights (checkpoints read and write it); self.ddp is what the schedules run.
        self.model, identity = _start_weights(cfg, stage, previous, inputs)
        self.ddp = wrap_ddp(self.model)
        self.reference, self.ref_mode, self.ref_model = None, None, None
        if stage == "wrpo":
            self._setup_reference(previous, identity)
        self.loader = _loader(cfg, self.section, stage, inputs, inputs.splits[stage], dp, self.reference)
        total = self.loader.steps_per_epoch * self.section.epochs
        self.total = min(total, self.section.max_steps) if self.section.max_steps else total
        self.optimizer, self.scheduler = build_optimizer(self.ddp, self.section.optim, self.total)
        self.step, self.alpha = 0, 0.0
        self.metrics: dict[str, float] = {}
        self.flops_per_token = model_flops_per_token(
            inputs.model_cfg, cfg.data.source.tokenize.max_length / 2
        )

    def resume_from(self, path: Path) -> None:
        state = ckpt.load_training_checkpoint(path, self.model, self.optimizer)
        self.step = state["step"]
        self.scheduler.load_state_dict(state["scheduler"])
        try:
            self.loader.load_state_dict(state["data"])
        except ValueError as exc:  # the data settings changed since the checkpoint: a config error (exit 2)
            raise ConfigError(f"cannot resume {path}: {exc}") from None

    def save(self, finished: bool) -> str:
        state = {
            "step": self.step,
            "total_steps": self.total,
            "scheduler": self.scheduler.state_dict(),
            "data": self.loader.state_dict(),
            "finished": finished,
            "reference": self.ref_mode,
            "final_metrics": self.metrics,
        }
        path = ckpt.save_training_checkpoint(
            self.stage_dir, self.step, self.model, self.optimizer, state, self.inputs.model_cfg,
            keep_last=self.cfg.checkpoint.keep_last, hf_assets=self.inputs.hf_assets,
        )  # fmt: skip
        return str(path)

    def train_one_step(self) -> dict[str, float]:
        """One optimizer step on the next global batch; returns its metrics (identical on every rank)."""
        from megatron.core import parallel_state

        start = time.perf_counter()
        batches = self.loader.next_global_batch()
        if self.ref_model is not None:
            attach_online_reference(self.ref_model, batches, self.device, self.vocab_size)
        # alpha_t uses the steps completed before this update: exactly DPO on (y_wt, y_l) at the first.
        self.alpha = alpha_at(self.step, self.total, self.cfg.wrpo.alpha) if self.stage == "wrpo" else 0.0
        forward_step = make_forward_step(
            _loss_builder(self.cfg, self.stage, self.alpha, self.vocab_size), self.device
        )
        metrics = train_step(self.ddp, self.optimizer, self.scheduler, forward_step, batches)
        self.step += 1
        seconds = time.perf_counter() - start
        tokens = _step_tokens(batches, parallel_state.get_data_parallel_group())
        metrics.update(tokens_per_s=tokens / seconds, step_time_s=seconds)
        metrics.update(_gpu_throughput(tokens, seconds, self.flops_per_token, self.ref_model is not None))
        self.metrics = metrics
        return metrics

    def evaluate(self) -> dict[str, float]:
        return _evaluate(
            self.cfg, self.stage, self.inputs, self.ddp, self.dp, self.device, self.reference, self.alpha,
            self.ref_model,
        )  # fmt: skip

    def _setup_reference(self, previous: str | None, identity: str) -> None:
        """Stored (or computed and stored) reference log-probs, or the frozen model of the online mode; a bf16
        reference runs on its own bf16 copy of the starting weights."""
        cfg = self.cfg
        own_copy = cfg.wrpo.reference_precision == "bf16" and self.model.config.params_dtype != torch.bfloat16
        frozen = None
        if cfg.wrpo.reference == "online" or own_copy:
            precision = "bf16" if cfg.wrpo.reference_precision == "bf16" else None
            reference_model, _ = _start_weights(cfg, self.stage, previous, self.inputs, precision)
            reference_model.requires_grad_(False)
            frozen = for_forward(reference_model)
        dtype = str(frozen.config.params_dtype if frozen is not None else self.model.config.params_dtype)
        self.reference, self.ref_mode = _reference_for(
            cfg,
            self.inputs,
            frozen if frozen is not None else self.ddp,
            f"{identity}|{dtype}",
            self.dp,
            self.device,
        )
        self.ref_model = frozen if cfg.wrpo.reference == "online" else None
        if self.ref_mode and cfg.wrpo.reference_precision == "bf16":
            self.ref_mode += " (bf16)"

    def announce(self) -> None:
        if dist.get_rank() == 0:
            print(
                f"[{self.stage}] {self.total} optimizer steps, {self.loader.rows_per_micro_batch} rows x "
                f"{self.cfg.data.source.tokenize.seq_length} tokens per micro-batch, data-parallel {self.dp}; "
                f"reference log-probs: {self.ref_mode or 'n/a'}; starting at step {self.step}",
                flush=True,
            )

    def run(self, preemption: Preemption) -> StageResult:
        self.announce()
        log = self.cfg.logging
        logger = MetricsLogger(
            self.stage_dir, self.stage, self.total, enabled=dist.get_rank() == 0, log_interval=log.log_interval,
            tensorboard=log.tensorboard, wandb_project=log.wandb_project, run_name=Path(self.cfg.run_dir).name,
        )  # fmt: skip
        preempted = False
        while self.step < self.total:
            metrics = self.train_one_step()
            logger.log(self.step, metrics)
            if log.eval_interval and self.step % log.eval_interval == 0 and self.step < self.total:
                logger.log(self.step, self.evaluate(), split="eval")
            if preemption.agreed():
                preempted = True
                break
            interval = self.cfg.checkpoint.save_interval
            if interval and self.step % interval == 0 and self.step < self.total:
                self.save(finished=False)
        eval_metrics = {} if preempted else self.evaluate()
        if eval_metrics:
            logger.log(self.step, eval_metrics, split="eval")
        path = self.save(finished=not preempted)
        logger.close()
        return StageResult(path, self.step, self.metrics, eval_metrics, self.ref_mode, preempted)


def run_stage(
    cfg: RunConfig, stage: str, inputs: RunInputs, previous: str | None, dp: int, device, preemption
):
    """Train one stage to its end (or to a preemption); a finished stage on resume is only reported."""
    latest = ckpt.latest_checkpoint(Path(cfg.run_dir) / stage) if cfg.checkpoint.resume else None
    if (done := _finished(latest)) is not None:
        return StageResult(
            str(latest), done["step"], done.get("final_metrics", {}), reference=done.get("reference")
        )
    runner = StageRun(cfg, stage, inputs, previous, dp, device)
    if latest is not None:
        runner.resume_from(latest)
    return runner.run(preemption)


def _gpu_throughput(tokens: float, seconds: float, flops_per_token: float, online_reference: bool) -> dict:
    """Model TFLOP/s and MFU per GPU on GPUs (the online reference adds one forward, a third of training)."""
    if not compat.cuda_available():
        return {}
    flops = tokens * flops_per_token * (4.0 / 3.0 if online_reference else 1.0)
    per_gpu = flops / seconds / dist.get_world_size() / 1e12
    peak = compat.peak_bf16_tflops()
    return {"tflops_per_gpu": per_gpu, **({"mfu": per_gpu / peak} if peak else {})}
