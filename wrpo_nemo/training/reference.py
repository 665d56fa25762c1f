"""Reference log-probs: the frozen starting model's summed response log-probs, by forward-only passes.

``precompute`` runs once over the WRPO (and evaluation) prompts before training and stores the result beside
the data cache (``wrpo_nemo.data.reference``), keyed by the reference model's identity, so every later run
on the same data and model reuses it. ``online`` runs the same pass every step on that step's micro-batches
with a frozen copy of the model, as the reference program did.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from wrpo_nemo import compat
from wrpo_nemo.data.cache import TokenizedDataset
from wrpo_nemo.data.layout import Layout, PackedBatch
from wrpo_nemo.data.packing import group_lengths, pack_micro_batch, rows_needed
from wrpo_nemo.data.reference import load_reference_logps, save_reference_logps
from wrpo_nemo.training.engine import run_schedule
from wrpo_nemo.training.step import make_forward_step, reference_loss_func

MICRO_BATCHES_PER_PASS = 32
"""Micro-batches handed to one schedule call (bounds the packed batches held in memory)."""


def reference_pass(
    model, micro_batches: list[PackedBatch], device: torch.device, vocab_size: int
) -> list[dict]:
    """Forward-only schedule over ``micro_batches``; per-micro-batch dicts on the last pipeline stage."""
    forward_step = make_forward_step(lambda b: partial(reference_loss_func, b, vocab_size), device)
    model.eval()
    try:
        with torch.no_grad():
            return run_schedule(model, forward_step, micro_batches, forward_only=True)
    finally:
        model.train()


def _collect(outputs: list[dict], num_examples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the log-probs of this rank's outputs into dataset-wide arrays (and how often each was seen)."""
    from megatron.core import parallel_state

    values = torch.zeros(num_examples, 3, dtype=torch.float64)
    seen = torch.zeros(num_examples, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        for out in outputs:
            index = out["prompt_index"].cpu()
            values.index_add_(0, index, out["reference_logps"].detach().cpu().double())
            seen.index_add_(0, index, torch.ones(len(index), dtype=torch.float64))
    return values, seen


def compute_reference_logps(
    model,
    dataset: TokenizedDataset,
    indices: np.ndarray,
    *,
    micro_batch_size: int,
    seq_length: int,
    pad_id: int,
    device: torch.device,
    vocab_size: int,
    layout: Layout = "shared_prompt",
) -> np.ndarray:
    """``[len(dataset), 3]`` reference log-probs for ``indices`` (0 elsewhere), identical on every rank.

    The values do not depend on ``layout`` (it only decides how the rows are packed), so a store computed in
    one layout serves runs in the other.
    """
    from megatron.core import parallel_state

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    per_pass = micro_batch_size * dp_size
    # Pad with repeats of the last prompt so every rank runs the same number of micro-batches; repeats are
    # averaged away below.
    padded = np.concatenate([indices, np.full((-len(indices)) % per_pass, indices[-1], dtype=np.int64)])
    groups = padded.reshape(-1, dp_size, micro_batch_size)
    mine = groups[:, dp_rank]
    # One row count for every micro-batch of every rank (pipeline stages exchange fixed shapes), sized for
    # the fullest of these consecutive groups, which are not length-balanced like training micro-batches.
    lengths = group_lengths(dataset, "wrpo", layout)
    rows = max(rows_needed(lengths[g], seq_length) for g in groups.reshape(-1, micro_batch_size))
    values = torch.zeros(len(dataset), 3, dtype=torch.float64)
    seen = torch.zeros(len(dataset), dtype=torch.float64)
    for start in range(0, len(mine), MICRO_BATCHES_PER_PASS):
        batches = [
            pack_micro_batch(dataset, micro, "wrpo", seq_length, rows, pad_id, layout=layout)
            for micro in mine[start : start + MICRO_BATCHES_PER_PASS]
        ]
        v, s = _collect(reference_pass(model, batches, device, vocab_size), len(dataset))
        values += v
        seen += s
    totals = torch.cat([values, seen[:, None]], dim=1).to(compat.device())
    dist.all_reduce(totals)
    totals = totals.cpu()
    result = torch.zeros(len(dataset), 3, dtype=torch.float64)
    hit = totals[:, 3] > 0
    result[hit] = totals[hit, :3] / totals[hit, 3:4]
    missing = np.setdiff1d(indices, np.nonzero(hit.numpy())[0])
    if len(missing):
        raise RuntimeError(
            f"reference pass produced no log-probs for {len(missing)} prompts, e.g. {missing[:5]}"
        )
    return result.float().numpy()


def precomputed_reference(
    model, dataset: TokenizedDataset, indices: np.ndarray, model_id: str, **kwargs
) -> tuple:
    """Stored reference log-probs for ``model_id``, computed and stored first when missing.

    Returns ``(logps, "loaded" | "computed")``. Every rank calls it; rank 0 writes the file.
    """
    cache_dir = dataset.path
    stored = load_reference_logps(cache_dir, model_id, num_examples=len(dataset))
    if stored is not None and np.all(np.any(stored[indices] != 0, axis=1)):
        return stored, "loaded"
    logps = compute_reference_logps(model, dataset, indices, **kwargs)
    if dist.get_rank() == 0:
        save_reference_logps(cache_dir, model_id, logps)
    dist.barrier()
    return logps, "computed"


def attach_online_reference(
    ref_model, micro_batches: list[PackedBatch], device: torch.device, vocab_size: int
) -> None:
    """Fill ``reference_logps`` of this step's micro-batches from a frozen model (``online`` mode)."""
    from megatron.core import parallel_state

    outputs = reference_pass(ref_model, micro_batches, device, vocab_size)
    last = parallel_state.is_pipeline_last_stage()
    for i, batch in enumerate(micro_batches):
        batch.reference_logps = outputs[i]["reference_logps"].float().cpu() if last else None
