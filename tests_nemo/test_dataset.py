"""The WRPO datasets yield the project data layer's token ids and label masks for the same records.

The reference is the data layer's own path, run independently: the tokenised cache (``build_or_load``) and
its packed micro-batch (``pack_micro_batch``), whose ``labels``/``loss_mask`` say which positions predict a
response token. NeMo-Aligner's layout drops the last input token and the first label of each segment.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from wrpo_nemo.data.cache import DataConfig, build_or_load
from wrpo_nemo.data.layout import ROLE_NAMES
from wrpo_nemo.data.packing import pack_micro_batch
from wrpo_nemo.data.tokenize import TokenizeConfig

MAX_LENGTH, MAX_PROMPT = 48, 30


def _reference(path: str, tmp_path: Any, tokenizer: Any, seq_length: int) -> Any:
    """The data layer's tokenised dataset of ``path`` with the same length rules."""
    tokenize = TokenizeConfig(max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT, seq_length=seq_length)
    cfg = DataConfig(sources=[path], tokenize=tokenize, cache_dir=str(tmp_path / "cache"), num_workers=1)
    return build_or_load(cfg, tokenizer)


def _reference_segments(reference: Any, index: int, pad_id: int) -> dict[str, tuple[list[int], list[int]]]:
    """``role -> (inputs, labels)`` of example ``index`` from the data layer's packed batch, in NeMo's layout."""
    # NeMo-Aligner repeats the prompt for each response: compare with the data layer's separate layout.
    batch = pack_micro_batch(reference, [index], "wrpo", 3 * MAX_LENGTH, 1, pad_id, layout="separate")
    out = {}
    for segment, role in enumerate(batch.segment_role.tolist()):
        where = batch.segment_ids[0] == segment
        tokens, labels, mask = batch.tokens[0, where], batch.labels[0, where], batch.loss_mask[0, where]
        masked = torch.where(mask, labels, torch.full_like(labels, -100))
        out[ROLE_NAMES[role]] = (tokens[:-1].tolist(), masked[:-1].tolist())
    return out


def _cfg(**data: Any) -> Any:
    return OmegaConf.create({"data": {"max_prompt_length": MAX_PROMPT, **data}})


def test_unpacked_items_have_the_data_layers_token_ids_and_label_masks(
    tmp_path: Any, nemo_tokenizer: Any, toy_records: Any
) -> None:
    from wrpo_nemo.integrations.nemo_aligner.dataset import ROLES, WRPOModelDataset

    path, records = toy_records
    dataset = WRPOModelDataset(
        _cfg(), nemo_tokenizer, "train", path, np.arange(len(records)), records, MAX_LENGTH, 0
    )
    reference = _reference(path, tmp_path, nemo_tokenizer.tokenizer, 3 * MAX_LENGTH)

    assert len(dataset) == len(reference) == len(records)
    for index in range(len(dataset)):
        item = dataset[index]
        expected = _reference_segments(reference, index, nemo_tokenizer.eos_id)
        for role in ROLES:
            n = item[f"{role}_length"]
            assert item[role][:n].tolist() == expected[role][0], (index, role)
            assert item[f"{role}_labels"][:n].tolist() == expected[role][1], (index, role)
            assert (item[f"{role}_labels"][n:] == -100).all()


def test_packed_rows_after_nemo_collate_have_the_data_layers_token_ids_and_labels(
    tmp_path: Any, nemo_tokenizer: Any, toy_records: Any
) -> None:
    from wrpo_nemo.integrations.nemo_aligner.packed import WRPOPackedDataset

    path, records = toy_records
    seq_length = 160
    dataset = WRPOPackedDataset(
        _cfg(), nemo_tokenizer, "train", path, np.arange(len(records)), records, seq_length, 0
    )
    reference = _reference(path, tmp_path, nemo_tokenizer.tokenizer, seq_length)
    assert len(dataset) < len(records)  # rows hold several prompts
    assert sorted(k for row in dataset.data for k in row["prompts"]) == list(range(len(reference)))
    # A sample is a row (batch sizes count rows); the dataset says how many prompts a row holds on average.
    assert dataset.num_prompts == len(reference)
    assert dataset.prompts_per_row == pytest.approx(len(reference) / len(dataset))

    for row in dataset.data:
        out = dataset.global_collate_fn([row], eos_id=nemo_tokenizer.eos_id)
        bounds = out["cu_seqlens"][0].tolist()
        segment = 0
        for prompt in row["prompts"]:
            expected = _reference_segments(reference, prompt, nemo_tokenizer.eos_id)
            for role in ROLE_NAMES:  # the model's packed reduction relies on this order
                start, end = bounds[segment], bounds[segment + 1]
                assert out["input_ids"][0, start:end].tolist() == expected[role][0], (prompt, role)
                assert out["labels"][0, start:end].tolist() == expected[role][1], (prompt, role)
                assert out["position_ids"][0, start:end].tolist() == list(range(end - start))
                segment += 1


