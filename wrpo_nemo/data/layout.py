"""The packed micro-batch: the one contract between the data layer and the training engine.

A micro-batch is ``rows`` rows of ``seq_length`` tokens. Each row holds whole *groups*; a group is what one
prompt contributes. Two layouts (``data.layout``):

- ``separate``: one segment ``prompt + response`` per response (the prompt repeated for each response);
- ``shared_prompt``: the prompt once, then each response. Every response is laid out as a *span* that starts
  with the prompt's last token (whose logits predict the response's first token) and attends to the shared
  prompt before it and causally to itself, never to a sibling response. Rotary positions of every response
  continue from the prompt's end, so the log-probs equal those of the separate layout exactly.

In a WRPO batch every prompt has three responses, one per role, all in the same micro-batch (and row); in an
SFT batch one (role ``SOURCE_CHOSEN``), always in the separate layout.

Token-level tensors (``[rows, seq_length]``):

- ``tokens``: input ids; padding positions hold ``pad_id``.
- ``labels``: the next token of the same sequence at each position; ``IGNORE_INDEX`` where there is none
  (the end of a response, the shared prompt, padding).
- ``loss_mask``: ``True`` where ``labels`` is a *response* token (the prediction of the response, including
  the template's end-of-turn token, never the prompt or the assistant header).
- ``position_ids``: the rotary position of each token in its own ``prompt + response`` sequence.
- ``segment_ids``: the micro-batch-wide index of the segment (one response of one prompt) a token belongs to,
  ``0 .. num_segments-1`` (unique across rows); a shared prompt belongs to its group's first segment; ``-1``
  at padding.

Attention (``[num_spans, 4]``, ``attn_spans``): every token of the micro-batch, in order, belongs to exactly
one span ``(start, end, prefix_start, prefix_end)`` of flat token positions (``row * seq_length + column``).
The queries ``start .. end-1`` attend to the keys ``prefix_start .. prefix_end-1`` (the shared prompt; empty
when ``prefix_start == prefix_end``) and causally to ``start .. end-1``. A span with ``prefix_start == -1``
is padding: it attends to nothing outside itself and its outputs are never used.

Segment-level tensors (``[num_segments]``), indexed by ``segment_ids``:

- ``segment_prompt``: the micro-batch-local prompt index ``0 .. num_prompts-1``.
- ``segment_role``: ``SOURCE_CHOSEN`` (y_ws), ``TARGET_CHOSEN`` (y_wt) or ``REJECTED`` (y_l).

Prompt-level tensors (``[num_prompts]`` or ``[num_prompts, 3]``):

- ``prompt_index``: the example's index in the tokenised dataset (the key for stored reference log-probs
  and for the data order in a checkpoint).
- ``reference_logps``: optional ``[num_prompts, 3]`` summed reference log-probs, columns in role order.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal

import numpy as np
import torch

from wrpo_nemo.logprobs import IGNORE_INDEX as IGNORE_INDEX  # re-exported: the one definition

# IGNORE_INDEX (from the math layer): the label of positions without a target (end of a segment, padding).

SOURCE_CHOSEN = 0
"""Role of y_ws, the best source-model response."""
TARGET_CHOSEN = 1
"""Role of y_wt, the best response of the target (SFT) model."""
REJECTED = 2
"""Role of y_l, the worst response of the target (SFT) model."""
ROLE_NAMES = ("source_chosen", "target_chosen", "rejected")
NUM_ROLES = 3

Layout = Literal["shared_prompt", "separate"]
LAYOUTS: tuple[str, ...] = ("shared_prompt", "separate")
"""``shared_prompt``: each prompt once, its responses after it; ``separate``: the prompt repeated per response."""


@dataclass
class PackedBatch:
    """One packed micro-batch; see the module docstring for the meaning of every field."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    attn_spans: torch.Tensor
    segment_prompt: torch.Tensor
    segment_role: torch.Tensor
    prompt_index: torch.Tensor
    reference_logps: torch.Tensor | None = None

    @property
    def num_segments(self) -> int:
        return int(self.segment_role.numel())

    @property
    def num_prompts(self) -> int:
        return int(self.prompt_index.numel())

    def to(self, device: torch.device | str) -> PackedBatch:
        """A copy with every tensor on ``device``."""
        moved = {
            f.name: (getattr(self, f.name).to(device) if getattr(self, f.name) is not None else None)
            for f in fields(self)
        }
        return replace(self, **moved)

    def without_padding(self, multiple: int = 16) -> PackedBatch:
        """The same micro-batch as one row ``[1, T]`` of its real tokens: padding spans dropped, the attention
        spans re-indexed, and one padding span at the end bringing ``T`` to a multiple of ``multiple``.

        For runs whose micro-batches need not share one shape (no pipeline parallelism): the THD model then
        computes no padding. Every log-prob and loss is unchanged; segment and prompt tensors are shared.
        """
        # numpy, not torch: a few vectorised ops instead of a torch call per span (each one dispatched through
        # compat's CPU redirection when megatron's schedule calls this).
        spans = self.attn_spans.cpu().numpy()
        real_span = spans[:, 2] >= 0
        real_token = np.repeat(real_span, spans[:, 1] - spans[:, 0])  # the spans tile the tokens in order
        keep = np.flatnonzero(real_token)
        new_pos = np.cumsum(real_token) - 1  # a real token's index among the real tokens
        real = len(keep)
        extra = (-real) % multiple
        kept = spans[real_span]
        begin = new_pos[kept[:, 0]]
        shared = kept[:, 3] > kept[:, 2]
        pre_start = np.where(shared, new_pos[np.where(shared, kept[:, 2], 0)], begin)
        pre_end = np.where(shared, new_pos[np.where(shared, kept[:, 3] - 1, 0)] + 1, begin)
        new_spans = np.stack([begin, begin + kept[:, 1] - kept[:, 0], pre_start, pre_end], axis=1)
        if extra or not len(new_spans):
            extra = extra or multiple
            new_spans = np.concatenate([new_spans, np.array([[real, real + extra, -1, -1]])])
        fills = {
            "tokens": 0,
            "labels": IGNORE_INDEX,
            "loss_mask": False,
            "position_ids": 0,
            "segment_ids": -1,
        }
        compact = {}
        for name, fill in fills.items():
            flat = getattr(self, name).reshape(-1)[torch.from_numpy(keep)]
            compact[name] = torch.cat([flat, flat.new_full((extra,), fill)])[None]
        return replace(self, **compact, attn_spans=torch.from_numpy(new_spans.astype(np.int64)))

    def _validate_spans(self) -> None:
        spans = self.attn_spans
        total = self.tokens.numel()
        if spans.ndim != 2 or spans.shape[1] != 4 or spans.shape[0] == 0:
            raise ValueError(f"attn_spans must be [num_spans, 4], got shape {tuple(spans.shape)}")
        start, end, pre_start, pre_end = spans.unbind(1)
        if int(start[0]) != 0 or int(end[-1]) != total or bool((start[1:] != end[:-1]).any()):
            raise ValueError(f"attn_spans must tile the {total} tokens of the micro-batch in order")
        if bool((end <= start).any()):
            raise ValueError("attn_spans holds an empty span")
        real = pre_start >= 0
        if bool((real & ((pre_end < pre_start) | (pre_end > start))).any()):
            raise ValueError("a span's prefix must lie before the span")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field whose shape or content breaks the contract."""
        shape = tuple(self.tokens.shape)
        if len(shape) != 2:
            raise ValueError(f"tokens must be [rows, seq_length], got shape {shape}")
        for name in ("labels", "loss_mask", "position_ids", "segment_ids"):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}, expected {shape}")
        if self.loss_mask.dtype != torch.bool:
            raise ValueError(f"loss_mask must be bool, got {self.loss_mask.dtype}")
        n_seg = self.num_segments
        if self.segment_prompt.shape != (n_seg,):
            raise ValueError(
                f"segment_prompt has shape {tuple(self.segment_prompt.shape)}, expected ({n_seg},)"
            )
        if int(self.segment_ids.max()) >= n_seg or int(self.segment_ids.min()) < -1:
            raise ValueError("segment_ids must lie in [-1, num_segments)")
        if bool((self.loss_mask & (self.segment_ids < 0)).any()):
            raise ValueError("loss_mask is set at a padding position (segment_ids == -1)")
        if bool((self.loss_mask & (self.labels == IGNORE_INDEX)).any()):
            raise ValueError("loss_mask is set where labels == IGNORE_INDEX")
        if n_seg and (int(self.segment_role.min()) < 0 or int(self.segment_role.max()) >= NUM_ROLES):
            raise ValueError("segment_role must be 0 (source_chosen), 1 (target_chosen) or 2 (rejected)")
        if n_seg and int(self.segment_prompt.max()) >= self.num_prompts:
            raise ValueError("segment_prompt refers to a prompt beyond prompt_index")
        self._validate_spans()
        if self.reference_logps is not None and tuple(self.reference_logps.shape) != (
            self.num_prompts,
            NUM_ROLES,
        ):
            raise ValueError(
                f"reference_logps has shape {tuple(self.reference_logps.shape)}, expected ({self.num_prompts}, 3)"
            )


def check_layout(layout: str) -> None:
    """Raise ``ValueError`` naming ``data.layout`` when ``layout`` is not one of :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ValueError(f"data.layout={layout!r} is not one of {', '.join(LAYOUTS)}")


def dense_attention_mask(batch: PackedBatch) -> torch.Tensor:
    """The attention of ``attn_spans`` as a dense ``[T, T]`` boolean matrix over flat positions (``True`` =
    may attend). For tests and inspection only: no backend uses a dense mask."""
    total = batch.tokens.numel()
    allowed = torch.zeros(total, total, dtype=torch.bool)
    for start, end, pre_start, pre_end in batch.attn_spans.tolist():
        allowed[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        if pre_start >= 0:
            allowed[start:end, pre_start:pre_end] = True
    return allowed
