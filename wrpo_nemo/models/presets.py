"""Named model configs: Llama 3 / 3.1 at 8B and 70B (the published architectures) and a tiny CPU model."""

from __future__ import annotations

import dataclasses

from wrpo_nemo.models.config import ModelConfig, RopeScaling

_LLAMA3_TOKENS = {"bos_token_id": 128000, "eos_token_id": 128001}
_LLAMA31_ROPE = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)


def _llama3(hidden: int, layers: int, heads: int, ffn: int, *, v31: bool) -> ModelConfig:
    return ModelConfig(
        family="llama",
        vocab_size=128256,
        hidden_size=hidden,
        num_layers=layers,
        num_attention_heads=heads,
        num_query_groups=8,
        ffn_hidden_size=ffn,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=_LLAMA31_ROPE if v31 else None,
        tie_word_embeddings=False,
        max_position_embeddings=131072 if v31 else 8192,
        hf_extra=dict(_LLAMA3_TOKENS),
    )


PRESETS: dict[str, ModelConfig] = {
    "llama3_8b": _llama3(4096, 32, 32, 14336, v31=False),
    "llama3_70b": _llama3(8192, 80, 64, 28672, v31=False),
    "llama31_8b": _llama3(4096, 32, 32, 14336, v31=True),
    "llama31_70b": _llama3(8192, 80, 64, 28672, v31=True),
    # Small enough for a forward/backward in well under a second on one CPU core.
    "tiny": ModelConfig(
        family="llama",
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        make_vocab_size_divisible_by=64,
    ),
    # The default run's model: big enough to learn the toy arithmetic task in a few CPU minutes.
    "toy": ModelConfig(
        family="llama",
        vocab_size=512,
        hidden_size=128,
        num_layers=4,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=384,
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        make_vocab_size_divisible_by=32,
    ),
}

# The toy model made wide enough that the matmuls, not attention, hold most of the FLOPs at 2k-token rows (as in
# the 8B and 70B): what the CPU benchmarks use to measure savings that scale with tokens.
PRESETS["small"] = dataclasses.replace(
    PRESETS["toy"],
    hidden_size=512,
    num_attention_heads=8,
    num_query_groups=4,
    ffn_hidden_size=1536,
    max_position_embeddings=4096,
)


def get_preset(name: str) -> ModelConfig:
    """The preset called ``name``; ``KeyError`` lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None
