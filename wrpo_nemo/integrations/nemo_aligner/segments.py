"""Per-response sums of per-token log-probs for three-response batches (torch only).

NeMo-Aligner lays a DPO batch out as ``[chosen rows; rejected rows]`` and splits its outputs in halves. The WRPO
layout extends it to thirds: unpacked batches stack ``[source_chosen rows; target_chosen rows; rejected rows]``
(``B`` each), and packed rows hold each prompt's three segments back to back in role order. Either way the
result of :func:`reduce_response_logps` is *role-major*, ``[B source | B target | B rejected]``, so one
three-way split (:func:`split_roles`) serves both.
"""

from __future__ import annotations

import torch

from wrpo_nemo.data.layout import NUM_ROLES


def split_roles(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``values`` (role-major along dim 0, ``3 * B`` rows) as (source_chosen, target_chosen, rejected), in fp32."""
    if values.shape[0] % NUM_ROLES:
        raise ValueError(f"a three-response batch has 3 * B rows, got {values.shape[0]}")
    source, target, rejected = torch.split(values.float(), values.shape[0] // NUM_ROLES, dim=0)
    return source, target, rejected


def as_columns(values: torch.Tensor) -> torch.Tensor:
    """Role-major ``[3 * B]`` values as ``[B, 3]`` columns (the layout of ``wrpo_loss``)."""
    return torch.stack(split_roles(values), dim=1)


def packed_segment_bounds(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The boundaries of the real segments of a packed row: ``cu_seqlens`` without a trailing padding segment.

    NeMo-Aligner's collate appends one boundary at the row's end when the row is padded; a WRPO row holds whole
    prompts (three segments each), so the count of segments tells which case this is.
    """
    segments = cu_seqlens.numel() - 1
    if segments % NUM_ROLES == 1:
        return cu_seqlens[:-1]
    if segments % NUM_ROLES:
        raise ValueError(
            f"a packed WRPO row holds three segments per prompt (plus at most one padding segment), "
            f"got {segments} segments"
        )
    return cu_seqlens


def reduce_response_logps(
    logps: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum of ``logps`` over each response's labelled tokens (``labels >= 0``), role-major ``[3 * B]``.

    Unpacked: ``logps`` and ``labels`` are ``[3 * B, S]`` with rows role-major. Packed: they are ``[1, T]`` (or
    ``[T]``) and ``cu_seqlens`` holds the segment boundaries, prompts' segments in role order.
    """
    if logps.shape != labels.shape:
        raise ValueError(f"logps shape {tuple(logps.shape)} != labels shape {tuple(labels.shape)}")
    # Any negative label is a non-target (NeMo-Aligner pads labels with -100), as in the parent's reduction.
    mask = labels >= 0
    if cu_seqlens is None:
        return (logps * mask).sum(-1)
    bounds = packed_segment_bounds(cu_seqlens.to(torch.long).cpu())
    logps, mask = logps.reshape(-1), mask.reshape(-1)
    # Positions past the last real boundary (row padding) fall into no segment and are dropped.
    positions = torch.arange(int(bounds[-1]))
    segment = torch.searchsorted(bounds[1:], positions, right=True).to(logps.device)
    used = mask[: positions.numel()]
    sums = torch.zeros(bounds.numel() - 1, dtype=logps.dtype, device=logps.device)
    sums = sums.index_add(0, segment[used], logps[: positions.numel()][used])
    # Segments are prompt-major (p0: s, t, r; p1: s, t, r; ...): reorder to role-major.
    return sums.view(-1, NUM_ROLES).t().reshape(-1)
