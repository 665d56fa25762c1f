"""The two-stage pipeline of WRPO.md: SFT on y_ws, then WRPO, then the Hugging Face export.

Each stage builds its model from the previous stage's final checkpoint (the start weights for the first),
so stage boundaries are checkpoints and a resumed run skips finished stages.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import asdict, dataclass, field
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
from wrpo_nemo.training.config import RunConfig, StageSection
from wrpo_nemo.training.engine import (
    build_model,
    build_optimizer,
    reduce_metrics,
    run_schedule,
    train_step,
    wrap_ddp,
)
from wrpo_nemo.training.outputs import MetricsLogger, model_flops_per_token, plot_metrics
from wrpo_nemo.training.parallel import destroy_parallel, initialize_parallel
from wrpo_nemo.training.reference import attach_online_reference, precomputed_reference
from wrpo_nemo.training.setup import (
    RunInputs,
    load_tokenizer,
    prepare_dataset,
    resolve_model_config,
    validate_layout,
    world_size,
)
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


class _Preemption:
    """SIGTERM/SIGUSR1 (Slurm's warning) set a flag; the loop saves and stops at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        # On the compute device: NCCL reduces CUDA tensors only.
        flag = torch.tensor([1.0 if self.requested else 0.0], device=compat.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _start_weights(cfg: RunConfig, stage: str, previous: str | None, inputs: RunInputs) -> tuple[Any, str]:
    """This stage's model, loaded from where it starts; returns ``(model, identity of the start)``."""
    from wrpo_nemo.converters.checkpoint_io import load_model_checkpoint
    from wrpo_nemo.converters.hf_import import load_hf_weights

    torch.manual_seed(cfg.seed)
    model = build_model(
        inputs.model_cfg, precision=cfg.model.precision, fp8=cfg.model.fp8, recompute=cfg.model.recompute
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


def run_stage(
    cfg: RunConfig, stage: str, inputs: RunInputs, previous: str | None, dp: int, device, preemption
):
    """Train one stage to its end (or to a preemption); returns where its final checkpoint is."""
    from megatron.core import parallel_state

    section, stage_dir = getattr(cfg, stage), Path(cfg.run_dir) / stage
    latest = ckpt.latest_checkpoint(stage_dir) if cfg.checkpoint.resume else None
    if (done := _finished(latest)) is not None:
        return StageResult(
            str(latest), done["step"], done.get("final_metrics", {}), reference=done.get("reference")
        )
    model, identity = _start_weights(cfg, stage, previous, inputs)
    reference, ref_mode, ref_model = None, None, None
    if stage == "wrpo":
        reference, ref_mode = _reference_for(cfg, inputs, model, identity, dp, device)
        if cfg.wrpo.reference == "online":
            ref_model, _ = _start_weights(cfg, stage, previous, inputs)
            ref_model.requires_grad_(False)
    loader = _loader(cfg, section, stage, inputs, inputs.splits[stage], dp, reference)
    total = loader.steps_per_epoch * section.epochs
    total = min(total, section.max_steps) if section.max_steps else total
    ddp = wrap_ddp(model)
    optimizer, scheduler = build_optimizer(ddp, section.optim, total)
    step = 0
    if latest is not None:
        state = ckpt.load_training_checkpoint(latest, model, optimizer)
        step = state["step"]
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["data"])
    rank0 = dist.get_rank() == 0
    if rank0:
        print(f"[{stage}] {total} optimizer steps, {loader.rows_per_micro_batch} rows x "
              f"{cfg.data.source.tokenize.seq_length} tokens per micro-batch, data-parallel {dp}; "
              f"reference log-probs: {ref_mode or 'n/a'}; starting at step {step}", flush=True)  # fmt: skip
    logger = MetricsLogger(
        stage_dir, stage, total, enabled=rank0, log_interval=cfg.logging.log_interval,
        tensorboard=cfg.logging.tensorboard, wandb_project=cfg.logging.wandb_project, run_name=Path(cfg.run_dir).name,
    )  # fmt: skip
    flops_per_token = model_flops_per_token(inputs.model_cfg, cfg.data.source.tokenize.max_length / 2)
    metrics: dict[str, float] = {}
    preempted = False

    def save(finished: bool) -> str:
        state = {"step": step, "total_steps": total, "scheduler": scheduler.state_dict(), "data": loader.state_dict(),
                 "finished": finished, "reference": ref_mode, "final_metrics": metrics}  # fmt: skip
        return str(ckpt.save_training_checkpoint(stage_dir, step, model, optimizer, state, inputs.model_cfg,
                                                 keep_last=cfg.checkpoint.keep_last, hf_assets=inputs.hf_assets))  # fmt: skip

    while step < total:
        start = time.perf_counter()
        batches = loader.next_global_batch()
        if ref_model is not None:
            attach_online_reference(ref_model, batches, device, inputs.model_cfg.vocab_size)
        alpha = alpha_at(step, total, cfg.wrpo.alpha) if stage == "wrpo" else 0.0
        forward_step = make_forward_step(
            _loss_builder(cfg, stage, alpha, inputs.model_cfg.vocab_size), device
        )
        metrics = train_step(ddp, optimizer, scheduler, forward_step, batches)
        step += 1
        seconds = time.perf_counter() - start
        tokens = _step_tokens(batches, parallel_state.get_data_parallel_group())
        metrics.update(tokens_per_s=tokens / seconds, step_time_s=seconds)
        metrics.update(_gpu_throughput(tokens, seconds, flops_per_token, ref_model is not None))
        logger.log(step, metrics)
        if cfg.logging.eval_interval and step % cfg.logging.eval_interval == 0 and step < total:
            logger.log(
                step,
                _evaluate(cfg, stage, inputs, model, dp, device, reference, alpha, ref_model),
                split="eval",
            )
        preempted = preemption.agreed()
        if (
            preempted
            or step == total
            or (cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0)
        ):
            if step == total or preempted:
                break
            save(finished=False)
    eval_metrics = (
        {} if preempted else _evaluate(cfg, stage, inputs, model, dp, device, reference, alpha, ref_model)
    )
    if eval_metrics:
        logger.log(step, eval_metrics, split="eval")
    path = save(finished=not preempted)
    logger.close()
    return StageResult(path, step, metrics, eval_metrics, ref_mode, preempted)


def _gpu_throughput(tokens: float, seconds: float, flops_per_token: float, online_reference: bool) -> dict:
    """Model TFLOP/s and MFU per GPU on GPUs (the online reference adds one forward, a third of training)."""
    if not compat.cuda_available():
        return {}
    flops = tokens * flops_per_token * (4.0 / 3.0 if online_reference else 1.0)
    per_gpu = flops / seconds / dist.get_world_size() / 1e12
    peak = compat.peak_bf16_tflops()
    return {"tflops_per_gpu": per_gpu, **({"mfu": per_gpu / peak} if peak else {})}


def _export(cfg: RunConfig, stage: str, checkpoint: str) -> str | None:
    if not cfg.export.hf or dist.get_rank() != 0:
        return None
    from wrpo_nemo.converters.hf_export import export_hf

    out = Path(cfg.run_dir) / stage / "hf"
    export_hf(checkpoint, out, dtype=getattr(torch, cfg.export.dtype), overwrite=True)
    print(f"[{stage}] exported Hugging Face model to {out}", flush=True)
    return str(out)


def run(cfg: RunConfig) -> dict[str, StageResult]:
    """Run the configured stages; returns each stage's result (identical on every rank)."""
    tokenizer, tokenizer_dir = load_tokenizer(cfg)
    model_cfg = resolve_model_config(cfg, tokenizer)
    dp = validate_layout(cfg, model_cfg, world_size())
    device = initialize_parallel(
        cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.context, seed=cfg.seed
    )
    try:
        dataset = prepare_dataset(cfg, tokenizer)
        from wrpo_nemo.data.splits import split_indices

        splits = {n: split_indices(dataset.prompt_ids, n, cfg.data.split) for n in ("sft", "wrpo", "eval")}
        inputs = RunInputs(model_cfg, tokenizer, dataset, splits, cfg.model.hf_path or tokenizer_dir)
        if dist.get_rank() == 0:
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.run_dir) / "run_config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
            print(f"data: {len(dataset)} prompts -> sft {len(splits['sft'])}, wrpo {len(splits['wrpo'])}, "
                  f"eval {len(splits['eval'])}; report {dataset.path}/report.json", flush=True)  # fmt: skip
        preemption, previous, results = _Preemption(), None, {}
        for stage in cfg.stages:
            result = run_stage(cfg, stage, inputs, previous, dp, device, preemption)
            results[stage] = result
            if result.preempted:
                break
            previous = result.checkpoint
            exported = _export(cfg, stage, previous)
            if exported and cfg.data.toy:
                from wrpo_nemo.training.toy_eval import toy_accuracy

                result.eval_metrics["toy_accuracy"] = toy_accuracy(exported, dataset, splits["eval"])
                print(f"[{stage}] toy task accuracy on {len(splits['eval'])} held-out prompts: "
                      f"{result.eval_metrics['toy_accuracy']:.3f}", flush=True)  # fmt: skip
        dist.barrier()
        if dist.get_rank() == 0:
            if cfg.logging.plots:
                plot_metrics(Path(cfg.run_dir), list(results))
            summary = {k: asdict(v) for k, v in results.items()}
            (Path(cfg.run_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
        return results
    finally:
        destroy_parallel()
