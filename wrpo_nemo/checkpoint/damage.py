"""A failed read of a megatron dist checkpoint (``torch_dist``) told as the file that is damaged.

The format: ``.metadata`` (PyTorch DCP's pickled index: every stored item's file, offset and length),
``__<rank>_<n>.distcp`` (the items), megatron's ``metadata.json`` and ``common.pt`` (a ``torch.save`` archive
of the non-tensor state). The libraries' own errors rarely say which file broke (``PytorchStreamReader failed
reading zip archive``, a ``CheckpointException`` of rank 0, ``Ran out of input``), so after a failure
:func:`checkpoint_read_error` checks the folder against its index (each file present and as long as the index
says, ``common.pt`` a complete archive, both metadata files readable) and names what it finds. Nothing is
checked on the normal path.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

from wrpo_nemo.errors import InputError, first_line, read_json


def read_failures() -> tuple[type[BaseException], ...]:
    """What reading a damaged dist checkpoint raises: I/O and unpickling errors, DCP's per-rank wrapper
    (a ``BaseException``) and megatron's ``CheckpointingException``. Imports the libraries when called, so use
    it in an ``except`` clause (evaluated only once something was raised)."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    return (
        EOFError,
        OSError,
        RuntimeError,
        pickle.UnpicklingError,
        json.JSONDecodeError,
        CheckpointException,
        CheckpointingException,
    )


def root_cause(exc: BaseException) -> BaseException:
    """The first rank's own error inside DCP's ``CheckpointException``; ``exc`` itself otherwise."""
    from torch.distributed.checkpoint.api import CheckpointException

    while isinstance(exc, CheckpointException) and exc.failures:
        exc = next(iter(exc.failures.values()))[0]
    return exc


def _stored_extents(directory: Path) -> dict[str, int]:
    """File name -> the end of the last byte range ``.metadata`` places in it."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(directory)).read_metadata()
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    return ends


def find_damage(directory: str | Path) -> list[tuple[str, str]]:
    """``(file name, what is wrong)`` for every damaged file of the dist checkpoint ``directory``, data files
    first. Reads both metadata files and ``common.pt``; the data files are only measured."""
    directory = Path(directory)
    damage: list[tuple[str, str]] = []
    if not (directory / ".metadata").is_file():
        damage.append((".metadata", "missing: every dist checkpoint has this index of its files"))
    else:
        try:
            extents = _stored_extents(directory)
        except Exception as exc:  # truncated, not a pickle, or not DCP's: anything means unreadable
            damage.append((".metadata", f"unreadable ({first_line(exc)})"))
        else:
            for name, end in sorted(extents.items()):
                path = directory / name
                if not path.is_file():
                    damage.append((name, "missing (the checkpoint's .metadata lists it)"))
                elif (size := path.stat().st_size) < end:
                    problem = f"truncated: {size} bytes, but the checkpoint's .metadata places data up to byte {end}"
                    damage.append((name, problem))
    common = directory / "common.pt"
    if common.is_file():
        try:
            with zipfile.ZipFile(common) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            damage.append(("common.pt", f"not a complete torch.save archive, truncated? ({first_line(exc)})"))
        else:
            if bad is not None:
                damage.append(("common.pt", f"damaged: member {bad} fails its checksum"))
    if (directory / "metadata.json").is_file():
        try:
            read_json(directory / "metadata.json")
        except InputError as exc:
            damage.append(("metadata.json", exc.problem))
    return damage


def _listing(directory: Path) -> str:
    if not directory.is_dir():
        return "the folder does not exist"
    files = [f"{p.name} ({p.stat().st_size} bytes)" for p in sorted(directory.iterdir()) if p.is_file()]
    return "files: " + (", ".join(files) if files else "none")


def checkpoint_read_error(
    directory: str | Path, exc: BaseException, files: list[str] | None = None
) -> InputError:
    """The :class:`InputError` for the failed read ``exc`` of the dist checkpoint ``directory``.

    Names the damaged file when :func:`find_damage` finds one (preferring ``files``, those the failed read
    used, when known); else the one file the read used; else the folder, the error and the folder's files.
    """
    directory = Path(directory)
    cause = first_line(root_cause(exc))
    damage = find_damage(directory) if directory.is_dir() else []
    if damage:
        damage.sort(key=lambda d: d[0] not in (files or []))
        name, problem = damage[0]
        others = "; ".join(f"{n}: {p}" for n, p in damage[1:])
        return InputError(directory / name, problem + (f" (also damaged: {others})" if others else ""))
    if files and len(files) == 1:
        return InputError(directory / files[0], f"unreadable ({cause})")
    return InputError(
        directory,
        f"this dist checkpoint cannot be read ({cause}); no file is missing or shorter than its .metadata "
        f"says ({_listing(directory)})",
    )
