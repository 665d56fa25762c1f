"""Bad input stops with an error that names the problem (an unreadable file: the file), and never leaves a
partial output behind."""

import json
import os
import re
import shutil
import tarfile

import pytest
from safetensors.torch import load_file, save_file

from wrpo_nemo.checkpoint.model import load_model_checkpoint, read_model_config, weights_dir
from wrpo_nemo.converters import hf_import
from wrpo_nemo.converters.hf_export import export_hf
from wrpo_nemo.converters.hf_import import import_hf
from wrpo_nemo.converters.nemo import nemo_to_hf, read_nemo, write_nemo
from wrpo_nemo.errors import InputError
from wrpo_nemo.models import build_gpt_model


def copy_of(hf_dirs, tmp_path, name="llama_gqa_untied"):
    return shutil.copytree(hf_dirs(name), tmp_path / "hf")


def assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def truncate(path):
    """Keep the first half of the file, as an interrupted copy would."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def names(path):
    """``pytest.raises(match=...)`` for a message that starts with ``path``."""
    return "^" + re.escape(str(path)) + ": "


@pytest.fixture(scope="module")
def model_checkpoint(hf_dirs, tmp_path_factory):
    """One imported model checkpoint per module; tests damage copies of it."""
    out = tmp_path_factory.mktemp("imported") / "ckpt"
    import_hf(hf_dirs("llama_gqa_untied"), out)
    return out


def damaged_checkpoint(model_checkpoint, tmp_path, name):
    """A copy of the checkpoint whose dist checkpoint file ``name`` lost its second half."""
    ckpt = shutil.copytree(model_checkpoint, tmp_path / "damaged")
    truncate(weights_dir(ckpt) / name)
    return ckpt


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
    with pytest.raises(InputError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight is missing"):
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


def test_truncated_safetensors_shard_is_named(hf_dirs, tmp_path):
    hf = copy_of(hf_dirs, tmp_path)
    truncate(hf / "model.safetensors")
    with pytest.raises(InputError, match=names(hf / "model.safetensors") + "not a readable safetensors file"):
        import_hf(hf, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_config_json_that_is_not_json_is_named(hf_dirs, tmp_path):
    hf = copy_of(hf_dirs, tmp_path)
    (hf / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    with pytest.raises(InputError, match=names(hf / "config.json") + r"not valid JSON \(.*line 1"):
        import_hf(hf, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("read", [read_nemo, nemo_to_hf])
def test_random_bytes_as_a_nemo_archive_are_named(read, tmp_path):
    (tmp_path / "model.nemo").write_bytes(os.urandom(4096))
    with pytest.raises(InputError, match=names(tmp_path / "model.nemo") + "not a .nemo archive"):
        read(tmp_path / "model.nemo", tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize(
    "convert",
    [lambda ckpt, out: export_hf(ckpt, out / "hf"), lambda ckpt, out: write_nemo(ckpt, out / "m.nemo")],
    ids=["export_hf", "write_nemo"],
)
def test_truncated_distcp_file_is_named_by_the_converters(convert, model_checkpoint, tmp_path):
    ckpt = damaged_checkpoint(model_checkpoint, tmp_path, "__0_0.distcp")
    (tmp_path / "out").mkdir()
    expected = names(weights_dir(ckpt) / "__0_0.distcp") + r"truncated: \d+ bytes, but .*\.metadata"
    with pytest.raises(InputError, match=expected):
        convert(ckpt, tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())


def test_truncated_distcp_file_inside_a_nemo_archive_names_the_archive_and_the_member(
    model_checkpoint, tmp_path
):
    write_nemo(model_checkpoint, tmp_path / "good.nemo")
    with tarfile.open(tmp_path / "good.nemo") as tar:
        tar.extractall(tmp_path / "x", filter="data")
    truncate(tmp_path / "x" / "model_weights" / "__0_0.distcp")
    with tarfile.open(tmp_path / "bad.nemo", "w:") as tar:
        tar.add(tmp_path / "x", arcname=".")
    with pytest.raises(
        InputError, match=names(tmp_path / "bad.nemo") + r"member model_weights/__0_0\.distcp: trunc"
    ):
        nemo_to_hf(tmp_path / "bad.nemo", tmp_path / "hf")
    assert_nothing_written(tmp_path / "hf")


@pytest.mark.parametrize(
    ("name", "problem"),
    [("__0_0.distcp", r"truncated: \d+ bytes"), ("common.pt", "not a complete torch.save archive")],
    ids=["distcp", "common_pt"],
)
def test_load_model_checkpoint_names_a_truncated_file(
    name, problem, model_checkpoint, tmp_path, megatron_single_process
):
    ckpt = damaged_checkpoint(model_checkpoint, tmp_path, name)
    model = build_gpt_model(read_model_config(ckpt))
    with pytest.raises(InputError, match=names(weights_dir(ckpt) / name) + problem):
        load_model_checkpoint(model, ckpt)


def test_damage_the_index_cannot_see_names_the_file_read_or_else_the_folder_and_its_files(
    model_checkpoint, tmp_path, megatron_single_process
):
    ckpt = shutil.copytree(model_checkpoint, tmp_path / "damaged")
    distcp = weights_dir(ckpt) / "__0_0.distcp"
    data = distcp.read_bytes()
    distcp.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))  # full length, zeros
    # The streaming reader knows which file each tensor is read from.
    with pytest.raises(InputError, match=names(distcp) + "unreadable"):
        export_hf(ckpt, tmp_path / "hf")
    # megatron's loader does not say: the folder and its files are named.
    model = build_gpt_model(read_model_config(ckpt))
    with pytest.raises(
        InputError, match=names(weights_dir(ckpt)) + r"this dist checkpoint cannot be read"
    ) as err:
        load_model_checkpoint(model, ckpt)
    assert f"__0_0.distcp ({len(data)} bytes)" in str(err.value) and "common.pt (" in str(err.value)
