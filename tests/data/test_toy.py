"""The toy task: deterministic, the three responses mean what they mean in the paper by the scorer's own
verdict, and its tokenizer loads like any model's and goes through the chat-template path."""

import json
import time

import pytest
from transformers import AutoTokenizer

from wrpo_nemo.data.cache import build_or_load
from wrpo_nemo.data.records import ReadConfig, read_examples
from wrpo_nemo.data.toy import (
    build_toy_dataset,
    build_toy_tokenizer,
    score_answer,
    toy_data_config,
    toy_target,
)


def _records(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def _bytes(path):
    with open(path, "rb") as handle:
        return handle.read()


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = build_toy_dataset(str(tmp_path / "a"), 200, seed=1)["train"]
    b = build_toy_dataset(str(tmp_path / "b"), 200, seed=1)["train"]
    c = build_toy_dataset(str(tmp_path / "c"), 200, seed=2)["train"]
    assert _bytes(a) == _bytes(b) != _bytes(c)


def test_source_chosen_is_right_target_chosen_a_near_miss_rejected_clearly_wrong(tmp_path):
    path = build_toy_dataset(str(tmp_path), 2000, seed=0)["train"]
    for record in _records(path):
        question = record["prompt"]["content"]
        ws, wt = (m["content"] for m in record["chosen"])
        rejected = record["rejected"][0]["content"]
        assert score_answer(question, ws)
        assert not score_answer(question, wt) and not score_answer(question, rejected)
        truth = toy_target(question)
        near = int(wt.split()[-2])
        assert abs(near - truth) in (1, 10)
        if "answer is" in rejected:
            assert abs(int(rejected.split()[-2]) - truth) >= 20


def test_scorer_reads_answers_decoded_digit_by_digit():
    assert score_answer("what is 1 2 + 3 0 ?", "the answer is 4 2 .")
    assert score_answer("what is 12 - 30 ?", "the answer is - 1 8 .")
    assert not score_answer("what is 12 + 30 ?", "i do not know .")
    with pytest.raises(ValueError, match="not a toy question"):
        toy_target("hello")


def test_a_few_thousand_examples_build_and_tokenise_in_seconds_with_nothing_dropped(tmp_path):
    start = time.perf_counter()
    cfg = toy_data_config(str(tmp_path), num_examples=4000, seed=0)
    cfg.num_workers = 1
    dataset = build_or_load(cfg, build_toy_tokenizer())
    assert time.perf_counter() - start < 20
    assert len(dataset) == 4000 and dataset.report["dropped_by_length"] == {}
    assert dataset.report["responses_truncated"] == 0
    examples, _ = read_examples(cfg.sources, ReadConfig())
    assert len({e.prompt_id for e in examples}) == 4000


def test_tokenizer_is_small_saves_and_loads_with_its_chat_template(tmp_path):
    tok = build_toy_tokenizer(str(tmp_path / "tok"))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(loaded) == len(tok) < 300
    messages = [{"role": "user", "content": "what is 3 + 4 ?"}]
    rendered = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = loaded(rendered, add_special_tokens=False)["input_ids"]
    assert loaded.unk_token_id not in ids and loaded.eos_token == "<|eot_id|>"
