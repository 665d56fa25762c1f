"""WRPO and DPO-family preference training on megatron-core."""

__version__ = "0.1.0"
