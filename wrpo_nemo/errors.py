"""The error of an input a user can fix: a file that cannot be read, or that does not hold what it must.

Below every other layer, so the model layer (``config.json``), the checkpoint format, the converters and the
training layer raise the same type; the entry points (``recipes/wrpo.py``, the scripts through
:mod:`wrpo_nemo.cli`) print its one-line message and exit 2 instead of showing a traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """``path`` (a file or a folder) cannot be used; ``problem`` says why. Raised ``from`` the original error."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple:
        # Raised in spawned or worker processes too: it must unpickle with both arguments.
        return (InputError, (self.path, self.problem))


def first_line(exc: BaseException) -> str:
    """``Type: first sentence of the message`` of ``exc``, for a one-line account of a library's error (torch's
    and DCP's run on for lines of advice and tracebacks)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    head, stop, _ = lines[0].partition(". ")
    return f"{type(exc).__name__}: {head}{stop.strip()}"


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in the file ``path``; :class:`InputError` naming the file when it is not JSON (or UTF-8)."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON ({exc.msg}: line {exc.lineno}, column {exc.colno})") from exc
