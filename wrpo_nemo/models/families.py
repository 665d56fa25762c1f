"""Which model family a Hugging Face checkpoint belongs to, and where that family's weight mapping lives."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

from wrpo_nemo.models import llama
from wrpo_nemo.models.config import ModelConfig

# Hugging Face architecture name -> module holding that family's config builder and weight mapping.
_ARCHITECTURE_MODULES: dict[str, ModuleType] = {arch: llama for arch in llama.ARCHITECTURES.values()}
_FAMILY_MODULES: dict[str, ModuleType] = {family: llama for family in llama.ARCHITECTURES}


def read_hf_config(path_or_dict: str | Path | dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` dict of an HF folder, a path to a ``config.json``, or the dict itself."""
    if isinstance(path_or_dict, dict):
        return path_or_dict
    path = Path(path_or_dict)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no Hugging Face config.json at {path}")
    return json.loads(path.read_text())


def model_config_from_hf(path_or_dict: str | Path | dict[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face checkpoint (folder, ``config.json`` path or dict)."""
    hf = read_hf_config(path_or_dict)
    architectures = hf.get("architectures") or []
    supported = [a for a in architectures if a in _ARCHITECTURE_MODULES]
    if not supported:
        raise ValueError(
            f"config.json: architectures={architectures} is not supported; supported: {sorted(_ARCHITECTURE_MODULES)}"
        )
    return _ARCHITECTURE_MODULES[supported[0]].config_from_hf(hf)


def family_module(cfg: ModelConfig) -> ModuleType:
    """The module holding ``cfg.family``'s mapping (``tensor_mappings``, ``to_mcore``, ``to_hf``, HF config)."""
    return _FAMILY_MODULES[cfg.family]
