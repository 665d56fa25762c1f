"""Segment-aware attention over packed rows, the same contract on every backend (layer 3).

A packed micro-batch (:class:`wrpo_nemo.data.layout.PackedBatch`) runs through megatron's ``GPTModel`` as one
THD sequence of ``rows * seq_length`` tokens (batch dimension 1) with a :class:`SegmentAttentionParams`, a
megatron ``PackedSeqParams`` that also carries the micro-batch's attention spans and rotary positions. No
backend sees or needs a dense ``[seq, seq]`` mask:

- **TransformerEngine** (:func:`te_segment_attention_class`): megatron's ``TEDotProductAttention`` called in
  THD format with ``cu_seqlens_q``/``cu_seqlens_kv`` and ``max_seqlen_q``/``max_seqlen_kv``. In the
  ``shared_prompt`` layout a response's keys are its prompt followed by itself, so the keys and values are
  gathered into that order (``kv_index``; the prompt's gradient accumulates from every response through the
  gather) and the mask is ``padding_causal_bottom_right``; in the ``separate`` layout ``cu_seqlens_kv`` equals
  ``cu_seqlens_q`` and the mask is ``padding_causal``.
- **Everywhere else** (:class:`SegmentCoreAttention`: CPU, or a GPU without TransformerEngine): torch
  ``scaled_dot_product_attention`` on each span, causal, with the shared prompt's keys in front
  (``causal_lower_right`` alignment). Cost grows with the sum of squared span lengths, not with the row.

Rotary embeddings are applied here, not by ``GPTModel`` (built with ``position_embedding_type="none"``):
megatron computes rope from a token's offset in the sequence (in THD, from the start of its ``cu_seqlens``
sequence), while a response of the ``shared_prompt`` layout must continue from its prompt's end. The positions
travel with the params; cos/sin come from one table per model, grown as needed, gathered once per micro-batch
and shared by every layer. The layer spec and this format are chosen together in
:func:`wrpo_nemo.models.builder.select_layer_spec`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from wrpo_nemo.models.config import RopeScaling

DENSE_CHUNK = 256
"""Consecutive spans up to this many tokens in all are attended by the local backend in one masked call."""
PADDING_MASK = "padding_causal"
SHARED_PREFIX_MASK = "padding_causal_bottom_right"


def llama3_scaled_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1's rotary frequency scaling (Hugging Face ``rope_type: llama3``)."""
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryTable:
    """cos/sin of every rotary position up to the longest seen, per device; one object per model.

    Megatron's non-interleaved layout: the frequencies are repeated over both halves of the head dimension.
    """

    def __init__(self, dim: int, theta: float, scaling: RopeScaling | None = None) -> None:
        self.dim, self.theta, self.scaling = dim, theta, scaling
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.inv_freq = llama3_scaled_inv_freq(inv_freq, scaling) if scaling is not None else inv_freq
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``cos``, ``sin`` of ``positions`` (``[T]``), each ``[T, dim]``."""
        need = int(positions.max()) + 1 if positions.numel() else 1
        table = self._tables.get(positions.device)
        if table is None or table[0].shape[0] < need:
            size = 1 << max(need - 1, 1).bit_length()  # grow by powers of two: few rebuilds
            seq = torch.arange(size, dtype=torch.float32, device=positions.device)
            freqs = torch.outer(seq, self.inv_freq.to(positions.device))
            emb = torch.cat([freqs, freqs], dim=-1)
            table = (emb.cos(), emb.sin())
            self._tables[positions.device] = table
        return table[0][positions], table[1][positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (``[T, heads, dim]``) by per-token ``cos``/``sin`` (``[T, dim]``), non-interleaved."""
    cos, sin = cos.to(x.dtype)[:, None, :], sin.to(x.dtype)[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _single_entry(start: int, end: int, pre_start: int, pre_end: int, device: torch.device) -> tuple:
    if pre_end <= pre_start:
        return (start, end, "causal", start, start, None)
    q_len, kv_len = end - start, pre_end - pre_start + end - start
    # causal_lower_right: query i sits at key position (kv_len - q_len + i).
    mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
    return (start, end, "prefix", pre_start, pre_end, mask)


class _SegmentAttentionMethods:
    """What :class:`SegmentAttentionParams` adds to megatron's ``PackedSeqParams`` beyond fields."""

    def local_plan(self, device: torch.device) -> list[tuple]:
        """How the local backend runs the spans, built once per micro-batch for every layer.

        Entries ``(start, end, kind, prefix_start, prefix_end, mask)`` tile the tokens: ``pad`` (runs of padding
        merged; zeros), ``causal`` (a span without prefix), ``prefix`` (a span over a shared prompt; ``mask`` is
        its ``causal_lower_right`` mask for backends without the two-call path) and ``dense``: consecutive short
        spans, up to :data:`DENSE_CHUNK` tokens, attended in one call under their joint mask (``mask``), where
        one kernel call per tiny span would cost more in dispatch than the masked-out scores do.
        """
        if self._local_plan is not None:
            return self._local_plan
        plan: list = []
        chunk: list[tuple[int, int, int, int]] = []

        def flush() -> None:
            if len(chunk) == 1:
                start, end, pre_start, pre_end = chunk[0]
                plan.append(_single_entry(start, end, pre_start, pre_end, device))
            elif chunk:
                begin, finish = chunk[0][0], chunk[-1][1]
                allowed = torch.zeros(finish - begin, finish - begin, dtype=torch.bool)
                for start, end, pre_start, pre_end in chunk:
                    a, b = start - begin, end - begin
                    allowed[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
                    allowed[a:b, pre_start - begin : pre_end - begin] = True
                plan.append((begin, finish, "dense", -1, -1, allowed.to(device)))
            chunk.clear()

        for start, end, pre_start, pre_end in self.spans:
            if pre_start < 0:
                flush()
                if plan and plan[-1][2] == "pad" and plan[-1][1] == start:
                    plan[-1] = (plan[-1][0], end, "pad", -1, -1, None)
                else:
                    plan.append((start, end, "pad", -1, -1, None))
                continue
            size = end - (chunk[0][0] if chunk else start)
            inside = pre_end <= pre_start or (chunk and pre_start >= chunk[0][0])
            if not (size <= DENSE_CHUNK and inside):
                flush()
            if end - start <= DENSE_CHUNK // 2 and (pre_end <= pre_start or chunk):
                chunk.append((start, end, pre_start, pre_end))
            else:
                flush()
                plan.append(_single_entry(start, end, pre_start, pre_end, device))
        flush()
        self._local_plan = plan
        return plan

    @property
    def mask_type(self) -> str:
        """TransformerEngine's mask type for these sequences."""
        return SHARED_PREFIX_MASK if self.shared_prefix else PADDING_MASK

    def rotate(
        self, query: torch.Tensor, key: torch.Tensor, table: RotaryTable
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``query``/``key`` (``[T, heads, dim]``) rotated to their tokens' positions (cos/sin gathered once
        per micro-batch and table, then reused by every layer)."""
        cached = self._rotary_cache.get(id(table))
        if cached is None:
            cached = table.cos_sin(self.positions)
            self._rotary_cache[id(table)] = cached
        cos, sin = cached
        return apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)

    def gather_kv(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values in the order ``cu_seqlens_kv`` describes (each response's prompt in front)."""
        if self.kv_index is None:
            return key, value
        return key.index_select(0, self.kv_index), value.index_select(0, self.kv_index)

    def te_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of TransformerEngine's ``DotProductAttention.forward`` for these sequences."""
        return {
            "qkv_format": "thd",
            "cu_seqlens_q": self.cu_seqlens_q,
            "cu_seqlens_kv": self.cu_seqlens_kv,
            "max_seqlen_q": self.max_seqlen_q,
            "max_seqlen_kv": self.max_seqlen_kv,
            "attn_mask_type": self.mask_type,
        }


if TYPE_CHECKING:  # the real class is made on first use, by _params_class
    SegmentAttentionParams = _SegmentAttentionMethods


@functools.cache
def _params_class() -> type:
    # Made on first use: megatron.core takes seconds to import, and importing this module (the model layer,
    # config validation, converters) must not pay for it.
    from megatron.core.packed_seq_params import PackedSeqParams

    @dataclass
    class SegmentAttentionParams(_SegmentAttentionMethods, PackedSeqParams):
        """megatron's ``PackedSeqParams`` (THD, read by TransformerEngine) plus what our attention needs.

        ``spans`` are ``(start, end, prefix_start, prefix_end)`` over the flat tokens (see
        :mod:`wrpo_nemo.data.layout`); ``kv_index`` orders the keys as TransformerEngine reads them (``None``
        when every span's keys are its own tokens); ``positions`` are the rotary positions (``[T]``).
        """

        spans: list[tuple[int, int, int, int]] = field(default_factory=list)
        kv_index: torch.Tensor | None = None
        positions: torch.Tensor | None = None
        shared_prefix: bool = False
        _rotary_cache: dict = field(default_factory=dict, repr=False)
        _local_plan: list | None = field(default=None, repr=False)

    SegmentAttentionParams.__module__ = __name__
    SegmentAttentionParams.__qualname__ = "SegmentAttentionParams"
    return SegmentAttentionParams


def __getattr__(name: str):
    if name == "SegmentAttentionParams":
        return _params_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def params_from_spans(
    spans: torch.Tensor | list, positions: torch.Tensor, device: torch.device | str | None = None
) -> SegmentAttentionParams:
    """:class:`SegmentAttentionParams` for ``spans`` (``[num_spans, 4]``) and flat rotary ``positions``."""
    raw = spans.cpu().numpy() if torch.is_tensor(spans) else spans
    table = np.asarray(raw, dtype=np.int64).reshape(-1, 4)
    device = positions.device if device is None else torch.device(device)
    start, end, pre_start, pre_end = table.T
    prefix = np.where(pre_start >= 0, pre_end - pre_start, 0)
    q_lens = end - start
    kv_lens = prefix + q_lens
    shared = bool((prefix > 0).any())
    kv_index = None
    if shared:
        # Each span's keys: its prefix (the shared prompt), then itself; vectorised, not a torch call per span.
        piece_start = np.stack([pre_start, start], axis=1).reshape(-1)
        piece_len = np.stack([prefix, q_lens], axis=1).reshape(-1)
        offsets = np.cumsum(piece_len) - piece_len
        kv_index = torch.from_numpy(np.arange(piece_len.sum()) + np.repeat(piece_start - offsets, piece_len))
    cu_q = torch.from_numpy(np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32))
    cu_kv = torch.from_numpy(np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32))
    spans = [tuple(s) for s in table.tolist()]
    return _params_class()(
        qkv_format="thd",
        cu_seqlens_q=cu_q.to(device),
        cu_seqlens_kv=cu_kv.to(device),
        max_seqlen_q=int(q_lens.max()),
        max_seqlen_kv=int(kv_lens.max()),
        spans=spans,
        kv_index=kv_index.to(device) if shared else None,
        positions=positions.reshape(-1).to(device),
        shared_prefix=shared,
    )


