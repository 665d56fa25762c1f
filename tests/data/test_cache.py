"""The tokenised cache: built once, reused while nothing changes, rebuilt when anything does, never half-written;
the data report beside it; reference log-probs keyed by the model identity."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import datasets
import numpy as np
import pytest

from wrpo_nemo.data import cache as cache_mod
from wrpo_nemo.data.cache import DataConfig, build_or_load, cache_key
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
    path = write_jsonl(rows)
    cfg = _cfg(tmp_path, [path], read=ReadConfig(on_invalid="skip"))
    dataset = build_or_load(cfg, toy_tokenizer)
    with open(os.path.join(dataset.path, "report.json")) as handle:
        report = json.load(handle)
    assert report == dataset.report
    assert report["records_read"] == 5 and report["examples_kept"] == 1
    assert report["skipped_by_cause"] == {"invalid_json": 1, "contains_eot": 1, "duplicate_prompt_id": 1}
    assert report["dropped_by_length"] == {"response_too_long": 1}
    assert report["duplicate_prompt_ids"] == 1
    assert report["duplicate_prompt_id_locations"] == [
        f"{path}: line 5 (prompt id 'p0', first at {path}: line 1)"
    ]


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


def test_key_is_the_content_not_the_path_or_the_mtime(tmp_path, toy_tokenizer, write_jsonl, released):
    path = write_jsonl([released(i) for i in range(3)])
    key, _ = cache_key(_cfg(tmp_path, [path]), toy_tokenizer)
    moved = tmp_path / "elsewhere" / "data.jsonl"
    moved.parent.mkdir()
    shutil.copyfile(path, moved)
    os.utime(moved, (1_000_000_000, 1_000_000_000))
    assert cache_key(_cfg(tmp_path, [str(moved)]), toy_tokenizer)[0] == key
    raw = bytearray(moved.read_bytes())
    raw[raw.index(b"Rome")] = ord(b"D")  # one byte, same size, mtime put back
    moved.write_bytes(bytes(raw))
    os.utime(moved, (1_000_000_000, 1_000_000_000))
    assert cache_key(_cfg(tmp_path, [str(moved)]), toy_tokenizer)[0] != key


def test_key_of_a_saved_folder_is_its_content(tmp_path, toy_tokenizer, released):
    folder = tmp_path / "saved"
    datasets.Dataset.from_list([released(i) for i in range(3)]).save_to_disk(str(folder))
    key, _ = cache_key(_cfg(tmp_path, [str(folder)]), toy_tokenizer)
    copy = tmp_path / "copy" / "saved"
    shutil.copytree(folder, copy)
    for name in os.listdir(copy):
        os.utime(copy / name, (1_000_000_000, 1_000_000_000))
    assert cache_key(_cfg(tmp_path, [str(copy)]), toy_tokenizer)[0] == key
    with open(copy / "extra.txt", "w") as handle:
        handle.write("x")
    assert cache_key(_cfg(tmp_path, [str(copy)]), toy_tokenizer)[0] != key


def test_a_moved_run_folder_reuses_its_cache(tmp_path, toy_tokenizer, monkeypatch):
    run = tmp_path / "run"
    paths = build_toy_dataset(str(run / "toy"), num_examples=20)
    cfg = DataConfig(sources=[paths["train"]], cache_dir=str(run / "cache"), num_workers=1)
    first = build_or_load(cfg, toy_tokenizer)
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)  # copytree keeps mtimes: touch the records as a copy without -p would
    os.utime(moved / "toy" / "train.jsonl")

    def no_reading(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(cache_mod, "read_examples", no_reading)
    cfg = DataConfig(
        sources=[str(moved / "toy" / "train.jsonl")], cache_dir=str(moved / "cache"), num_workers=1
    )
    second = build_or_load(cfg, toy_tokenizer)
    assert second.key == first.key and second.prompt_ids == first.prompt_ids


_KILLED_BUILD = """
import os, signal, sys
from wrpo_nemo.data import cache
from wrpo_nemo.data.toy import build_toy_tokenizer
cache._tokenize_all = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
cache.build_or_load(cache.DataConfig(sources=[sys.argv[1]], cache_dir=sys.argv[2], num_workers=1),
                    build_toy_tokenizer())
"""


def _temp_folders(cache_dir):
    return sorted(name for name in os.listdir(cache_dir) if name.startswith(".tmp-"))


def test_a_build_removes_the_temporary_folder_of_a_killed_build(tmp_path, toy_tokenizer):
    paths = build_toy_dataset(str(tmp_path / "toy"), num_examples=20)
    cfg = _cfg(tmp_path, [paths["train"]])
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_BUILD, paths["train"], cfg.cache_dir], cwd=repo, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    assert len(_temp_folders(cfg.cache_dir)) == 1  # kill -9 while tokenising leaves its temporary folder
    dataset = build_or_load(cfg, toy_tokenizer)
    assert _temp_folders(cfg.cache_dir) == []
    assert len(dataset) == 20 and _entries(tmp_path) == [dataset.key]


def test_a_build_keeps_temporary_folders_that_may_be_in_use(tmp_path, toy_tokenizer, write_jsonl, released):
    cache_dir = tmp_path / "cache"
    ours = cache_mod._new_build_folder(str(cache_dir), "k1")  # a build of this (live) process
    unowned = cache_dir / ".tmp-k2-fresh"  # created a moment ago, owner not written yet
    unowned.mkdir()
    foreign = cache_mod._new_build_folder(str(cache_dir), "k3")  # a build on another machine
    owner = os.path.join(foreign, cache_mod.BUILD_OWNER_FILE)
    with open(owner) as handle:
        record = json.load(handle)
    with open(owner, "w") as handle:
        json.dump({**record, "host": "another-host"}, handle)
    old = cache_dir / ".tmp-k4-old"  # unowned and untouched for longer than any build takes
    old.mkdir()
    long_ago = time.time() - cache_mod.STALE_BUILD_AGE_S - 60
    os.utime(old, (long_ago, long_ago))
    build_or_load(_cfg(tmp_path, [write_jsonl([released(0)])]), toy_tokenizer)
    kept = {os.path.basename(ours), unowned.name, os.path.basename(foreign)}
    assert set(_temp_folders(cache_dir)) == kept


def test_a_temporary_folder_whose_pid_now_names_another_process_is_stale(tmp_path):
    cache_dir = str(tmp_path / "cache")
    folder = cache_mod._new_build_folder(cache_dir, "k")
    owner = os.path.join(folder, cache_mod.BUILD_OWNER_FILE)
    with open(owner) as handle:
        record = json.load(handle)
    assert record["pid"] == os.getpid() and record["pid_start"] is not None
    assert cache_mod.remove_stale_builds(cache_dir) == []
    with open(owner, "w") as handle:
        json.dump({**record, "pid_start": record["pid_start"] - 1}, handle)  # the owner ended, its PID reused
    assert cache_mod.remove_stale_builds(cache_dir) == [os.path.basename(folder)]
