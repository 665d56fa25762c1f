"""Segment-aware attention: the local per-span SDPA against float64 dense attention, the THD inputs built for
TransformerEngine against the segment boundaries of real packed batches, and the forward step's arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wrpo_nemo.data.cache import DataConfig, build_or_load
from wrpo_nemo.data.layout import ROLE_NAMES, dense_attention_mask
from wrpo_nemo.data.packing import PAD_SPAN, pack_micro_batch
from wrpo_nemo.data.tokenize import TokenizeConfig
from wrpo_nemo.data.toy import build_toy_dataset, build_toy_tokenizer
from wrpo_nemo.models.attention import (
    PADDING_MASK,
    SHARED_PREFIX_MASK,
    RotaryTable,
    SegmentAttentionParams,
    apply_rotary,
    params_from_spans,
    segment_attention,
)

SEQ = 128


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy-attn")
    tok = build_toy_tokenizer()
    paths = build_toy_dataset(str(root), num_examples=32, seed=3)
    cfg = DataConfig(
        sources=[paths["train"]], cache_dir=str(root / "cache"), num_workers=1,
        tokenize=TokenizeConfig(max_length=64, max_prompt_length=32, seq_length=SEQ),
    )  # fmt: skip
    return build_or_load(cfg, tok), tok.pad_token_id


def _dense_reference(q, k, v, allowed, scale):
    """float64 softmax attention under a dense ``[T, T]`` allowed-mask; GQA by repeating key/value heads."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # padding rows attend to nothing here
    return torch.einsum("hqk,khd->qhd", probs, v)


@pytest.mark.parametrize("dense_chunk", [0, 48, 100, 256])
@pytest.mark.parametrize("layout", ["shared_prompt", "separate"])
def test_segment_attention_equals_float64_dense_attention_with_gradients(
    toy, layout, dense_chunk, monkeypatch
):
    """Every way the local backend runs a span (alone, causal or over a shared prompt with two merged flash
    calls; or with its neighbours in one masked call) against float64 softmax attention under the layout's
    dense mask, outputs and gradients."""
    from wrpo_nemo.models import attention

    monkeypatch.setattr(attention, "DENSE_CHUNK", dense_chunk)
    dataset, pad = toy
    batch = pack_micro_batch(dataset, [0, 5, 9, 11], "wrpo", SEQ, rows=5, pad_id=pad, layout=layout)
    total, heads, groups, dim = batch.tokens.numel(), 4, 2, 8
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(total, h, dim, generator=gen, requires_grad=True) for h in (heads, groups, groups))
    params = params_from_spans(batch.attn_spans, batch.position_ids)
    plan = params.local_plan(q.device)
    assert [e[0] for e in plan] == [0] + [e[1] for e in plan[:-1]] and plan[-1][1] == total  # tiles, in order
    kinds = {entry[2] for entry in plan}
    assert ("dense" in kinds) == (dense_chunk > 0) and ("prefix" in kinds) == (
        layout == "shared_prompt" and dense_chunk < 256
    )
    out = segment_attention(q, k, v, params, scale=dim**-0.5)
    real = (batch.segment_ids >= 0).reshape(-1)
    allowed = dense_attention_mask(batch)
    expected = _dense_reference(q, k, v, allowed, dim**-0.5)
    torch.testing.assert_close(out[real].double(), expected[real], rtol=1e-5, atol=1e-6)
    assert (out[~real] == 0).all()
    weight = torch.randn(out.shape, generator=gen) * real[:, None, None]
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weight.double()).sum(), (q, k, v))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6)


def _expected_sequences(dataset, batch, layout):
    """``(q_len, kv_len)`` of every THD sequence, from the dataset's token lengths and the row fill alone."""
    rows, seq = batch.tokens.shape
    out = []
    row_groups: dict[int, list[int]] = {}
    for k in range(batch.num_prompts):
        seg = int(np.nonzero((batch.segment_prompt == k).numpy())[0][0])
        row = int(np.nonzero((batch.segment_ids == seg).any(dim=1).numpy())[0][0])
        start = int(np.nonzero(batch.segment_ids[row].numpy() == seg)[0][0])
        row_groups.setdefault(row, []).append((start, k))
    for row in range(rows):
        used = 0
        for _, k in sorted(row_groups.get(row, [])):
            index = int(batch.prompt_index[k])
            p = len(dataset.ids("prompt", index))
            lens = [len(dataset.ids(name, index)) for name in ROLE_NAMES]
            if layout == "shared_prompt":
                out.append((p - 1, p - 1))
                out += [(1 + n, p + n) for n in lens]
                used += p - 1 + sum(1 + n for n in lens)
            else:
                out += [(p + n, p + n) for n in lens]
                used += sum(p + n for n in lens)
        for start in range(used, seq, PAD_SPAN):
            n = min(PAD_SPAN, seq - start)
            out.append((n, n))
    return out


