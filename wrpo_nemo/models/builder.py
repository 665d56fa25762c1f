"""Build megatron-core's ``GPTModel`` from a :class:`ModelConfig`, with the layer spec chosen in one place.

What the machine has decides the implementation: TransformerEngine layers (fused BF16 kernels, FP8 on Hopper or
newer) when TransformerEngine imports and a GPU is present, megatron's local layers otherwise (every CPU machine).
Either way the core attention is segment-aware (:mod:`wrpo_nemo.models.attention`) and the model is called with
packed rows as one THD sequence plus :class:`~wrpo_nemo.models.attention.SegmentAttentionParams`: that format
and the layer spec are chosen together in :func:`select_layer_spec`.
Parallel sizes come from ``parallel_state``, which must be initialised first
(:func:`wrpo_nemo.training.parallel.initialize_parallel`).
"""

from __future__ import annotations

from typing import Literal

import torch

from wrpo_nemo import compat
from wrpo_nemo.models.attention import RotaryTable, local_core_attention, te_segment_attention_class
from wrpo_nemo.models.config import ModelConfig

Precision = Literal["auto", "bf16", "fp32"]
Recompute = Literal["none", "selective", "full"]
FP8_FORMATS = ("e4m3", "hybrid")
# FP8 tensor cores arrived with Ada (sm89) and Hopper (sm90); Ampere (A100, A800: sm80) has none.
_MIN_FP8_CAPABILITY = (8, 9)


def use_transformer_engine() -> bool:
    """The one decision between TransformerEngine layers and megatron's local layers (``compat.runtime()``)."""
    return compat.runtime().transformer_engine


def select_layer_spec(use_te: bool, rotary: RotaryTable):
    """megatron's layer spec for a Llama-style block (RMSNorm, SwiGLU, GQA), with our segment-aware core attention.

    The one place that pairs a backend with the batch format: both take packed rows as THD
    ``SegmentAttentionParams`` and rotate queries and keys to each token's own position (``rotary``), so the
    model is built with ``position_embedding_type="none"``. TransformerEngine: its fused linear/norm layers and
    its attention in THD format (cu_seqlens); elsewhere: megatron's local layers and per-span SDPA.
    """
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.spec_utils import ModuleSpec

    if use_te:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
        attention = te_segment_attention_class()
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
        attention = local_core_attention()
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=attention, params={"rotary": rotary}
    )
    return spec


def check_fp8(fp8: str | None, use_te: bool) -> None:
    """Raise a ``ValueError`` naming the ``fp8`` key when FP8 cannot run here."""
    if fp8 is None:
        return
    if fp8 not in FP8_FORMATS:
        raise ValueError(f"fp8={fp8!r} is not one of {FP8_FORMATS} (or null)")
    if not compat.runtime().cuda:
        raise ValueError("fp8 is set but there is no GPU: set fp8=null")
    if not use_te:
        raise ValueError("fp8 is set but TransformerEngine is not installed: set fp8=null or install it")
    capability = torch.cuda.get_device_capability()
    if capability < _MIN_FP8_CAPABILITY:
        raise ValueError(
            f"fp8={fp8!r} needs compute capability >= 8.9 (Ada/Hopper); this GPU has "
            f"{capability[0]}.{capability[1]} (e.g. A100/A800 have no FP8): set fp8=null"
        )


def params_dtype(precision: Precision) -> torch.dtype:
    """Parameter dtype: bf16 on a GPU (the optimizer keeps fp32 main copies), fp32 on a CPU."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision={precision!r} is not one of auto, bf16, fp32")
    if precision == "auto":
        return compat.runtime().default_dtype
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _recompute_kwargs(recompute: Recompute, recompute_num_layers: int | None) -> dict:
    if recompute == "none":
        return {}
    if recompute == "selective":
        return {"recompute_granularity": "selective"}
    if recompute == "full":
        return {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": recompute_num_layers or 1,
        }
    raise ValueError(f"recompute={recompute!r} is not one of none, selective, full")


def transformer_config(
    cfg: ModelConfig,
    *,
    precision: Precision = "auto",
    fp8: str | None = None,
    recompute: Recompute = "none",
    recompute_num_layers: int | None = None,
    use_te: bool | None = None,
):
    """megatron ``TransformerConfig`` for ``cfg`` at the current ``parallel_state`` layout."""
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    use_te = use_transformer_engine() if use_te is None else use_te
    check_fp8(fp8, use_te)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cfg.check_parallel_layout(tp, pp)
    dtype = params_dtype(precision)
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp8=fp8,
        use_cpu_initialization=compat.runtime().cpu_initialization,
        # Fused kernels exist only on the TransformerEngine path; the local path must run on a CPU. Rotary
        # embeddings are applied by the segment-aware attention (per-token positions), not megatron's rope.
        masked_softmax_fusion=False,
        bias_activation_fusion=use_te,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        **_recompute_kwargs(recompute, recompute_num_layers),
    )


def build_gpt_model(
    cfg: ModelConfig,
    *,
    precision: Precision = "auto",
    fp8: str | None = None,
    recompute: Recompute = "none",
    recompute_num_layers: int | None = None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    parallel_output: bool = True,
    use_te: bool | None = None,
):
    """megatron ``GPTModel`` for ``cfg`` on this rank (its pipeline stage, its TP shard), randomly initialised.

    ``pre_process``/``post_process`` default to whether this rank is the first/last pipeline stage.
    ``parallel_output=True`` keeps logits split over the vocabulary across TP ranks (the loss gathers them).
    ``use_te=None`` lets :func:`use_transformer_engine` decide.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    use_te = use_transformer_engine() if use_te is None else use_te
    config = transformer_config(
        cfg,
        precision=precision,
        fp8=fp8,
        recompute=recompute,
        recompute_num_layers=recompute_num_layers,
        use_te=use_te,
    )
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    # With tied embeddings split over pipeline stages, megatron moves the output weight with ``.cuda()``
    # before all-reducing it over the embedding group; redirected to the CPU there (compat, item 4).
    rotary = RotaryTable(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    with compat.redirect_cuda_to_cpu():
        model = GPTModel(
            config,
            transformer_layer_spec=select_layer_spec(use_te, rotary),
            vocab_size=cfg.padded_vocab_size(config.tensor_model_parallel_size),
            max_sequence_length=cfg.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=cfg.tie_word_embeddings,
            position_embedding_type="none",
        )
    return model
