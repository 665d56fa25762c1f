"""Three-response WRPO records as NeMo-Aligner DPO-style items (no NeMo needed to import).

The records and their tokenisation are the project's data layer, unchanged: :func:`wrpo_nemo.data.records.parse_record`
reads the released (``chosen = [y_ws, y_wt]``) or explicit layout, and
:func:`wrpo_nemo.data.tokenize.tokenize_example` renders the tokenizer's own chat template, so labels cover the
response only (never the assistant header) and the end-of-turn token appears once. Only the item layout is
NeMo-Aligner's: ``tokens = (prompt + response)[:-1]`` and ``labels = ([-100] * len(prompt) + response)[1:]``,
the three responses of a prompt padded to one length, as ``DPOModelDataset`` does for two.

Unlike ``DPOModelDataset`` (which keeps a too-long example and zeroes its labels), examples are tokenised once
at construction and those the length policy drops are left out and counted in :attr:`WRPOModelDataset.report`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from wrpo_nemo.data.layout import IGNORE_INDEX
from wrpo_nemo.data.records import DataError, ReadConfig, duplicate_error, parse_record
from wrpo_nemo.data.tokenize import RESPONSE_FIELDS, TokenizeConfig, eot_token_id, tokenize_example

ROLES = RESPONSE_FIELDS
"""Item keys of the three responses, in the order the model stacks them: y_ws, y_wt, y_l."""

log = logging.getLogger(__name__)


def hf_tokenizer(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer behind ``tokenizer`` (NeMo's ``AutoTokenizer`` wraps one as ``.tokenizer``)."""
    for candidate in (getattr(tokenizer, "tokenizer", None), tokenizer):
        # NeMo's wrapper has its own apply_chat_template but not the rest of the Hugging Face API the data
        # layer uses, so the wrapped tokenizer is preferred.
        if hasattr(candidate, "apply_chat_template") and hasattr(candidate, "convert_tokens_to_ids"):
            return candidate
    raise ValueError(
        "WRPO datasets tokenise through the tokenizer's own chat template: the model needs a Hugging Face "
        f"tokenizer (model.tokenizer.library=huggingface), got {type(tokenizer).__name__}"
    )


def data_configs(
    data_cfg: Mapping[str, Any], seq_length: int, packed: bool
) -> tuple[ReadConfig, TokenizeConfig]:
    """The data layer's read and tokenise configs from NeMo's ``model.data`` section.

    Keys: ``records`` (the fields of :class:`~wrpo_nemo.data.records.ReadConfig`: layout, column names,
    system_prompt, on_invalid), ``max_prompt_length``, ``length_policy`` (drop | truncate), ``eot_token``.
    ``seq_length`` bounds one segment (prompt + response); packed, it also bounds a prompt's three segments.
    """
    read = ReadConfig(**dict(data_cfg.get("records", None) or {}))
    tokenize = TokenizeConfig(
        max_length=seq_length,
        max_prompt_length=int(data_cfg.get("max_prompt_length", None) or seq_length - 1),
        # Unpacked, the three segments are separate rows: only the per-segment bound applies.
        seq_length=seq_length if packed else 3 * seq_length,
        length_policy=data_cfg.get("length_policy", "drop"),
        eot_token=data_cfg.get("eot_token", None),
    )
    tokenize.validate()
    return read, tokenize


def tokenize_records(
    data: Sequence[Mapping[str, Any]],
    documents: Sequence[int],
    tokenizer: Any,
    read: ReadConfig,
    tokenize: TokenizeConfig,
    name: str = "",
) -> tuple[list[dict[str, Any]], Counter]:
    """Tokenised examples of ``data[documents]`` that the length policy keeps, and the count of every outcome.

    A bad record raises :class:`~wrpo_nemo.data.records.DataError` (``records.on_invalid: error``) or is
    counted by its cause (``skip``); the report also counts ``ok``, drops by cause and truncations.
    """
    hf = hf_tokenizer(tokenizer)
    eot_id = eot_token_id(hf, tokenize)
    kept: list[dict[str, Any]] = []
    report: Counter = Counter()
    first_at: dict[str, str] = {}
    for index in documents:
        where = f"{name} record {int(index) + 1}"
        try:
            example = parse_record(data[int(index)], where, read)
            if example.prompt_id in first_at:  # as the recipe's reader: a repeated prompt would count twice
                raise duplicate_error(example, first_at[example.prompt_id], read)
            first_at[example.prompt_id] = where
            tokenized = tokenize_example(hf, example, tokenize, eot_id)
        except DataError as err:
            if read.on_invalid != "skip":
                raise
            report[f"invalid/{err.cause}"] += 1
            continue
        report[tokenized["status"]] += 1
        report["prompt_truncated"] += int(tokenized["prompt_truncated"])
        report["responses_truncated"] += tokenized["responses_truncated"]
        if tokenized["status"] == "ok":
            kept.append(tokenized)
    if not kept:
        raise ValueError(f"{name}: every record was dropped or invalid: {dict(report)}")
    log.info("WRPO %s data: %s", name, dict(report))
    return kept, report


