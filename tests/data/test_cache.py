"""The tokenised cache: built once, reused while nothing changes, rebuilt when anything does, never half-written;
the data report beside it; reference log-probs keyed by the model identity."""

import json
import os

import numpy as np
import pytest

from wrpo_nemo.data import cache as cache_mod
from wrpo_nemo.data.cache import DataConfig, build_or_load
from wrpo_nemo.data.records import DataError, ReadConfig, read_examples
from wrpo_nemo.data.reference import load_reference_logps, save_reference_logps
from wrpo_nemo.data.tokenize import TokenizeConfig, eot_token_id, tokenize_example
from wrpo_nemo.data.toy import build_toy_dataset, build_toy_tokenizer


@pytest.fixture(scope="module")
def toy_tokenizer():
    return build_toy_tokenizer()


def _cfg(tmp_path, sources, **kw):
    kw.setdefault("tokenize", TokenizeConfig(max_length=64, max_prompt_length=32, seq_length=192))
    kw.setdefault("num_workers", 1)
    return DataConfig(sources=sources, cache_dir=str(tmp_path / "cache"), **kw)


def _entries(tmp_path):
    root = tmp_path / "cache"
    return sorted(os.listdir(root)) if root.exists() else []


def test_cache_holds_exactly_the_ids_of_tokenize_example(tmp_path, toy_tokenizer):
    paths = build_toy_dataset(str(tmp_path / "toy"), num_examples=40, seed=3)
    cfg = _cfg(tmp_path, [paths["train"]])
    dataset = build_or_load(cfg, toy_tokenizer)
    examples, _ = read_examples(cfg.sources, cfg.read)
    eot = eot_token_id(toy_tokenizer, cfg.tokenize)
    assert len(dataset) == 40 and dataset.prompt_ids == [e.prompt_id for e in examples]
    for i, example in enumerate(examples):
        expected = tokenize_example(toy_tokenizer, example, cfg.tokenize, eot)
        for column in ("prompt", "source_chosen", "target_chosen", "rejected"):
            assert dataset.ids(column, i).tolist() == expected[f"{column}_ids"]


def test_two_workers_build_the_same_cache_as_one(tmp_path, toy_tokenizer):
    paths = build_toy_dataset(str(tmp_path / "toy"), num_examples=600, seed=1)
    one = build_or_load(_cfg(tmp_path / "a", [paths["train"]]), toy_tokenizer)
    two = build_or_load(_cfg(tmp_path / "b", [paths["train"]], num_workers=2), toy_tokenizer)
    assert one.prompt_ids == two.prompt_ids
    for column in ("prompt", "source_chosen", "target_chosen", "rejected"):
        assert np.array_equal(one._values[column], two._values[column])
        assert np.array_equal(one._offsets[column], two._offsets[column])


