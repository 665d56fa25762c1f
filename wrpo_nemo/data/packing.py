"""Packing the prompts of one micro-batch into a fixed ``[rows, seq_length]`` :class:`PackedBatch`.

A *group* is what one prompt contributes: its three segments ``prompt + y`` (WRPO) or its one segment
``prompt + y_ws`` (SFT). Groups are placed whole into rows by first-fit decreasing, so a prompt never
splits across rows; the number of rows is fixed by the caller because megatron's pipeline schedules need
one shape for every micro-batch. A micro-batch whose groups do not fit raises :class:`PackingError`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from wrpo_nemo.data.cache import TokenizedDataset
from wrpo_nemo.data.layout import IGNORE_INDEX, NUM_ROLES, ROLE_NAMES, SOURCE_CHOSEN, PackedBatch

Stage = Literal["sft", "wrpo"]
STAGE_ROLES: dict[str, tuple[int, ...]] = {"sft": (SOURCE_CHOSEN,), "wrpo": tuple(range(NUM_ROLES))}
"""The roles whose segments a prompt contributes in each stage."""


class PackingError(ValueError):
    """The prompts of a micro-batch do not fit the rows it is given."""


def group_lengths(dataset: TokenizedDataset, stage: Stage) -> np.ndarray:
    """Tokens each example occupies in a row in ``stage`` (its segments, prompt repeated per segment)."""
    roles = STAGE_ROLES[stage]
    return len(roles) * dataset.lengths("prompt") + sum(dataset.lengths(ROLE_NAMES[r]) for r in roles)


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
) -> PackedBatch:
    """Pack examples ``indices`` (dataset positions) into ``rows`` rows of ``seq_length`` tokens.

    The micro-batch-local prompt ``k`` is ``indices[k]``; ``reference_logps`` (``[len(dataset), 3]``) adds
    their stored reference log-probs to the batch.
    """
    indices = np.asarray(indices, dtype=np.int64)
    roles = STAGE_ROLES[stage]
    lengths = group_lengths(dataset, stage)[indices]
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
    for r, row_groups in enumerate(placement):
        start = 0
        for k in row_groups:
            prompt = dataset.ids("prompt", int(indices[k]))
            for role in roles:
                response = dataset.ids(ROLE_NAMES[role], int(indices[k]))
                start = _write_segment(arrays, r, start, prompt, response, len(segment_role))
                segment_prompt.append(k)
                segment_role.append(role)
    ref = None
    if reference_logps is not None:
        ref = torch.as_tensor(np.asarray(reference_logps[indices], dtype=np.float32))
    return PackedBatch(
        **{name: torch.from_numpy(array) for name, array in arrays.items()},
        segment_prompt=torch.tensor(segment_prompt, dtype=torch.long),
        segment_role=torch.tensor(segment_role, dtype=torch.long),
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


def _write_segment(
    arrays: dict[str, np.ndarray],
    row: int,
    start: int,
    prompt: np.ndarray,
    response: np.ndarray,
    segment: int,
) -> int:
    """Write one ``prompt + response`` segment at ``start`` of ``row``; returns where the next one starts."""
    end = start + len(prompt) + len(response)
    tokens = arrays["tokens"][row]
    tokens[start:end] = np.concatenate([prompt, response])
    arrays["labels"][row, start : end - 1] = tokens[start + 1 : end]
    # The logits at position j predict token j+1: the response's tokens are predicted from the last prompt
    # position up to the one before the segment's end.
    arrays["loss_mask"][row, start + len(prompt) - 1 : end - 1] = True
    arrays["position_ids"][row, start:end] = np.arange(end - start)
    arrays["segment_ids"][row, start:end] = segment
    return end


def packing_efficiency(batch: PackedBatch) -> float:
    """Real tokens / row tokens of a packed micro-batch."""
    return float((batch.segment_ids >= 0).float().mean())
