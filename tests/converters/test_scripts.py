"""The command lines: HF -> .nemo -> HF through both scripts gives the original tensors back; a bad input ends
with one line naming the file and exit code 2 (``--debug``: the traceback)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from tests.converters.test_hf_export import hf_tensors

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
# The scripts import this checkout's wrpo_nemo, not whichever one is installed.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def run(script, *args):
    cmd = [sys.executable, str(SCRIPTS / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


def test_scripts_convert_hf_to_nemo_and_back_and_refuse_existing_output(hf_dirs, tmp_path):
    hf_dir = hf_dirs("llama_mha_tied")
    first = run("convert_hf_to_nemo.py", str(hf_dir), str(tmp_path / "m.nemo"))
    assert first.returncode == 0, first.stderr
    again = run("convert_hf_to_nemo.py", str(hf_dir), str(tmp_path / "m.nemo"))
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    back = run("convert_nemo_to_hf.py", str(tmp_path / "m.nemo"), str(tmp_path / "hf"), "--dtype", "auto")
    assert back.returncode == 0, back.stderr
    original, exported = hf_tensors(hf_dir), hf_tensors(tmp_path / "hf")
    assert (
        all(torch.equal(exported[k], v) for k, v in original.items()) and exported.keys() == original.keys()
    )


def test_a_bad_input_ends_with_one_line_naming_the_file_and_exit_2_and_debug_shows_the_traceback(
    hf_dirs, tmp_path
):
    hf_dir = shutil.copytree(hf_dirs("llama_mha_tied"), tmp_path / "hf")
    shard = hf_dir / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    plain = run("convert_hf_to_nemo.py", str(hf_dir), str(tmp_path / "m.nemo"))
    assert plain.returncode == 2, plain.stderr
    assert plain.stderr.splitlines() == [plain.stderr.strip()]
    assert plain.stderr.startswith(f"input error: {shard}: not a readable safetensors file")
    debug = run("convert_hf_to_nemo.py", str(hf_dir), str(tmp_path / "m.nemo"), "--debug")
    assert debug.returncode not in (0, 2)
    assert "Traceback" in debug.stderr and f"InputError: {shard}" in debug.stderr
    assert not (tmp_path / "m.nemo").exists()
