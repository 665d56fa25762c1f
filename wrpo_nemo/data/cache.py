"""The tokenised on-disk cache: tokenise once (in worker processes), memory-map after.

Layout of ``<cache_dir>/<key>/``:

- ``prompt.npy``, ``source_chosen.npy``, ``target_chosen.npy``, ``rejected.npy``: every example's ids
  concatenated (int32, memory-mapped on load), with ``<name>_offsets.npy`` (int64, ``N + 1`` entries);
- ``prompt_ids.json``: the prompt id of every example, in order (``prompt_index`` of a packed batch indexes it);
- ``report.json``: the data report (records read, skipped by cause, duplicates, drops and truncations);
- ``meta.json``: what the key was computed from (and, not hashed, the source paths it was built from);
- ``reference_logps/``: the reference model's summed log-probs, one file per model identity.

The key hashes the content of the data files (size and SHA-256 of the bytes; a folder's files by relative
path; a hub dataset by its name, the revision being an option), the tokenizer (vocabulary, special tokens,
chat template) and every option; a change rebuilds, nothing else does. Neither the files' location nor their
mtime is part of it, so a run folder moved or copied elsewhere finds its cache and resumes.

A build writes into a temporary folder ``.tmp-<key>-*`` and renames it into place, so a failed build leaves no
cache behind. A build killed outright (kill -9, out of memory, a lost node) cannot remove its folder; every
build therefore first removes the temporary folders no build is using any more (:func:`remove_stale_builds`):
those whose owner (recorded in ``build_owner.json``: host, boot, PID namespace, PID and its start time) is a
process of this machine that has ended, and those whose owner cannot be checked from here (another machine or
container, or no owner file) and that nothing has changed for :data:`STALE_BUILD_AGE_S`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from wrpo_nemo.data.records import DataError, Example, ReadConfig, read_examples
from wrpo_nemo.data.tokenize import RESPONSE_FIELDS, TokenizeConfig, eot_token_id, tokenize_example

CACHE_VERSION = 2
"""Bumped when the cache layout, the key or the tokenisation rules change, so old caches are not reused
(2: the key hashes the data files' content instead of their path and mtime)."""
COLUMNS = ("prompt", *RESPONSE_FIELDS)

BUILD_PREFIX = ".tmp-"
"""Name prefix of the temporary folder a build writes into, inside the cache root."""
BUILD_OWNER_FILE = "build_owner.json"
"""The process that owns a temporary build folder; removed before the folder becomes the cache."""
STALE_BUILD_AGE_S = 24 * 3600
"""A temporary build folder whose owner cannot be checked from here is removed once nothing in it has changed
for this long: far longer than any tokenisation, so a slow build of another machine is never touched."""
_HASH_CHUNK = 1 << 20

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Where the records are, how to read and tokenise them, and where the cache lives."""

    sources: list[str] = field(default_factory=list)
    """JSONL/Parquet files, ``save_to_disk`` folders or hub dataset names, read in order."""
    read: ReadConfig = field(default_factory=ReadConfig)
    """Layout, column names, system prompt, bad-record policy."""
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    """Lengths and the length policy."""
    cache_dir: str = "cache/data"
    """Root folder of tokenised caches; each build lives in a sub-folder named by its key."""
    num_workers: int = 2
    """Processes that tokenise in parallel (``datasets.map(num_proc=...)``); 1 tokenises in this process."""


def _fingerprint_source(source: str) -> Any:
    """What identifies a source's records: its content, wherever it lies and whatever its mtime.

    A file: its extension (it decides the reader), size and SHA-256. A folder: every file's path relative to
    the folder (sorted), size and SHA-256. Anything else is a hub dataset name and stands for itself.
    """
    if os.path.isdir(source):
        files = sorted(
            os.path.relpath(os.path.join(root, name), source).replace(os.sep, "/")
            for root, _, names in os.walk(source)
            for name in names
        )
        return ["folder", [[rel, *_content_hash(os.path.join(source, rel))] for rel in files]]
    if os.path.exists(source):
        return ["file", os.path.splitext(source)[1], *_content_hash(source)]
    return ["hub", source]


def _content_hash(path: str) -> tuple[int, str]:
    """Size and SHA-256 of a file's bytes, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides the ids: the backend tokenizer, the special tokens and the chat template."""
    parts = [
        tokenizer.backend_tokenizer.to_str(),
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
        tokenizer.chat_template or "",
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def cache_key(cfg: DataConfig, tokenizer: Any) -> tuple[str, dict[str, Any]]:
    """The cache key and the description it was hashed from."""
    meta = {
        "version": CACHE_VERSION,
        "sources": [_fingerprint_source(s) for s in cfg.sources],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "read": asdict(cfg.read),
        "tokenize": asdict(cfg.tokenize),
    }
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return digest, meta


class TokenizedDataset:
    """A built cache, memory-mapped: the ids of example ``i``'s prompt and responses, without copies."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.key = os.path.basename(os.path.normpath(path))
        self._values = {c: np.load(os.path.join(path, f"{c}.npy"), mmap_mode="r") for c in COLUMNS}
        self._offsets = {c: np.load(os.path.join(path, f"{c}_offsets.npy")) for c in COLUMNS}
        with open(os.path.join(path, "prompt_ids.json"), encoding="utf-8") as handle:
            self.prompt_ids: list[str] = json.load(handle)
        with open(os.path.join(path, "report.json"), encoding="utf-8") as handle:
            self.report: dict[str, Any] = json.load(handle)
        self._lengths = {c: np.diff(self._offsets[c]) for c in COLUMNS}

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def ids(self, column: str, index: int) -> np.ndarray:
        """Ids of ``column`` (``prompt`` or a role name) of example ``index``."""
        offsets = self._offsets[column]
        return self._values[column][offsets[index] : offsets[index + 1]]

    def lengths(self, column: str) -> np.ndarray:
        """Token count of ``column`` for every example (do not modify the returned array)."""
        return self._lengths[column]


def _tokenize_batch(rows: dict[str, list], tokenizer: Any, cfg: TokenizeConfig, on_invalid: str) -> dict:
    eot_id = eot_token_id(tokenizer, cfg)
    out: dict[str, list] = {}
    names = ("prompt_id", "prompt", *RESPONSE_FIELDS, "where")
    for values in zip(*(rows[n] for n in names), strict=True):
        example = Example(values[0], tuple(values[1]), *values[2:])
        try:
            result = tokenize_example(tokenizer, example, cfg, eot_id)
            result["error"] = ""
        except DataError as err:
            if on_invalid == "error":
                raise
            result = {f"{c}_ids": [] for c in COLUMNS}
            result.update(prompt_id=example.prompt_id, status=err.cause, error=str(err))
            result.update(prompt_truncated=False, responses_truncated=0)
        for k, v in result.items():
            out.setdefault(k, []).append(v)
    return out


def _tokenize_all(examples: list[Example], tokenizer: Any, cfg: DataConfig) -> Any:
    import datasets

    rows = {
        "prompt_id": [e.prompt_id for e in examples],
        "prompt": [list(e.prompt) for e in examples],
        **{name: [getattr(e, name) for e in examples] for name in RESPONSE_FIELDS},
        "where": [e.where for e in examples],
    }
    table = datasets.Dataset.from_dict(rows)
    workers = cfg.num_workers if cfg.num_workers > 1 and len(examples) >= 2 * cfg.num_workers else None
    return table.map(
        _tokenize_batch,
        batched=True,
        batch_size=256,
        num_proc=workers,
        remove_columns=table.column_names,
        fn_kwargs={"tokenizer": tokenizer, "cfg": cfg.tokenize, "on_invalid": cfg.read.on_invalid},
        desc="tokenising",
    )


def _write_arrays(tokenized: Any, keep: np.ndarray, folder: str) -> None:
    import pyarrow.compute as pc

    table = tokenized.with_format("arrow")[np.flatnonzero(keep).tolist()]  # no rewrite, no progress bar
    for column in COLUMNS:
        ids = table.column(f"{column}_ids").combine_chunks()
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(pc.list_value_length(ids).to_numpy(zero_copy_only=False), out=offsets[1:])
        values = ids.flatten().to_numpy(zero_copy_only=False).astype(np.int32)
        np.save(os.path.join(folder, f"{column}.npy"), values)
        np.save(os.path.join(folder, f"{column}_offsets.npy"), offsets)
    with open(os.path.join(folder, "prompt_ids.json"), "w", encoding="utf-8") as handle:
        json.dump(table.column("prompt_id").to_pylist(), handle)


_LENGTH_CAUSES = ("prompt_too_long", "response_too_long", "exceeds_seq_length")


def _report(read_report: Any, tokenized: Any, keep: np.ndarray) -> dict[str, Any]:
    status = Counter(tokenized["status"])
    report = read_report.to_dict()
    # Records the reader accepted but the template refused are skipped records too, not length drops.
    skipped = Counter(report["skipped_by_cause"])
    skipped.update({k: v for k, v in status.items() if k != "ok" and k not in _LENGTH_CAUSES})
    report["skipped_by_cause"] = dict(skipped)
    report["first_errors"] = report["first_errors"] + [e for e in tokenized["error"] if e][:20]
    report["dropped_by_length"] = {k: v for k, v in status.items() if k in _LENGTH_CAUSES}
    report["prompts_truncated"] = int(sum(tokenized["prompt_truncated"]))
    report["responses_truncated"] = int(sum(tokenized["responses_truncated"]))
    report["examples_kept"] = int(keep.sum())
    return report


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _machine() -> dict[str, str]:
    """Where a PID means a process: the host, its current boot and this process's PID namespace."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return {
        "host": socket.gethostname(),
        "boot": _read_text("/proc/sys/kernel/random/boot_id"),
        "pid_namespace": namespace,
    }


def _process_start(pid: int) -> int | None:
    """Start time of process ``pid`` (clock ticks after boot), or ``None`` where ``/proc`` cannot tell."""
    stat = _read_text(f"/proc/{pid}/stat")
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 else None


def _new_build_folder(cache_dir: str, key: str) -> str:
    """A fresh temporary folder for building ``key``, its owner (this process) recorded in it."""
    os.makedirs(cache_dir, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=f"{BUILD_PREFIX}{key}-", dir=cache_dir)
    owner = {**_machine(), "pid": os.getpid(), "pid_start": _process_start(os.getpid())}
    with open(os.path.join(folder, BUILD_OWNER_FILE), "w", encoding="utf-8") as handle:
        json.dump(owner, handle)
    return folder


def _owner_alive(pid: int, start: Any) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # a process of another user
    # A PID reused by a later process has another start time.
    return start is None or _process_start(pid) in (None, start)


def _last_change(folder: str) -> float:
    times = [os.stat(folder).st_mtime]
    with os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                times.append(entry.stat(follow_symlinks=False).st_mtime)
    return max(times)


def _build_in_use(folder: str, now: float) -> bool:
    """Whether a build may still be writing into ``folder`` (see the module docstring for the rule)."""
    try:
        with open(os.path.join(folder, BUILD_OWNER_FILE), encoding="utf-8") as handle:
            owner = json.load(handle)
    except (OSError, ValueError):
        owner = None
    machine = _machine()
    if (
        isinstance(owner, dict)
        and all(owner.get(k) == v for k, v in machine.items())
        and isinstance(owner.get("pid"), int)
        and owner["pid"] > 0
    ):
        return _owner_alive(owner["pid"], owner.get("pid_start"))
    try:
        return now - _last_change(folder) < STALE_BUILD_AGE_S
    except FileNotFoundError:
        return True  # removed meanwhile by someone else


def remove_stale_builds(cache_dir: str) -> list[str]:
    """Remove the temporary folders of builds that were killed before they could; returns their names.

    Only folders named ``.tmp-*`` directly in ``cache_dir`` that no build uses any more: their owner, a
    process of this machine (same host, boot and PID namespace), has ended; or their owner cannot be checked
    from here and nothing in them has changed for :data:`STALE_BUILD_AGE_S`. A build in progress on this
    machine (another job sharing the cache root included) or elsewhere is never touched.
    """
    try:
        names = sorted(os.listdir(cache_dir))
    except FileNotFoundError:
        return []
    now, removed = time.time(), []
    for name in names:
        folder = os.path.join(cache_dir, name)
        if name.startswith(BUILD_PREFIX) and os.path.isdir(folder) and not _build_in_use(folder, now):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(name)
    if removed:
        log.warning(
            "data: removed %d temporary folder(s) of killed cache builds in %s: %s",
            len(removed),
            cache_dir,
            ", ".join(removed),
        )
    return removed


def build_or_load(cfg: DataConfig, tokenizer: Any) -> TokenizedDataset:
    """The tokenised dataset of ``cfg``: loaded when a cache with the same key exists, built otherwise.

    In a multi-process run call this on one rank first (the others wait at a barrier) so that one build
    runs; a concurrent build that loses the final rename discards its copy and loads the winner's. A build
    first removes the temporary folders that killed builds left behind (:func:`remove_stale_builds`).
    """
    cfg.tokenize.validate()
    if not cfg.sources:
        raise ValueError("data.sources is empty: give at least one JSONL/Parquet file, folder or hub name")
    key, meta = cache_key(cfg, tokenizer)
    final = os.path.join(cfg.cache_dir, key)
    if os.path.exists(os.path.join(final, "report.json")):
        return TokenizedDataset(final)
    eot_token_id(tokenizer, cfg.tokenize)  # a wrong end-of-turn token fails here, before any work
    remove_stale_builds(cfg.cache_dir)
    examples, read_report = read_examples(cfg.sources, cfg.read)
    if not examples:
        raise ValueError(f"no valid records in {cfg.sources}: {read_report.to_dict()}")
    tmp = _new_build_folder(cfg.cache_dir, key)
    try:
        tokenized = _tokenize_all(examples, tokenizer, cfg)
        keep = np.array([s == "ok" for s in tokenized["status"]], dtype=bool)
        if not keep.any():
            raise ValueError(f"every example was dropped; see the counts: {Counter(tokenized['status'])}")
        _write_arrays(tokenized, keep, tmp)
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as handle:
            json.dump({**meta, "built_from": cfg.sources}, handle, indent=1, default=str)
        os.remove(os.path.join(tmp, BUILD_OWNER_FILE))  # not part of the cache
        # report.json is written last: its presence marks a complete cache.
        with open(os.path.join(tmp, "report.json"), "w", encoding="utf-8") as handle:
            json.dump(_report(read_report, tokenized, keep), handle, indent=1)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.exists(os.path.join(final, "report.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenizedDataset(final)