def test_unchanged_inputs_reuse_the_cache_without_reading(tmp_path, toy_tokenizer, monkeypatch):
    paths = build_toy_dataset(str(tmp_path / "toy"), num_examples=20)
    cfg = _cfg(tmp_path, [paths["train"]])
    first = build_or_load(cfg, toy_tokenizer)

    def no_reading(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(cache_mod, "read_examples", no_reading)
    second = build_or_load(cfg, build_toy_tokenizer())
    assert second.path == first.path


def test_any_change_of_data_tokenizer_template_or_options_rebuilds(
    tmp_path, toy_tokenizer, write_jsonl, released
):
    path = write_jsonl([released(i) for i in range(3)])
    tok = build_toy_tokenizer()
    base = _cfg(tmp_path, [path], read=ReadConfig(on_invalid="skip"))
    keys = {build_or_load(base, tok).key}
    keys.add(
        build_or_load(_cfg(tmp_path, [path], read=ReadConfig(system_prompt="x", on_invalid="skip")), tok).key
    )
    long = TokenizeConfig(max_length=96, max_prompt_length=32, seq_length=192)
    keys.add(build_or_load(_cfg(tmp_path, [path], tokenize=long, read=base.read), tok).key)
    other_template = build_toy_tokenizer()
    other_template.chat_template = tok.chat_template.replace("\\n\\n", "\\n")
    keys.add(build_or_load(_cfg(tmp_path, [path], read=base.read), other_template).key)
    write_jsonl([released(i) for i in range(4)])  # same path, new content
    keys.add(build_or_load(base, tok).key)
    assert len(keys) == 5
    assert sorted(_entries(tmp_path)) == sorted(keys)


def test_failed_build_leaves_no_cache_behind(tmp_path, toy_tokenizer, write_jsonl, released):
    bad = released(1)
    del bad["chosen"]
    with pytest.raises(DataError, match="line 2: field 'chosen'"):
        build_or_load(_cfg(tmp_path, [write_jsonl([released(0), bad])]), toy_tokenizer)
    assert _entries(tmp_path) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_error_during_tokenising_leaves_no_cache_behind(
    tmp_path, toy_tokenizer, write_jsonl, released, workers
):
    record = released(0)
    record["chosen"][0]["content"] = "paris <|eot_id|> more"
    path = write_jsonl([*(released(i) for i in range(1, 8)), record])
    with pytest.raises(DataError, match=r"line 8: field 'source_chosen'.*end-of-turn"):
        build_or_load(_cfg(tmp_path, [path], num_workers=workers), toy_tokenizer)
    assert _entries(tmp_path) == []


def test_report_beside_the_cache_counts_skips_duplicates_and_length_drops(
    tmp_path, toy_tokenizer, write_jsonl, released
):
    short = {**released(0), "prompt": {"role": "user", "content": "what is 1 + 2 ?"}}
    long_answer = released(1)
    long_answer["chosen"][0]["content"] = "1 " * 80
    eot_inside = released(2)
    eot_inside["rejected"][0]["content"] = "no <|eot_id|>"
    rows = [short, long_answer, eot_inside, "{broken", short]
    cfg = _cfg(tmp_path, [write_jsonl(rows)], read=ReadConfig(on_invalid="skip"))
    dataset = build_or_load(cfg, toy_tokenizer)
    with open(os.path.join(dataset.path, "report.json")) as handle:
        report = json.load(handle)
    assert report == dataset.report
    assert report["records_read"] == 5 and report["examples_kept"] == 2
    assert report["skipped_by_cause"] == {"invalid_json": 1, "contains_eot": 1}
    assert report["dropped_by_length"] == {"response_too_long": 1}
    assert report["duplicate_prompt_ids"] == 1


def test_truncation_is_counted_in_the_report(tmp_path, toy_tokenizer, write_jsonl, released):
    record = released(0)
    record["chosen"][0]["content"] = "1 " * 80
    tokenize = TokenizeConfig(max_length=64, max_prompt_length=32, seq_length=192, length_policy="truncate")
    dataset = build_or_load(_cfg(tmp_path, [write_jsonl([record])], tokenize=tokenize), toy_tokenizer)
    assert dataset.report["responses_truncated"] == 1
    assert len(dataset.ids("prompt", 0)) + len(dataset.ids("source_chosen", 0)) == 64


def test_reference_logps_round_trip_per_model_identity(tmp_path):
    logps = np.arange(12, dtype=np.float32).reshape(4, 3) * -1.5
    save_reference_logps(str(tmp_path), "ckpt/sft@step100", logps)
    assert np.array_equal(load_reference_logps(str(tmp_path), "ckpt/sft@step100", num_examples=4), logps)
    assert load_reference_logps(str(tmp_path), "ckpt/sft@step200") is None
    with pytest.raises(ValueError, match="holds 4 rows"):
        load_reference_logps(str(tmp_path), "ckpt/sft@step100", num_examples=5)


def test_reference_logps_of_wrong_shape_or_not_finite_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        save_reference_logps(str(tmp_path), "m", np.zeros((4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        save_reference_logps(str(tmp_path), "m", np.full((4, 3), np.nan))
    assert not os.path.exists(tmp_path / "reference_logps" / "m.npy")
