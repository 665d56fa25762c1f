"""Converters: HF safetensors <-> model checkpoint (megatron dist checkpoint, any TP/PP) <-> ``.nemo``."""

from wrpo_nemo.checkpoint.model import (
    load_model_checkpoint,
    model_config_from_source,
    read_model_config,
    save_model_checkpoint,
)
from wrpo_nemo.converters.hf_export import export_hf
from wrpo_nemo.converters.hf_import import import_hf, load_hf_weights
from wrpo_nemo.converters.nemo import nemo_to_hf, read_nemo, write_nemo

__all__ = [
    "export_hf",
    "import_hf",
    "load_hf_weights",
    "load_model_checkpoint",
    "model_config_from_source",
    "nemo_to_hf",
    "read_model_config",
    "read_nemo",
    "save_model_checkpoint",
    "write_nemo",
]
