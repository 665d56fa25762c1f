"""All-or-nothing outputs: build in a hidden sibling, then rename into place."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_output(path: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite``; returns ``path`` as a ``Path``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"output {path} already exists; pass --overwrite (overwrite=True) to replace it"
        )
    return path


def fsync_tree(path: str | Path) -> None:
    """Flush ``path`` (a file, or a folder with everything under it) to stable storage: every file's data, then
    every folder's entries, so a rename that publishes ``path`` never points at data still in a cache."""
    path = Path(path)
    if path.is_file():
        _fsync(path, os.O_RDONLY)
        return
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            _fsync(Path(root) / name, os.O_RDONLY)
        _fsync(Path(root), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (after a rename in it)."""
    _fsync(Path(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def remove_tree(path: str | Path) -> None:
    """Delete ``path``: renamed out of the way first (a hidden sibling), so a crash half-way through the deletion
    leaves a hidden folder no reader takes for the original, never a half-deleted one under its name."""
    path = Path(path)
    if not path.exists():
        return
    doomed = path.with_name(f".{path.name}.deleting-{uuid.uuid4().hex[:8]}")
    os.rename(path, doomed)
    if doomed.is_dir():
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        doomed.unlink()


def replace_path(src: Path, dst: Path) -> None:
    """Move the finished ``src`` to ``dst`` (its contents flushed first); an old ``dst`` is moved aside first and
    removed only afterwards."""
    src, dst = Path(src), Path(dst)
    fsync_tree(src)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(dst, old)
        os.rename(src, dst)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        os.rename(src, dst)
    fsync_dir(dst.parent)


@contextmanager
def atomic_output_dir(path: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty staging directory that becomes ``path`` when the block succeeds and vanishes if it fails."""
    out = check_output(path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_path(staging, out)
