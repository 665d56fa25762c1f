"""The GPU check's CPU-runnable parts: the script end to end (GPU tests skip here) with the benchmark's model
FLOPs and size checked against Hugging Face's Llama, its install decision, the synthetic WRPO batch, and the
wheel pins."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch

from tests.flop_reference import counted_training_flops_per_token, hf_llama
from wrpo_nemo.data.layout import IGNORE_INDEX
from wrpo_nemo.models.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "bench_wrpo_step", ROOT / "scripts" / "gpu" / "bench_wrpo_step.py"
)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
TINY_BENCH = ["--layers", "2", "--hidden", "64", "--heads", "4", "--groups", "2", "--ffn", "128", "--vocab", "512",
              "--seq", "128", "--prompt-len", "8", "--response-len", "12", "--matmul-size", "128", "--steps", "2",
              "--warmup", "1", "--micro-batches", "2"]  # fmt: skip


def gpu_check(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
                "GPU_SITE": str(tmp_path / "site"), "OMP_NUM_THREADS": "1", **env}  # fmt: skip
    cmd = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=240, cwd=ROOT)


@pytest.mark.parametrize("layout", ["shared_prompt", "separate"])
def test_synthetic_wrpo_batch_keeps_the_packed_layout_contract(layout):
    batch = bench.synthetic_wrpo_batch(
        rows=2, seq_length=100, prompt_len=5, response_len=7, vocab_size=50, layout=layout
    )
    batch.validate()
    group = 5 + 2 + 3 * 7 if layout == "shared_prompt" else 3 * 12
    assert batch.num_prompts == 2 * (100 // group) and batch.num_segments == 3 * batch.num_prompts
    flat_tokens, flat_labels = batch.tokens.reshape(-1), batch.labels.reshape(-1)
    prompts = {}
    for start, end, pre_start, pre_end in batch.attn_spans.tolist():
        if pre_start < 0 or not batch.loss_mask.reshape(-1)[start:end].any():
            continue
        seq = torch.cat([flat_tokens[pre_start:pre_end], flat_tokens[start:end]])
        assert seq.numel() == 12 and torch.equal(
            batch.position_ids.reshape(-1)[start:end], torch.arange(12 - (end - start), 12)
        )
        # The loss covers exactly the predictions of the 7 response ids.
        mask = batch.loss_mask.reshape(-1)[start:end]
        assert torch.equal(flat_labels[start:end][mask], seq[5:]) and flat_labels[end - 1] == IGNORE_INDEX
        seg = int(batch.segment_ids.reshape(-1)[start])
        prompts.setdefault(int(batch.segment_prompt[seg]), set()).add(tuple(seq[:5].tolist()))
    assert len(prompts) == batch.num_prompts and all(len(p) == 1 for p in prompts.values())


def test_gpu_check_runs_end_to_end_on_a_cpu_and_its_numbers_match_an_independent_count(tmp_path):
    out = gpu_check(tmp_path, *TINY_BENCH)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "nothing to install" in out.stdout
    assert re.search(r"GPU tests\s+4 skipped", out.stdout), out.stdout[-2000:]
    result = json.loads((tmp_path / "out" / "bench.json").read_text())
    cfg = bench.llama3_8b_shaped(2, hidden=64, heads=4, groups=2, ffn=128, vocab=512)
    assert isinstance(cfg, ModelConfig) and cfg.vocab_size == 512 and cfg.num_query_groups == 2
    # 2 micro-batches x 1 row x 2 prompts (128 // 46) x (shared prompt: 8 + 2 repeated last tokens + 3 x 12).
    assert result["tokens_per_step"] == 2 * 1 * 2 * (8 + 2 + 3 * 12) and result["prompts_per_step"] == 4
    # Model FLOPs and size against Hugging Face's Llama of the same shape: torch's FLOP counter over a training
    # step on one prompt + response (8 + 12 tokens, what each response attends to), and its parameters.
    flops = counted_training_flops_per_token(cfg, 8 + 12)
    assert result["flops_per_token"] == pytest.approx(flops, rel=1e-12)
    assert result["model_tflops"] == pytest.approx(
        flops * result["tokens_per_step"] / result["step_s"] / 1e12
    )
    assert result["params"] == sum(p.numel() for p in hf_llama(cfg).parameters())
    assert len(result["losses"]) == 3 and all(x == x for x in result["losses"])
    assert f"{result['tokens_per_s']:,.0f}" in out.stdout.split("== result")[1]


def test_dry_run_installs_only_what_does_not_import_and_passes_benchmark_arguments(tmp_path):
    hidden = tmp_path / "no_megatron"
    (hidden / "megatron").mkdir(parents=True)
    (hidden / "megatron" / "__init__.py").write_text("raise ImportError('not on this machine')\n")
    out = gpu_check(
        tmp_path, "--dry-run", "--layers", "3", PYTHONPATH=str(hidden), WHEELS=str(tmp_path / "w")
    )
    assert out.returncode == 0, out.stderr
    commands = [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]
    assert commands[0].endswith(f"--find-links {tmp_path / 'w'} --target {tmp_path / 'site'} megatron-core")
    assert "--no-index --no-deps" in commands[0] and "torch" not in commands[0].split("--target")[1]
    assert commands[1].startswith("timeout 150 ") and " -m pytest -m gpu tests/gpu " in commands[1]
    assert commands[2].endswith(f"bench_wrpo_step.py --json {tmp_path / 'out' / 'bench.json'} --layers 3")


def test_wheel_pins_match_the_project_and_this_environment():
    text = (ROOT / "scripts" / "gpu" / "prepare_wheels.sh").read_text()
    pins = dict(re.findall(r"^\s+([a-z-]+)==([\w.]+)$", text, re.M))
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"megatron-core=={pins['megatron-core']}" in deps
    assert "torch" not in pins
    from importlib.metadata import version

    for name, pinned in pins.items():
        assert version(name) == pinned, name
    needs = re.search(r"NEEDS=\((.*?)\)", (ROOT / "scripts" / "gpu_check.sh").read_text(), re.S).group(1)
    assert sorted(n.split("=")[0] for n in needs.split()) == sorted(pins)


ABSENT_ON_GPU_MACHINE = ["datasets", "transformers", "hydra", "omegaconf", "safetensors", "tokenizers",
                         "tensorboard", "matplotlib", "pyarrow", "pandas", "trl", "yaml"]  # fmt: skip
"""Packages of this project's environment that the GPU machine lacks and prepare_wheels.sh does not carry."""
BLOCKED_RUN = """
import importlib.abc, importlib.machinery, importlib.util, sys
ABSENT = set(sys.argv[1].split(","))

class Absent(importlib.abc.Loader):
    def create_module(self, spec):
        raise ModuleNotFoundError(f"{spec.name} is not installed on the GPU machine")
    def exec_module(self, module):
        pass

class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ABSENT:
            return importlib.machinery.ModuleSpec(name, Absent())

sys.meta_path.insert(0, Finder())
sys.path.insert(0, ".")
for name, path in (("test_gpu_step", "tests/gpu/test_gpu_step.py"), ("bench", "scripts/gpu/bench_wrpo_step.py")):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
module.main(sys.argv[2:])
print("IMPORTED", sorted(m for m in sys.modules if m.split(".")[0] in ABSENT))
"""


def test_gpu_tests_and_benchmark_need_nothing_beyond_the_carried_wheels():
    cmd = [sys.executable, "-c", BLOCKED_RUN, ",".join(ABSENT_ON_GPU_MACHINE), *TINY_BENCH]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "IMPORTED []" in out.stdout
