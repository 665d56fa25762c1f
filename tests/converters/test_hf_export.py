"""Model checkpoint -> HF folder: exact inverse of import, and trained weights load in transformers."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.converters.tiny_models import PAD_MULTIPLE, hf_logits, megatron_logits
from wrpo_nemo.checkpoint.model import (
    HF_ASSETS_DIR,
    load_model_checkpoint,
    read_model_config,
    save_model_checkpoint,
)
from wrpo_nemo.converters.hf_export import export_hf
from wrpo_nemo.converters.hf_import import import_hf
from wrpo_nemo.models import build_gpt_model
from wrpo_nemo.models.attention import causal_rows_params, packed_forward


def hf_tensors(directory):
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize(
    ("name", "max_shard_bytes"), [("llama_gqa_untied", 60_000), ("qwen2_qkv_bias", 5 * 1024**3)]
)
def test_import_then_export_gives_bit_identical_tensors_and_equal_config(
    name, max_shard_bytes, hf_dirs, tmp_path
):
    hf_dir = hf_dirs(name)
    import_hf(hf_dir, tmp_path / "ckpt", make_vocab_size_divisible_by=PAD_MULTIPLE)
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf", dtype=None, max_shard_bytes=max_shard_bytes)
    original, exported = hf_tensors(hf_dir), hf_tensors(out)
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    for name in ("config.json", "generation_config.json"):
        assert json.loads((out / name).read_text()) == json.loads((hf_dir / name).read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    assert len(set(index["weight_map"].values())) == len(list(out.glob("*.safetensors")))


def test_export_defaults_to_bf16_and_says_so_in_config(hf_dirs, tmp_path):
    import_hf(hf_dirs("llama_mha_tied"), tmp_path / "ckpt")
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert {t.dtype for t in hf_tensors(out).values()} == {torch.bfloat16}
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_export_after_training_steps_loads_in_transformers_with_the_engine_logits(
    hf_dirs, tokens, tmp_path, megatron_single_process
):
    hf_dir = hf_dirs("llama31_rope_scaling")
    import_hf(hf_dir, tmp_path / "ckpt", make_vocab_size_divisible_by=PAD_MULTIPLE)
    cfg = read_model_config(tmp_path / "ckpt")
    model = build_gpt_model(cfg)
    load_model_checkpoint(model, tmp_path / "ckpt")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):  # move every weight: a random-target loss through the full model
        optimizer.zero_grad()
        out = packed_forward(model, tokens, causal_rows_params(*tokens.shape))
        loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), tokens.roll(1, dims=1).flatten())
        loss.backward()
        optimizer.step()
    model.eval()
    save_model_checkpoint(model, tmp_path / "trained", cfg, hf_assets=tmp_path / "ckpt" / HF_ASSETS_DIR)
    exported = export_hf(tmp_path / "trained", tmp_path / "hf", dtype=torch.float32)
    engine = megatron_logits(model, tokens)
    assert not torch.allclose(engine, hf_logits(hf_dir, tokens), atol=1e-3)
    torch.testing.assert_close(hf_logits(exported, tokens), engine, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama31_rope_scaling", "qwen2_qkv_bias"])
def test_export_without_hf_assets_generates_a_config_that_transformers_runs_identically(
    name, hf_dirs, tokens, tmp_path
):
    hf_dir = hf_dirs(name)
    import_hf(hf_dir, tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "ckpt" / HF_ASSETS_DIR)  # as for a model trained from a preset
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf", dtype=torch.float32)
    torch.testing.assert_close(hf_logits(out, tokens), hf_logits(hf_dir, tokens), atol=0, rtol=0)
