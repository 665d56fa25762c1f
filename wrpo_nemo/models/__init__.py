"""Model layer: family configs, presets, Hugging Face configs, and megatron ``GPTModel`` construction."""

from wrpo_nemo.models.builder import build_gpt_model, select_layer_spec, use_transformer_engine
from wrpo_nemo.models.config import ModelConfig, RopeScaling
from wrpo_nemo.models.families import family_module, model_config_from_hf
from wrpo_nemo.models.presets import PRESETS, get_preset

__all__ = [
    "PRESETS",
    "ModelConfig",
    "RopeScaling",
    "build_gpt_model",
    "family_module",
    "get_preset",
    "model_config_from_hf",
    "select_layer_spec",
    "use_transformer_engine",
]
