"""Tiny random Hugging Face models built locally, and the megatron side of logits comparisons."""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from wrpo_nemo.models.attention import causal_rows_params, packed_forward

# vocab 100 with make_vocab_size_divisible_by=8 pads to 104 at TP=1 but 112 at TP=2.
VOCAB = 100
PAD_MULTIPLE = 8
_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
CONFIGS = {
    "llama_gqa_untied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_mha_tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    # Non-default original_max_position_embeddings: megatron's constructor alone would get this wrong.
    "llama31_rope_scaling": (
        "llama",
        dict(
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=4.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "mistral_gqa": ("mistral", dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2_qkv_bias": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
}


def hf_model(name: str):
    """A random fp32 HF model of config ``name`` with eager attention; norms are perturbed off 1."""
    import transformers

    family, extra = CONFIGS[name]
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    config = config_cls(**_BASE, **extra, attn_implementation="eager")
    torch.manual_seed(zlib.crc32(name.encode()))
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            # Norm weights away from 1 and biases away from 0, so a swapped or dropped tensor shows.
            p.add_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.02))
    return model


def save_hf(name: str, directory: Path) -> Path:
    model = hf_model(name)
    model.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    return directory


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return model(tokens).logits


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits of a TP=1 (or TP-gathered) megatron model, padding columns dropped."""
    from megatron.core import tensor_parallel

    from wrpo_nemo import compat

    with torch.no_grad(), compat.redirect_cuda_to_cpu():  # megatron's gather allocates on the CUDA device
        logits = packed_forward(model, tokens, causal_rows_params(*tokens.shape))
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return logits[..., :VOCAB]
