"""Packing the prompts of one micro-batch into a fixed ``[rows, seq_length]`` :class:`PackedBatch`.

A *group* is what one prompt contributes: in WRPO its prompt and three responses, laid out as
``prompt + y`` three times (``separate``) or as the prompt once followed by the three responses
(``shared_prompt``, see :mod:`wrpo_nemo.data.layout`); in SFT its one segment ``prompt + y_ws``. Groups are
placed whole into rows by first-fit decreasing, so a prompt never splits across rows; the number of rows is
fixed by the caller because megatron's pipeline schedules need one shape for every micro-batch. A micro-batch
whose groups do not fit raises :class:`PackingError`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from wrpo_nemo.data.cache import TokenizedDataset
from wrpo_nemo.data.layout import (
    IGNORE_INDEX,
    NUM_ROLES,
    ROLE_NAMES,
    SOURCE_CHOSEN,
    Layout,
    PackedBatch,
    check_layout,
)

Stage = Literal["sft", "wrpo"]
STAGE_ROLES: dict[str, tuple[int, ...]] = {"sft": (SOURCE_CHOSEN,), "wrpo": tuple(range(NUM_ROLES))}
"""The roles whose segments a prompt contributes in each stage."""
PAD_SPAN = 64
"""Padding is cut into attention spans of at most this many tokens (TransformerEngine's THD format needs every
token in a sequence; short ones keep their attention cost negligible)."""


class PackingError(ValueError):
    """The prompts of a micro-batch do not fit the rows it is given."""


def effective_layout(stage: Stage, layout: Layout) -> Layout:
    """The layout a stage packs with: SFT has one response per prompt, so nothing to share."""
    check_layout(layout)
    return "separate" if stage == "sft" else layout


def group_lengths(dataset: TokenizedDataset, stage: Stage, layout: Layout = "shared_prompt") -> np.ndarray:
    """Tokens each example occupies in a row in ``stage`` and ``layout``.

    ``separate``: the prompt once per response. ``shared_prompt``: the prompt once, and its last token once more
    per response after the first (each response's span starts with it).
    """
    roles = STAGE_ROLES[stage]
    responses = sum(dataset.lengths(ROLE_NAMES[r]) for r in roles)
    if effective_layout(stage, layout) == "shared_prompt":
        return dataset.lengths("prompt") + (len(roles) - 1) + responses
    return len(roles) * dataset.lengths("prompt") + responses


def first_fit_decreasing(lengths: np.ndarray, seq_length: int) -> list[list[int]]:
    """Positions of ``lengths`` per row: longest first, each into the first row with room."""
    if len(lengths) and int(np.max(lengths)) > seq_length:
        raise PackingError(
            f"a prompt needs {int(np.max(lengths))} tokens, a row holds seq_length={seq_length}"
        )
    rows: list[list[int]] = []
    free: list[int] = []
    for pos in np.argsort(-np.asarray(lengths), kind="stable"):
        need = int(lengths[pos])
        for r, room in enumerate(free):
            if room >= need:
                rows[r].append(int(pos))
                free[r] -= need
                break
        else:
            rows.append([int(pos)])
            free.append(seq_length - need)
    return rows


def rows_needed(lengths: np.ndarray, seq_length: int) -> int:
    """Rows that first-fit decreasing uses for groups of ``lengths``."""
    return len(first_fit_decreasing(lengths, seq_length))


def pack_micro_batch(
    dataset: TokenizedDataset,
    indices: list[int] | np.ndarray,
    stage: Stage,
    seq_length: int,
    rows: int,
    pad_id: int,
    reference_logps: np.ndarray | None = None,
    layout: Layout = "shared_prompt",
) -> PackedBatch:
    """Pack examples ``indices`` (dataset positions) into ``rows`` rows of ``seq_length`` tokens.

    The micro-batch-local prompt ``k`` is ``indices[k]``; ``reference_logps`` (``[len(dataset), 3]``) adds
    their stored reference log-probs to the batch. ``layout`` applies to WRPO (SFT is always separate).
    """
    indices = np.asarray(indices, dtype=np.int64)
    roles = STAGE_ROLES[stage]
    layout = effective_layout(stage, layout)
    lengths = group_lengths(dataset, stage, layout)[indices]
    placement = first_fit_decreasing(lengths, seq_length)
    if len(placement) > rows:
        raise PackingError(
            f"{len(indices)} prompts ({int(lengths.sum())} tokens in {stage} segments) need {len(placement)} rows "
            f"of {seq_length} tokens, the micro-batch has rows_per_micro_batch={rows}: raise it, raise seq_length "
            "or lower micro_batch_size"
        )
    arrays = _empty_rows(rows, seq_length, pad_id)
    segment_prompt: list[int] = []
    segment_role: list[int] = []
    spans: list[tuple[int, int, int, int]] = []
    for r in range(rows):
        start = 0
        for k in placement[r] if r < len(placement) else []:
            prompt = dataset.ids("prompt", int(indices[k]))
            responses = [dataset.ids(ROLE_NAMES[role], int(indices[k])) for role in roles]
            start = _write_group(arrays, spans, r, start, prompt, responses, len(segment_role), layout)
            segment_prompt += [k] * len(roles)
            segment_role += list(roles)
        for pad in range(start, seq_length, PAD_SPAN):
            flat = r * seq_length + pad
            spans.append((flat, flat + min(PAD_SPAN, seq_length - pad), -1, -1))
    ref = None
    if reference_logps is not None:
        ref = torch.as_tensor(np.asarray(reference_logps[indices], dtype=np.float32))
    return PackedBatch(
        **{name: torch.from_numpy(array) for name, array in arrays.items()},
        segment_prompt=torch.tensor(segment_prompt, dtype=torch.long),
        segment_role=torch.tensor(segment_role, dtype=torch.long),
        attn_spans=torch.tensor(spans, dtype=torch.long),
        prompt_index=torch.from_numpy(indices.copy()),
        reference_logps=ref,
    )


def _empty_rows(rows: int, seq_length: int, pad_id: int) -> dict[str, np.ndarray]:
    shape = (rows, seq_length)
    return {
        "tokens": np.full(shape, pad_id, dtype=np.int64),
        "labels": np.full(shape, IGNORE_INDEX, dtype=np.int64),
        "loss_mask": np.zeros(shape, dtype=bool),
        "position_ids": np.zeros(shape, dtype=np.int64),
        "segment_ids": np.full(shape, -1, dtype=np.int64),
    }


def _write_group(
    arrays: dict[str, np.ndarray],
    spans: list[tuple[int, int, int, int]],
    row: int,
    start: int,
    prompt: np.ndarray,
    responses: list[np.ndarray],
    first_segment: int,
    layout: Layout,
) -> int:
    """Write one prompt's group at ``start`` of ``row``; returns where the next group starts.

    Each response becomes a span ``head + response`` whose first token's logits predict the response's first
    token: ``head`` is the whole prompt (``separate``) or its last token, after a shared span holding the rest
    of the prompt (``shared_prompt``).
    """
    seq_length = arrays["tokens"].shape[1]
    flat = row * seq_length
    prefix = None  # the shared prompt's flat range, which every response span attends to (shared_prompt only)
    head = prompt
    if layout == "shared_prompt" and len(prompt) > 1:
        shared = prompt[:-1]
        end = start + len(shared)
        arrays["tokens"][row, start:end] = shared
        arrays["position_ids"][row, start:end] = np.arange(len(shared))
        arrays["segment_ids"][row, start:end] = first_segment
        spans.append((flat + start, flat + end, flat + start, flat + start))
        prefix = (flat + start, flat + end)
        head = prompt[-1:]
        start = end
    offset = len(prompt) - len(head)  # rotary position of the head's first token
    for i, response in enumerate(responses):
        end = start + len(head) + len(response)
        tokens = arrays["tokens"][row]
        tokens[start:end] = np.concatenate([head, response])
        arrays["labels"][row, start : end - 1] = tokens[start + 1 : end]
        # The logits at position j predict token j+1: the response's tokens are predicted from the head's last
        # position up to the one before the span's end.
        arrays["loss_mask"][row, start + len(head) - 1 : end - 1] = True
        arrays["position_ids"][row, start:end] = np.arange(offset, offset + end - start)
        arrays["segment_ids"][row, start:end] = first_segment + i
        spans.append((flat + start, flat + end, *(prefix or (flat + start, flat + start))))
        start = end
    return start


def packing_efficiency(batch: PackedBatch) -> float:
    """Real tokens / row tokens of a packed micro-batch."""
    return float((batch.segment_ids >= 0).float().mean())
