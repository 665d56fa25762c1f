"""The recipe end to end, as a user runs it: ``python recipes/wrpo.py`` in a subprocess."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.dist_utils import free_port

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "data.toy_examples=240",
    "sft.global_batch_size=8",
    "sft.micro_batch_size=4",
    "sft.max_steps=3",
    "wrpo.global_batch_size=8",
    "wrpo.micro_batch_size=4",
    "logging.eval_interval=2",
    "logging.eval_prompts=8",
    "logging.log_interval=1",
]
TIMING = {"tokens_per_s", "step_time_s"}
# A user's shell, not a leftover of other tests' process groups in this pytest process; the recipe imports
# wrpo_nemo from this checkout (python puts recipes/, not the root, on sys.path).
_DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
ENV = {
    **{k: v for k, v in os.environ.items() if k not in _DIST_VARS},
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
}


def recipe(
    run_dir: Path, *overrides: str, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "recipes" / "wrpo.py"), f"run_dir={run_dir}", *SMALL, *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)
    if check and out.returncode != 0:
        raise AssertionError(f"recipe failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def metrics(path: Path, split: str = "train") -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in records if r["split"] == split]


def _final_weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    from wrpo_nemo.converters.dcp_stream import CheckpointReader
    from wrpo_nemo.training.checkpoint import latest_checkpoint

    reader = CheckpointReader(latest_checkpoint(stage_dir) / "weights")
    keys = [
        k for k in reader._metadata.state_dict_metadata if reader.has(k) and not k.startswith("optimizer")
    ]
    return {k: reader.read(k) for k in keys}


@pytest.mark.slow
def test_tiny_recipe_runs_both_stages_and_leaves_every_output(tmp_path):
    run_dir = tmp_path / "run"
    out = recipe(run_dir, "wrpo.max_steps=4", "checkpoint.save_interval=2")
    assert "[wrpo] done after 4 steps" in out.stdout
    sft, wrpo = metrics(run_dir / "sft" / "metrics.jsonl"), metrics(run_dir / "wrpo" / "metrics.jsonl")
    assert [r["step"] for r in sft] == [1, 2, 3] and [r["step"] for r in wrpo] == [1, 2, 3, 4]
    for r in wrpo:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "alpha", "rewards/chosen", "rewards/margins",
                    "rewards/accuracies", "rewards/source_chosen", "rewards/target_chosen", "logps/rejected"):  # fmt: skip
            assert key in r, key
    # alpha_t = alpha_max * t / T with t the steps completed before the update: 0 at the first step.
    assert [r["alpha"] for r in wrpo] == pytest.approx([0.0, 0.025, 0.05, 0.075])
    assert metrics(run_dir / "wrpo" / "metrics.jsonl", "eval"), "no evaluation was logged"
    assert (run_dir / "curves_sft.png").is_file() and (run_dir / "curves_wrpo.png").is_file()
    assert any((run_dir / "tensorboard" / "wrpo").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["wrpo"]["reference"] == "computed"
    assert "toy_accuracy" in summary["wrpo"]["eval_metrics"]
    # keep_last=2 with saves at steps 2 and 4: both kept, nothing half-written left behind.
    names = sorted(p.name for p in (run_dir / "wrpo" / "checkpoints").iterdir())
    assert names == ["step_0000002", "step_0000004"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = run_dir / "wrpo" / "hf"
    model = AutoModelForCausalLM.from_pretrained(hf)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    assert model.config.vocab_size == len(tokenizer)

    # A second WRPO run from the same stage-1 checkpoint on the same data reuses the stored reference.
    sft_ckpt = run_dir / "sft" / "checkpoints" / "step_0000003"
    again = recipe(
        run_dir, "stages=[wrpo]", f"model.checkpoint={sft_ckpt}", "wrpo.max_steps=1", "export.hf=false"
    )
    assert "reference log-probs: loaded" in again.stdout
    # A bf16 reference pass is stored under its own key: computed, not the fp32 values loaded.
    bf16 = recipe(
        run_dir, "stages=[wrpo]", f"model.checkpoint={sft_ckpt}", "wrpo.max_steps=1", "export.hf=false",
        "wrpo.reference_precision=bf16", "logging.eval_interval=0",
    )  # fmt: skip
    assert "reference log-probs: computed (bf16)" in bf16.stdout


@pytest.mark.slow
def test_resume_continues_bit_for_bit(tmp_path):
    run_dir = tmp_path / "run"
    recipe(
        run_dir, "wrpo.max_steps=6", "checkpoint.save_interval=3", "checkpoint.keep_last=5", "export.hf=false"
    )
    straight = metrics(run_dir / "wrpo" / "metrics.jsonl")
    straight_weights = _final_weights(run_dir / "wrpo")
    # Forget everything after step 3 of stage 2, as a crash right after that save would.
    shutil.rmtree(run_dir / "wrpo" / "checkpoints" / "step_0000006")
    lines = (run_dir / "wrpo" / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= 3 and json.loads(line)["split"] == "train"]
    (run_dir / "wrpo" / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    out = recipe(run_dir, "wrpo.max_steps=6", "checkpoint.save_interval=3", "checkpoint.keep_last=5",
                 "export.hf=false", "checkpoint.resume=true")  # fmt: skip
    assert "starting at step 3" in out.stdout
    resumed = metrics(run_dir / "wrpo" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, resumed, strict=True):
        assert {k: v for k, v in a.items() if k not in TIMING} == {
            k: v for k, v in b.items() if k not in TIMING
        }
    resumed_weights = _final_weights(run_dir / "wrpo")
    for key, value in straight_weights.items():
        assert torch.equal(value, resumed_weights[key]), key


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_zero_then_resume_finishes(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "recipes" / "wrpo.py"), f"run_dir={run_dir}", *SMALL,
           "stages=[sft]", "sft.max_steps=null", "sft.epochs=200", "export.hf=false"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=ENV)  # fmt: skip
    log = run_dir / "sft" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert time.time() - sent < 60
    assert "[sft] preempted after" in stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sft"]["preempted"] is True
    steps = summary["sft"]["steps"]
    out = recipe(run_dir, "stages=[sft]", f"sft.max_steps={steps + 2}", "sft.epochs=200", "export.hf=false",
                 "checkpoint.resume=true")  # fmt: skip
    assert f"starting at step {steps}" in out.stdout


def test_a_config_error_exits_2_naming_the_key_before_anything_is_written(tmp_path):
    # The one subprocess check of the exit path; every rule is tested in-process in test_config.py.
    out = recipe(tmp_path / "bad", "wrpo.micro_batch_size=3", check=False, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "config error: wrpo.global_batch_size=8 is not a multiple of wrpo.micro_batch_size=3" in out.stderr
    assert not (tmp_path / "bad").exists()  # not even Hydra's output folder


@pytest.mark.slow
def test_online_reference_gives_the_same_training_as_the_precomputed_one_in_either_layout(tmp_path):
    """Online (shared_prompt layout) against precomputed (separate layout): same losses, rewards and norms."""
    common = ("stages=[wrpo]", "wrpo.max_steps=3", "export.hf=false", "logging.eval_interval=0",
              "wrpo.optim.warmup_ratio=0.0")  # fmt: skip
    recipe(tmp_path / "pre", *common, "wrpo.reference=precompute", "data.layout=separate")
    out = recipe(tmp_path / "online", *common, "wrpo.reference=online", "data.layout=shared_prompt")
    assert "reference log-probs: online" in out.stdout
    pre = metrics(tmp_path / "pre" / "wrpo" / "metrics.jsonl")
    online = metrics(tmp_path / "online" / "wrpo" / "metrics.jsonl")
    for a, b in zip(pre, online, strict=True):
        for key in a.keys() - TIMING - {"stage", "split", "rewards/accuracies"}:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
        # The layouts sum in another order (fp32): a prompt whose margin is within rounding of 0 may count either
        # way. At step 1 the policy is the reference and every margin is rounding alone: not compared.
        if a["step"] > 1:
            assert abs(b["rewards/accuracies"] - a["rewards/accuracies"]) <= 1 / 8


@pytest.mark.slow
def test_resume_at_another_tensor_parallel_size_continues_the_same_training(tmp_path):
    run_dir = tmp_path / "run"
    args = ("stages=[sft]", "sft.max_steps=6", "checkpoint.save_interval=3", "checkpoint.keep_last=5",
            "export.hf=false")  # fmt: skip
    recipe(run_dir, *args)
    straight = metrics(run_dir / "sft" / "metrics.jsonl")
    shutil.rmtree(run_dir / "sft" / "checkpoints" / "step_0000006")
    (run_dir / "sft" / "metrics.jsonl").unlink()
    # The TP=1 checkpoint (weights, Adam moments, schedule, data position) resharded onto TP=2 by torchrun.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), str(ROOT / "recipes" / "wrpo.py"), f"run_dir={run_dir}", *SMALL, *args,
           "parallel.tensor=2", "checkpoint.resume=true"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "starting at step 3" in out.stdout
    resumed = metrics(run_dir / "sft" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for a, b in zip(straight[3:], resumed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["lr"] == a["lr"]
