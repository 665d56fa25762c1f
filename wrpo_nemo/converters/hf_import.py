"""Hugging Face folder -> model checkpoint (:mod:`wrpo_nemo.checkpoint.model`), streamed.

Every input is checked before anything is written (architecture, every tensor present with the shape the
config implies); the output appears only when complete. Each megatron tensor is built for one layer at a time
from the few Hugging Face tensors it needs, so peak memory is about one layer (or the embedding).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from wrpo_nemo.checkpoint.atomic import atomic_output_dir
from wrpo_nemo.checkpoint.model import (
    HF_ASSETS_DIR,
    copy_hf_assets,
    is_model_checkpoint,
    load_model_checkpoint,
    weights_dir,
    write_model_config,
)
from wrpo_nemo.converters.dcp_stream import Chunk, StreamedTensor, write_checkpoint
from wrpo_nemo.converters.safetensors_io import HFWeights
from wrpo_nemo.errors import InputError
from wrpo_nemo.models.config import ModelConfig
from wrpo_nemo.models.families import family_module, model_config_from_hf


def check_hf_weights(weights: HFWeights, cfg: ModelConfig) -> None:
    """Raise :class:`InputError` naming the first HF tensor that is missing or has the wrong shape for ``cfg``."""
    for mapping in family_module(cfg).tensor_mappings(cfg):
        layers = range(cfg.num_layers) if mapping.per_layer else [None]
        for layer in layers:
            for name, shape in zip(mapping.hf_names(layer), mapping.hf_shapes, strict=True):
                if name not in weights:
                    raise InputError(weights.hf_dir, f"tensor {name} is missing")
                if weights.shape(name) != shape:
                    raise InputError(
                        weights.hf_dir,
                        f"tensor {name} has shape {weights.shape(name)}, but config.json implies {shape}",
                    )


def _producer(mapping, weights: HFWeights, cfg: ModelConfig, layer: int | None) -> Callable[[], torch.Tensor]:
    family = family_module(cfg)

    def produce() -> torch.Tensor:
        tensor = family.to_mcore(mapping, [weights.read(n) for n in mapping.hf_names(layer)], cfg)
        return tensor if layer is None else tensor.unsqueeze(0)

    return produce


def streamed_tensors(weights: HFWeights, cfg: ModelConfig, dtype: torch.dtype) -> list[StreamedTensor]:
    """The checkpoint tensors of ``cfg``, one chunk per layer, produced from ``weights`` on demand."""
    tensors = []
    for mapping in family_module(cfg).tensor_mappings(cfg):
        shape = mapping.mcore_shape
        if mapping.per_layer:
            chunks = [
                Chunk((layer,) + (0,) * len(shape), (1, *shape), _producer(mapping, weights, cfg, layer))
                for layer in range(cfg.num_layers)
            ]
            shape = (cfg.num_layers, *shape)
        else:
            chunks = [Chunk((0,) * len(shape), shape, _producer(mapping, weights, cfg, None))]
        tensors.append(StreamedTensor(mapping.mcore_key, shape, dtype, chunks))
    return tensors


def import_hf(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    make_vocab_size_divisible_by: int | None = None,
) -> ModelConfig:
    """Convert the HF folder ``hf_dir`` into a model checkpoint at ``out_dir``; returns its config.

    ``dtype`` defaults to the dtype of the HF embedding. The checkpoint loads at any TP/PP
    (:func:`load_model_checkpoint`); tokenizer, config and generation config are kept under ``hf_assets/``.
    """
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"Hugging Face folder {hf_dir} does not exist")
    cfg = model_config_from_hf(hf_dir)
    if make_vocab_size_divisible_by is not None:
        cfg = ModelConfig.from_dict(
            {**cfg.to_dict(), "make_vocab_size_divisible_by": make_vocab_size_divisible_by}
        )
    weights = HFWeights(hf_dir)
    check_hf_weights(weights, cfg)
    dtype = dtype or weights.dtype("model.embed_tokens.weight")
    with atomic_output_dir(out_dir, overwrite) as staging:
        write_checkpoint(weights_dir(staging), streamed_tensors(weights, cfg, dtype))
        write_model_config(staging, cfg)
        copy_hf_assets(hf_dir, staging / HF_ASSETS_DIR)
    return cfg


def load_hf_weights(model, hf_dir: str | Path, cache_dir: str | Path) -> None:
    """Load an HF folder into a built (possibly TP/PP-sharded) ``GPTModel``; collective over all ranks.

    Rank 0 imports ``hf_dir`` into ``cache_dir`` (reused when already complete; it must be visible to every
    rank), then every rank loads its shard through megatron's resharding loader.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not is_model_checkpoint(cache_dir):
        import_hf(hf_dir, cache_dir, overwrite=True)
    if dist.is_initialized():
        dist.barrier()
    load_model_checkpoint(model, cache_dir)
