"""NeMo's ``.nemo`` archive: write one from a model checkpoint, and read one (ours or NeMo's) back.

A ``.nemo`` file is a tar holding ``model_config.yaml`` (the fields NeMo's ``MegatronGPTModel`` reads for an
mcore GPT) and ``model_weights/``, a megatron dist checkpoint whose keys carry NeMo's ``model.`` prefix
(``model.decoder.layers.self_attention.linear_qkv.weight``, ...). This project also stores, under the
``wrpo_nemo`` key of the YAML, the fields NeMo keeps elsewhere (true vocabulary size from the tokenizer,
family, all four Llama-3.1 rope-scaling parameters) and the HF assets under ``hf_assets/``, so its own archives
round-trip exactly. A NeMo-made archive without them is read with the vocabulary taken from the embedding
rows (NeMo's padded size) and family ``llama``.
"""

from __future__ import annotations

import gzip
import shutil
import tarfile
import tempfile
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from wrpo_nemo.checkpoint.atomic import atomic_output_dir, check_output, replace_path
from wrpo_nemo.checkpoint.model import (
    HF_ASSETS_DIR,
    read_model_config,
    weights_dir,
    write_model_config,
)
from wrpo_nemo.converters.dcp_stream import CheckpointReader, Chunk, StreamedTensor, write_checkpoint
from wrpo_nemo.converters.hf_export import export_hf
from wrpo_nemo.errors import InputError, first_line
from wrpo_nemo.models.config import ModelConfig, RopeScaling

NEMO_PREFIX = "model."
CONFIG_YAML = "model_config.yaml"
WEIGHTS = "model_weights"


def nemo_model_config(cfg: ModelConfig) -> dict[str, Any]:
    """NeMo's ``model_config.yaml`` for an mcore Llama-style GPT."""
    return {
        "mcore_gpt": True,
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.num_query_groups,
        "kv_channels": cfg.head_dim,
        "encoder_seq_length": cfg.max_position_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "normalization": "rmsnorm",
        "layernorm_epsilon": cfg.norm_eps,
        "activation": "fast-swiglu",
        "bias": False,
        "qkv_bias": cfg.qkv_bias,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "position_embedding_type": "rope",
        "rotary_base": cfg.rope_theta,
        "rotary_percentage": 1.0,
        "seq_len_interpolation_factor": None,
        "scale_positional_embedding": cfg.rope_scaling is not None,
        "share_embeddings_and_output_weights": cfg.tie_word_embeddings,
        "make_vocab_size_divisible_by": cfg.make_vocab_size_divisible_by,
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        "precision": "bf16",
        "dist_ckpt_format": "torch_dist",
        "tokenizer": {"library": "huggingface", "type": cfg.hf_extra.get("_name_or_path", HF_ASSETS_DIR)},
        "wrpo_nemo": cfg.to_dict(),
    }


def model_config_from_nemo(nemo_cfg: dict[str, Any], embedding_rows: int) -> ModelConfig:
    """The :class:`ModelConfig` of a ``model_config.yaml`` (``embedding_rows``: vocabulary fallback)."""
    if "wrpo_nemo" in nemo_cfg:
        return ModelConfig.from_dict(nemo_cfg["wrpo_nemo"])
    if not nemo_cfg.get("mcore_gpt") or nemo_cfg.get("activation") not in ("fast-swiglu", "swiglu"):
        raise ValueError("model_config.yaml: only mcore GPT models with SwiGLU are supported")
    heads = int(nemo_cfg["num_attention_heads"])
    return ModelConfig(
        family="llama",
        vocab_size=embedding_rows,
        hidden_size=int(nemo_cfg["hidden_size"]),
        num_layers=int(nemo_cfg["num_layers"]),
        num_attention_heads=heads,
        num_query_groups=int(nemo_cfg.get("num_query_groups") or heads),
        ffn_hidden_size=int(nemo_cfg["ffn_hidden_size"]),
        kv_channels=nemo_cfg.get("kv_channels"),
        norm_eps=float(nemo_cfg.get("layernorm_epsilon", 1e-5)),
        rope_theta=float(nemo_cfg.get("rotary_base", 10000.0)),
        rope_scaling=RopeScaling() if nemo_cfg.get("scale_positional_embedding") else None,
        tie_word_embeddings=bool(nemo_cfg.get("share_embeddings_and_output_weights", False)),
        max_position_embeddings=int(nemo_cfg.get("max_position_embeddings", 4096)),
        make_vocab_size_divisible_by=int(nemo_cfg.get("make_vocab_size_divisible_by", 128)),
        qkv_bias=bool(nemo_cfg.get("qkv_bias", False)),
    )


def _copy_weights(src: Path, src_prefix: str, dst: Path, dst_prefix: str) -> None:
    """Stream every tensor of one dist checkpoint into another, renaming the key prefix."""
    reader = CheckpointReader(src)
    tensors = []
    for full_key in reader.tensor_keys():
        if not full_key.startswith(src_prefix):
            continue
        shape, key = reader.shape(full_key), full_key.removeprefix(src_prefix)
        if key.startswith("decoder.layers."):  # one chunk per layer keeps memory at one layer
            chunks = [
                Chunk((i,) + (0,) * (len(shape) - 1), (1, *shape[1:]), _layer_reader(reader, full_key, i))
                for i in range(shape[0])
            ]
        else:
            chunks = [Chunk((0,) * len(shape), shape, _layer_reader(reader, full_key, None))]
        tensors.append(StreamedTensor(dst_prefix + key, shape, reader.dtype(full_key), chunks))
    write_checkpoint(dst, tensors)


