"""Reading WRPO records from JSONL, Parquet, a saved ``datasets`` folder or a hub name, and checking them.

Every record becomes an :class:`Example`: the prompt as a list of chat messages (ending with the user turn)
and the three responses as plain strings. A bad record raises :class:`DataError` naming the file, the record
(``line N`` for JSONL, ``row N`` for Parquet and datasets, ``record N`` for a JSON array, all 1-based) and the
field, as ``<file>: line N: field 'x': problem``; with ``on_invalid="skip"`` it is counted by cause in the
:class:`DataReport` instead. A prompt id seen before (in any of the sources) is such a bad record: the split
and the reference store are keyed by the prompt id, so a duplicate would silently skew both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

Message = dict[str, str]

log = logging.getLogger(__name__)

LISTED_ERRORS = 20
"""Skipped records whose message the report keeps (``first_errors``)."""
LISTED_DUPLICATES = 20
"""Skipped duplicate prompt ids whose location the report keeps (``duplicate_prompt_id_locations``)."""


class DataError(ValueError):
    """A record that breaks the input contract; ``cause`` is the short key counted in the data report."""

    def __init__(self, where: str, field_name: str | None, problem: str, cause: str) -> None:
        self.where = where
        self.field_name = field_name
        self.cause = cause
        self.problem = problem
        target = f"field '{field_name}': " if field_name else ""
        super().__init__(f"{where}: {target}{problem}")

    def __reduce__(self) -> tuple:
        # Raised inside tokenising worker processes: it must unpickle in the parent (the default would call
        # DataError(message) and fail there, hanging the worker pool).
        return (DataError, (self.where, self.field_name, self.problem, self.cause))


@dataclass(frozen=True)
class Example:
    """One validated WRPO example."""

    prompt_id: str
    prompt: tuple[Message, ...]
    """The conversation up to (and including) the last user turn; a system message first if any."""
    source_chosen: str
    """y_ws: the best source-model response."""
    target_chosen: str
    """y_wt: the best response of the target (SFT) model."""
    rejected: str
    """y_l: the worst response of the target (SFT) model."""
    where: str = ""
    """File and record the example came from, for error messages after reading."""


@dataclass
class ReadConfig:
    """How records are laid out and what to do with bad ones."""

    layout: Literal["released", "explicit"] = "released"
    """``released``: ``chosen`` = [y_ws, y_wt], ``rejected`` = [y_l] (AALF/ultrafeedback_wrpo);
    ``explicit``: one column per response (``source_chosen``, ``target_chosen``, ``rejected``)."""
    prompt_column: str = "prompt"
    """A string, a message dict or a list of messages ending with a user turn."""
    prompt_id_column: str | None = "prompt_id"
    """Column with a unique prompt id; ``None`` derives the id from a hash of the prompt messages."""
    chosen_column: str = "chosen"
    """Released layout: the list [y_ws, y_wt]; the order carries the meaning."""
    rejected_column: str = "rejected"
    """Released layout: the list [y_l]; explicit layout: the y_l response."""
    source_chosen_column: str = "source_chosen"
    """Explicit layout: the y_ws response."""
    target_chosen_column: str = "target_chosen"
    """Explicit layout: the y_wt response."""
    system_prompt: str | None = None
    """Prepended as a system message to every prompt that has none."""
    on_invalid: Literal["error", "skip"] = "error"
    """``error`` stops at the first bad record; ``skip`` drops it and counts it by cause in the report."""
    hub_split: str = "train"
    """Split to load when a source is a hub dataset name."""
    hub_revision: str | None = None
    """Commit or tag of a hub dataset; pin it, since the cache key of a hub source is its name and this."""

    def validate(self, prefix: str = "") -> None:
        """Raise ``ValueError`` naming the offending key, written as ``prefix + field`` (the run config
        passes ``data.source.read.``)."""
        if self.layout not in ("released", "explicit"):
            raise ValueError(f"{prefix}layout must be 'released' or 'explicit', got {self.layout!r}")
        if self.on_invalid not in ("error", "skip"):
            raise ValueError(f"{prefix}on_invalid must be 'error' or 'skip', got {self.on_invalid!r}")


@dataclass
class DataReport:
    """Counts written beside the cache: what was read, skipped, dropped or truncated, and why."""

    records_read: int = 0
    examples_valid: int = 0
    skipped: Counter = field(default_factory=Counter)
    duplicate_prompt_ids: int = 0
    """Records skipped because their prompt id repeats an earlier one (also in ``skipped``)."""
    duplicate_prompt_id_locations: list[str] = field(default_factory=list)
    """The first :data:`LISTED_DUPLICATES` of them: ``<file>: line N (prompt id 'x', first at <file>: line M)``."""
    first_errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "records_read": self.records_read,
            "examples_valid": self.examples_valid,
            "skipped_by_cause": dict(self.skipped),
            "duplicate_prompt_ids": self.duplicate_prompt_ids,
            "duplicate_prompt_id_locations": self.duplicate_prompt_id_locations,
            "first_errors": self.first_errors,
        }


# ---------------------------------------------------------------------------------------------- raw sources


def iter_raw_records(
    source: str, hub_split: str = "train", hub_revision: str | None = None
) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, record)`` for every record of ``source``; ``record`` is a ``DataError`` when unreadable.

    A source is a ``.jsonl``/``.json`` file, a ``.parquet`` file, a folder written by ``save_to_disk``, or
    (when no such path exists) a hub dataset name.
    """
    if os.path.isdir(source):
        yield from _iter_rows(_load_from_disk(source), source)
    elif source.endswith(".json") and _starts_with_bracket(source):
        yield from _iter_json_array(source)
    elif source.endswith((".jsonl", ".json")):
        yield from _iter_jsonl(source)
    elif source.endswith(".parquet"):
        yield from _iter_parquet(source)
    elif os.path.exists(source):
        raise DataError(
            source, None, "unknown file type (expected .jsonl, .json, .parquet or a folder)", "io"
        )
    else:
        import datasets

        yield from _iter_rows(datasets.load_dataset(source, split=hub_split, revision=hub_revision), source)


