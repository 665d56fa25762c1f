"""The model-family config: what a decoder-only Llama-style model is, independent of how it is parallelised.

One typed dataclass describes every supported family (Llama 2/3/3.1, Mistral, Qwen2). It is built from a preset
(:mod:`wrpo_nemo.models.presets`) or from a Hugging Face ``config.json`` (:mod:`wrpo_nemo.models.families`), is
stored beside every checkpoint as JSON, and is turned into a megatron ``GPTModel`` by
:func:`wrpo_nemo.models.builder.build_gpt_model`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style rotary frequency scaling (Hugging Face ``rope_type: llama3``)."""

    factor: float = 8.0
    """How much the long wavelengths are stretched (8 for Llama 3.1)."""
    low_freq_factor: float = 1.0
    """Wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``."""
    high_freq_factor: float = 4.0
    """Wavelengths shorter than ``original_max_position_embeddings / high_freq_factor`` are left unchanged."""
    original_max_position_embeddings: int = 8192
    """Context length the model was pre-trained with before the extension (8192 for Llama 3.1)."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-style decoder (RMSNorm, SwiGLU, rotary positions, grouped-query attention)."""

    family: str
    """Model family: one of ``llama``, ``mistral``, ``qwen2``; picks the Hugging Face architecture on export."""
    vocab_size: int
    """True vocabulary size (rows of the Hugging Face embedding), before padding for tensor parallelism."""
    hidden_size: int
    """Width of the residual stream."""
    num_layers: int
    """Number of transformer layers."""
    num_attention_heads: int
    """Number of query heads."""
    num_query_groups: int
    """Number of key/value heads (grouped-query attention); equal to ``num_attention_heads`` for MHA."""
    ffn_hidden_size: int
    """Inner width of the SwiGLU MLP (Hugging Face ``intermediate_size``)."""
    kv_channels: int | None = None
    """Per-head dimension; ``None`` means ``hidden_size // num_attention_heads``."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    rope_scaling: RopeScaling | None = None
    """Llama-3.1 frequency scaling, or ``None`` for plain rotary embeddings."""
    tie_word_embeddings: bool = False
    """Whether the output projection shares the input embedding matrix."""
    max_position_embeddings: int = 8192
    """Longest context the model supports (copied into the Hugging Face config on export)."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this times the tensor-parallel size."""
    qkv_bias: bool = False
    """Whether q, k and v projections carry a bias (Qwen2)."""
    sliding_window: int | None = None
    """Mistral's attention window; training sequences must not be longer (see :meth:`check_seq_length`)."""
    hf_extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Hugging Face config fields that do not change the computation (token ids, names), kept for export."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        """Per-head dimension, resolved."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field that makes the architecture impossible."""
        if self.family not in SUPPORTED_FAMILIES:
            raise ValueError(f"model.family={self.family!r} is not one of {SUPPORTED_FAMILIES}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.num_query_groups <= 0 or self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"model.num_query_groups={self.num_query_groups}"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}; set model.kv_channels"
            )
        if self.make_vocab_size_divisible_by <= 0:
            raise ValueError("model.make_vocab_size_divisible_by must be positive")

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        """Embedding rows megatron allocates: the vocabulary rounded up so every TP rank holds an equal slice."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def check_parallel_layout(self, tensor_parallel_size: int, pipeline_parallel_size: int) -> None:
        """Raise ``ValueError`` naming the key when this model cannot be split as asked."""
        tp, pp = tensor_parallel_size, pipeline_parallel_size
        if self.num_attention_heads % tp:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by TP={tp}"
            )
        if self.num_query_groups % tp:
            raise ValueError(f"model.num_query_groups={self.num_query_groups} is not divisible by TP={tp}")
        if self.ffn_hidden_size % tp:
            raise ValueError(f"model.ffn_hidden_size={self.ffn_hidden_size} is not divisible by TP={tp}")
        if self.num_layers % pp:
            raise ValueError(f"model.num_layers={self.num_layers} is not divisible by PP={pp}")

    def check_seq_length(self, seq_length: int) -> None:
        """Raise when sequences are longer than Mistral's sliding window (full attention would differ)."""
        if self.sliding_window is not None and seq_length > self.sliding_window:
            raise ValueError(
                f"seq_length={seq_length} exceeds model.sliding_window={self.sliding_window}: "
                "sliding-window attention is not implemented; shorten the sequences"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; :meth:`from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild from :meth:`to_dict`; unknown keys are an error (a config from a newer version)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {unknown}")
        values = dict(data)
        if values.get("rope_scaling") is not None:
            values["rope_scaling"] = RopeScaling(**values["rope_scaling"])
        return cls(**values)