def causal_rows_params(
    rows: int, seq_length: int, device: torch.device | str = "cpu"
) -> SegmentAttentionParams:
    """Params for ``rows`` rows that each hold one causal sequence from position 0 (no packing)."""
    spans = [(r * seq_length, (r + 1) * seq_length, r * seq_length, r * seq_length) for r in range(rows)]
    positions = torch.arange(seq_length).repeat(rows)
    return params_from_spans(spans, positions, device)


def _require_params(packed_seq_params: Any, attention_mask: Any) -> SegmentAttentionParams:
    if not isinstance(packed_seq_params, _params_class()):
        raise TypeError(
            "this model attends per packed segment: call it with packed_seq_params=SegmentAttentionParams "
            "(wrpo_nemo.models.attention), tokens as one [1, T] sequence; a dense attention mask is not used"
        )
    if attention_mask is not None:
        raise ValueError("pass attention_mask=None: the segments in packed_seq_params decide the attention")
    return packed_seq_params


class _PrefixCausalAttention(torch.autograd.Function):
    """Queries over (prefix keys, all visible) + (own keys, causal), exactly, with two flash-attention calls
    (CPU kernels) merged by their log-sum-exps; the backward calls each block's flash backward with the merged
    output and log-sum-exp, which is the exact gradient of the joint softmax (as in ring attention).

    One masked call over ``prefix + own`` keys would compute the masked upper triangle as well: more work than
    the ``separate`` layout's plain causal attention, which would cancel the saving of sharing the prompt.
    Inputs ``[1, heads, len, dim]`` with as many key heads as query heads.
    """

    @staticmethod
    def forward(ctx, q, k_pre, v_pre, k_own, v_own, scale):
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out_pre, lse_pre = flash(q, k_pre, v_pre, 0.0, False, scale=scale)
        out_own, lse_own = flash(q, k_own, v_own, 0.0, True, scale=scale)
        lse = torch.logaddexp(lse_pre, lse_own)
        out = out_pre * (lse_pre - lse).exp()[..., None] + out_own * (lse_own - lse).exp()[..., None]
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k_pre, v_pre, k_own, v_own, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k_pre, v_pre, k_own, v_own, out, lse = ctx.saved_tensors
        flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        grad_out = grad_out.contiguous()
        dq_pre, dk_pre, dv_pre = flash_bwd(grad_out, q, k_pre, v_pre, out, lse, 0.0, False, scale=ctx.scale)
        dq_own, dk_own, dv_own = flash_bwd(grad_out, q, k_own, v_own, out, lse, 0.0, True, scale=ctx.scale)
        return dq_pre + dq_own, dk_pre, dv_pre, dk_own, dv_own, None


