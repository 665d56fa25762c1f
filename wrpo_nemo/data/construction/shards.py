"""Resumable JSONL outputs and the assignment of prompts to shards."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from wrpo_nemo.data.records import DataError, iter_raw_records, parse_prompt


def read_prompts(
    path: str, prompt_column: str = "prompt", id_column: str = "prompt_id"
) -> list[dict[str, Any]]:
    """``{"prompt_id", "prompt"}`` (messages) of every record of a prompt file; bad records raise ``DataError``.

    Generated responses, scores and the final records are keyed by the prompt id, so a repeated id is refused.
    """
    prompts = []
    first_at: dict[str, str] = {}
    for where, record in iter_raw_records(path):
        if isinstance(record, DataError):
            raise record
        if not isinstance(record, dict) or id_column not in record or prompt_column not in record:
            raise DataError(
                where, None, f"a prompt record needs '{id_column}' and '{prompt_column}'", "missing_field"
            )
        prompt_id = str(record[id_column])
        if prompt_id in first_at:
            raise DataError(
                where,
                id_column,
                f"duplicate prompt id {prompt_id!r} (first at {first_at[prompt_id]})",
                "duplicate_prompt_id",
            )
        first_at[prompt_id] = where
        messages = parse_prompt(record[prompt_column], where, prompt_column)
        prompts.append({"prompt_id": prompt_id, "prompt": list(messages)})
    return prompts


def shard_of(items: list[Any], shard_index: int, num_shards: int) -> list[Any]:
    """Every ``num_shards``-th item starting at ``shard_index``: stable, and shards never overlap."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index={shard_index} must lie in [0, num_shards={num_shards})")
    return items[shard_index::num_shards]


def iter_jsonl(paths: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The records of JSONL files written by these steps (complete lines only)."""
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.endswith("\n") and line.strip():
                    yield json.loads(line)


def resume_keys(path: str, key: Callable[[dict[str, Any]], tuple]) -> set[tuple]:
    """Keys of the records already in ``path``; a partial last line (a crash mid-write) is cut off first."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb+") as handle:
        data = handle.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            handle.truncate(end)
    return {key(json.loads(line)) for line in data[:end].decode("utf-8").splitlines() if line.strip()}


class JsonlSink:
    """Appends records to a JSONL file, flushed after every batch so a crash loses at most one batch."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, records: list[dict[str, Any]]) -> None:
        self._handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