def test_packed_unpadded_boundaries_are_the_segment_boundaries_though_prompts_hold_eos(
    nemo_tokenizer: Any, toy_records: Any
) -> None:
    """Llama 3's eos (``<|eot_id|>``) ends every prompt turn; the segments must not end there."""
    from nemo_aligner.data.nlp.datasets import DPOPackedDataset

    from wrpo_nemo.integrations.nemo_aligner.packed import WRPOPackedDataset

    path, records = toy_records
    dataset = WRPOPackedDataset(
        _cfg(), nemo_tokenizer, "train", path, np.arange(len(records)), records, 160, 0
    )
    row = dataset.data[0]
    assert nemo_tokenizer.eos_id in row["input_ids"][: row["seq_boundaries"][1] - 1].tolist()

    out = dataset.global_collate_fn([row], eos_id=nemo_tokenizer.eos_id)
    parent = DPOPackedDataset.global_collate_fn(dataset, [row], eos_id=nemo_tokenizer.eos_id)

    segments = len(row["seq_boundaries"]) - 1
    real = out["cu_seqlens"][0, : segments + 1]
    unpadded = out["cu_seqlens_unpadded"][0]
    assert unpadded[: segments + 1].tolist() == real.tolist()
    assert unpadded[int(out["cu_seqlens_unpadded_argmin"][0])] == -1
    # NeMo-Aligner's own rule (first eos = end of the unpadded segment) would cut the first segment short.
    assert parent["cu_seqlens_unpadded"][0, 1] < real[1]


def test_dropped_examples_are_left_out_and_counted_like_the_data_layer(
    tmp_path: Any, nemo_tokenizer: Any, toy_records: Any
) -> None:
    from wrpo_nemo.integrations.nemo_aligner.dataset import WRPOModelDataset

    records = [dict(r) for r in toy_records[1][:6]]
    long_answer = " ".join(["the answer is 1 ."] * 20)
    records[2]["rejected"] = [{"role": "assistant", "content": long_answer}]
    path = tmp_path / "with_long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))

    dataset = WRPOModelDataset(
        _cfg(), nemo_tokenizer, "train", str(path), np.arange(6), records, MAX_LENGTH, 0
    )
    reference = _reference(str(path), tmp_path, nemo_tokenizer.tokenizer, 3 * MAX_LENGTH)

    assert (
        dataset.report["response_too_long"] == reference.report["dropped_by_length"]["response_too_long"] == 1
    )
    assert len(dataset) == len(reference) == 5
    assert [e["prompt_id"] for e in dataset.examples] == reference.prompt_ids


def test_collate_stacks_three_roles_to_one_width_with_a_causal_mask(
    nemo_tokenizer: Any, toy_records: Any
) -> None:
    from wrpo_nemo.integrations.nemo_aligner.dataset import ROLES, WRPOModelDataset, wrpo_custom_collate

    path, records = toy_records
    dataset = WRPOModelDataset(
        _cfg(), nemo_tokenizer, "train", path, np.arange(len(records)), records, MAX_LENGTH, 0
    )
    items = [dataset[i] for i in range(4)]

    batch = wrpo_custom_collate(items, eos_id=nemo_tokenizer.eos_id, pad_length_to_multiple_of=16)

    width = batch[ROLES[0]].shape[1]
    assert width % 16 == 0
    for role in ROLES:
        assert batch[role].shape == batch[f"{role}_labels"].shape == (4, width)
        for row, item in enumerate(items):
            n = item[f"{role}_length"]
            assert batch[role][row, :n].tolist() == item[role][:n].tolist()
            assert (batch[f"{role}_labels"][row, n:] == -100).all()
    # True = masked out: each position sees itself and the past only.
    expected_mask = ~torch.tril(torch.ones(width, width, dtype=torch.bool))
    assert torch.equal(batch["attention_mask"][0, 0], expected_mask)
    assert batch["position_ids"][0].tolist() == list(range(width))


def test_a_nemo_tokenizer_without_a_hugging_face_one_is_refused() -> None:
    from wrpo_nemo.integrations.nemo_aligner.dataset import hf_tokenizer

    class SentencePieceLike:
        def text_to_ids(self, text: str) -> list[int]:
            return []

    with pytest.raises(ValueError, match="library=huggingface"):
        hf_tokenizer(SentencePieceLike())


def test_a_repeated_prompt_id_is_refused_or_skipped_like_the_data_layer(
    tmp_path: Any, nemo_tokenizer: Any, toy_records: Any
) -> None:
    from wrpo_nemo.data.records import DataError
    from wrpo_nemo.integrations.nemo_aligner.dataset import WRPOModelDataset

    records = [dict(r) for r in toy_records[1][:4]]
    records.append(dict(records[1]))  # record 5 repeats record 2
    path = tmp_path / "repeated.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))

    with pytest.raises(DataError) as err:
        WRPOModelDataset(_cfg(), nemo_tokenizer, "train", str(path), np.arange(5), records, MAX_LENGTH, 0)
    assert "record 5" in str(err.value) and "first at train record 2" in str(err.value)
    assert err.value.cause == "duplicate_prompt_id"

    skipping = WRPOModelDataset(
        _cfg(records={"on_invalid": "skip"}),
        nemo_tokenizer,
        "train",
        str(path),
        np.arange(5),
        records,
        MAX_LENGTH,
        0,
    )
    from wrpo_nemo.data.records import ReadConfig

    tokenize = TokenizeConfig(max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT, seq_length=3 * MAX_LENGTH)
    cfg = DataConfig(
        sources=[str(path)],
        read=ReadConfig(on_invalid="skip"),
        tokenize=tokenize,
        cache_dir=str(tmp_path / "cache"),
        num_workers=1,
    )
    reference = build_or_load(cfg, nemo_tokenizer.tokenizer)
    assert reference.report["duplicate_prompt_ids"] == 1
    assert len(skipping) == 4 and skipping.report["invalid/duplicate_prompt_id"] == 1
    assert [e["prompt_id"] for e in skipping.examples] == reference.prompt_ids