def _prefix_causal_attention(q, k_pre, v_pre, k_own, v_own, mask, scale):
    """Attention of ``q`` over a fully visible prefix and causally over its own keys (``[1, H, L, D]``)."""
    if q.device.type == "cpu":
        rep = q.shape[1] // k_pre.shape[1]
        if rep > 1:
            k_pre, v_pre, k_own, v_own = (
                t.repeat_interleave(rep, dim=1) for t in (k_pre, v_pre, k_own, v_own)
            )
        return _PrefixCausalAttention.apply(
            q.contiguous(),
            k_pre.contiguous(),
            v_pre.contiguous(),
            k_own.contiguous(),
            v_own.contiguous(),
            scale,
        )
    k, v = torch.cat([k_pre, k_own], dim=2), torch.cat([v_pre, v_own], dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def segment_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    params: SegmentAttentionParams,
    scale: float,
) -> torch.Tensor:
    """Attention of each span over its prefix and causally over itself; ``[T, heads, dim]`` in and out.

    ``key``/``value`` may have fewer heads (grouped-query attention). Padding spans give zeros.
    """
    plan = params.local_plan(query.device)
    # Split (not slice) the tiling spans: the backward of a split is one concatenation of the pieces'
    # gradients, where slicing would build a zero-filled full-size gradient for every span.
    lengths = [end - start for start, end, *_ in plan]
    queries, keys, values = query.split(lengths), key.split(lengths), value.split(lengths)
    piece = {(start, end): i for i, (start, end, *_) in enumerate(plan)}
    outputs = []
    for i, (start, end, kind, pre_start, pre_end, mask) in enumerate(plan):
        if kind == "pad":
            outputs.append(query.new_zeros(end - start, query.shape[1], value.shape[-1]))
            continue
        q, k, v = (t[i].transpose(0, 1)[None] for t in (queries, keys, values))
        if kind == "prefix":
            j = piece.get((pre_start, pre_end))
            pre_k = keys[j] if j is not None else key[pre_start:pre_end]
            pre_v = values[j] if j is not None else value[pre_start:pre_end]
            out = _prefix_causal_attention(
                q, pre_k.transpose(0, 1)[None], pre_v.transpose(0, 1)[None], k, v, mask, scale
            )
        elif kind == "dense":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs)