@pytest.mark.parametrize("layout", ["shared_prompt", "separate"])
def test_thd_params_match_the_segment_boundaries(toy, layout):
    """What TransformerEngine reads: cu_seqlens_q/kv and max_seqlen from the groups' token lengths."""
    dataset, pad = toy
    batch = pack_micro_batch(dataset, [1, 2, 3, 4, 7], "wrpo", SEQ, rows=6, pad_id=pad, layout=layout)
    params = params_from_spans(batch.attn_spans, batch.position_ids)
    expected = _expected_sequences(dataset, batch, layout)
    q_lens, kv_lens = zip(*expected, strict=True)
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.dtype == torch.int32 and params.cu_seqlens_kv.dtype == torch.int32
    assert params.cu_seqlens_q.tolist() == np.concatenate([[0], np.cumsum(q_lens)]).tolist()
    assert params.cu_seqlens_kv.tolist() == np.concatenate([[0], np.cumsum(kv_lens)]).tolist()
    assert params.cu_seqlens_q[-1] == batch.tokens.numel()
    assert (params.max_seqlen_q, params.max_seqlen_kv) == (max(q_lens), max(kv_lens))
    te = params.te_kwargs()
    assert te["qkv_format"] == "thd" and te["cu_seqlens_q"] is params.cu_seqlens_q
    if layout == "shared_prompt":
        assert te["attn_mask_type"] == SHARED_PREFIX_MASK
        assert len(params.kv_index) == params.cu_seqlens_kv[-1]
    else:
        assert te["attn_mask_type"] == PADDING_MASK and params.kv_index is None


def _varlen_reference(q, k, v, params, scale):
    """TransformerEngine's THD semantics, written independently: sequence i attends its queries
    ``q[cu_q[i]:cu_q[i+1]]`` to keys ``k[cu_kv[i]:cu_kv[i+1]]`` under a causal mask aligned as the mask type
    says (bottom-right: the last query sees every key; top-left: query j sees keys 0..j)."""
    cu_q, cu_kv = params.cu_seqlens_q.tolist(), params.cu_seqlens_kv.tolist()
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    for i in range(len(cu_q) - 1):
        qs, ks, vs = q[cu_q[i] : cu_q[i + 1]], k[cu_kv[i] : cu_kv[i + 1]], v[cu_kv[i] : cu_kv[i + 1]]
        lq, lk = len(qs), len(ks)
        shift = lk - lq if params.te_kwargs()["attn_mask_type"] == SHARED_PREFIX_MASK else 0
        allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + shift
        out[cu_q[i] : cu_q[i + 1]] = _dense_reference(qs, ks, vs, allowed, scale)
    return out


@pytest.mark.parametrize("layout", ["shared_prompt", "separate"])
def test_the_thd_inputs_for_transformer_engine_attend_like_the_local_backend(toy, layout):
    dataset, pad = toy
    batch = pack_micro_batch(dataset, [6, 8, 12], "wrpo", SEQ, rows=5, pad_id=pad, layout=layout)
    params = params_from_spans(batch.attn_spans, batch.position_ids)
    total, dim = batch.tokens.numel(), 8
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(total, h, dim, generator=gen) for h in (4, 2, 2))
    k_thd, v_thd = params.gather_kv(k, v)
    via_te = _varlen_reference(q, k_thd, v_thd, params, dim**-0.5)
    local = segment_attention(q, k, v, params, dim**-0.5)
    real = (batch.segment_ids >= 0).reshape(-1)
    torch.testing.assert_close(via_te[real], local[real].double(), rtol=1e-5, atol=1e-6)


def test_rotary_table_rotates_like_the_textbook_formula():
    table = RotaryTable(8, 10000.0)
    positions = torch.tensor([0, 3, 1, 700, 2])  # any order, beyond the first table size
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    cos, sin = table.cos_sin(positions)
    got = apply_rotary(x, cos.double(), sin.double())
    inv = 1.0 / 10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    angle = positions.double()[:, None] * inv[None]  # [T, 4]: pair (i, i + 4) rotates by angle[:, i]
    x1, x2 = x[..., :4], x[..., 4:]
    c, s = angle.cos()[:, None], angle.sin()[:, None]
    expected = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("drop_padding", [False, True])
