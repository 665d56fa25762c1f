"""Bad input stops with an error that names the problem, and never leaves a partial output behind."""

import json
import shutil
import tarfile

import pytest
from safetensors.torch import load_file, save_file

from wrpo_nemo.converters import hf_import
from wrpo_nemo.converters.hf_export import export_hf
from wrpo_nemo.converters.hf_import import import_hf
from wrpo_nemo.converters.nemo import read_nemo


def copy_of(hf_dirs, tmp_path, name="llama_gqa_untied"):
    return shutil.copytree(hf_dirs(name), tmp_path / "hf")


def assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_missing_hf_folder_or_config_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_hf(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        import_hf(tmp_path / "empty", tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_unsupported_architecture_is_named(hf_dirs, tmp_path):
    hf = copy_of(hf_dirs, tmp_path)
    config = json.loads((hf / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        import_hf(hf, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_missing_tensor_is_named(hf_dirs, tmp_path):
    hf = copy_of(hf_dirs, tmp_path)
    tensors = load_file(hf / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        import_hf(hf, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_shape_that_does_not_match_the_config_is_named(hf_dirs, tmp_path):
    hf = copy_of(hf_dirs, tmp_path)
    config = json.loads((hf / "config.json").read_text())
    config["intermediate_size"] = 128
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"gate_proj\.weight has shape \(96, 64\).*\(128, 64\)"):
        import_hf(hf, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_existing_output_needs_overwrite_and_is_replaced_with_it(hf_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        import_hf(hf_dirs("llama_gqa_untied"), out)
    assert (out / "keep.txt").read_text() == "old"
    import_hf(hf_dirs("llama_gqa_untied"), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model_config.json").is_file()


def test_failure_while_writing_leaves_no_partial_output_and_keeps_the_old_one(hf_dirs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    import_hf(hf_dirs("llama_gqa_untied"), out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    calls = {"n": 0}
    real_read = hf_import.HFWeights.read

    def failing_read(self, name):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError("disk went away")
        return real_read(self, name)

    monkeypatch.setattr(hf_import.HFWeights, "read", failing_read)
    with pytest.raises(OSError, match="disk went away"):
        import_hf(hf_dirs("llama_gqa_untied"), out, overwrite=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_export_rejects_a_checkpoint_whose_shapes_contradict_its_config(hf_dirs, tmp_path):
    import_hf(hf_dirs("llama_gqa_untied"), tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "model_config.json"
    payload = json.loads(config_path.read_text())
    payload["model"]["ffn_hidden_size"] = 128
    config_path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=r"linear_fc1\.weight has shape"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert_nothing_written(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match=r"model_config\.json"):
        export_hf(tmp_path / "missing", tmp_path / "hf")


def test_a_tar_without_nemo_layout_is_rejected(tmp_path):
    (tmp_path / "readme.txt").write_text("not a model")
    with tarfile.open(tmp_path / "bad.nemo", "w:") as tar:
        tar.add(tmp_path / "readme.txt", arcname="readme.txt")
    with pytest.raises(ValueError, match=r"model_config\.yaml"):
        read_nemo(tmp_path / "bad.nemo", tmp_path / "out")
    assert_nothing_written(tmp_path / "out")