def _softmax_scale(config, softmax_scale: float | None) -> float:
    if softmax_scale is not None:
        return softmax_scale
    return 1.0 / math.sqrt(config.kv_channels)


def _check_no_dropout(config) -> None:
    if config.attention_dropout:
        raise ValueError(
            "segment attention has no dropout; the Llama-style models here use attention_dropout=0"
        )


@functools.cache
def local_core_attention() -> type:
    """The local backend's core attention: a megatron module in place of ``DotProductAttention``."""
    from megatron.core.transformer.module import MegatronModule

    class SegmentCoreAttention(MegatronModule):
        """Per-span SDPA with rotary positions from the params (the local spec's ``core_attention``)."""

        def __init__(
            self,
            config,
            layer_number: int,
            attn_mask_type,
            attention_type: str,
            attention_dropout: float | None = None,
            softmax_scale: float | None = None,
            cp_comm_type: str | None = None,
            pg_collection=None,
            rotary: RotaryTable | None = None,
            **_: Any,
        ) -> None:
            super().__init__(config=config)
            if rotary is None:
                raise ValueError(
                    "SegmentCoreAttention needs the model's RotaryTable (params={'rotary': ...})"
                )
            _check_no_dropout(config)
            self.rotary = rotary
            self.scale = _softmax_scale(config, softmax_scale)

        def forward(
            self,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            attention_mask: torch.Tensor | None,
            attn_mask_type=None,
            attention_bias=None,
            packed_seq_params=None,
        ) -> torch.Tensor:
            params = _require_params(packed_seq_params, attention_mask)
            query, key = params.rotate(query, key, self.rotary)
            out = segment_attention(query, key, value, params, self.scale)
            return out.reshape(out.shape[0], -1)

    return SegmentCoreAttention


