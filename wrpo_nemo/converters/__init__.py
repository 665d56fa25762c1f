"""Converters: HF safetensors <-> model checkpoint (megatron dist checkpoint, any TP/PP) <-> ``.nemo``."""