def _load_from_disk(path: str) -> Any:
    import datasets

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        raise DataError(
            path, None, f"holds several splits {list(loaded)}; pass the folder of one split", "io"
        )
    return loaded


def _iter_rows(dataset: Any, name: str) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(dataset):
        yield f"{name}: row {i + 1}", row


def _starts_with_bracket(path: str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4096).lstrip()[:1] == b"["


def _json_problem(err: json.JSONDecodeError) -> str:
    """``invalid JSON (<msg>, column C)``: the decoder's own 1-based column, in characters."""
    end = ", at the end of the line" if err.pos >= len(err.doc) or err.doc[err.pos] == "\n" else ""
    return f"invalid JSON ({err.msg}, column {err.colno}{end})"


def _iter_json_array(path: str) -> Iterator[tuple[str, Any]]:
    """A ``.json`` file holding one list of records; records are named by their 1-based position."""
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        records = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        byte = err.start - raw.rfind(b"\n", 0, err.start)
        where = f"{path}: line {line}"
        raise DataError(
            where, None, f"bytes are not UTF-8 ({err.reason} at byte {byte})", "not_utf8"
        ) from err
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: line {err.lineno}", None, _json_problem(err), "invalid_json") from err
    for i, record in enumerate(records):
        yield f"{path}: record {i + 1}", record


def _iter_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}: line {number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                problem = f"bytes are not UTF-8 ({err.reason} at byte {err.start + 1})"
                yield where, DataError(where, None, problem, "not_utf8")
                continue
            # Without its line break: a fault at the end of the line would otherwise be placed at column 1
            # of a next line.
            text = text.rstrip("\r\n")
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as err:
                yield where, DataError(where, None, _json_problem(err), "invalid_json")


def _iter_parquet(path: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield f"{path}: row {row}", record


# ----------------------------------------------------------------------------------------------- validation


def _need(record: dict, column: str, where: str) -> Any:
    if column not in record or record[column] is None:
        raise DataError(where, column, "missing", "missing_field")
    return record[column]


def _message(value: Any, where: str, name: str) -> Message:
    if not isinstance(value, dict):
        raise DataError(where, name, f"expected a message dict, got {type(value).__name__}", "wrong_type")
    if not isinstance(value.get("role"), str) or not isinstance(value.get("content"), str):
        raise DataError(where, name, "a message needs string 'role' and 'content'", "wrong_type")
    return {"role": value["role"], "content": value["content"]}


def parse_prompt(value: Any, where: str, name: str, system_prompt: str | None = None) -> tuple[Message, ...]:
    """The prompt as messages ending with a user turn; ``system_prompt`` goes first unless one is there."""
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, dict):
        messages = [_message(value, where, name)]
    elif isinstance(value, list):
        messages = [_message(m, where, f"{name}[{i}]") for i, m in enumerate(value)]
    else:
        raise DataError(
            where, name, f"expected a string, a message or a list, got {type(value).__name__}", "wrong_type"
        )
    if not messages or messages[-1]["role"] != "user":
        raise DataError(where, name, "the prompt must end with a user turn", "prompt_not_user")
    if not messages[-1]["content"].strip():
        raise DataError(where, name, "the user turn is empty", "empty_prompt")
    for i, m in enumerate(messages):
        if m["role"] not in ("system", "user", "assistant"):
            raise DataError(where, f"{name}[{i}]", f"unknown role {m['role']!r}", "wrong_role")
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tuple(messages)


def _response(value: Any, where: str, name: str, prompt: tuple[Message, ...]) -> str:
    """A response is a string, an assistant message, a one-message list holding it, or a whole conversation
    (the prompt's turns, then the assistant's) as in UltraFeedback-style binary preference data."""
    if isinstance(value, list) and len(value) > 1:
        turns = tuple(_message(m, where, f"{name}[{i}]") for i, m in enumerate(value[:-1]))
        if turns != prompt:
            raise DataError(
                where, name, "the conversation's earlier turns are not the prompt", "prompt_mismatch"
            )
        value = value[-1:]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        message = _message(value, where, name)
        if message["role"] != "assistant":
            raise DataError(where, name, f"not an assistant turn (role {message['role']!r})", "not_assistant")
        value = message["content"]
    if not isinstance(value, str):
        raise DataError(
            where,
            name,
            f"expected a string or an assistant message, got {type(value).__name__}",
            "wrong_type",
        )
    if not value.strip():
        raise DataError(where, name, "empty response", "empty_response")
    return value


def _pair(record: dict, column: str, where: str, length: int) -> list[Any]:
    value = _need(record, column, where)
    if not isinstance(value, list):
        raise DataError(
            where, column, f"expected a list of {length}, got {type(value).__name__}", "wrong_type"
        )
    if len(value) != length:
        raise DataError(where, column, f"expected {length} responses, got {len(value)}", "wrong_length")
    return value


def prompt_hash(prompt: tuple[Message, ...]) -> str:
    """A stable id for a prompt without one: the SHA-256 of its messages."""
    return hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:32]


