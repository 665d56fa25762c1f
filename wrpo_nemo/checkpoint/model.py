"""The weights-only model checkpoint: one layout shared by the converters and the training engine.

A model checkpoint is a directory::

    <dir>/model_config.json   {"format": FORMAT, "model": ModelConfig.to_dict()}
    <dir>/weights/            megatron torch_dist dist checkpoint of model.sharded_state_dict()
    <dir>/hf_assets/          optional: config.json, generation_config.json, tokenizer files of the HF origin

``weights/`` uses megatron's sharded keys without a prefix (``embedding.word_embeddings.weight``,
``decoder.layers.self_attention.linear_qkv.weight`` with a leading layer axis, ...) and without the modules'
``_extra_state`` (TransformerEngine's FP8 bookkeeping, not weights), so it loads with the local and the
TransformerEngine specs alike, at any TP/PP. A full training checkpoint adds optimizer and scheduler state
under other keys in the same ``weights/`` dist checkpoint; :func:`load_model_checkpoint` reads only the model's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from wrpo_nemo import compat
from wrpo_nemo.checkpoint.atomic import replace_path
from wrpo_nemo.checkpoint.damage import checkpoint_read_error, read_failures
from wrpo_nemo.errors import InputError, first_line, read_json
from wrpo_nemo.models.config import ModelConfig

FORMAT = "wrpo_nemo.model_checkpoint/1"
CONFIG_FILE = "model_config.json"
WEIGHTS_DIR = "weights"
HF_ASSETS_DIR = "hf_assets"
# Everything in an HF folder except the weights: copied on import, restored on export.
HF_ASSET_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def weights_dir(directory: str | Path) -> Path:
    """Where the dist checkpoint of a model checkpoint lives."""
    return Path(directory) / WEIGHTS_DIR


def is_model_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` holds a complete model checkpoint."""
    directory = Path(directory)
    return (directory / CONFIG_FILE).is_file() and (weights_dir(directory) / "metadata.json").is_file()


def write_model_config(directory: str | Path, cfg: ModelConfig) -> None:
    """Write ``model_config.json`` into ``directory``."""
    payload = {"format": FORMAT, "model": cfg.to_dict()}
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")


def read_model_config(directory: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` stored in a model checkpoint."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a model checkpoint: {CONFIG_FILE} is missing")
    payload: Any = read_json(path)
    if not isinstance(payload, dict):
        raise InputError(path, f"expected a JSON object, got {type(payload).__name__}")
    if payload.get("format") != FORMAT:
        raise InputError(path, f"format {payload.get('format')!r} is not {FORMAT!r}")
    try:
        return ModelConfig.from_dict(payload["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(path, f"not a valid model config ({first_line(exc)})") from exc


def model_config_from_source(source: str | Path) -> ModelConfig:
    """The model config named by ``source``: a preset name, a model checkpoint, or a Hugging Face folder."""
    from wrpo_nemo.models.families import model_config_from_hf
    from wrpo_nemo.models.presets import PRESETS

    if isinstance(source, str) and source in PRESETS:
        return PRESETS[source]
    if is_model_checkpoint(source) or (Path(source) / CONFIG_FILE).is_file():
        return read_model_config(source)
    if (Path(source) / "config.json").is_file():
        return model_config_from_hf(source)
    raise FileNotFoundError(
        f"model source {source!r} is neither a preset ({sorted(PRESETS)}), a model checkpoint, nor an HF folder"
    )


def copy_hf_assets(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the non-weight files of an HF folder (those present) into ``dst``; returns their names."""
    src, dst = Path(src), Path(dst)
    names = [name for name in HF_ASSET_FILES if (src / name).is_file()]
    if names:
        dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(src / name, dst / name)
    return names


def model_sharded_state_dict(model) -> dict:
    """``model.sharded_state_dict()`` without ``_extra_state`` entries (see the module docstring)."""
    return {k: v for k, v in model.sharded_state_dict().items() if not k.endswith("_extra_state")}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_model_checkpoint(
    model, directory: str | Path, model_cfg: ModelConfig, *, hf_assets: str | Path | None = None
) -> None:
    """Save this rank's part of ``model`` (collective over all ranks) as a model checkpoint at ``directory``.

    Atomic: written to a hidden sibling and renamed into place by rank 0; an existing checkpoint at ``directory``
    is replaced only once the new one is complete. ``hf_assets`` (an HF folder or an ``hf_assets`` dir) is copied.
    """
    from megatron.core import dist_checkpointing

    out = Path(directory)
    staging = out.with_name(f".{out.name}.partial")
    if _rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        weights_dir(staging).mkdir(parents=True)
    _barrier()
    with compat.redirect_cuda_to_cpu():  # megatron's writer synchronizes CUDA
        dist_checkpointing.save(model_sharded_state_dict(model), str(weights_dir(staging)))
    if _rank() == 0:
        write_model_config(staging, model_cfg)
        if hf_assets is not None:
            copy_hf_assets(hf_assets, staging / HF_ASSETS_DIR)
        replace_path(staging, out)
    _barrier()


def load_model_checkpoint(model, directory: str | Path) -> None:
    """Load the weights of a model checkpoint (saved at any TP/PP) into this rank's part of ``model``.

    A damaged dist checkpoint raises :class:`~wrpo_nemo.errors.InputError` naming the file (or the folder).
    """
    from megatron.core import dist_checkpointing

    path = weights_dir(directory)
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{directory} has no dist checkpoint under {WEIGHTS_DIR}/")
    request = model_sharded_state_dict(model)
    try:
        with compat.redirect_cuda_to_cpu():
            loaded = dist_checkpointing.load(request, str(path))
    except read_failures() as exc:
        raise checkpoint_read_error(path, exc) from exc
    # A training checkpoint's common state (optimizer param groups, trainer state) comes back too: keep the model's.
    result = model.load_state_dict({k: v for k, v in loaded.items() if k in request}, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"checkpoint {directory}: missing {missing}, unexpected {result.unexpected_keys}")
