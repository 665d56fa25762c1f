"""FLOPs accounting and the plots of a run."""

import json

import pytest

from wrpo_nemo.models.presets import get_preset
from wrpo_nemo.training.outputs import model_flops_per_token, plot_metrics


@pytest.mark.parametrize("preset", ["tiny", "toy"])
def test_flops_per_token_is_six_times_the_matmul_weights_plus_attention(preset):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = get_preset(preset)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_query_groups, tie_word_embeddings=False,
        )
    )  # fmt: skip
    # Every weight of a matmul does one multiply-add per token forward (2 FLOPs), backward twice that; the
    # input embedding is a lookup and the norms are not matmuls.
    matmul_weights = sum(
        p.numel()
        for name, p in hf.named_parameters()
        if name.endswith("proj.weight") or name == "lm_head.weight"
    )
    context = 100
    attention = 2 * 2 * cfg.num_layers * cfg.hidden_size * context / 2  # QK^T and AV over half the context
    expected = 3 * (2 * matmul_weights + attention)
    assert model_flops_per_token(cfg, context) == pytest.approx(expected, rel=1e-12)


def test_llama3_8b_flops_per_token_is_about_six_n():
    flops = model_flops_per_token(get_preset("llama3_8b"), mean_context=1)
    non_embedding = 8.03e9 - 128256 * 4096  # published parameter count less the input embedding
    assert flops == pytest.approx(6 * non_embedding, rel=0.01)


def test_plots_are_written_for_each_stage_with_metrics(tmp_path):
    records = [
        {"stage": "wrpo", "split": "train", "step": s, "loss": 0.7 - 0.01 * s, "alpha": 0.01 * s}
        for s in range(1, 6)
    ]
    records.append({"stage": "wrpo", "split": "eval", "step": 5, "loss": 0.6, "alpha": 0.05})
    (tmp_path / "wrpo").mkdir()
    (tmp_path / "wrpo" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    written = plot_metrics(tmp_path, ["sft", "wrpo"])
    assert written == [tmp_path / "curves_wrpo.png"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
