"""Packing: every segment of a micro-batch is its prompt + response, labels hold the response exactly, a
prompt's three segments share one row, and the shape is the fixed one the schedules need."""

import numpy as np
import pytest
import torch

from wrpo_nemo.data.cache import DataConfig, build_or_load
from wrpo_nemo.data.layout import IGNORE_INDEX, ROLE_NAMES, SOURCE_CHOSEN
from wrpo_nemo.data.packing import (
    PackingError,
    first_fit_decreasing,
    group_lengths,
    pack_micro_batch,
    packing_efficiency,
    rows_needed,
)
from wrpo_nemo.data.tokenize import TokenizeConfig
from wrpo_nemo.data.toy import build_toy_dataset, build_toy_tokenizer

SEQ = 256


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    tok = build_toy_tokenizer()
    paths = build_toy_dataset(str(root), num_examples=64, seed=5)
    cfg = DataConfig(
        sources=[paths["train"]],
        cache_dir=str(root / "cache"),
        num_workers=1,
        tokenize=TokenizeConfig(max_length=64, max_prompt_length=32, seq_length=SEQ),
    )
    return build_or_load(cfg, tok), tok.pad_token_id


def _sequences(batch):
    """``{segment: (flat positions of its prompt + response)}``, read from the attention spans: a response's
    sequence is its span's prefix (the shared prompt, if any) followed by the span itself."""
    seqs = {}
    for start, end, pre_start, pre_end in batch.attn_spans.tolist():
        if pre_start < 0:
            continue
        labelled = batch.loss_mask.reshape(-1)[start:end]
        if labelled.any():
            seg = int(batch.segment_ids.reshape(-1)[start])
            seqs[seg] = list(range(pre_start, pre_end)) + list(range(start, end))
    return seqs


