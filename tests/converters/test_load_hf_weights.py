"""Starting from an HF folder directly: weights load into a built model; stored dtype is cast on load."""

import pytest
import torch
from safetensors.torch import load_file

from tests.converters.tiny_models import hf_logits, megatron_logits
from wrpo_nemo.checkpoint.model import load_model_checkpoint, model_config_from_source
from wrpo_nemo.converters.hf_import import import_hf, load_hf_weights
from wrpo_nemo.models import build_gpt_model, get_preset


def test_hf_folder_loads_straight_into_a_built_model_with_transformers_logits(
    hf_dirs, tokens, tmp_path, megatron_single_process
):
    hf_dir = hf_dirs("mistral_gqa")
    model = build_gpt_model(model_config_from_source(hf_dir)).eval()
    load_hf_weights(model, hf_dir, tmp_path / "cache")
    torch.testing.assert_close(
        megatron_logits(model, tokens), hf_logits(hf_dir, tokens), atol=1e-5, rtol=1e-5
    )


def test_bf16_checkpoint_loads_into_an_fp32_model_as_the_rounded_weights(
    hf_dirs, tmp_path, megatron_single_process
):
    hf_dir = hf_dirs("llama_gqa_untied")
    import_hf(hf_dir, tmp_path / "ckpt", dtype=torch.bfloat16)
    model = build_gpt_model(model_config_from_source(tmp_path / "ckpt"))
    load_model_checkpoint(model, tmp_path / "ckpt")
    loaded = model.decoder.layers[1].mlp.linear_fc2.weight
    original = load_file(hf_dir / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded.detach(), original.to(torch.bfloat16).float())


def test_model_source_resolves_presets_and_rejects_unknown_names(tmp_path):
    assert model_config_from_source("tiny") == get_preset("tiny")
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        model_config_from_source(str(tmp_path / "nothing"))
