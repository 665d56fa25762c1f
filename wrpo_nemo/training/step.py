"""The forward step of each stage, in the shape megatron's pipeline schedules call it.

``get_forward_backward_func()`` calls ``forward_step(data_iterator, model)`` once per micro-batch and, on
the last pipeline stage, the returned ``loss_func(output)``. Every loss function here returns megatron's
three-tuple ``(loss_sum, count, metric_sums)`` and the model config sets ``calculate_per_token_loss``, so
megatron divides the gradients by the count summed over all micro-batches and data-parallel ranks:

- SFT: count = response tokens; the loss is the token-mean NLL over the whole global batch.
- WRPO: count = prompts; the loss is the mean over the global batch's prompts, as in WRPO.md.

Either way the result does not depend on how the global batch is split into micro-batches or ranks.
The math (log-probs, losses) comes from layer 1; this module only wires it to megatron's interfaces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

from wrpo_nemo import compat
from wrpo_nemo.data.layout import NUM_ROLES, PackedBatch
from wrpo_nemo.logprobs import per_prompt_by_role, segment_sums, token_logprobs
from wrpo_nemo.losses import Preference, wrpo_loss
from wrpo_nemo.models.attention import packed_forward, params_from_spans

Stage = Literal["sft", "wrpo"]


@dataclass(frozen=True)
class WrpoLossSettings:
    """The loss knobs of the WRPO stage that do not change during a run (alpha does, per step)."""

    beta: float = 0.01
    """Inverse temperature of the implicit reward (0.01 in the paper)."""
    preference: Preference = "dpo"
    """Objective: dpo (the paper), ipo, simpo, dpo_pair_mean (see wrpo_nemo.losses)."""
    label_smoothing: float = 0.0
    """Conservative-DPO label smoothing (0 in the paper)."""
    gamma: float = 0.0
    """SimPO's target reward margin."""
    sft_weight: float = 0.0
    """Weight of an added NLL term on y_ws (0 in the paper)."""


def _tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _token_logps(
    logits: torch.Tensor, batch: PackedBatch, vocab_size: int, inplace_backward: bool
) -> torch.Tensor:
    # vocab_size drops megatron's padded vocabulary columns from the softmax (as the HF model computes it).
    return token_logprobs(
        logits, batch.labels, group=_tp_group(), inplace_backward=inplace_backward, vocab_size=vocab_size
    )


def response_logps(logits: torch.Tensor, batch: PackedBatch, vocab_size: int, inplace_backward: bool = False):
    """Summed response log-probs and response lengths, both ``[num_prompts, 3]``, of a WRPO micro-batch."""
    tok = _token_logps(logits, batch, vocab_size, inplace_backward)
    seg = segment_sums(tok, batch.segment_ids, batch.num_segments, batch.loss_mask)
    counts = segment_sums(
        batch.loss_mask.to(tok.dtype), batch.segment_ids, batch.num_segments, batch.loss_mask
    )
    arrange = partial(
        per_prompt_by_role,
        segment_prompt=batch.segment_prompt,
        segment_role=batch.segment_role,
        num_prompts=batch.num_prompts,
        num_roles=NUM_ROLES,
    )
    return arrange(seg), arrange(counts)


def sft_loss_func(batch: PackedBatch, vocab_size: int, logits: torch.Tensor):
    """NLL summed over response tokens, the token count, and metric sums."""
    tok = _token_logps(logits, batch, vocab_size, inplace_backward=True)
    mask = batch.loss_mask
    loss_sum = -(tok * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    detached = loss_sum.detach()
    return loss_sum, num_tokens, {"loss": torch.stack([detached, num_tokens.to(detached.dtype)])}


def wrpo_loss_func(
    batch: PackedBatch,
    alpha: float,
    settings: WrpoLossSettings,
    vocab_size: int,
    logits: torch.Tensor,
    *,
    nll_tokens_per_prompt: float | None = None,
):
    """WRPO loss summed over the micro-batch's prompts, the prompt count, and metric sums.

    ``nll_tokens_per_prompt``: y_ws tokens per prompt over the whole global batch; with it the optional NLL
    term (``settings.sft_weight``) is normalised by the global batch's y_ws tokens (after megatron divides by
    the global prompt count), not by each micro-batch's.
    """
    if batch.reference_logps is None and settings.preference != "simpo":
        raise RuntimeError("a WRPO micro-batch reached the loss without reference log-probs")
    policy, lengths = response_logps(logits, batch, vocab_size, inplace_backward=True)
    reference = batch.reference_logps.to(policy.dtype) if batch.reference_logps is not None else None
    loss, metrics = wrpo_loss(
        policy,
        reference,
        alpha=alpha,
        beta=settings.beta,
        preference=settings.preference,
        label_smoothing=settings.label_smoothing,
        gamma=settings.gamma,
        lengths=lengths,
        sft_weight=settings.sft_weight,
        sft_tokens=None if nll_tokens_per_prompt is None else nll_tokens_per_prompt * batch.num_prompts,
    )
    prompts = batch.num_prompts
    sums = {"loss": torch.stack([loss.detach() * prompts, loss.new_tensor(float(prompts))])}
    for name, value in metrics.items():
        sums[name] = torch.stack([value * prompts, value.new_tensor(float(prompts))])
    return loss * prompts, torch.tensor(prompts, dtype=torch.int), sums


def reference_loss_func(batch: PackedBatch, vocab_size: int, logits: torch.Tensor):
    """Forward-only: no loss, the micro-batch's summed response log-probs for the reference store."""
    with torch.no_grad():
        logps, _ = response_logps(logits, batch, vocab_size)
    zero = logits.new_zeros(())
    return (
        zero,
        torch.tensor(0, dtype=torch.int),
        {"reference_logps": logps, "prompt_index": batch.prompt_index},
    )


def make_forward_step(
    loss_builder: Callable[[PackedBatch], Callable], device: torch.device, drop_padding: bool | None = None
) -> Callable:
    """A megatron ``forward_step_func`` over an iterator of ``PackedBatch`` micro-batches.

    ``loss_builder(batch)`` returns the ``loss_func(output)`` for that micro-batch (only called on the last
    pipeline stage's output, by megatron). The model sees the micro-batch as one THD sequence with its
    attention spans and rotary positions (:mod:`wrpo_nemo.models.attention`), never a dense mask.
    ``drop_padding`` (default: when there is no pipeline parallelism, whose stages exchange one fixed shape)
    computes only the real tokens (:meth:`PackedBatch.without_padding`).
    """
    if drop_padding is None:
        from megatron.core import parallel_state

        drop_padding = parallel_state.get_pipeline_model_parallel_world_size() == 1

    def forward_step(data_iterator: Iterator[PackedBatch], model):
        packed = next(data_iterator)
        if drop_padding:
            packed = packed.without_padding()
        params = params_from_spans(packed.attn_spans, packed.position_ids, device)
        batch = packed.to(device)
        with compat.outside_redirect():  # the model's forward needs none of compat's CUDA redirection
            output = packed_forward(model, batch.tokens, params)
        return output, loss_builder(batch)

    return forward_step