def test_forward_step_passes_thd_params_and_no_dense_mask(toy, drop_padding):
    """The step every backend runs: tokens as one [1, T] sequence (only the real ones, rounded up to a multiple
    of 16, when padding is dropped), no attention mask, SegmentAttentionParams whose rotary positions are the
    batch's (a stand-in model records what it is called with)."""
    from wrpo_nemo.training.step import make_forward_step

    dataset, pad = toy
    batch = pack_micro_batch(dataset, [0, 1], "wrpo", SEQ, rows=2, pad_id=pad)
    calls = []

    def model(tokens, position_ids, attention_mask, **kwargs):
        calls.append((tokens, position_ids, attention_mask, kwargs))
        return torch.zeros(1, tokens.shape[1], 5)

    seen = []
    step = make_forward_step(lambda b: seen.append(b) or (lambda out: out), torch.device("cpu"), drop_padding)
    output, _ = step(iter([batch]), model)
    ((tokens, position_ids, mask, kwargs),) = calls
    real = batch.tokens.reshape(-1)[(batch.segment_ids >= 0).reshape(-1)]
    if drop_padding:
        assert tokens.shape == (1, -(-len(real) // 16) * 16) and torch.equal(tokens[0, : len(real)], real)
    else:
        assert tokens.shape == (1, 2 * SEQ) and torch.equal(tokens[0], batch.tokens.reshape(-1))
    assert mask is None and position_ids is None and set(kwargs) == {"packed_seq_params"}
    params = kwargs["packed_seq_params"]
    assert isinstance(params, SegmentAttentionParams) and params.qkv_format == "thd"
    assert params.cu_seqlens_q[-1] == tokens.shape[1]
    assert torch.equal(params.positions, seen[0].position_ids.reshape(-1))
    assert output.shape == (*seen[0].tokens.shape, 5)


def test_a_dense_mask_or_missing_params_is_refused(megatron_single_process):
    from wrpo_nemo.models import build_gpt_model, get_preset

    model = build_gpt_model(get_preset("tiny"))
    tokens = torch.randint(0, 500, (1, 8))
    with pytest.raises(TypeError, match="packed_seq_params=SegmentAttentionParams"):
        model(tokens, None, None)
    params = params_from_spans([(0, 8, 0, 0)], torch.arange(8))
    with pytest.raises(ValueError, match="attention_mask=None"):
        model(tokens, None, torch.zeros(1, 1, 8, 8, dtype=torch.bool), packed_seq_params=params)


@pytest.mark.parametrize("dense_chunk", [0, 100, 256])
def test_every_mix_of_short_and_long_spans_is_attended_in_order(dense_chunk, monkeypatch):
    """Short spans pooled into masked chunks next to long spans run alone, a shared prompt inside a chunk with
    a response outside it, padding between: the plan still tiles the tokens in order and equals float64."""
    from wrpo_nemo.models import attention

    monkeypatch.setattr(attention, "DENSE_CHUNK", dense_chunk)
    spans = [(0, 20, 0, 0), (20, 100, 20, 20), (100, 130, 100, 100), (130, 140, 100, 130), (140, 230, 100, 130),
             (230, 294, -1, -1), (294, 300, -1, -1), (300, 310, 300, 300), (310, 320, 300, 310)]  # fmt: skip
    total = spans[-1][1]
    allowed = torch.zeros(total, total, dtype=torch.bool)
    for start, end, pre_start, pre_end in spans:
        allowed[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        if pre_start >= 0:
            allowed[start:end, pre_start:pre_end] = True
    params = params_from_spans(spans, torch.arange(total))
    plan = params.local_plan(torch.device("cpu"))
    assert [e[0] for e in plan] == [0] + [e[1] for e in plan[:-1]] and plan[-1][1] == total
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(total, h, 8, generator=gen, requires_grad=True) for h in (4, 2, 2))
    out = segment_attention(q, k, v, params, scale=0.35)
    real = torch.ones(total, dtype=torch.bool)
    real[230:300] = False
    expected = _dense_reference(q, k, v, allowed, 0.35)
    torch.testing.assert_close(out[real].double(), expected[real], rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out[real].sum(), (q, k, v))
    want = torch.autograd.grad(expected[real].sum(), (q, k, v))
    for got, exp in zip(grads, want, strict=True):
        torch.testing.assert_close(got.double(), exp.double(), rtol=1e-5, atol=1e-6)
