"""Reading and checking WRPO records: every source format, both layouts, and every bad-input case."""

import json
import logging
import re

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wrpo_nemo.data import records
from wrpo_nemo.data.records import DataError, ReadConfig, read_examples


def _expected(i):
    return (f"p{i}", f"The capital of France is Paris. {i}", "Paris.", "Rome.")


def _summary(examples):
    return [(e.prompt_id, e.source_chosen, e.target_chosen, e.rejected) for e in examples]


def test_jsonl_parquet_and_saved_folder_give_the_same_examples(tmp_path, write_jsonl, released):
    rows = [released(i) for i in range(5)]
    jsonl = write_jsonl(rows)
    parquet = str(tmp_path / "data.parquet")
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    folder = str(tmp_path / "saved")
    datasets.Dataset.from_list(rows).save_to_disk(folder)
    results = [read_examples([src], ReadConfig()) for src in (jsonl, parquet, folder)]
    for examples, report in results:
        assert _summary(examples) == [_expected(i) for i in range(5)]
        assert examples[0].prompt == ({"role": "user", "content": "What is the capital of France? 0"},)
        assert report.records_read == 5 and report.examples_valid == 5


def test_released_order_inside_chosen_is_source_then_target(write_jsonl, released):
    record = released(0)
    record["chosen"] = [{"role": "assistant", "content": "ws"}, {"role": "assistant", "content": "wt"}]
    (example,), _ = read_examples([write_jsonl([record])], ReadConfig())
    assert (example.source_chosen, example.target_chosen, example.rejected) == ("ws", "wt", "Rome.")


@pytest.mark.parametrize(
    "prompt",
    ["Hi?", {"role": "user", "content": "Hi?"}, [{"role": "user", "content": "Hi?"}]],
    ids=["string", "message", "message-list"],
)
def test_prompt_as_string_message_or_list_reads_as_one_user_turn(write_jsonl, released, prompt):
    record = released(0)
    record["prompt"] = prompt
    (example,), _ = read_examples([write_jsonl([record])], ReadConfig())
    assert example.prompt == ({"role": "user", "content": "Hi?"},)


def test_responses_may_be_plain_strings(write_jsonl, released):
    record = released(0)
    record["chosen"], record["rejected"] = ["a", "b"], ["c"]
    (example,), _ = read_examples([write_jsonl([record])], ReadConfig())
    assert (example.source_chosen, example.target_chosen, example.rejected) == ("a", "b", "c")


def test_explicit_layout_with_renamed_columns_and_system_prompt(write_jsonl):
    record = {"id": 7, "question": "Hi?", "ws": "a", "wt": "b", "l": "c"}
    cfg = ReadConfig(
        layout="explicit",
        prompt_column="question",
        prompt_id_column="id",
        source_chosen_column="ws",
        target_chosen_column="wt",
        rejected_column="l",
        system_prompt="Be brief.",
    )
    (example,), _ = read_examples([write_jsonl([record])], cfg)
    assert example.prompt_id == "7"
    assert example.prompt == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"})
    assert (example.source_chosen, example.target_chosen, example.rejected) == ("a", "b", "c")


def test_system_prompt_does_not_replace_an_existing_system_turn(write_jsonl, released):
    record = released(0)
    record["prompt"] = [{"role": "system", "content": "own"}, {"role": "user", "content": "Hi?"}]
    (example,), _ = read_examples([write_jsonl([record])], ReadConfig(system_prompt="other"))
    assert example.prompt[0] == {"role": "system", "content": "own"}


def test_missing_prompt_id_column_derives_a_stable_id_from_the_prompt(write_jsonl, released):
    a, b = released(0), released(0)
    del a["prompt_id"], b["prompt_id"]
    cfg = ReadConfig(prompt_id_column=None)
    (ea,), _ = read_examples([write_jsonl([a], name="a.jsonl")], cfg)
    (eb,), _ = read_examples([write_jsonl([b], name="b.jsonl")], cfg)
    assert ea.prompt_id == eb.prompt_id == records.prompt_hash(ea.prompt)


def _break(record, case):
    if case == "missing_field":
        del record["rejected"]
    elif case == "wrong_type":
        record["prompt"] = 3
    elif case == "chosen_not_two":
        record["chosen"] = record["chosen"][:1]
    elif case == "empty_response":
        record["chosen"][1]["content"] = "  "
    elif case == "not_assistant":
        record["rejected"][0]["role"] = "user"
    return record