def parse_record(record: Any, where: str, cfg: ReadConfig) -> Example:
    """Check one raw record and turn it into an :class:`Example`; raise :class:`DataError` when it is bad."""
    if isinstance(record, DataError):
        raise record
    if not isinstance(record, dict):
        raise DataError(where, None, f"a record must be an object, got {type(record).__name__}", "wrong_type")
    given = parse_prompt(_need(record, cfg.prompt_column, where), where, cfg.prompt_column)
    prompt = parse_prompt(list(given), where, cfg.prompt_column, cfg.system_prompt)
    if cfg.layout == "released":
        chosen = _pair(record, cfg.chosen_column, where, 2)
        rejected = _pair(record, cfg.rejected_column, where, 1)
        ys = [
            _response(chosen[0], where, f"{cfg.chosen_column}[0]", given),
            _response(chosen[1], where, f"{cfg.chosen_column}[1]", given),
            _response(rejected[0], where, f"{cfg.rejected_column}[0]", given),
        ]
    elif cfg.layout == "explicit":
        columns = (cfg.source_chosen_column, cfg.target_chosen_column, cfg.rejected_column)
        ys = [_response(_need(record, c, where), where, c, given) for c in columns]
    else:
        raise ValueError(f"layout must be 'released' or 'explicit', got {cfg.layout!r}")
    if cfg.prompt_id_column is None:
        prompt_id = prompt_hash(prompt)
    else:
        raw_id = _need(record, cfg.prompt_id_column, where)
        if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool):
            raise DataError(
                where, cfg.prompt_id_column, f"expected a string, got {type(raw_id).__name__}", "wrong_type"
            )
        prompt_id = str(raw_id)
    return Example(prompt_id, prompt, ys[0], ys[1], ys[2], where)


def read_examples(sources: list[str], cfg: ReadConfig) -> tuple[list[Example], DataReport]:
    """Read and check every record of ``sources`` in order; see :class:`ReadConfig` for the policy."""
    cfg.validate()
    report = DataReport()
    examples: list[Example] = []
    first_seen: dict[str, str] = {}
    for source in sources:
        for where, record in iter_raw_records(source, cfg.hub_split, cfg.hub_revision):
            report.records_read += 1
            try:
                example = parse_record(record, where, cfg)
            except DataError as err:
                _skip(err, cfg, report)
                continue
            first = first_seen.get(example.prompt_id)
            if first is not None:
                _skip(duplicate_error(example, first, cfg), cfg, report)
                report.duplicate_prompt_ids += 1
                if len(report.duplicate_prompt_id_locations) < LISTED_DUPLICATES:
                    report.duplicate_prompt_id_locations.append(
                        f"{where} (prompt id {example.prompt_id!r}, first at {first})"
                    )
                continue
            first_seen[example.prompt_id] = where
            examples.append(example)
    report.examples_valid = len(examples)
    if report.duplicate_prompt_ids:
        log.warning(
            "data: skipped %d records whose prompt id repeats an earlier one (on_invalid=skip), e.g. %s; "
            "the data report lists up to %d of them",
            report.duplicate_prompt_ids,
            report.duplicate_prompt_id_locations[0],
            LISTED_DUPLICATES,
        )
    return examples, report


def _skip(err: DataError, cfg: ReadConfig, report: DataReport) -> None:
    """Raise ``err`` under ``on_invalid="error"``; count it in ``report`` under ``"skip"``."""
    if cfg.on_invalid == "error":
        raise err
    report.skipped[err.cause] += 1
    if len(report.first_errors) < LISTED_ERRORS:
        report.first_errors.append(str(err))


def duplicate_error(example: Example, first_where: str, cfg: ReadConfig) -> DataError:
    """The error of a record whose prompt id an earlier record (at ``first_where``) already has."""
    if cfg.prompt_id_column is None:
        problem = f"duplicate prompt (id {example.prompt_id!r} derived from it; first at {first_where})"
        return DataError(example.where, cfg.prompt_column, problem, "duplicate_prompt_id")
    problem = f"duplicate prompt id {example.prompt_id!r} (first at {first_where})"
    return DataError(example.where, cfg.prompt_id_column, problem, "duplicate_prompt_id")
