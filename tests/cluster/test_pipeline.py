"""scripts/pipeline/run_pipeline.py: the paper's sequence at toy scale on a CPU, step by step and restartable.

A tiny Llama with the toy tokenizer stands in for LLaMA-3-8B-Instruct, a tiny sequence classifier for ArmoRM,
the toy records for UltraFeedback with source responses; sampling uses the transformers backend.
"""

import json
import shlex
import sys
from pathlib import Path

import pytest

from tests.cluster.conftest import save_tiny_chat_model

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "pipeline"))
import run_pipeline  # noqa: E402

COMMON = ["data.toy=false", "data.source.num_workers=1", "logging.eval_prompts=4", "logging.plots=false",
          "logging.tensorboard=false", "logging.eval_interval=0"]  # fmt: skip
SFT = ["sft.global_batch_size=8", "sft.micro_batch_size=4", "sft.max_steps=3"]
WRPO = ["wrpo.global_batch_size=8", "wrpo.micro_batch_size=4", "wrpo.max_steps=2"]


def save_tiny_reward_model(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from wrpo_nemo.data.toy import build_toy_tokenizer

    tokenizer = build_toy_tokenizer(str(folder))
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(folder)
    return folder


def pipeline_args(
    tmp_path: Path, base: Path, reward: Path, records: Path, questions: Path, *extra: str
) -> list:
    return [
        "--work-dir", str(tmp_path / "work"), "--base-model", str(base), "--records", str(records),
        "--reward-model", str(reward), "--sft-config", "wrpo_tiny", "--wrpo-config", "wrpo_tiny",
        *[f"--override={o}" for o in COMMON], *[f"--sft-override={o}" for o in SFT],
        *[f"--wrpo-override={o}" for o in WRPO], "--seeds", "1", "2", "--max-new-tokens", "8",
        "--backend", "transformers", "--export-dtype", "fp32", "--arena-hard", str(questions),
        "--alpaca-eval", str(questions.with_suffix(".json")), "--model-id", "toy-wrpo",
        "--eval-max-new-tokens", "6", *extra,
    ]  # fmt: skip


@pytest.fixture
def toy_inputs(tmp_path):
    from wrpo_nemo.data.toy import build_toy_dataset

    base = save_tiny_chat_model(tmp_path / "base")
    reward = save_tiny_reward_model(tmp_path / "reward")
    records = Path(build_toy_dataset(str(tmp_path / "records"), 150, seed=0)["train"])
    questions = tmp_path / "arena.jsonl"
    questions.write_text(json.dumps({"question_id": "q1", "turns": [{"content": "what is 1 + 1 ?"}]}) + "\n")
    questions.with_suffix(".json").write_text(
        json.dumps([{"instruction": "what is 2 + 2 ?", "dataset": "x"}])
    )
    return base, reward, records, questions


def test_dry_run_prints_every_step_in_the_papers_order_and_writes_nothing(toy_inputs, tmp_path, capsys):
    run_pipeline.main(pipeline_args(tmp_path, *toy_inputs, "--dry-run"))
    out = capsys.readouterr().out
    steps = [line.strip("[]") for line in out.splitlines() if line.startswith("[")]
    assert steps == list(run_pipeline.STEPS)
    commands = [line for line in out.splitlines() if line.startswith("+ ")]
    assert "convert_hf_to_nemo.py" in commands[0]
    assert "stages=[sft]" in commands[1] and "construct.py generate" in commands[2]
    assert "construct.py score" in commands[3] and "construct.py select" in commands[4]
    assert "stages=[wrpo]" in commands[5] and "convert_nemo_to_hf.py" in commands[6]
    assert commands[7].count("generate_answers.py") == 1 and len(commands) == 9
    assert not (tmp_path / "work").exists()


def test_sharded_sampling_and_scoring_split_the_prompts_once_and_selection_reads_every_shard(
    toy_inputs, tmp_path, capsys
):
    run_pipeline.main(pipeline_args(tmp_path, *toy_inputs, "--dry-run", "--shards", "3"))
    commands = [
        shlex.split(line[2:]) for line in capsys.readouterr().out.splitlines() if line.startswith("+ ")
    ]
    generate = [c for c in commands if "generate" in c]
    score = [c for c in commands if "score" in c]
    for group in (generate, score):
        assert [(c[c.index("--shard-index") + 1], c[c.index("--num-shards") + 1]) for c in group] == [
            ("0", "3"),
            ("1", "3"),
            ("2", "3"),
        ]
    outputs = {c[c.index("--output") + 1] for c in score}
    assert len(outputs) == 3 and all(
        o.startswith(str(tmp_path / "work" / "data" / "scored")) for o in outputs
    )
    (select,) = [c for c in commands if "select" in c]
    assert select[select.index("--inputs") + 1] == str(tmp_path / "work" / "data" / "scored" / "*.jsonl")


@pytest.mark.slow
def test_toy_pipeline_runs_end_to_end_on_cpu_and_a_rerun_skips_every_finished_step(
    toy_inputs, tmp_path, capsys
):
    from transformers import AutoModelForCausalLM

    run_pipeline.main(pipeline_args(tmp_path, *toy_inputs))
    work = tmp_path / "work"
    assert sorted(p.name for p in (work / "done").iterdir()) == sorted(run_pipeline.STEPS)
    # Selection kept prompts with a source response and two differently scored target samples.
    selected = [json.loads(line) for line in (work / "data" / "wrpo.jsonl").read_text().splitlines()]
    assert selected and all(len(r["chosen"]) == 2 and len(r["rejected"]) == 1 for r in selected)
    assert all(r["scores"]["target_chosen"] > r["scores"]["rejected"] for r in selected)
    summary = json.loads((work / "wrpo" / "summary.json").read_text())
    assert summary["wrpo"]["steps"] == 2 and not summary["wrpo"]["preempted"]
    model = AutoModelForCausalLM.from_pretrained(work / "export" / "hf")
    assert model.config.num_hidden_layers == 2
    (answer,) = [
        json.loads(x) for x in (work / "eval" / "arena_hard" / "model_answer" / "toy-wrpo.jsonl").open()
    ]
    assert answer["question_id"] == "q1" and answer["model_id"] == "toy-wrpo"
    assert (
        json.loads((work / "eval" / "alpaca_eval" / "model_outputs.json").read_text())[0]["generator"]
        == "toy-wrpo"
    )
    capsys.readouterr()
    run_pipeline.main(pipeline_args(tmp_path, *toy_inputs))
    out = capsys.readouterr().out
    assert out.count("done before, skipped") == len(run_pipeline.STEPS) and "+ " not in out
