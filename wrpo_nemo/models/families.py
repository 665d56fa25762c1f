"""Which model family a Hugging Face checkpoint belongs to, and where that family's weight mapping lives."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from wrpo_nemo.errors import InputError, read_json
from wrpo_nemo.models import llama
from wrpo_nemo.models.config import ModelConfig

# Hugging Face architecture name -> module holding that family's config builder and weight mapping.
_ARCHITECTURE_MODULES: dict[str, ModuleType] = {arch: llama for arch in llama.ARCHITECTURES.values()}
_FAMILY_MODULES: dict[str, ModuleType] = {family: llama for family in llama.ARCHITECTURES}


def read_hf_config(path_or_dict: str | Path | dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` dict of an HF folder, a path to a ``config.json``, or the dict itself."""
    if isinstance(path_or_dict, dict):
        return path_or_dict
    path = _config_path(path_or_dict)
    if not path.is_file():
        raise FileNotFoundError(f"no Hugging Face config.json at {path}")
    hf = read_json(path)
    if not isinstance(hf, dict):
        raise InputError(path, f"expected a JSON object, got {type(hf).__name__}")
    return hf


def _config_path(path: str | Path) -> Path:
    path = Path(path)
    return path / "config.json" if path.is_dir() else path


def model_config_from_hf(path_or_dict: str | Path | dict[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face checkpoint (folder, ``config.json`` path or dict).

    Read from a file, a config this project cannot use raises :class:`InputError` naming the file.
    """
    hf = read_hf_config(path_or_dict)
    try:
        architectures = hf.get("architectures") or []
        supported = [a for a in architectures if a in _ARCHITECTURE_MODULES]
        if not supported:
            raise ValueError(
                f"config.json: architectures={architectures} is not supported; "
                f"supported: {sorted(_ARCHITECTURE_MODULES)}"
            )
        return _ARCHITECTURE_MODULES[supported[0]].config_from_hf(hf)
    except (ValueError, KeyError, TypeError) as exc:
        if isinstance(path_or_dict, dict):
            raise
        problem = f"{exc.args[0]} is missing" if isinstance(exc, KeyError) else str(exc)
        raise InputError(_config_path(path_or_dict), problem.removeprefix("config.json: ")) from exc


def family_module(cfg: ModelConfig) -> ModuleType:
    """The module holding ``cfg.family``'s mapping (``tensor_mappings``, ``to_mcore``, ``to_hf``, HF config)."""
    return _FAMILY_MODULES[cfg.family]