def _segments(batch):
    """``(row, start, end)`` of every segment's own span (its response and the prompt tokens it carries)."""
    seq = batch.tokens.shape[1]
    return {
        seg: (flat[-1] // seq, flat[0] % seq, flat[-1] % seq + 1) for seg, flat in _sequences(batch).items()
    }


@pytest.mark.parametrize("layout", ["shared_prompt", "separate"])
@pytest.mark.parametrize("stage", ["wrpo", "sft"])
def test_every_segment_is_its_prompt_then_its_response_with_labels_on_the_response_only(toy, stage, layout):
    dataset, pad = toy
    indices = [3, 17, 5, 40, 22, 9]
    batch = pack_micro_batch(dataset, indices, stage, SEQ, rows=4, pad_id=pad, layout=layout)
    batch.validate()
    seqs = _sequences(batch)
    roles = (SOURCE_CHOSEN,) if stage == "sft" else (0, 1, 2)
    assert sorted(zip(batch.segment_prompt.tolist(), batch.segment_role.tolist(), strict=True)) == sorted(
        (k, r) for k in range(len(indices)) for r in roles
    )
    assert sorted(seqs) == list(range(batch.num_segments))
    tokens, positions = batch.tokens.reshape(-1), batch.position_ids.reshape(-1)
    labels, loss_mask = batch.labels.reshape(-1), batch.loss_mask.reshape(-1)
    for seg, flat in seqs.items():
        index = indices[int(batch.segment_prompt[seg])]
        prompt = dataset.ids("prompt", index).tolist()
        response = dataset.ids(ROLE_NAMES[int(batch.segment_role[seg])], index).tolist()
        assert tokens[flat].tolist() == prompt + response
        assert positions[flat].tolist() == list(range(len(flat)))
        own = flat[len(flat) - len(response) - 1 :]  # the positions whose labels are the response
        assert labels[own[:-1]].tolist() == response and loss_mask[own[:-1]].all()
        assert int(labels[flat[-1]]) == IGNORE_INDEX
    assert int(loss_mask.sum()) == sum(len(dataset.ids(ROLE_NAMES[int(batch.segment_role[s])],
        indices[int(batch.segment_prompt[s])])) for s in range(batch.num_segments))  # fmt: skip
    assert batch.prompt_index.tolist() == indices


@pytest.mark.parametrize("layout", ["shared_prompt", "separate"])
def test_without_padding_keeps_every_sequence_and_drops_only_padding(toy, layout):
    dataset, pad = toy
    batch = pack_micro_batch(dataset, [3, 17, 5, 40], "wrpo", SEQ, rows=4, pad_id=pad, layout=layout)
    compact = batch.without_padding(multiple=16)
    compact.validate()
    real = int((batch.segment_ids >= 0).sum())
    assert compact.tokens.shape == (1, -(-real // 16) * 16) and int((compact.segment_ids >= 0).sum()) == real
    for name in ("tokens", "labels", "loss_mask", "position_ids", "segment_ids"):
        before, after = getattr(batch, name).reshape(-1), getattr(compact, name).reshape(-1)
        for (seg, a), (seg2, b) in zip(
            sorted(_sequences(batch).items()), sorted(_sequences(compact).items()), strict=True
        ):
            assert seg == seg2 and torch.equal(before[a], after[b]), name


def test_shared_prompt_layout_holds_each_prompt_once(toy):
    dataset, pad = toy
    indices = [3, 17, 5]
    shared = pack_micro_batch(dataset, indices, "wrpo", SEQ, rows=2, pad_id=pad, layout="shared_prompt")
    separate = pack_micro_batch(dataset, indices, "wrpo", SEQ, rows=2, pad_id=pad, layout="separate")
    prompts = sum(len(dataset.ids("prompt", i)) for i in indices)
    real = [int((b.segment_ids >= 0).sum()) for b in (shared, separate)]
    # The shared layout repeats only each prompt's last token, once per response after the first.
    assert real[1] - real[0] == 2 * prompts - 2 * len(indices)
    assert real[0] == int(group_lengths(dataset, "wrpo", "shared_prompt")[indices].sum())


def test_padding_has_no_segment_no_label_and_the_pad_id(toy):
    dataset, pad = toy
    batch = pack_micro_batch(dataset, [0, 1], "wrpo", SEQ, rows=3, pad_id=pad)
    padding = batch.segment_ids < 0
    assert padding.any()
    assert (batch.tokens[padding] == pad).all() and (batch.labels[padding] == IGNORE_INDEX).all()
    assert not batch.loss_mask[padding].any()


def test_the_three_segments_of_a_prompt_share_one_row(toy):
    dataset, pad = toy
    batch = pack_micro_batch(dataset, list(range(12)), "wrpo", SEQ, rows=8, pad_id=pad)
    spans = _segments(batch)
    for k in range(12):
        rows = {spans[s][0] for s in range(batch.num_segments) if int(batch.segment_prompt[s]) == k}
        assert len(rows) == 1


def test_shape_is_fixed_whatever_the_prompts(toy):
    dataset, pad = toy
    shapes = {
        tuple(pack_micro_batch(dataset, [i, i + 1], "wrpo", SEQ, 3, pad).tokens.shape)
        for i in range(0, 20, 2)
    }
    assert shapes == {(3, SEQ)}


def test_prompts_that_do_not_fit_the_rows_name_the_keys_to_change(toy):
    dataset, pad = toy
    with pytest.raises(PackingError, match="rows_per_micro_batch=1"):
        pack_micro_batch(dataset, list(range(10)), "wrpo", SEQ, rows=1, pad_id=pad)
    with pytest.raises(PackingError, match="seq_length=16"):
        pack_micro_batch(dataset, [0], "wrpo", 16, rows=4, pad_id=pad)


def test_reference_logps_follow_prompt_index(toy):
    dataset, pad = toy
    table = np.arange(len(dataset) * 3, dtype=np.float32).reshape(-1, 3)
    batch = pack_micro_batch(dataset, [7, 2, 30], "wrpo", SEQ, 4, pad, reference_logps=table)
    batch.validate()
    assert torch.equal(batch.reference_logps, torch.from_numpy(table[[7, 2, 30]]))


def test_efficiency_is_real_tokens_over_row_tokens(toy):
    dataset, pad = toy
    indices = [1, 2, 3, 4]
    batch = pack_micro_batch(dataset, indices, "wrpo", SEQ, rows=5, pad_id=pad)
    real = int(group_lengths(dataset, "wrpo")[indices].sum())
    assert packing_efficiency(batch) == pytest.approx(real / (5 * SEQ))


def test_first_fit_decreasing_places_every_group_once_without_overflow():
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = rng.integers(1, 100, size=int(rng.integers(1, 40)))
        rows = first_fit_decreasing(lengths, 100)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(lengths[row].sum() <= 100 for row in rows)
        # First-fit decreasing is within 11/9 OPT + 1 of the optimum; the sum bound is a floor on OPT.
        assert len(rows) <= 11 / 9 * np.ceil(lengths.sum() / 100) + 1
        assert rows_needed(lengths, 100) == len(rows)


@pytest.mark.parametrize("layout", ["shared_prompt", "separate"])
def test_packed_rows_give_each_response_the_log_prob_it_has_alone(toy, layout):
    """The whole contract at once: tokens, position ids, attention spans (as a dense mask given to an HF model),
    segment ids, labels and loss mask of a packed batch give every response the summed log-prob a model gives
    it unpacked, in both layouts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from wrpo_nemo.data.layout import dense_attention_mask

    dataset, pad = toy
    batch = pack_micro_batch(dataset, [0, 1, 2, 3, 4], "wrpo", SEQ, rows=3, pad_id=pad, layout=layout)
    batch.validate()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    allowed = dense_attention_mask(batch) | torch.eye(batch.tokens.numel(), dtype=torch.bool)  # pads: self
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        logits = model(
            input_ids=batch.tokens.reshape(1, -1),
            position_ids=batch.position_ids.reshape(1, -1),
            attention_mask=additive[None, None],
        ).logits.view(*batch.tokens.shape, -1)
    token_logps = torch.log_softmax(logits, -1).gather(-1, batch.labels.clamp(min=0)[..., None])[..., 0]
    sums = torch.zeros(batch.num_segments).index_add_(
        0, batch.segment_ids.clamp(min=0).flatten(), (token_logps * batch.loss_mask).flatten()
    )
    for seg in range(batch.num_segments):
        index = int(batch.prompt_index[batch.segment_prompt[seg]])
        prompt = torch.from_numpy(dataset.ids("prompt", index).astype(np.int64))
        response = torch.from_numpy(
            dataset.ids(ROLE_NAMES[int(batch.segment_role[seg])], index).astype(np.int64)
        )
        with torch.no_grad():
            alone = torch.log_softmax(model(input_ids=torch.cat([prompt, response])[None]).logits[0], -1)
        expected = alone[len(prompt) - 1 : -1].gather(-1, response[:, None])[:, 0].sum()
        assert float(sums[seg]) == pytest.approx(float(expected), abs=1e-4)
