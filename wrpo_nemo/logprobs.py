"""Token log-probabilities from (vocab-parallel) logits, and per-segment sums for packed rows (layer 1).

Under tensor parallelism megatron's output layer leaves each rank of the tensor-parallel group with a
contiguous slice ``[rank * V_local, (rank + 1) * V_local)`` of the (padded) vocabulary. The log-prob of a
label token is ``logit[label] - logsumexp(logits)``; both terms need the whole vocabulary, so the ranks
exchange one max and two sums per token (``[tokens]``-sized all-reduces, never the logits).

Memory: a naive ``logits.float().log_softmax(-1)`` holds two fp32 copies of the full ``[tokens, vocab]``
tensor (for Llama 3, 128256 columns: 2 GB per 4096 tokens) plus the same again in backward. Here tokens are
processed in chunks: forward keeps only ``[tokens]`` statistics, backward writes the gradient chunk by chunk
into one tensor of the logits' own dtype (or, with ``inplace_backward``, into the logits' own storage). The
fp32 work space is ``chunk_tokens x V_local``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 512


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits)[label] over a vocabulary possibly split across ``group``; fp32 output."""

    @staticmethod
    def forward(ctx, logits, labels, vocab_start, group, chunk_tokens, inplace_backward, real_local):
        num_tokens, vocab_local = logits.shape
        local_labels = labels - vocab_start
        owned = (local_labels >= 0) & (local_labels < vocab_local)
        local_labels = torch.where(owned, local_labels, torch.zeros_like(local_labels))
        logps = torch.empty(num_tokens, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(logps)
        for start in range(0, num_tokens, chunk_tokens):
            end = min(start + chunk_tokens, num_tokens)
            # copy=True: the chunk is modified in place below and must never alias the caller's logits.
            chunk = logits[start:end].to(torch.float32, copy=True)
            chunk[:, real_local:] = float("-inf")  # padded vocabulary columns are not tokens
            row_max = chunk.max(dim=-1).values
            if group is not None:
                dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
            target = chunk.gather(1, local_labels[start:end, None]).squeeze(1)
            target = torch.where(owned[start:end], target, torch.zeros_like(target))
            sum_exp = chunk.sub_(row_max[:, None]).exp_().sum(dim=-1)
            stats = torch.stack([sum_exp, target])
            if group is not None:
                dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
            lse[start:end] = row_max + stats[0].log()
            logps[start:end] = stats[1] - lse[start:end]
            del chunk  # release before the next chunk is allocated: one fp32 chunk alive at a time
        ctx.save_for_backward(logits, local_labels, owned, lse)
        ctx.chunk_tokens = chunk_tokens
        ctx.inplace_backward = inplace_backward
        ctx.real_local = real_local
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        logits, local_labels, owned, lse = ctx.saved_tensors
        grad_logits = logits if ctx.inplace_backward else torch.empty_like(logits)
        grad_logps = grad_logps.float()
        for start in range(0, logits.shape[0], ctx.chunk_tokens):
            end = min(start + ctx.chunk_tokens, logits.shape[0])
            g = grad_logps[start:end]
            # d logp / d logit_j = 1[j == label] - softmax_j ; softmax uses the global logsumexp.
            chunk = logits[start:end].to(torch.float32, copy=True)
            chunk[:, ctx.real_local :] = float("-inf")
            chunk.sub_(lse[start:end, None]).exp_().mul_(-g[:, None])
            chunk.scatter_add_(1, local_labels[start:end, None], (g * owned[start:end])[:, None])
            grad_logits[start:end] = chunk
            del chunk
        return grad_logits, None, None, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ignore_index: int = IGNORE_INDEX,
    inplace_backward: bool = False,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Per-token log-probs ``log p(labels[..., t] | ...)`` as fp32, shaped like ``labels``.

    Args:
        logits: ``[..., V_local]``; this rank's vocabulary slice when ``group`` is a tensor-parallel group
            of more than one rank, otherwise the whole (possibly padded) vocabulary.
        labels: ``[...]`` global token ids; ``ignore_index`` positions get log-prob 0 and no gradient.
        group: the tensor-parallel group over which the vocabulary is split (``None``: not split).
        vocab_start: first vocabulary id of this rank's slice; defaults to ``rank_in_group * V_local``.
        chunk_tokens: tokens per chunk; bounds the fp32 work space to ``chunk_tokens x V_local``.
        inplace_backward: write the gradient into the logits' own storage instead of a new tensor (as
            megatron's vocab-parallel cross-entropy does). Saves one logits-sized buffer; only valid when
            nothing reads the logits after backward (true of the training step, where the logits are a
            temporary of the output layer).
        vocab_size: the real vocabulary size when ``logits`` carry padding columns (megatron pads the
            vocabulary to a multiple of the TP size): ids from ``vocab_size`` on are left out of the softmax,
            as a Hugging Face model without the padding computes it. ``None``: every column is a token.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    vocab_local = logits.shape[-1]
    if vocab_start is None:
        vocab_start = dist.get_rank(group) * vocab_local if group is not None else 0
    flat_logits = logits.reshape(-1, vocab_local)
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    real_local = vocab_local if vocab_size is None else min(max(vocab_size - vocab_start, 0), vocab_local)
    logps = _TokenLogprobs.apply(
        flat_logits, flat_labels, vocab_start, group, chunk_tokens, inplace_backward, real_local
    )
    return torch.where(valid, logps, torch.zeros_like(logps)).reshape(labels.shape)


def segment_sums(
    values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum ``values`` (where ``mask``) per segment of packed rows; ``segment_ids == -1`` is padding.

    ``values``, ``segment_ids`` and ``mask`` share one shape; returns ``[num_segments]``, differentiable.
    """
    keep = segment_ids >= 0
    if mask is not None:
        keep = keep & mask.bool()
    contrib = torch.where(keep, values, torch.zeros_like(values)).reshape(-1)
    index = segment_ids.clamp(min=0).reshape(-1)
    return torch.zeros(num_segments, dtype=values.dtype, device=values.device).index_add(0, index, contrib)


def per_prompt_by_role(
    segment_values: torch.Tensor,
    segment_prompt: torch.Tensor,
    segment_role: torch.Tensor,
    num_prompts: int,
    num_roles: int = 3,
) -> torch.Tensor:
    """Arrange per-segment values into ``[num_prompts, num_roles]`` (each pair must occur exactly once)."""
    slot = segment_prompt * num_roles + segment_role
    counts = torch.bincount(slot, minlength=num_prompts * num_roles)
    if counts.numel() != num_prompts * num_roles or bool((counts != 1).any()):
        raise ValueError("every (prompt, role) pair must have exactly one segment in the micro-batch")
    out = torch.zeros(num_prompts * num_roles, dtype=segment_values.dtype, device=segment_values.device)
    return out.index_add(0, slot, segment_values).reshape(num_prompts, num_roles)