def segment_ids_and_labels(tokenized: Mapping[str, Any], role: str) -> tuple[list[int], list[int]]:
    """The full segment ``prompt + response`` and its labels before the shift (``-100`` on the prompt)."""
    prompt, response = list(tokenized["prompt_ids"]), list(tokenized[f"{role}_ids"])
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response


def unpacked_item(tokenized: Mapping[str, Any], pad_id: int) -> dict[str, Any]:
    """One prompt's item: ``<role>``, ``<role>_labels`` (padded to the longest of the three) and ``<role>_length``."""
    rows = {}
    for role in ROLES:
        full, labels = segment_ids_and_labels(tokenized, role)
        # Position j predicts token j + 1: inputs drop the last token, labels the first.
        rows[role] = (full[:-1], labels[1:])
    width = max(len(tokens) for tokens, _ in rows.values())
    item: dict[str, Any] = {}
    for role, (tokens, labels) in rows.items():
        pad = width - len(tokens)
        item[role] = torch.tensor(tokens + [pad_id] * pad, dtype=torch.long)
        item[f"{role}_labels"] = torch.tensor(labels + [IGNORE_INDEX] * pad, dtype=torch.long)
        item[f"{role}_length"] = len(tokens)
    return item


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_id", None)
    return int(eos if eos is not None else hf_tokenizer(tokenizer).eos_token_id)


class WRPOModelDataset(torch.utils.data.Dataset):
    """WRPO records for NeMo-Aligner's DPO data path (unpacked); the constructor is ``DPOModelDataset``'s.

    Pass it to ``nemo_aligner.data.nlp.builders.build_train_valid_test_datasets`` (see
    :mod:`wrpo_nemo.integrations.nemo_aligner.packed` for ready partials) and collate global batches with
    :func:`wrpo_custom_collate`.
    """

    def __init__(
        self,
        cfg: Any,
        tokenizer: Any,
        name: str,
        data_prefix: Any,
        documents: np.ndarray,
        data: Sequence[Mapping[str, Any]],
        seq_length: int,
        seed: int,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.name = name
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        self.drop_last = drop_last
        self.eos_id = _eos_id(tokenizer)
        read, tokenize = data_configs(cfg.data, seq_length, packed=False)
        self.examples, self.report = tokenize_records(data, documents, tokenizer, read, tokenize, name)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return unpacked_item(self.examples[idx], self.eos_id)


def _data_parallel_max(value: int) -> int:
    # Every data-parallel rank must pad to the same length, as NeMo-Aligner's collate does; the reduction runs
    # on the device of the process group's backend (CUDA under NCCL, CPU under gloo).
    if not (dist.is_available() and dist.is_initialized()):
        return value
    from megatron.core import parallel_state

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(value, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
    return int(tensor.item())


def wrpo_custom_collate(
    batch: list[dict[str, Any]],
    eos_id: int,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    pad_length_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """``dpo_custom_collate`` for three responses: one width for all of them, a causal mask, position ids.

    The result holds ``<role>``, ``<role>_labels`` and ``<role>_length`` for every role, ``attention_mask``
    (``[B, 1, S, S]``, True = masked out) and ``position_ids`` (``[B, S]``).
    """
    if pad_length_to_multiple_of is not None and pad_length_to_multiple_of < 0:
        raise ValueError(f"{pad_length_to_multiple_of=} must be >= 0")
    width = max(item[role].numel() for item in batch for role in ROLES)
    if pad_length_to_multiple_of:
        width = math.ceil(_data_parallel_max(width) / pad_length_to_multiple_of) * pad_length_to_multiple_of
    out: dict[str, torch.Tensor] = {}
    for role in ROLES:
        tokens = torch.full((len(batch), width), eos_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for row, item in enumerate(batch):
            n = item[role].numel()
            tokens[row, :n] = item[role]
            labels[row, :n] = item[f"{role}_labels"]
        out[role] = tokens
        out[f"{role}_labels"] = labels
        out[f"{role}_length"] = torch.tensor([item[f"{role}_length"] for item in batch], dtype=torch.long)
    from nemo.collections.nlp.modules.common.megatron.utils import get_ltor_masks_and_position_ids

    attention_mask, _, position_ids = get_ltor_masks_and_position_ids(
        out[ROLES[0]], eos_id, reset_position_ids, reset_attention_mask, eod_mask_loss
    )
    if attention_mask.shape[0] == 1:
        attention_mask = attention_mask.repeat(len(batch), 1, 1, 1)
    out["attention_mask"] = attention_mask
    out["position_ids"] = position_ids
    return out