def _layer_reader(reader: CheckpointReader, key: str, layer: int | None):
    def produce():
        tensor = reader.read(key, layer)
        return tensor if layer is None else tensor.unsqueeze(0)

    return produce


def write_nemo(checkpoint_dir: str | Path, nemo_path: str | Path, *, overwrite: bool = False) -> Path:
    """Pack the model checkpoint ``checkpoint_dir`` into the ``.nemo`` archive ``nemo_path``."""
    checkpoint_dir, nemo_path = Path(checkpoint_dir), check_output(nemo_path, overwrite)
    cfg = read_model_config(checkpoint_dir)
    with tempfile.TemporaryDirectory(dir=nemo_path.parent, prefix=".nemo-build-") as tmp:
        _copy_weights(weights_dir(checkpoint_dir), "", Path(tmp) / WEIGHTS, NEMO_PREFIX)
        (Path(tmp) / CONFIG_YAML).write_text(yaml.safe_dump(nemo_model_config(cfg), sort_keys=False))
        staging = nemo_path.with_name(f".{nemo_path.name}.partial-{uuid.uuid4().hex[:8]}")
        try:
            with tarfile.open(staging, "w:") as tar:
                tar.add(Path(tmp) / CONFIG_YAML, arcname=f"./{CONFIG_YAML}")
                tar.add(Path(tmp) / WEIGHTS, arcname=f"./{WEIGHTS}")
                if (checkpoint_dir / HF_ASSETS_DIR).is_dir():
                    tar.add(checkpoint_dir / HF_ASSETS_DIR, arcname=f"./{HF_ASSETS_DIR}")
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
        replace_path(staging, nemo_path)
    return nemo_path


@contextmanager
def _naming_members(nemo_path: Path, into: Path) -> Iterator[None]:
    """An :class:`InputError` about a file extracted into ``into`` names the archive and its member instead."""
    try:
        yield
    except InputError as exc:
        if not Path(exc.path).is_relative_to(into):
            raise
        member = Path(exc.path).relative_to(into)
        where = "" if member == Path(".") else f"member {member}: "
        raise InputError(nemo_path, where + exc.problem) from exc


def _extract(nemo_path: Path, into: Path) -> tuple[ModelConfig, Path]:
    if not nemo_path.is_file():
        raise FileNotFoundError(f".nemo archive {nemo_path} does not exist")
    try:
        tar = tarfile.open(nemo_path, "r:*")  # noqa: SIM115 - closed by the with below
    except tarfile.TarError as exc:
        raise InputError(nemo_path, "not a .nemo archive: not a tar file (plain or compressed)") from exc
    try:
        with tar:
            tar.extractall(into, filter="data")
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(nemo_path, f"damaged .nemo archive, truncated? ({first_line(exc)})") from exc
    if not (into / CONFIG_YAML).is_file() or not (into / WEIGHTS).is_dir():
        raise InputError(nemo_path, f"not a .nemo archive: {CONFIG_YAML} or {WEIGHTS}/ is missing")
    try:
        nemo_cfg = yaml.safe_load((into / CONFIG_YAML).read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(nemo_path, f"member {CONFIG_YAML}: not valid YAML ({first_line(exc)})") from exc
    if not isinstance(nemo_cfg, dict):
        raise InputError(
            nemo_path, f"member {CONFIG_YAML}: expected a mapping, got {type(nemo_cfg).__name__}"
        )
    with _naming_members(nemo_path, into):
        reader = CheckpointReader(into / WEIGHTS, prefix=NEMO_PREFIX)
        rows = reader.shape("embedding.word_embeddings.weight")[0]
    try:
        return model_config_from_nemo(nemo_cfg, rows), into / WEIGHTS
    except (KeyError, TypeError, ValueError) as exc:
        problem = f"{exc.args[0]} is missing" if isinstance(exc, KeyError) else str(exc)
        raise InputError(
            nemo_path, f"member {CONFIG_YAML}: {problem.removeprefix(CONFIG_YAML + ': ')}"
        ) from exc


def read_nemo(nemo_path: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> ModelConfig:
    """Unpack a ``.nemo`` archive into a model checkpoint at ``out_dir``; returns its config."""
    nemo_path = Path(nemo_path)
    check_output(out_dir, overwrite)
    with tempfile.TemporaryDirectory(prefix=".nemo-read-", dir=Path(out_dir).parent) as tmp:
        cfg, weights = _extract(nemo_path, Path(tmp))
        with atomic_output_dir(out_dir, overwrite) as staging, _naming_members(nemo_path, Path(tmp)):
            _copy_weights(weights, NEMO_PREFIX, weights_dir(staging), "")
            write_model_config(staging, cfg)
            if (Path(tmp) / HF_ASSETS_DIR).is_dir():
                shutil.copytree(Path(tmp) / HF_ASSETS_DIR, staging / HF_ASSETS_DIR)
    return cfg


def nemo_to_hf(nemo_path: str | Path, out_dir: str | Path, **export_kwargs: Any) -> Path:
    """Export a ``.nemo`` archive straight to an HF folder (keyword arguments as :func:`export_hf`)."""
    nemo_path, out_dir = Path(nemo_path), Path(out_dir)
    check_output(out_dir, export_kwargs.get("overwrite", False))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".nemo-read-", dir=out_dir.parent) as tmp:
        cfg, weights = _extract(nemo_path, Path(tmp))
        # ``tmp/hf_assets`` (our archives) is where export_hf looks for assets by default.
        with _naming_members(nemo_path, Path(tmp)):
            return export_hf(
                tmp, out_dir, model_cfg=cfg, weights_path=weights, key_prefix=NEMO_PREFIX, **export_kwargs
            )
