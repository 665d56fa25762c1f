"""Model checkpoint (saved at any TP/PP) -> Hugging Face folder, streamed.

The output holds sharded safetensors with ``model.safetensors.index.json``, ``config.json`` (the imported one
when the checkpoint kept it, otherwise generated from the model config) with the dtype updated, and the tokenizer
and generation config copied. One megatron tensor is read for one layer at a time, split into its HF tensors
and appended to the current shard, so peak memory is about one layer whatever the shard size.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from wrpo_nemo.checkpoint.atomic import atomic_output_dir
from wrpo_nemo.checkpoint.model import HF_ASSETS_DIR, read_model_config, weights_dir
from wrpo_nemo.converters.dcp_stream import CheckpointReader
from wrpo_nemo.converters.safetensors_io import INDEX_FILE, StreamingSafetensorsWriter, safetensors_header
from wrpo_nemo.errors import InputError, read_json
from wrpo_nemo.models.config import ModelConfig
from wrpo_nemo.models.families import family_module
from wrpo_nemo.models.llama import TensorMapping

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


@dataclass(frozen=True)
class _Group:
    """One megatron tensor (one layer of it) and the HF tensors it becomes."""

    mapping: TensorMapping
    layer: int | None
    names: list[str]


def _groups(cfg: ModelConfig) -> list[_Group]:
    """HF output order: embedding, then layer by layer, then the final norm and the output layer."""
    mappings = family_module(cfg).tensor_mappings(cfg)
    glob = [m for m in mappings if not m.per_layer]
    first = [_Group(m, None, m.hf_names()) for m in glob if m.mcore_key.startswith("embedding")]
    last = [_Group(m, None, m.hf_names()) for m in glob if not m.mcore_key.startswith("embedding")]
    layers = [_Group(m, i, m.hf_names(i)) for i in range(cfg.num_layers) for m in mappings if m.per_layer]
    return first + layers + last


def check_checkpoint(reader: CheckpointReader, cfg: ModelConfig) -> None:
    """Raise :class:`InputError` naming the first megatron tensor that is missing or does not fit ``cfg``."""
    for mapping in family_module(cfg).tensor_mappings(cfg):
        expected = (cfg.num_layers, *mapping.mcore_shape) if mapping.per_layer else mapping.mcore_shape
        actual = reader.shape(mapping.mcore_key)
        if mapping.kind == "vocab":  # any padding >= the true vocabulary is fine
            ok = actual[1:] == expected[1:] and actual[0] >= cfg.vocab_size
        else:
            ok = actual == expected
        if not ok:
            raise InputError(
                reader.directory,
                f"checkpoint tensor {mapping.mcore_key} has shape {actual}, model config implies {expected}",
            )


def _shards(groups: list[_Group], dtype: torch.dtype, max_bytes: int) -> list[list[_Group]]:
    """Consecutive groups packed into shards of at most ``max_bytes`` (a larger group gets its own)."""
    shards: list[list[_Group]] = [[]]
    size = 0
    for group in groups:
        nbytes = sum(torch.Size(s).numel() for s in group.mapping.hf_shapes) * dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(group)
        size += nbytes
    return shards


def _write_config(assets: Path | None, out: Path, cfg: ModelConfig, dtype: torch.dtype) -> None:
    dtype_name = str(dtype).removeprefix("torch.")
    if assets is not None and (assets / "config.json").is_file():
        hf = read_json(assets / "config.json")
        if not isinstance(hf, dict):
            raise InputError(assets / "config.json", f"expected a JSON object, got {type(hf).__name__}")
        keys = [k for k in ("torch_dtype", "dtype") if k in hf] or ["torch_dtype"]
        hf.update(dict.fromkeys(keys, dtype_name))
    else:
        hf = family_module(cfg).hf_config_from_model_config(cfg, dtype)
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if assets is not None:
        for path in assets.iterdir():
            if path.name != "config.json":
                shutil.copy2(path, out / path.name)


def _write_weights(
    reader: CheckpointReader, cfg: ModelConfig, out: Path, dtype: torch.dtype, max_bytes: int
) -> None:
    family = family_module(cfg)
    shards = _shards(_groups(cfg), dtype, max_bytes)
    weight_map, total = {}, 0
    for index, shard in enumerate(shards, start=1):
        file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        entries = [(n, s, dtype) for g in shard for n, s in zip(g.names, g.mapping.hf_shapes, strict=True)]
        total += safetensors_header(entries)[1]
        writer = StreamingSafetensorsWriter(out / file_name, entries)
        for group in shard:
            tensors = family.to_hf(group.mapping, reader.read(group.mapping.mcore_key, group.layer), cfg)
            for name, tensor in zip(group.names, tensors, strict=True):
                writer.write(name, tensor)
                weight_map[name] = file_name
        writer.close()
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index_json, indent=2) + "\n")


def export_hf(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = torch.bfloat16,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    model_cfg: ModelConfig | None = None,
    weights_path: str | Path | None = None,
    key_prefix: str = "",
    hf_assets: str | Path | None = None,
) -> Path:
    """Write the HF folder of the model checkpoint ``checkpoint_dir`` to ``out_dir``; returns ``out_dir``.

    ``dtype=None`` keeps the checkpoint's dtype. ``model_cfg``, ``weights_path``, ``key_prefix`` and ``hf_assets``
    override where config, weights and assets are found (used for ``.nemo`` archives); ``hf_assets`` defaults
    to the checkpoint's ``hf_assets/`` when present.
    """
    checkpoint_dir = Path(checkpoint_dir)
    cfg = model_cfg or read_model_config(checkpoint_dir)
    reader = CheckpointReader(weights_path or weights_dir(checkpoint_dir), prefix=key_prefix)
    check_checkpoint(reader, cfg)
    dtype = dtype or _checkpoint_dtype(reader, cfg)
    assets = Path(hf_assets) if hf_assets else checkpoint_dir / HF_ASSETS_DIR
    with atomic_output_dir(out_dir, overwrite) as staging:
        _write_weights(reader, cfg, staging, dtype, max_shard_bytes)
        _write_config(assets if assets.is_dir() else None, staging, cfg, dtype)
    return Path(out_dir)


def _checkpoint_dtype(reader: CheckpointReader, cfg: ModelConfig) -> torch.dtype:
    return reader.dtype(family_module(cfg).tensor_mappings(cfg)[0].mcore_key)