@functools.cache
def te_segment_attention_class() -> type:
    """TransformerEngine's attention (via megatron's ``TEDotProductAttention``) on THD packed sequences.

    The subclass keeps megatron's module (and so its checkpoint keys and FP8 state); its forward rotates
    ``query``/``key`` to their positions, gathers the keys of shared-prompt spans and calls
    TransformerEngine's ``DotProductAttention.forward`` with :meth:`SegmentAttentionParams.te_kwargs` (megatron's
    own forward cannot pass ``padding_causal_bottom_right``, which its ``AttnMaskType`` lacks).
    """
    import transformer_engine as te
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    class TESegmentAttention(TEDotProductAttention):
        def __init__(self, *args: Any, rotary: RotaryTable | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if rotary is None:
                raise ValueError("TESegmentAttention needs the model's RotaryTable (params={'rotary': ...})")
            _check_no_dropout(self.config)
            self.rotary = rotary

        def forward(
            self,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            attention_mask: torch.Tensor | None,
            attn_mask_type=None,
            attention_bias=None,
            packed_seq_params=None,
            num_splits=None,
        ) -> torch.Tensor:
            params = _require_params(packed_seq_params, attention_mask)
            query, key = params.rotate(query, key, self.rotary)
            key, value = params.gather_kv(key, value)
            return te.pytorch.DotProductAttention.forward(self, query, key, value, None, **params.te_kwargs())

    return TESegmentAttention


def packed_forward(model, tokens: torch.Tensor, params: SegmentAttentionParams) -> torch.Tensor:
    """Run ``model`` (a ``GPTModel``, possibly wrapped) on packed ``tokens`` (``[rows, seq]``) as one THD
    sequence. On the last pipeline stage returns logits ``[rows, seq, vocab]``, elsewhere the hidden states
    for the next stage."""
    rows, seq = tokens.shape
    output = model(tokens.reshape(1, rows * seq), None, None, packed_seq_params=params)
    if output.dim() == 3 and output.shape[0] == 1 and output.shape[1] == rows * seq:
        return output.view(rows, seq, output.shape[-1])
    return output
