"""The packed micro-batch: the one contract between the data layer and the training engine.

A micro-batch is ``rows`` rows of ``seq_length`` tokens. Each row holds whole *segments*; a segment is one
full sequence ``prompt + response`` (the prompt is repeated for each of its responses). In a WRPO batch
every prompt contributes exactly three segments, one per role, and all three are in the same micro-batch
(usually the same row); in an SFT batch every prompt contributes one segment (role ``SOURCE_CHOSEN``).

Token-level tensors (``[rows, seq_length]``):

- ``tokens``: input ids; padding positions hold ``pad_id``.
- ``labels``: the next token of the same segment at each position (``tokens`` shifted left by one inside
  the segment); ``IGNORE_INDEX`` where there is no next token of the same segment or at padding.
- ``loss_mask``: ``True`` where ``labels`` is a *response* token (the prediction of the response, including
  the template's end-of-turn token, never the prompt or the assistant header).
- ``position_ids``: restart at 0 at the start of every segment.
- ``segment_ids``: the micro-batch-wide index of the segment a token belongs to, ``0 .. num_segments-1``
  (unique across rows); ``-1`` at padding.

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

import torch

IGNORE_INDEX = -100
"""Label value for positions that have no target (end of a segment, padding)."""

SOURCE_CHOSEN = 0
"""Role of y_ws, the best source-model response."""
TARGET_CHOSEN = 1
"""Role of y_wt, the best response of the target (SFT) model."""
REJECTED = 2
"""Role of y_l, the worst response of the target (SFT) model."""
ROLE_NAMES = ("source_chosen", "target_chosen", "rejected")
NUM_ROLES = 3


@dataclass
class PackedBatch:
    """One packed micro-batch; see the module docstring for the meaning of every field."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
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
        if self.reference_logps is not None and tuple(self.reference_logps.shape) != (
            self.num_prompts,
            NUM_ROLES,
        ):
            raise ValueError(
                f"reference_logps has shape {tuple(self.reference_logps.shape)}, expected ({self.num_prompts}, 3)"
            )


def attention_mask_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask for packed rows, in megatron's convention (``True`` = masked out).

    Shape ``[rows, 1, seq, seq]``. A token attends to earlier tokens of its own segment only. Padding
    tokens attend to themselves (keeps softmax finite; their outputs are never used).
    """
    seq = segment_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = same & causal
    allowed |= torch.eye(seq, dtype=torch.bool, device=segment_ids.device)
    return (~allowed).unsqueeze(1)
