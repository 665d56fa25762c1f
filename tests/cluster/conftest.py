"""A tiny Hugging Face chat model (toy tokenizer with the Llama 3 template, random weights), built once."""

from pathlib import Path

import pytest


def save_tiny_chat_model(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with the toy task's word-level tokenizer, saved as an HF folder (a few hundred kB)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from wrpo_nemo.data.toy import build_toy_tokenizer

    tokenizer = build_toy_tokenizer(str(folder))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat_model"))
