"""The command lines: HF -> .nemo -> HF through both scripts gives the original tensors back."""

import subprocess
import sys
from pathlib import Path

import torch

from tests.converters.test_hf_export import hf_tensors

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def run(script, *args):
    return subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True)


def test_scripts_convert_hf_to_nemo_and_back_and_refuse_existing_output(hf_dirs, tmp_path):
    hf_dir = hf_dirs("llama_mha_tied")
    first = run("convert_hf_to_nemo.py", str(hf_dir), str(tmp_path / "m.nemo"))
    assert first.returncode == 0, first.stderr
    again = run("convert_hf_to_nemo.py", str(hf_dir), str(tmp_path / "m.nemo"))
    assert again.returncode != 0 and "--overwrite" in again.stderr
    back = run("convert_nemo_to_hf.py", str(tmp_path / "m.nemo"), str(tmp_path / "hf"), "--dtype", "auto")
    assert back.returncode == 0, back.stderr
    original, exported = hf_tensors(hf_dir), hf_tensors(tmp_path / "hf")
    assert (
        all(torch.equal(exported[k], v) for k, v in original.items()) and exported.keys() == original.keys()
    )
