"""scripts/eval/generate_answers.py: the answer files MT-Bench, AlpacaEval 2 and Arena-Hard-Auto read."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "eval" / "generate_answers.py"
spec = importlib.util.spec_from_file_location("generate_answers", SCRIPT)
answers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(answers)

MT_BENCH = [
    {"question_id": 81, "category": "writing", "turns": ["what is 1 + 2 ?", "what is 3 - 1 ?"]},
    {"question_id": 111, "category": "math", "turns": ["compute 7 + 8 .", "compute 9 - 4 ."]},
    {"question_id": 131, "category": "stem", "turns": ["what is 4 + 4 ?", "maybe 2 + 2 ?"]},
]
ALPACA = [
    {
        "instruction": "what is 2 + 2 ?",
        "output": "4",
        "generator": "gpt4_1106_preview",
        "dataset": "helpful_base",
    },
    {"instruction": "compute 5 - 3 .", "output": "2", "generator": "gpt4_1106_preview", "dataset": "oasst"},
]
ARENA = [
    {"question_id": "328c149e", "category": "arena-hard-v0.1", "cluster": "x", "turns": [{"content": "what is 6 + 1 ?"}]},
    {"question_id": "9a1b2c3d", "category": "arena-hard-v0.1", "cluster": "y", "turns": [{"content": "compute 2 - 2 ."}]},
]  # fmt: skip
# FastChat llm_judge common.py temperature_config, copied here as the independent reference.
FASTCHAT_TEMPERATURES = {"writing": 0.7, "math": 0.0, "stem": 0.1}


# Arena-Hard-Auto v0.1 as lmarena/arena-hard-auto's gen_answer.py writes it at the pinned commit (read there:
# gen_answer.py, add_markdown_info.py, show_result.py), written out here as the independent reference.
ARENA_HARD_V01_COMMIT = "3071ef95d913bb5cd632641db336a3b6c7fe4bdd"
ARENA_HARD_V01_FIELDS = {"question_id", "answer_id", "model_id", "choices", "tstamp", "conv_metadata"}
ARENA_HARD_V01_METADATA = {
    "token_len": int,
    "header_count": {"h1", "h2", "h3", "h4", "h5", "h6"},
    "list_count": {"ordered", "unordered"},
    "bold_count": {"**", "__"},
}


def assert_arena_hard_v01_record(record: dict, model_id: str) -> None:
    assert set(record) == ARENA_HARD_V01_FIELDS
    assert record["model_id"] == model_id and record["answer_id"] and isinstance(record["tstamp"], float)
    (choice,) = record["choices"]
    assert choice["index"] == 0
    (turn,) = choice["turns"]
    assert set(turn) == {"content"} and isinstance(turn["content"], str)  # token_len moved to conv_metadata
    metadata = record["conv_metadata"]
    assert set(metadata) == set(ARENA_HARD_V01_METADATA) and isinstance(metadata["token_len"], int)
    for name, keys in ARENA_HARD_V01_METADATA.items():
        if name != "token_len":
            assert set(metadata[name]) == keys and all(isinstance(v, int) for v in metadata[name].values())


def write_questions(folder: Path) -> dict[str, Path]:
    paths = {"mt_bench": folder / "mt_question.jsonl", "alpaca_eval": folder / "alpaca_eval.json",
             "arena_hard": folder / "arena_question.jsonl"}  # fmt: skip
    paths["mt_bench"].write_text("".join(json.dumps(q) + "\n" for q in MT_BENCH))
    paths["alpaca_eval"].write_text(json.dumps(ALPACA))
    paths["arena_hard"].write_text("".join(json.dumps(q) + "\n" for q in ARENA))
    return paths


def generate_cli(bench: str, model: Path, questions: Path, output: Path, *extra: str) -> Path:
    """The command line, parsed and run in this process (a subprocess would pay the imports again)."""
    argv = [bench, "--model", str(model), "--questions", str(questions), "--output", str(output),
            "--model-id", "tiny-wrpo", "--max-new-tokens", "6", *extra]  # fmt: skip
    return answers.run(answers.parse_args(argv))


def test_mt_bench_uses_fastchat_category_temperatures_and_answers_turn_two_after_turn_one():
    calls = []

    def fake_generate(conversations, temperature, max_new_tokens):
        calls.append((temperature, [list(c) for c in conversations]))
        return [f"answer {len(c)} {c[-1]['content']}" for c in conversations]

    records = answers.mt_bench_answers(MT_BENCH, fake_generate, "m", 16)
    seen = {}
    for temperature, conversations in calls:
        for c in conversations:
            question = next(q for q in MT_BENCH if q["turns"][0] == c[0]["content"])
            seen.setdefault(question["category"], set()).add(temperature)
            if len(c) == 3:  # turn 2 sees the question and the model's own first answer
                assert c[1] == {"role": "assistant", "content": f"answer 1 {question['turns'][0]}"}
                assert c[2] == {"role": "user", "content": question["turns"][1]}
    assert seen == {k: {v} for k, v in FASTCHAT_TEMPERATURES.items()}
    assert [r["choices"][0]["turns"] for r in records] == [
        [f"answer 1 {q['turns'][0]}", f"answer 3 {q['turns'][1]}"] for q in MT_BENCH
    ]


def test_answer_files_have_each_harness_format_with_the_tiny_model(tiny_chat_model, tmp_path):
    questions = write_questions(tmp_path)
    mt = generate_cli("mt_bench", tiny_chat_model, questions["mt_bench"], tmp_path / "mt" / "model_answer")
    assert mt == tmp_path / "mt" / "model_answer" / "tiny-wrpo.jsonl"
    mt_records = [json.loads(line) for line in mt.read_text().splitlines()]
    assert [r["question_id"] for r in mt_records] == [81, 111, 131]
    for r in mt_records:
        assert set(r) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert r["model_id"] == "tiny-wrpo" and isinstance(r["tstamp"], float) and r["answer_id"]
        (choice,) = r["choices"]
        assert choice["index"] == 0 and len(choice["turns"]) == 2
        assert all(isinstance(t, str) for t in choice["turns"])

    ae = generate_cli("alpaca_eval", tiny_chat_model, questions["alpaca_eval"], tmp_path / "ae")
    ae_records = json.loads((tmp_path / "ae" / "model_outputs.json").read_text())
    assert ae == tmp_path / "ae" / "model_outputs.json"
    assert [(r["instruction"], r["dataset"], r["generator"]) for r in ae_records] == [
        (q["instruction"], q["dataset"], "tiny-wrpo") for q in ALPACA
    ]
    assert all(set(r) == {"instruction", "output", "generator", "dataset"} for r in ae_records)

    ah = generate_cli(
        "arena_hard", tiny_chat_model, questions["arena_hard"], tmp_path / "ah" / "model_answer"
    )
    ah_records = [json.loads(line) for line in ah.read_text().splitlines()]
    assert [r["question_id"] for r in ah_records] == ["328c149e", "9a1b2c3d"]
    for r in ah_records:
        assert_arena_hard_v01_record(r, "tiny-wrpo")


def test_greedy_batched_answers_equal_unbatched_generation_of_the_same_model(tiny_chat_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    questions = write_questions(tmp_path)
    path = generate_cli("arena_hard", tiny_chat_model, questions["arena_hard"], tmp_path / "ah",
                        "--batch-size", "2")  # fmt: skip
    records = [json.loads(line) for line in path.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model).eval()
    for question, record in zip(ARENA, records, strict=True):
        (turn,), answer_metadata = record["choices"][0]["turns"], record["conv_metadata"]
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question["turns"][0]["content"]}], add_generation_prompt=True,
            return_tensors="pt", return_dict=True,
        )["input_ids"]  # fmt: skip
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        assert turn["content"] == expected
        assert answer_metadata["token_len"] == len(tokenizer(expected, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize(
    ("bench", "output", "expected"),
    [
        ("mt_bench", "a/model_answer", "a/model_answer/m.jsonl"),
        ("arena_hard", "a/m2.jsonl", "a/m2.jsonl"),
        ("alpaca_eval", "r/m", "r/m/model_outputs.json"),
        ("alpaca_eval", "r/out.json", "r/out.json"),
    ],
)
def test_output_path_follows_each_harness_layout(bench, output, expected):
    assert answers.output_path(bench, output, "m") == Path(expected)


def test_arena_hard_writer_names_the_version_whose_format_it_writes():
    assert answers.ARENA_HARD_COMMIT == ARENA_HARD_V01_COMMIT
    assert answers.ARENA_HARD_REPOSITORY == "https://github.com/lmarena/arena-hard-auto"
    records = answers.arena_hard_answers(ARENA, lambda convs, t, n: ["**4**" for _ in convs], "m", 8, len)
    for record in records:
        assert_arena_hard_v01_record(record, "m")
        assert record["conv_metadata"]["token_len"] == 5  # the given counter on the answer's text


def test_arena_hard_style_counts_skip_code_blocks_and_count_each_header_level():
    answer = "\n".join(
        [
            "# Plan",
            "## Steps",
            "#not a header (no space)",
            "1. **first** step",
            "  2. second step",
            "- a dash item",
            "* a star item",
            "+ a plus item",
            "Some __underlined__ and **bold** words, and ** not bold",
            "```python",
            "# a comment, not a header",
            "- not a list item",
            "```",
            "###### Deepest",
        ]
    )
    assert answers.markdown_counts(answer) == {
        "header_count": {"h1": 1, "h2": 1, "h3": 0, "h4": 0, "h5": 0, "h6": 1},
        "list_count": {"ordered": 2, "unordered": 3},
        "bold_count": {"**": 2, "__": 1},
    }
