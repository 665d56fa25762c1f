"""build_gpt_model: the local spec and fp32 on a CPU, and FP8 refused with the key named where it cannot run."""

import pytest
import torch

from wrpo_nemo import compat
from wrpo_nemo.models import build_gpt_model, builder, get_preset, use_transformer_engine


def test_cpu_build_uses_local_layers_segment_attention_and_fp32_params(megatron_single_process):
    from wrpo_nemo.models.attention import local_core_attention

    assert not use_transformer_engine()
    model = build_gpt_model(get_preset("tiny"), recompute="full")
    assert isinstance(model.decoder.layers[0].self_attention.core_attention, local_core_attention())
    # Rotary positions are applied by the segment attention from the batch's positions, not by GPTModel.
    assert model.position_embedding_type == "none" and model.config.apply_rope_fusion is False
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.recompute_granularity == "full"
    assert model.embedding.word_embeddings.weight.shape[0] == 512


def test_fp8_on_a_cpu_is_refused_naming_fp8(megatron_single_process):
    with pytest.raises(ValueError, match="fp8 is set but there is no GPU"):
        build_gpt_model(get_preset("tiny"), fp8="hybrid")


def test_fp8_without_transformer_engine_is_refused(monkeypatch):
    monkeypatch.setattr(compat, "runtime", lambda: compat.Runtime(cuda=True, transformer_engine=False))
    with pytest.raises(ValueError, match="TransformerEngine is not installed"):
        builder.check_fp8("hybrid", use_te=False)


def test_fp8_on_ampere_is_refused_naming_the_gpu_generation(monkeypatch):
    monkeypatch.setattr(compat, "runtime", lambda: compat.Runtime(cuda=True, transformer_engine=False))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"fp8='e4m3' needs compute capability >= 8\.9.*A800.*fp8=null"):
        builder.check_fp8("e4m3", use_te=True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    builder.check_fp8("e4m3", use_te=True)


def test_gpu_precision_defaults_to_bf16_and_cpu_to_fp32(monkeypatch):
    assert builder.params_dtype("auto") == torch.float32
    monkeypatch.setattr(compat, "runtime", lambda: compat.Runtime(cuda=True, transformer_engine=False))
    assert builder.params_dtype("auto") == torch.bfloat16


def test_the_backend_and_its_attention_are_chosen_together(monkeypatch):
    """select_layer_spec is the one place that pairs a layer spec with our segment-aware attention: the TE spec
    gets the THD TransformerEngine attention, the local spec the per-span SDPA one, both with the rotary table."""
    from megatron.core.models.gpt import gpt_layer_specs

    from wrpo_nemo.models.attention import RotaryTable, local_core_attention

    class FakeTEAttention:  # TransformerEngine cannot be installed here: a stand-in class
        pass

    calls = []

    def te_spec(*args, **kwargs):
        calls.append("te")
        return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")

    monkeypatch.setattr(gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec", te_spec)
    monkeypatch.setattr(builder, "te_segment_attention_class", lambda: FakeTEAttention)
    rotary = RotaryTable(16, 10000.0)
    te = builder.select_layer_spec(True, rotary).submodules.self_attention.submodules.core_attention
    assert calls == ["te"] and te.module is FakeTEAttention and te.params == {"rotary": rotary}
    local = builder.select_layer_spec(False, rotary).submodules.self_attention.submodules.core_attention
    assert local.module is local_core_attention() and local.params == {"rotary": rotary}