BAD_CASES = {
    "missing_field": ("rejected", "missing", "missing_field"),
    "wrong_type": ("prompt", "expected a string", "wrong_type"),
    "chosen_not_two": ("chosen", "expected 2 responses", "wrong_length"),
    "empty_response": ("chosen[1]", "empty response", "empty_response"),
    "not_assistant": ("rejected[0]", "not an assistant turn", "not_assistant"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_record_error_names_file_line_and_field(write_jsonl, released, case):
    path = write_jsonl([released(0), _break(released(1), case)])
    field, problem, cause = BAD_CASES[case]
    with pytest.raises(DataError) as info:
        read_examples([path], ReadConfig())
    message = str(info.value)
    assert f"{path}: line 2" in message and f"field '{field}'" in message and problem in message
    assert info.value.cause == cause


@pytest.mark.parametrize("case", ["chosen_not_two", "empty_response", "not_assistant"])
def test_bad_parquet_row_error_names_file_row_and_field(tmp_path, released, case):
    path = str(tmp_path / "bad.parquet")
    pq.write_table(pa.Table.from_pylist([released(0), released(1), _break(released(2), case)]), path)
    with pytest.raises(DataError, match=rf"bad\.parquet: row 3: field '{re.escape(BAD_CASES[case][0])}'"):
        read_examples([path], ReadConfig())


def test_null_in_a_parquet_column_is_a_missing_field(tmp_path, released):
    path = str(tmp_path / "null.parquet")
    rows = [released(0), released(1)]
    rows[1]["rejected"] = None
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"null\.parquet: row 2: field 'rejected': missing"):
        read_examples([path], ReadConfig())


def test_invalid_json_reports_the_decoders_column(tmp_path, write_jsonl, released):
    good = json.dumps(released(0))
    mid = good.replace('"chosen": [', '"chosen": [oops, ')
    column = mid.index("oops") + 1
    truncated = good[:-1]  # the closing brace is missing: the fault is at the end of the line
    path = write_jsonl([good, mid, truncated])
    _, report = read_examples([path], ReadConfig(on_invalid="skip"))
    assert report.first_errors == [
        f"{path}: line 2: invalid JSON (Expecting value, column {column})",
        f"{path}: line 3: invalid JSON (Expecting ',' delimiter, column {len(truncated) + 1}, at the end of the line)",
    ]
    array = tmp_path / "array.json"
    array.write_text("[\n" + good + ",\n" + mid + "\n]\n")
    with pytest.raises(DataError) as info:
        read_examples([str(array)], ReadConfig())
    assert str(info.value) == f"{array}: line 3: invalid JSON (Expecting value, column {column})"


def test_invalid_json_and_non_utf8_lines_are_named(write_jsonl, released):
    good = json.dumps(released(0))
    path = write_jsonl([good, "{not json", b'{"prompt": "\xff\xfe"}'])
    with pytest.raises(DataError, match=r"line 2: invalid JSON"):
        read_examples([path], ReadConfig())
    path = write_jsonl([good, b'{"prompt": "\xff\xfe"}'], name="utf.jsonl")
    with pytest.raises(DataError, match=r"utf\.jsonl: line 2: bytes are not UTF-8"):
        read_examples([path], ReadConfig())


def test_skip_policy_counts_every_bad_record_by_cause(write_jsonl, released):
    bad = [_break(released(i), case) for i, case in enumerate(BAD_CASES, start=10)]
    path = write_jsonl([released(0), *bad, "{oops", b"\xff", released(1)])
    examples, report = read_examples([path], ReadConfig(on_invalid="skip"))
    assert [e.prompt_id for e in examples] == ["p0", "p1"]
    assert report.records_read == 2 + len(bad) + 2
    assert dict(report.skipped) == {
        "missing_field": 1,
        "wrong_type": 1,
        "wrong_length": 1,
        "empty_response": 1,
        "not_assistant": 1,
        "invalid_json": 1,
        "not_utf8": 1,
    }
    assert all(path in e for e in report.first_errors)


def test_duplicate_prompt_id_is_an_error_naming_both_lines(write_jsonl, released):
    path = write_jsonl([released(0), released(1), released(0)])
    with pytest.raises(DataError) as info:
        read_examples([path], ReadConfig())
    assert str(info.value) == (
        f"{path}: line 3: field 'prompt_id': duplicate prompt id 'p0' (first at {path}: line 1)"
    )
    assert info.value.cause == "duplicate_prompt_id"


def test_duplicate_prompt_id_across_files_names_the_row_and_the_line(tmp_path, write_jsonl, released):
    parquet = str(tmp_path / "first.parquet")
    pq.write_table(pa.Table.from_pylist([released(0), released(1)]), parquet)
    jsonl = write_jsonl([released(2), released(1)])
    with pytest.raises(DataError) as info:
        read_examples([parquet, jsonl], ReadConfig())
    assert str(info.value) == (
        f"{jsonl}: line 2: field 'prompt_id': duplicate prompt id 'p1' (first at {parquet}: row 2)"
    )


def test_duplicate_derived_prompt_id_is_an_error_on_the_prompt(write_jsonl, released):
    a, b = released(0), released(0)
    del a["prompt_id"], b["prompt_id"]
    path = write_jsonl([a, b])
    derived = records.prompt_hash(({"role": "user", "content": "What is the capital of France? 0"},))
    with pytest.raises(DataError) as info:
        read_examples([path], ReadConfig(prompt_id_column=None))
    assert str(info.value) == (
        f"{path}: line 2: field 'prompt': duplicate prompt (id '{derived}' derived from it; "
        f"first at {path}: line 1)"
    )


def test_skip_policy_keeps_the_first_of_duplicate_ids_and_lists_the_others(write_jsonl, released, caplog):
    rows = [released(0), released(1), *(released(i % 2) for i in range(24))]
    path = write_jsonl(rows)
    with caplog.at_level(logging.WARNING, logger="wrpo_nemo.data.records"):
        examples, report = read_examples([path], ReadConfig(on_invalid="skip"))
    assert [e.prompt_id for e in examples] == ["p0", "p1"]
    assert dict(report.skipped) == {"duplicate_prompt_id": 24}
    assert report.duplicate_prompt_ids == 24
    locations = report.to_dict()["duplicate_prompt_id_locations"]
    assert len(locations) == records.LISTED_DUPLICATES == 20
    assert locations[:2] == [
        f"{path}: line 3 (prompt id 'p0', first at {path}: line 1)",
        f"{path}: line 4 (prompt id 'p1', first at {path}: line 2)",
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 24 records whose prompt id repeats an earlier one" in warnings[0]
    assert f"{path}: line 3" in warnings[0]


def test_prompt_must_end_with_a_user_turn(write_jsonl, released):
    record = released(0)
    record["prompt"] = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(DataError, match="must end with a user turn"):
        read_examples([write_jsonl([record])], ReadConfig())


def test_unknown_file_type_is_refused(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataError, match="unknown file type"):
        read_examples([str(path)], ReadConfig())


def test_a_name_that_is_no_path_is_loaded_from_the_hub(monkeypatch, released):
    calls = []

    def fake_load_dataset(name, split, revision):
        calls.append((name, split, revision))
        return datasets.Dataset.from_list([released(0)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples, _ = read_examples(
        ["AALF/ultrafeedback_wrpo"], ReadConfig(hub_split="train", hub_revision="abc")
    )
    assert calls == [("AALF/ultrafeedback_wrpo", "train", "abc")]
    assert examples[0].where == "AALF/ultrafeedback_wrpo: row 1"


def test_json_array_file_names_records_by_position(tmp_path, released):
    path = tmp_path / "data.json"
    bad = released(1)
    bad["chosen"] = "x"
    path.write_text(json.dumps([released(0), bad]))
    with pytest.raises(DataError, match=r"data\.json: record 2: field 'chosen': expected a list"):
        read_examples([str(path)], ReadConfig())
    path.write_text(json.dumps([released(0)]))
    assert _summary(read_examples([str(path)], ReadConfig())[0]) == [_expected(0)]


def test_saved_folder_with_several_splits_asks_for_one(tmp_path, released):
    folder = str(tmp_path / "dd")
    rows = datasets.Dataset.from_list([released(0)])
    datasets.DatasetDict({"train": rows, "test": rows}).save_to_disk(folder)
    with pytest.raises(DataError, match="holds several splits"):
        read_examples([folder], ReadConfig())
    assert len(read_examples([f"{folder}/train"], ReadConfig())[0]) == 1


def test_response_given_as_whole_conversation_keeps_the_assistant_turn(write_jsonl):
    user = {"role": "user", "content": "Hi?"}
    record = {
        "prompt_id": "c",
        "prompt": "Hi?",
        "source_chosen": [user, {"role": "assistant", "content": "a"}],
        "target_chosen": "b",
        "rejected": [user, {"role": "assistant", "content": "c"}],
    }
    cfg = ReadConfig(layout="explicit", system_prompt="Be brief.")
    (example,), _ = read_examples([write_jsonl([record])], cfg)
    assert (example.source_chosen, example.target_chosen, example.rejected) == ("a", "b", "c")
    record["rejected"][0] = {"role": "user", "content": "Other?"}
    with pytest.raises(DataError, match=r"line 1: field 'rejected': the conversation's earlier turns"):
        read_examples([write_jsonl([record], name="mismatch.jsonl")], cfg)
