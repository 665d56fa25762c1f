"""The recipe end to end at toy scale.

One test runs ``python recipes/wrpo.py`` in a subprocess as a user does (exit status, closing lines, files).
The others run the same composed config in this process (tests/training/recipe_runner.py) and share runs: the
two-stage run below is run once and read by the output, resume and reference-reuse tests. Only the resume
onto TP=2 starts processes of its own (scripts/launch_local.sh, torchrun): tensor parallelism needs two.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.training.recipe_runner import DIST_VARS, ROOT, recipe_main, run_recipe

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
# A user's shell, not a leftover of other tests' process groups in this pytest process.
ENV = {**{k: v for k, v in os.environ.items() if k not in DIST_VARS}, "OMP_NUM_THREADS": "1"}
# SFT 3 steps, then WRPO 6 steps with a save every 3 (keep_last=2 of wrpo_tiny keeps both), then the exports.
STRAIGHT = ("wrpo.max_steps=6", "checkpoint.save_interval=3")


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


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The two-stage run, and what it left behind recorded before later runs in its folder (the resume, the
    reference reuse) change any of it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tmp_path_factory.mktemp("straight") / "run"
    results, out = run_recipe(run_dir, *SMALL, *STRAIGHT)
    hf = run_dir / "wrpo" / "hf"
    return SimpleNamespace(
        run_dir=run_dir,
        results=results,
        out=out,
        sft=metrics(run_dir / "sft" / "metrics.jsonl"),
        wrpo=metrics(run_dir / "wrpo" / "metrics.jsonl"),
        wrpo_eval=metrics(run_dir / "wrpo" / "metrics.jsonl", "eval"),
        summary=json.loads((run_dir / "summary.json").read_text()),
        plots=[(run_dir / f"curves_{s}.png").is_file() for s in ("sft", "wrpo")],
        tensorboard=any((run_dir / "tensorboard" / "wrpo").iterdir()),
        checkpoints=sorted(p.name for p in (run_dir / "wrpo" / "checkpoints").iterdir()),
        weights=_final_weights(run_dir / "wrpo"),
        hf_vocab_size=AutoModelForCausalLM.from_pretrained(hf).config.vocab_size,
        tokenizer_size=len(AutoTokenizer.from_pretrained(hf)),
    )


@pytest.fixture(scope="module")
def resumed(straight):
    """The straight run's WRPO stage cut back to its step-3 save, as a crash right after that save leaves it,
    then resumed with the same settings (the finished SFT stage is only reported)."""
    run_dir = straight.run_dir
    shutil.rmtree(run_dir / "wrpo" / "checkpoints" / "step_0000006")
    lines = (run_dir / "wrpo" / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= 3 and json.loads(line)["split"] == "train"]
    (run_dir / "wrpo" / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    # The exports come after training and change none of it: not written again.
    results, out = run_recipe(run_dir, *SMALL, *STRAIGHT, "checkpoint.resume=true", "export.hf=false")
    return SimpleNamespace(
        results=results,
        out=out,
        wrpo=metrics(run_dir / "wrpo" / "metrics.jsonl"),
        weights=_final_weights(run_dir / "wrpo"),
    )


@pytest.mark.slow
def test_tiny_recipe_runs_both_stages_and_leaves_every_output(straight):
    sft, wrpo = straight.results["sft"], straight.results["wrpo"]
    assert (sft.steps, sft.preempted, wrpo.steps, wrpo.preempted) == (3, False, 6, False)
    assert [r["step"] for r in straight.sft] == [1, 2, 3]
    assert [r["step"] for r in straight.wrpo] == [1, 2, 3, 4, 5, 6]
    for r in straight.wrpo:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "alpha", "rewards/chosen", "rewards/margins",
                    "rewards/accuracies", "rewards/source_chosen", "rewards/target_chosen", "logps/rejected"):  # fmt: skip
            assert key in r, key
    # alpha_t = alpha_max * t / T with t the steps completed before the update: 0 at the first step.
    assert [r["alpha"] for r in straight.wrpo] == pytest.approx([0.1 * t / 6 for t in range(6)])
    assert straight.wrpo_eval, "no evaluation was logged"
    assert straight.plots == [True, True]
    assert straight.tensorboard
    assert straight.summary["wrpo"]["reference"] == "computed"
    assert "toy_accuracy" in straight.summary["wrpo"]["eval_metrics"]
    # keep_last=2 with saves at steps 3 and 6: both kept, nothing half-written left behind.
    assert straight.checkpoints == ["step_0000003", "step_0000006"]
    assert straight.hf_vocab_size == straight.tokenizer_size
    # Each stage says how it computes: SFT has nothing to share; the default WRPO layout shares each prompt.
    assert (
        "[sft] 3 optimizer steps" in straight.out
        and "separate layout, attention per-span SDPA" in straight.out
    )
    assert "shared_prompt layout, attention per-span SDPA (local layers), float32" in straight.out


@pytest.mark.slow
def test_resume_continues_bit_for_bit(straight, resumed):
    assert "starting at step 3" in resumed.out
    assert resumed.results["wrpo"].steps == 6 and not resumed.results["wrpo"].preempted
    assert [r["step"] for r in resumed.wrpo] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight.wrpo, resumed.wrpo, strict=True):
        assert {k: v for k, v in a.items() if k not in TIMING} == {
            k: v for k, v in b.items() if k not in TIMING
        }
    assert straight.weights.keys() == resumed.weights.keys()
    for key, value in straight.weights.items():
        assert torch.equal(value, resumed.weights[key]), key


# After the resume: these runs save in the folder whose checkpoints it resumes from.
@pytest.mark.slow
@pytest.mark.usefixtures("resumed")
def test_wrpo_from_the_same_checkpoint_reuses_the_stored_reference_and_bf16_computes_its_own(straight):
    run_dir = straight.run_dir
    from_sft = (
        "stages=[wrpo]", f"model.checkpoint={run_dir / 'sft' / 'checkpoints' / 'step_0000003'}",
        "wrpo.max_steps=1", "export.hf=false",
    )  # fmt: skip
    # A second WRPO run from the same stage-1 checkpoint on the same data reuses the stored reference.
    results, out = run_recipe(run_dir, *SMALL, *from_sft)
    assert "reference log-probs: loaded" in out and results["wrpo"].reference == "loaded"
    # A bf16 reference pass is stored under its own key: computed, not the fp32 values loaded.
    results, out = run_recipe(
        run_dir, *SMALL, *from_sft, "wrpo.reference_precision=bf16", "logging.eval_interval=0"
    )
    assert "reference log-probs: computed (bf16)" in out and results["wrpo"].reference == "computed (bf16)"


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_zero_then_resume_finishes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    log = run_dir / "sft" / "metrics.jsonl"
    sent, done = [], threading.Event()

    def preempt_after_three_steps():
        deadline = time.time() + 240
        while not done.is_set() and time.time() < deadline:
            # Only into the pipeline's own handler (wrpo_nemo.training.preemption's), never the default that
            # ends the process.
            handler = signal.getsignal(signal.SIGTERM)
            ours = getattr(handler, "__module__", None) == "wrpo_nemo.training.preemption"
            if ours and log.is_file() and len(log.read_text().splitlines()) >= 3:
                sent.append(time.time())
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=preempt_after_three_steps, daemon=True)
    watcher.start()
    try:
        # The recipe's main returns (no SystemExit): the command line's exit status 0.
        recipe_main(
            run_dir, *SMALL, "stages=[sft]", "sft.max_steps=null", "sft.epochs=200", "export.hf=false"
        )
    finally:
        done.set()
        watcher.join()
    assert sent, "the run never logged three steps"
    assert time.time() - sent[0] < 60
    assert "[sft] preempted after" in capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sft"]["preempted"] is True
    steps = summary["sft"]["steps"]
    results, out = run_recipe(
        run_dir, *SMALL, "stages=[sft]", f"sft.max_steps={steps + 2}", "sft.epochs=200", "export.hf=false",
        "checkpoint.resume=true",
    )  # fmt: skip
    assert f"starting at step {steps}" in out
    assert results["sft"].steps == steps + 2 and not results["sft"].preempted


def test_config_errors_exit_2_with_the_key_and_build_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        recipe_main(tmp_path / "bad", *SMALL, "wrpo.micro_batch_size=3")
    assert exit_info.value.code == 2
    assert "wrpo.global_batch_size=8 is not a multiple of wrpo.micro_batch_size=3" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "sft").exists()


@pytest.mark.slow
def test_online_reference_gives_the_same_training_as_the_precomputed_one_in_either_layout(tmp_path):
    """Online (shared_prompt layout) against precomputed (separate layout): same losses, rewards and norms."""
    common = ("stages=[wrpo]", "wrpo.max_steps=3", "export.hf=false", "logging.eval_interval=0",
              "wrpo.optim.warmup_ratio=0.0")  # fmt: skip
    results, _ = run_recipe(
        tmp_path / "pre", *SMALL, *common, "wrpo.reference=precompute", "data.layout=separate"
    )
    assert results["wrpo"].reference == "computed"
    results, out = run_recipe(
        tmp_path / "online", *SMALL, *common, "wrpo.reference=online", "data.layout=shared_prompt"
    )
    assert "reference log-probs: online" in out and results["wrpo"].reference == "online"
    pre = metrics(tmp_path / "pre" / "wrpo" / "metrics.jsonl")
    online = metrics(tmp_path / "online" / "wrpo" / "metrics.jsonl")
    assert [r["step"] for r in pre] == [1, 2, 3]
    for a, b in zip(pre, online, strict=True):
        for key in a.keys() - TIMING - {"stage", "split", "rewards/accuracies"}:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
        # The layouts sum in another order (fp32): a prompt whose margin is within rounding of 0 may count either
        # way. At step 1 the policy is the reference and every margin is rounding alone: not compared.
        if a["step"] > 1:
            assert abs(b["rewards/accuracies"] - a["rewards/accuracies"]) <= 1 / 8


@pytest.mark.slow
def test_two_local_processes_resume_a_one_process_run_at_tensor_parallel_size_2(tmp_path):
    """scripts/launch_local.sh (torchrun, two CPU processes) continues at TP=2 what one process began at TP=1:
    the checkpoint's weights, Adam moments, schedule and data position resharded."""
    run_dir = tmp_path / "run"
    args = ("stages=[sft]", "sft.max_steps=6", "checkpoint.save_interval=3", "checkpoint.keep_last=5",
            "export.hf=false")  # fmt: skip
    run_recipe(run_dir, *SMALL, *args)
    straight = metrics(run_dir / "sft" / "metrics.jsonl")
    shutil.rmtree(run_dir / "sft" / "checkpoints" / "step_0000006")
    (run_dir / "sft" / "metrics.jsonl").unlink()
    cmd = ["bash", str(ROOT / "scripts" / "launch_local.sh"), "2", f"run_dir={run_dir}", *SMALL, *args,
           "parallel.tensor=2", "checkpoint.resume=true"]  # fmt: skip
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**ENV, "PYTHON": sys.executable}
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "starting at step 3" in out.stdout and "[sft] done after 6 steps" in out.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sft"]["steps"] == 6 and summary["sft"]["preempted"] is False
    assert json.loads((run_dir / "run_config.json").read_text())["parallel"]["tensor"] == 2
    resumed = metrics(run_dir / "sft" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for a, b in zip(straight[3:], resumed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["lr"] == a["lr"]


@pytest.mark.slow
def test_command_line_runs_both_stages_and_exports(tmp_path):
    """The one subprocess of the plain command line: Hydra's parsing, the exit status, the closing lines."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "recipes" / "wrpo.py"), f"run_dir={run_dir}", *SMALL, "wrpo.max_steps=2",
           "logging.eval_interval=0"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    assert "[sft] done after 3 steps" in out.stdout and "[wrpo] done after 2 steps" in out.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {s: (summary[s]["steps"], summary[s]["preempted"]) for s in summary} == {
        "sft": (3, False),
        "wrpo": (2, False),
    }
    assert json.loads((run_dir / "run_config.json").read_text())["wrpo"]["max_steps"] == 2
    for stage, steps in (("sft", 3), ("wrpo", 2)):
        assert [r["step"] for r in metrics(run_dir / stage / "metrics.jsonl")] == list(range(1, steps + 1))
        assert [p.name for p in (run_dir / stage / "checkpoints").iterdir()] == [f"step_{steps:07d}"]
        exported = {p.name for p in (run_dir / stage / "hf").iterdir()}
        assert {"config.json", "model.safetensors.index.json"} <= exported
        assert (run_dir / f"curves_{stage}.png").is_file()
