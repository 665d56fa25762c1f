"""The recipe's command line: Hydra over the typed schema, and every check before anything is written.

``recipes/wrpo.py`` registers :func:`~wrpo_nemo.training.config.structured_schema` as ``wrpo_schema`` (the
first entry of every ``conf/*.yaml`` defaults list), so Hydra refuses a misspelt key, a wrong type or a value
outside a fixed set of choices at composition, naming the key. Hydra creates its output folder
(``hydra.run.dir``, inside ``run_dir`` in the shipped configs) before it calls the task, so
:func:`preflight` composes the same config first and runs every start-up check
(:func:`~wrpo_nemo.training.validate.check_before_writing`): a bad config prints ``config error: ...``
naming the key and exits 2 with nothing written.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from wrpo_nemo.training.config import ConfigError, RunConfig, load_run_config, structured_schema

SCHEMA_NAME = "wrpo_schema"
"""The name ``conf/*.yaml`` list first in their defaults."""
CONFIG_ERROR_EXIT = 2


def register_schema() -> None:
    """Store the typed schema (every key, its type and default) in Hydra's ConfigStore as ``wrpo_schema``."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=structured_schema())


def to_run_config(cfg: DictConfig) -> RunConfig:
    """The typed run config of Hydra's composed config (interpolations resolved, choices as strings)."""
    return load_run_config(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


def check_here(cfg: RunConfig) -> None:
    """Every start-up check for this process: the world size torchrun launched (1 without it), a GPU or not."""
    from wrpo_nemo import compat
    from wrpo_nemo.training.setup import world_size
    from wrpo_nemo.training.validate import check_before_writing

    check_before_writing(cfg, world_size(), compat.runtime().cuda)


def _composition_error(exc: Exception) -> ConfigError:
    # Hydra's message says what failed ("Could not override 'sft.micro_batchsize'"); OmegaConf's cause names
    # the key ("full_key: sft.micro_batchsize").
    message = str(exc)
    cause = exc.__cause__
    if cause is not None and str(cause) not in message:
        message = f"{message}\n{cause}"
    return ConfigError(message)


@contextlib.contextmanager
def _hydra_initialized(config_dir: Path, extra_dir: str | None, job_name: str) -> Iterator[None]:
    """Hydra set up as ``hydra.main`` sets it up: ``config_dir``, then ``--config-dir``'s folder (where a primary
    config may live too), then the ConfigStore; the previous global state is restored afterwards."""
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.errors import SearchPathException
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    version.setbase(None)
    search_path = create_config_search_path(str(config_dir))
    if extra_dir is not None:
        if not os.path.isdir(extra_dir):
            raise SearchPathException(f"Additional config directory '{os.path.abspath(extra_dir)}' not found")
        search_path.prepend("command-line", f"file://{os.path.abspath(extra_dir)}", SearchPathQuery("schema"))
    Hydra.create_main_hydra2(task_name=job_name, config_search_path=search_path)
    try:
        yield
    finally:
        restore_gh_from_backup(backup)


def compose_run_config(
    config_dir: str | Path,
    config_name: str,
    overrides: Sequence[str] = (),
    extra_dir: str | None = None,
    job_name: str = "wrpo",
) -> RunConfig:
    """What ``hydra.main`` hands the recipe for ``--config-name config_name overrides...``, typed.

    ``config_dir`` is the primary config folder, ``extra_dir`` the one ``--config-dir`` adds. Composition errors
    (unknown key, wrong type, bad choice, unparsable override, missing config) raise :class:`ConfigError` with
    Hydra's and OmegaConf's messages, which name the dotted key.
    """
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf import open_dict, read_write
    from omegaconf.errors import OmegaConfBaseException

    register_schema()
    try:
        with _hydra_initialized(Path(config_dir).resolve(), extra_dir, job_name):
            cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
            # As hydra.main's run_job sets them (without creating the folder), for ${hydra:...} interpolations.
            with read_write(cfg.hydra.runtime):
                cfg.hydra.runtime.output_dir = os.path.abspath(str(cfg.hydra.run.dir))
            HydraConfig.instance().set_config(cfg)
            with open_dict(cfg):
                del cfg["hydra"]
            return to_run_config(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise _composition_error(exc) from None


def preflight(argv: Sequence[str], recipe: str | Path, config_path: str, config_name: str) -> None:
    """Compose what ``hydra.main`` is about to run and check it before Hydra writes anything; on a problem print
    ``config error: ...`` and exit 2.

    ``argv`` is parsed by Hydra's own parser; ``config_path`` (relative to the ``recipe`` file, as in
    ``hydra.main``) and ``config_name`` are the decorator's, which ``--config-path`` and ``--config-name``
    override. Only a plain run is checked here: ``--help``, ``--cfg``, ``--info``, ``--multirun`` and the like
    are left to Hydra (a multirun's jobs are checked by the task, after Hydra's output folder exists).
    """
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(list(argv))
    other_command = args.help or args.hydra_help or args.cfg or args.info or args.shell_completion
    multirun = args.multirun or any(o.replace(" ", "") == "hydra.mode=MULTIRUN" for o in args.overrides)
    if other_command or multirun or args.experimental_rerun:
        return
    overrides = list(args.overrides)
    config_path = args.config_path if args.config_path is not None else config_path
    if config_path.startswith("pkg://"):
        return  # a packaged config folder: the task checks it
    config_dir = Path(recipe).resolve().parent / config_path
    try:
        cfg = compose_run_config(
            config_dir, args.config_name or config_name, overrides, args.config_dir, Path(recipe).stem
        )
        check_here(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT)
