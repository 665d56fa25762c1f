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


def replace_path(src: Path, dst: Path) -> None:
    """Move the finished ``src`` to ``dst``; an old ``dst`` is moved aside first and removed only afterwards."""
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
