"""The Llama family (Llama 2/3/3.1, Mistral, Qwen2): its Hugging Face config and its weight layout in megatron.

Hugging Face keeps q, k, v and gate, up as separate matrices; megatron fuses them:

- ``linear_qkv`` rows are grouped per query group: for each of the ``num_query_groups`` groups,
  ``[q rows of its heads (heads_per_group * head_dim); k (head_dim); v (head_dim)]``. Slicing rows evenly then
  hands every tensor-parallel rank whole groups. Qwen2's q/k/v biases are fused the same way.
- ``linear_fc1`` is ``cat[gate_proj, up_proj]`` (megatron's SwiGLU takes the first half as the gate).
- The embedding (and the untied output layer) is padded with zero rows to ``padded_vocab_size()``; export drops
  them again.

Keys are megatron's *sharded* (checkpoint) keys, which are the same for the local and the TransformerEngine
layer specs and for every TP/PP layout; per-layer tensors carry a leading layer axis in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from wrpo_nemo.models.config import ModelConfig, RopeScaling

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_KEPT_HF_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from either transformers 5's ``rope_parameters`` or the older ``rope_theta``/``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"config.json: rope_type={rope_type!r} is not supported (only default and llama3)")
    return theta, RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face Llama/Mistral/Qwen2 ``config.json`` dict."""
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        raise ValueError(f"config.json: model_type={family!r} is not one of {sorted(ARCHITECTURES)}")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"config.json: {flag}=true is not supported for {family}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported (only silu)")
    theta, scaling = _rope_from_hf(hf)
    heads = int(hf["num_attention_heads"])
    sliding = hf.get("sliding_window") if family == "mistral" or hf.get("use_sliding_window") else None
    return ModelConfig(
        family=family,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        ffn_hidden_size=int(hf["intermediate_size"]),
        kv_channels=hf.get("head_dim"),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        qkv_bias=family == "qwen2",
        sliding_window=sliding,
        hf_extra={k: hf[k] for k in _KEPT_HF_FIELDS if hf.get(k) is not None},
    )


def hf_config_from_model_config(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """A ``config.json`` dict for ``cfg`` (legacy rope fields: read by transformers 4 and 5 and by vLLM)."""
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **cfg.hf_extra,
    }
    if cfg.rope_scaling is not None:
        hf["rope_scaling"] = {"rope_type": "llama3", **vars(cfg.rope_scaling)}
    if cfg.family == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    return hf


@dataclass(frozen=True)
class TensorMapping:
    """One megatron checkpoint tensor and the Hugging Face tensors it is made of."""

    mcore_key: str
    """Megatron sharded key, e.g. ``decoder.layers.self_attention.linear_qkv.weight``."""
    mcore_shape: tuple[int, ...]
    """Unsharded shape (per layer for per-layer tensors; vocab rows padded for TP=1)."""
    hf_keys: tuple[str, ...]
    """Hugging Face names; ``{layer}`` stands for the layer index in per-layer tensors."""
    hf_shapes: tuple[tuple[int, ...], ...]
    """The shape each Hugging Face tensor must have, in ``hf_keys`` order."""
    kind: str
    """How the tensors combine: ``copy``, ``qkv``, ``fc1`` or ``vocab`` (row padding)."""
    per_layer: bool
    """Whether the tensor exists once per transformer layer."""

    def hf_names(self, layer: int | None = None) -> list[str]:
        """The Hugging Face names for ``layer`` (ignored for global tensors)."""
        return [k.format(layer=layer) for k in self.hf_keys]


