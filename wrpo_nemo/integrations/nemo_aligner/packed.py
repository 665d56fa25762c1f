"""Packed WRPO data for NeMo-Aligner, and the dataset builders (needs NeMo-Aligner).

NeMo-Aligner packs DPO data offline into rows of ``input_ids``/``labels`` with ``seq_boundaries`` and collates
them into THD batches (``cu_seqlens``) for TransformerEngine's attention. :class:`WRPOPackedDataset` builds such
rows from the records directly, with the project's tokenisation and its first-fit-decreasing packing: each
prompt's three segments (y_ws, y_wt, y_l, in that order) sit back to back in one row, which is what the model's
three-way packed reduction expects.

As in NeMo-Aligner's packed DPO, a sample of the dataset is a packed row: ``model.micro_batch_size`` (1) and
``model.global_batch_size`` count rows, and a row holds as many prompts as fit in ``seq_length`` tokens. The
dataset logs its prompts per row (:attr:`WRPOPackedDataset.prompts_per_row`) so that a batch size in prompts
can be turned into one in rows.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import numpy as np
import torch
from nemo_aligner.data.nlp.builders import build_train_valid_test_datasets
from nemo_aligner.data.nlp.datasets import DPOPackedDataset

from wrpo_nemo.data.packing import first_fit_decreasing
from wrpo_nemo.integrations.nemo_aligner.dataset import (
    ROLES,
    WRPOModelDataset,
    data_configs,
    segment_ids_and_labels,
    tokenize_records,
)

log = logging.getLogger(__name__)


def pack_rows(examples: list[dict[str, Any]], seq_length: int) -> list[dict[str, Any]]:
    """Rows in NeMo-Aligner's packed layout, each prompt's three segments whole and in role order.

    A row holds ``input_ids`` and ``labels`` (aligned with the tokens, ``-100`` on prompts: NeMo-Aligner's
    collate shifts them per segment), ``seq_boundaries``, the segment ``lengths``, a zero ``reward`` per
    segment (WRPO has no ground-truth reward; the key keeps the parent's batch layout) and ``prompts``, the
    positions in ``examples`` of the row's prompts in order.
    """
    segments = [[segment_ids_and_labels(example, role) for role in ROLES] for example in examples]
    group_lengths = np.array([sum(len(ids) for ids, _ in group) for group in segments])
    rows = []
    for placed in first_fit_decreasing(group_lengths, seq_length):
        ids: list[int] = []
        labels: list[int] = []
        bounds = [0]
        for k in placed:
            for segment_ids, segment_labels in segments[k]:
                ids += segment_ids
                labels += segment_labels
                bounds.append(len(ids))
        rows.append(
            {
                "input_ids": np.array(ids, dtype=np.int64),
                "labels": np.array(labels, dtype=np.int64),
                "seq_boundaries": bounds,
                "lengths": list(np.diff(bounds)),
                "reward": [0.0] * (len(bounds) - 1),
                "prompts": [int(k) for k in placed],
            }
        )
    return rows


class WRPOPackedDataset(DPOPackedDataset):
    """Packed WRPO rows (micro batch size 1, TransformerEngine attention); built from the records at start-up.

    The constructor is NeMo-Aligner's; ``data`` holds the records (``data_impl: jsonl``), not pre-packed rows.
    Its samples are rows: batch sizes count rows, each of several prompts (:attr:`prompts_per_row`).
    """

    def __init__(
        self,
        cfg: Any,
        tokenizer: Any,
        name: str,
        data_prefix: Any,
        documents: np.ndarray,
        data: Any,
        seq_length: int,
        seed: int,
        drop_last: bool = True,
    ) -> None:
        read, tokenize = data_configs(cfg.data, seq_length, packed=True)
        examples, self.report = tokenize_records(data, documents, tokenizer, read, tokenize, name)
        rows = pack_rows(examples, seq_length)
        self.num_prompts = len(examples)
        """Prompts in the dataset (after the length policy), all of them packed."""
        log.info(
            "WRPO %s data: %d prompts packed into %d rows of %d tokens, %.2f prompts per row; "
            "model.micro_batch_size and model.global_batch_size count rows",
            name,
            len(examples),
            len(rows),
            seq_length,
            len(examples) / len(rows),
        )
        super().__init__(
            cfg, tokenizer, name, data_prefix, np.arange(len(rows)), rows, seq_length, seed, drop_last
        )

    @property
    def prompts_per_row(self) -> float:
        """Mean prompts in a packed row: a global batch of ``G`` rows holds about ``G * prompts_per_row``."""
        return self.num_prompts / len(self.data)

    def global_collate_fn(
        self,
        batch: list[dict[str, Any]],
        eos_id: int,
        reset_position_ids: bool = False,
        reset_attention_mask: bool = False,
        eod_mask_loss: bool = False,
        pad_length_to_multiple_of: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """The parent's THD collate, with the unpadded boundaries equal to the real segment boundaries.

        The parent finds a segment's unpadded length at its first ``eos_id``; a chat prompt holds the
        end-of-turn token (the eos of instruct tokenizers) after every turn, which would cut segments short.
        These rows are never pre-padded, so the real boundaries are the unpadded ones.
        """
        out = super().global_collate_fn(
            batch, eos_id, reset_position_ids, reset_attention_mask, eod_mask_loss, pad_length_to_multiple_of
        )
        unpadded = out["cu_seqlens"].clone()
        for row, item in enumerate(batch):
            real = len(item["seq_boundaries"]) - 1
            if real + 1 < unpadded.shape[1] and unpadded[row, real + 1] >= 0:
                # The row's padding tail is a segment of no real tokens.
                unpadded[row, real + 1] = unpadded[row, real]
        out["cu_seqlens_unpadded"] = unpadded
        out["cu_seqlens_unpadded_argmin"] = torch.argmin(unpadded, dim=1, keepdim=True)
        return out


build_train_valid_test_wrpo_datasets = partial(build_train_valid_test_datasets, WRPOModelDataset)
"""``build_train_valid_test_dpo_datasets`` for WRPO records (unpacked)."""
build_train_valid_test_wrpo_packed_datasets = partial(build_train_valid_test_datasets, WRPOPackedDataset)
"""``build_train_valid_test_dpo_packed_datasets`` for WRPO records (packed at start-up)."""
