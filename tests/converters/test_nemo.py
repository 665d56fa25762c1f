"""``.nemo`` archives: NeMo's layout on write, exact round trip, and export straight to HF."""

import tarfile

import torch
import yaml

from tests.converters.test_hf_export import hf_tensors
from tests.converters.tiny_models import PAD_MULTIPLE
from wrpo_nemo.checkpoint.model import read_model_config, weights_dir
from wrpo_nemo.converters.dcp_stream import CheckpointReader
from wrpo_nemo.converters.hf_import import import_hf
from wrpo_nemo.converters.nemo import nemo_to_hf, read_nemo, write_nemo


def test_nemo_archive_has_nemo_config_fields_and_model_prefixed_keys(hf_dirs, tmp_path):
    import_hf(hf_dirs("llama31_rope_scaling"), tmp_path / "ckpt", make_vocab_size_divisible_by=PAD_MULTIPLE)
    nemo = write_nemo(tmp_path / "ckpt", tmp_path / "model.nemo")
    with tarfile.open(nemo) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    config = yaml.safe_load((tmp_path / "x" / "model_config.yaml").read_text())
    assert config["mcore_gpt"] and config["activation"] == "fast-swiglu" and config["num_query_groups"] == 2
    assert config["scale_positional_embedding"] and config["position_embedding_type"] == "rope"
    keys = CheckpointReader(tmp_path / "x" / "model_weights").tensor_keys()
    assert "model.decoder.layers.self_attention.linear_qkv.weight" in keys
    assert all(k.startswith("model.") for k in keys)


def test_nemo_round_trip_gives_identical_checkpoint_and_config(hf_dirs, tmp_path):
    import_hf(hf_dirs("qwen2_qkv_bias"), tmp_path / "ckpt", make_vocab_size_divisible_by=PAD_MULTIPLE)
    write_nemo(tmp_path / "ckpt", tmp_path / "model.nemo")
    read_nemo(tmp_path / "model.nemo", tmp_path / "back")
    assert read_model_config(tmp_path / "back") == read_model_config(tmp_path / "ckpt")
    before, after = (
        CheckpointReader(weights_dir(tmp_path / "ckpt")),
        CheckpointReader(weights_dir(tmp_path / "back")),
    )
    assert sorted(after.tensor_keys()) == sorted(before.tensor_keys())
    for key in before.tensor_keys():
        assert torch.equal(after.read(key), before.read(key)), key


def test_nemo_exports_to_the_original_hf_tensors(hf_dirs, tmp_path):
    hf_dir = hf_dirs("llama_gqa_untied")
    import_hf(hf_dir, tmp_path / "ckpt", make_vocab_size_divisible_by=PAD_MULTIPLE)
    write_nemo(tmp_path / "ckpt", tmp_path / "model.nemo")
    out = nemo_to_hf(tmp_path / "model.nemo", tmp_path / "hf", dtype=None)
    original, exported = hf_tensors(hf_dir), hf_tensors(out)
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], v) for k, v in original.items())
    assert (out / "generation_config.json").is_file()