def tensor_mappings(cfg: ModelConfig) -> list[TensorMapping]:
    """Every tensor of the megatron checkpoint of ``cfg``, in model order."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    vocab, v = (cfg.padded_vocab_size(1), h), (cfg.vocab_size, h)
    att, mlp, layer = "model.layers.{layer}.self_attn.", "model.layers.{layer}.mlp.", "model.layers.{layer}."
    qkv_names = [att + "q_proj.", att + "k_proj.", att + "v_proj."]
    # (megatron key, per-layer shape, HF names, HF shapes, kind, per layer)
    table = [
        ("embedding.word_embeddings.weight", vocab, ["model.embed_tokens.weight"], [v], "vocab", False),
        ("decoder.layers.self_attention.linear_qkv.layer_norm_weight", (h,),
         [layer + "input_layernorm.weight"], [(h,)], "copy", True),
        ("decoder.layers.self_attention.linear_qkv.weight", (q + 2 * kv, h),
         [n + "weight" for n in qkv_names], [(q, h), (kv, h), (kv, h)], "qkv", True),
        ("decoder.layers.self_attention.linear_qkv.bias", (q + 2 * kv,),
         [n + "bias" for n in qkv_names], [(q,), (kv,), (kv,)], "qkv", True),
        ("decoder.layers.self_attention.linear_proj.weight", (h, q), [att + "o_proj.weight"], [(h, q)], "copy", True),
        ("decoder.layers.mlp.linear_fc1.layer_norm_weight", (h,),
         [layer + "post_attention_layernorm.weight"], [(h,)], "copy", True),
        ("decoder.layers.mlp.linear_fc1.weight", (2 * f, h),
         [mlp + "gate_proj.weight", mlp + "up_proj.weight"], [(f, h), (f, h)], "fc1", True),
        ("decoder.layers.mlp.linear_fc2.weight", (h, f), [mlp + "down_proj.weight"], [(h, f)], "copy", True),
        ("decoder.final_layernorm.weight", (h,), ["model.norm.weight"], [(h,)], "copy", False),
        ("output_layer.weight", vocab, ["lm_head.weight"], [v], "vocab", False),
    ]  # fmt: skip
    absent = {
        "decoder.layers.self_attention.linear_qkv.bias": not cfg.qkv_bias,
        "output_layer.weight": cfg.tie_word_embeddings,
    }
    return [
        TensorMapping(key, shape, tuple(names), tuple(shapes), kind, per_layer)
        for key, shape, names, shapes, kind, per_layer in table
        if not absent.get(key, False)
    ]


def to_mcore(mapping: TensorMapping, tensors: Sequence[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Combine the Hugging Face ``tensors`` of ``mapping`` into megatron's (unsharded) layout."""
    if mapping.kind == "qkv":
        q, k, v = tensors
        groups, rest = cfg.num_query_groups, q.shape[1:]
        fused = torch.cat(
            [q.reshape(groups, -1, *rest), k.reshape(groups, -1, *rest), v.reshape(groups, -1, *rest)], dim=1
        )
        return fused.reshape(-1, *rest)
    if mapping.kind == "fc1":
        return torch.cat(list(tensors), dim=0)
    (tensor,) = tensors
    if mapping.kind == "vocab":
        padding = mapping.mcore_shape[0] - tensor.shape[0]
        return torch.cat([tensor, tensor.new_zeros(padding, *tensor.shape[1:])]) if padding else tensor
    return tensor


def to_hf(mapping: TensorMapping, tensor: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """Split a megatron tensor back into the Hugging Face tensors of ``mapping`` (inverse of :func:`to_mcore`)."""
    if mapping.kind == "qkv":
        groups, d, rest = cfg.num_query_groups, cfg.head_dim, tensor.shape[1:]
        per_group = tensor.reshape(groups, -1, *rest)
        q_rows = per_group.shape[1] - 2 * d
        q, k, v = torch.split(per_group, [q_rows, d, d], dim=1)
        return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]
    if mapping.kind == "fc1":
        return [t.contiguous() for t in torch.chunk(tensor, 2, dim=0)]
    if mapping.kind == "vocab":
        return [tensor[: cfg.vocab_size].contiguous()]
    return [tensor.contiguous()]
