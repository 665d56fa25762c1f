"""An independent FLOP count for the model FLOPs the trainer and the GPU benchmark report.

torch's ``FlopCounterMode`` counts the matmuls that actually run in one forward and backward of Hugging Face's
``LlamaForCausalLM`` of the same shape (its own modules, eager attention), so nothing here restates
``wrpo_nemo.training.outputs.model_flops_per_token``.
"""

from __future__ import annotations

import torch

from wrpo_nemo.models.config import ModelConfig


def hf_llama(cfg: ModelConfig):
    """Hugging Face's Llama with ``cfg``'s shape: untied output layer, eager attention (plain matmuls)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, head_dim=cfg.head_dim, tie_word_embeddings=False,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def counted_training_flops_per_token(cfg: ModelConfig, context: int) -> float:
    """FLOPs per token of one training step (forward and backward) on one sequence of ``context`` tokens.

    The linear layers' matmuls (``aten.mm``) are taken as counted. Eager attention multiplies every query by
    every key and value (``aten.bmm``, the full ``context x context`` square); a causal model needs only the
    lower triangle, about half of it, so half of that count is taken.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = hf_llama(cfg)
    tokens = torch.randint(cfg.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(tokens).logits.sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    unexpected = set(counts) - {"aten.mm", "aten.addmm", "aten.bmm"}
    assert not unexpected, f"FLOPs counted in ops this reference does not account for: {unexpected}"
    linear = counts.get("aten.mm", 0) + counts.get("aten.addmm", 0)
    return (linear + counts["aten.bmm"] / 2) / context
