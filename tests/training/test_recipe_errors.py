"""A bad data record stops the recipe with one line naming the file and the record, and exit code 2, as a
config error does (``HYDRA_FULL_ERROR=1``: the traceback)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from wrpo_nemo.data.toy import build_toy_tokenizer

ROOT = Path(__file__).resolve().parents[2]
_DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
# A user's shell running this checkout's wrpo_nemo (not whichever one is installed).
ENV = {
    **{k: v for k, v in os.environ.items() if k not in _DIST_VARS and k != "HYDRA_FULL_ERROR"},
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
}
GOOD = {
    "prompt_id": "p1",
    "prompt": "what is 1 + 2 ?",
    "chosen": [{"role": "assistant", "content": "3"}, {"role": "assistant", "content": "4"}],
    "rejected": [{"role": "assistant", "content": "9"}],
}


def test_a_bad_data_record_ends_the_recipe_with_one_line_and_exit_2(tmp_path):
    records = tmp_path / "records.jsonl"
    bad = {k: v for k, v in GOOD.items() if k != "rejected"} | {"prompt_id": "p2"}
    records.write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    build_toy_tokenizer(str(tmp_path / "tokenizer"))
    cmd = [sys.executable, str(ROOT / "recipes" / "wrpo.py"), f"run_dir={tmp_path / 'run'}", "data.toy=false",
           f"data.tokenizer={tmp_path / 'tokenizer'}", f"data.source.sources=[{records}]",
           "data.source.num_workers=1"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert out.returncode == 2, out.stderr[-3000:]
    # Before it, stderr holds only megatron's import warnings (no TransformerEngine or Apex on a CPU machine).
    lines = out.stderr.splitlines()
    assert lines[-1] == f"data error: {records}: line 2: field 'rejected': missing"
    assert "Traceback" not in out.stderr and not [line for line in lines[:-1] if str(records) in line]
    assert not (tmp_path / "run" / "sft").exists()
    full = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=ENV | {"HYDRA_FULL_ERROR": "1"}, cwd=ROOT
    )
    assert full.returncode not in (0, 2)
    assert "Traceback" in full.stderr and f"DataError: {records}: line 2" in full.stderr
