"""build_gpt_model: the local spec and fp32 on a CPU, and FP8 refused with the key named where it cannot run."""

import pytest
import torch

from wrpo_nemo import compat
from wrpo_nemo.models import build_gpt_model, builder, get_preset, use_transformer_engine


def test_cpu_build_uses_local_layers_and_fp32_params(megatron_single_process):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    assert not use_transformer_engine()
    model = build_gpt_model(get_preset("tiny"), recompute="full")
    assert isinstance(model.decoder.layers[0].self_attention.core_attention, DotProductAttention)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.recompute_granularity == "full"
    assert model.embedding.word_embeddings.weight.shape[0] == 512


def test_fp8_on_a_cpu_is_refused_naming_fp8(megatron_single_process):
    with pytest.raises(ValueError, match="fp8 is set but there is no GPU"):
        build_gpt_model(get_preset("tiny"), fp8="hybrid")


def test_fp8_without_transformer_engine_is_refused(monkeypatch):
    monkeypatch.setattr(compat, "cuda_available", lambda: True)
    with pytest.raises(ValueError, match="TransformerEngine is not installed"):
        builder.check_fp8("hybrid", use_te=False)


def test_fp8_on_ampere_is_refused_naming_the_gpu_generation(monkeypatch):
    monkeypatch.setattr(compat, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"fp8='e4m3' needs compute capability >= 8\.9.*A800.*fp8=null"):
        builder.check_fp8("e4m3", use_te=True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    builder.check_fp8("e4m3", use_te=True)


def test_gpu_precision_defaults_to_bf16_and_cpu_to_fp32(monkeypatch):
    assert builder.params_dtype("auto") == torch.float32
    monkeypatch.setattr(compat, "cuda_available", lambda: True)
    assert builder.params_dtype("auto") == torch.bfloat16
