"""Model, Megatron DDP, Megatron optimizer and LR schedule, and one optimizer step through megatron's schedules.

The same code runs on a GPU cluster and on a CPU machine; the differences live in ``wrpo_nemo.compat``
(the distributed optimizer, which needs CUDA tensors, is used on GPUs only).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from wrpo_nemo import compat
from wrpo_nemo.data.layout import PackedBatch
from wrpo_nemo.models.config import ModelConfig


@dataclass(frozen=True)
class OptimSettings:
    """Optimizer and learning-rate schedule of one stage (AdamW, cosine with linear warm-up)."""

    lr: float = 3e-7
    """Peak learning rate (7e-6 for the paper's SFT stage, 3e-7 for its WRPO stage)."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    warmup_ratio: float = 0.1
    """Fraction of the run's optimizer steps spent warming up linearly from 0."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold (0 disables clipping)."""


def build_model(
    model_cfg: ModelConfig, *, precision: str = "auto", fp8: str | None = None, recompute: str = "none"
):
    """This rank's GPTModel with the training-loop settings of its config applied."""
    from wrpo_nemo.models.builder import build_gpt_model

    model = build_gpt_model(model_cfg, precision=precision, fp8=fp8, recompute=recompute)
    config = model.config
    # Losses return (sum, count): megatron divides by the count over the whole global batch.
    config.calculate_per_token_loss = True
    compat.configure_model_parallel(config)
    return model


@functools.cache
def _half_precision_class():
    from megatron.core.transformer.module import Float16Module

    class HalfPrecisionModule(Float16Module):
        """megatron's Float16Module (every weight, norms included, in bf16/fp16; fp32 main copies live in
        the optimizer) that hands the logits on in model precision: the log-prob kernel reads them chunk by
        chunk in fp32, and a full fp32 copy of ``[tokens, vocab]`` is what it exists to avoid."""

        def forward(self, *inputs, **kwargs):
            return super().forward(*inputs, fp32_output=False, **kwargs)

    return HalfPrecisionModule


def for_forward(model):
    """The module the schedules run: ``model`` itself in fp32, wrapped in half precision for bf16/fp16.

    The wrapper shares (and casts in place) ``model``'s parameters, so checkpoints keep using ``model``.
    """
    config = model.config
    if config.bf16 or config.fp16:
        return _half_precision_class()(config, model)
    return model


def wrap_ddp(model):
    """Megatron DDP around :func:`for_forward`: gradients in a contiguous fp32 buffer, reduced across
    data-parallel ranks."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=compat.runtime().distributed_optimizer,
    )
    with compat.redirect_cuda_to_cpu():
        ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=for_forward(model))
    model.config.finalize_model_grads_func = finalize_model_grads
    return ddp


def build_optimizer(ddp_model, settings: OptimSettings, total_steps: int):
    """Megatron's optimizer (AdamW; distributed on GPUs) and its cosine LR schedule with warm-up."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = ddp_model.config
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        min_lr=settings.min_lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad,
        bf16=config.bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=compat.runtime().distributed_optimizer,
    )
    with compat.redirect_cuda_to_cpu():
        optimizer = get_megatron_optimizer(opt_config, [ddp_model])
    # HF's rounding (ceil); megatron needs at least one step after the warm-up, so very short runs get it.
    warmup = min(math.ceil(settings.warmup_ratio * total_steps), total_steps - 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=settings.lr,
        min_lr=settings.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=total_steps,
        lr_decay_style="cosine",
        start_wd=settings.weight_decay,
        end_wd=settings.weight_decay,
        wd_incr_steps=total_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def run_schedule(
    model,
    forward_step: Callable,
    micro_batches: list[PackedBatch],
    *,
    forward_only: bool,
) -> list[dict[str, Any]]:
    """One pass of megatron's forward/backward schedule (1F1B under pipeline parallelism).

    Returns the per-micro-batch metric dicts (non-empty only on the last pipeline stage).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    rows, seq_length = micro_batches[0].tokens.shape
    for batch in micro_batches:
        if tuple(batch.tokens.shape) != (rows, seq_length):
            raise ValueError("all micro-batches of a step must share one [rows, seq_length] shape")
    forward_backward = get_forward_backward_func()
    with compat.redirect_cuda_to_cpu():
        # The model runs each micro-batch as one THD sequence of rows * seq_length tokens (batch 1): that is
        # the activation shape pipeline stages exchange. megatron's ``micro_batch_size`` below is that batch
        # dimension (1), not the config's ``micro_batch_size``, which everywhere in wrpo_nemo counts prompts.
        return forward_backward(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[model],
            num_microbatches=len(micro_batches),
            seq_length=rows * seq_length,
            micro_batch_size=1,
            forward_only=forward_only,
        )


def train_step(
    ddp_model, optimizer, scheduler, forward_step: Callable, micro_batches: list[PackedBatch]
) -> dict:
    """Zero grads, forward/backward over the global batch's micro-batches, optimizer and LR step.

    Returns the reduced metrics (identical on every rank) plus ``grad_norm`` and ``lr``.
    """
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    lr = optimizer.param_groups[0]["lr"]
    outputs = run_schedule(ddp_model, forward_step, micro_batches, forward_only=False)
    with compat.redirect_cuda_to_cpu():
        success, grad_norm, _ = optimizer.step()
    if not success:
        raise FloatingPointError("the optimizer step was skipped: gradients overflowed (inf/nan)")
    scheduler.step(increment=1)
    metrics = reduce_metrics(outputs)
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["lr"] = lr
    return metrics


def reduce_metrics(outputs: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Average ``{name: [sum, count]}`` metric pairs over micro-batches and all ranks.

    Only the last pipeline stage holds metrics; only its tensor-parallel rank 0 contributes, so each
    data-parallel replica is counted once. Every rank returns the same numbers.
    """
    from megatron.core import parallel_state

    # Ranks off the last pipeline stage have no outputs: agree on the names before the collective.
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(outputs[0]) if outputs else [])
    names = next((n for n in gathered if n), [])
    totals = torch.zeros(len(names), 2, dtype=torch.float64)
    contributes = (
        parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    )
    if contributes:
        for out in outputs:
            for i, name in enumerate(names):
                totals[i] += out[name].detach().to(device="cpu", dtype=torch.float64)
    totals = totals.to(compat.device())
    dist.all_reduce(totals)
    totals = totals.cpu()
    return {
        name: float(totals[i, 0] / totals[i, 1]) if totals[i, 1] > 0 else float("nan")
        for i, name in enumerate(names)
    }
