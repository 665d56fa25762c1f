"""Model configs: presets are the published architectures, HF configs parse in both rope styles, bad layouts
are refused with the key named."""

import pytest

from wrpo_nemo.models import ModelConfig, RopeScaling, get_preset, model_config_from_hf

# The published config.json of meta-llama/Llama-3.1-8B (weights-independent fields).
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "vocab_size": 128256,
    "hidden_act": "silu",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
LLAMA3_70B = {
    **LLAMA31_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
    "rope_scaling": None,
    "max_position_embeddings": 8192,
}


def test_presets_equal_the_published_hf_configs():
    assert model_config_from_hf(LLAMA31_8B) == get_preset("llama31_8b")
    assert model_config_from_hf(LLAMA3_70B) == get_preset("llama3_70b")
    assert get_preset("llama31_70b").rope_scaling == RopeScaling()
    assert get_preset("llama3_8b").rope_scaling is None


def test_transformers5_rope_parameters_parse_like_the_legacy_fields():
    legacy = model_config_from_hf(LLAMA31_8B)
    modern = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_theta", "rope_scaling")}
    modern["rope_parameters"] = {**LLAMA31_8B["rope_scaling"], "rope_theta": 500000.0}
    assert model_config_from_hf(modern) == legacy


def test_unsupported_rope_type_and_biases_are_refused():
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        model_config_from_hf({**LLAMA31_8B, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="mlp_bias"):
        model_config_from_hf({**LLAMA31_8B, "mlp_bias": True})


def test_padded_vocab_is_a_multiple_of_divisor_times_tp():
    cfg = get_preset("llama3_8b")
    assert cfg.padded_vocab_size(1) == 128256
    assert cfg.padded_vocab_size(8) == 129024 and 129024 % (128 * 8) == 0


def test_layouts_that_cannot_split_name_the_key():
    cfg = get_preset("llama3_70b")
    with pytest.raises(ValueError, match="num_query_groups=8 is not divisible by TP=16"):
        cfg.check_parallel_layout(16, 1)
    with pytest.raises(ValueError, match="num_layers=80 is not divisible by PP=3"):
        cfg.check_parallel_layout(8, 3)
    with pytest.raises(ValueError, match=r"model\.num_attention_heads=6 must be a multiple"):
        ModelConfig(family="llama", vocab_size=8, hidden_size=12, num_layers=1, num_attention_heads=6,
                    num_query_groups=4, ffn_hidden_size=8)  # fmt: skip


def test_config_survives_its_json_form():
    cfg = get_preset("llama31_70b")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
