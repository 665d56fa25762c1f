"""What the command lines share: an error the user can act on ends with one line and exit code 2.

A bad config key (:class:`~wrpo_nemo.training.config.ConfigError`), a bad data record
(:class:`~wrpo_nemo.data.records.DataError`), an unreadable or unusable input file
(:class:`~wrpo_nemo.errors.InputError`), and for the scripts a missing input or an existing output, each
name what to fix; their tracebacks would only bury that. ``recipes/wrpo.py`` shows the traceback with
``HYDRA_FULL_ERROR=1``, the scripts with ``--debug``::

    parser = argparse.ArgumentParser(...)
    add_debug_option(parser)
    args = parser.parse_args(argv)
    with user_errors(args.debug):
        ...
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from wrpo_nemo.errors import InputError

EXIT_CODE = 2
"""Exit status of a user error, as for a command-line usage error (argparse's too)."""


def user_error_types() -> tuple[type[Exception], ...]:
    """What the scripts report in one line: the message names the key, the record or the path.

    Imported when called (in an ``except`` clause, only once something was raised): ``wrpo_nemo.data`` pulls in
    transformers, which a script's ``--help`` should not wait for.
    """
    from wrpo_nemo.data.records import DataError
    from wrpo_nemo.training.config import ConfigError

    return (ConfigError, DataError, InputError, FileNotFoundError, FileExistsError)


def error_line(exc: BaseException) -> str:
    """``<kind> error: <message>`` on one line (a message's own line breaks become ``; ``)."""
    from wrpo_nemo.data.records import DataError
    from wrpo_nemo.training.config import ConfigError

    if isinstance(exc, ConfigError):
        kind = "config error"
    elif isinstance(exc, DataError):
        kind = "data error"
    elif isinstance(exc, InputError):
        kind = "input error"
    else:
        kind = "error"
    text = "; ".join(line.strip().rstrip(";") for line in str(exc).splitlines() if line.strip())
    return f"{kind}: {text}"


def add_debug_option(parser: argparse.ArgumentParser) -> None:
    """``--debug``: show the traceback of a user error instead of its one line."""
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of an input, data or config error (otherwise: one line, exit code 2)",
    )


@contextmanager
def user_errors(debug: bool = False) -> Iterator[None]:
    """Inside the block, an error of :func:`user_error_types` prints :func:`error_line` to stderr and exits
    with :data:`EXIT_CODE`; with ``debug`` it propagates (traceback and all). Other errors always propagate."""
    try:
        yield
    except user_error_types() as exc:
        if debug:
            raise
        print(error_line(exc), file=sys.stderr)
        sys.exit(EXIT_CODE)


# Library warnings that tell a user of this project nothing to act on: deprecations inside megatron-core and
# torch.distributed's checkpointing that this project's code does not call directly, and (on a machine
# without a GPU, where it is expected) megatron falling back from TransformerEngine/Apex kernels.
LIBRARY_CHATTER = (
    (UserWarning, r"full scope is deprecated"),
    (FutureWarning, r"`load_state_dict` is deprecated"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor"),
    # A converter writes a checkpoint from one process without a process group, as intended.
    (UserWarning, r"torch.distributed is disabled, unavailable or uninitialized"),
)
CPU_CHATTER = ((UserWarning, r"(Transformer Engine and )?Apex (is|are) not installed"),)
SHOW_LIBRARY_WARNINGS = "WRPO_LIBRARY_WARNINGS"
"""Set to 1 to see every library warning (they are filtered by default)."""


def quiet_library_warnings(gpu: bool | None = None) -> None:
    """Keep :data:`LIBRARY_CHATTER` (and :data:`CPU_CHATTER` without a GPU) off the console; call before megatron
    is imported, its fallback warnings fire at import. ``WRPO_LIBRARY_WARNINGS=1`` leaves every warning on."""
    if os.environ.get(SHOW_LIBRARY_WARNINGS) == "1":
        return
    if gpu is None:
        from wrpo_nemo import compat  # torch only: megatron is not imported yet

        gpu = compat.runtime().cuda
    for category, message in LIBRARY_CHATTER + (() if gpu else CPU_CHATTER):
        warnings.filterwarnings("ignore", message=message, category=category)
