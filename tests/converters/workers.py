"""Bodies of the multi-process tests (module-level so spawned processes can import them)."""

from __future__ import annotations

from functools import partial

import torch

from tests.converters.tiny_models import megatron_logits
from wrpo_nemo import compat
from wrpo_nemo.checkpoint.model import (
    HF_ASSETS_DIR,
    load_model_checkpoint,
    read_model_config,
    save_model_checkpoint,
)
from wrpo_nemo.models import build_gpt_model
from wrpo_nemo.models.attention import causal_rows_params, packed_forward
from wrpo_nemo.training.parallel import destroy_parallel, initialize_parallel


def _load(checkpoint):
    model = build_gpt_model(read_model_config(checkpoint)).eval()
    load_model_checkpoint(model, checkpoint)
    return model


def tp2_logits_equal(rank, world_size, checkpoint, tokens, expected, resaved):
    """Load at TP=2, check the logits, then save again from the TP=2 shards into ``resaved``."""
    initialize_parallel(tensor_parallel_size=2, seed=1)
    try:
        model = _load(checkpoint)
        torch.testing.assert_close(megatron_logits(model, tokens), expected, atol=1e-5, rtol=1e-5)
        save_model_checkpoint(
            model, resaved, read_model_config(checkpoint), hf_assets=checkpoint / HF_ASSETS_DIR
        )
    finally:
        destroy_parallel()


def _keep_logits(output):
    return torch.zeros(()), {"logits": output.detach().clone()}


def _forward_step(batch, data_iterator, model):
    tokens = next(data_iterator)
    return packed_forward(model, tokens, causal_rows_params(*tokens.shape)), _keep_logits


def pp2_logits_equal(rank, world_size, checkpoint, tokens, expected, resaved):
    """Run megatron's real pipeline schedule (forward only) over two stages; the last stage checks the logits."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    initialize_parallel(pipeline_parallel_size=2, seed=1)
    try:
        model = _load(checkpoint)
        model.config.batch_p2p_comm = False  # plain isend/irecv: no CUDA synchronisation (STACK.md item 4)
        with torch.no_grad(), compat.redirect_cuda_to_cpu():
            out = get_forward_backward_func()(
                forward_step_func=partial(_forward_step, None),
                data_iterator=iter([tokens]),
                model=[model],
                num_microbatches=1,
                seq_length=tokens.numel(),  # one THD sequence of every row's tokens
                micro_batch_size=1,
                forward_only=True,
            )
        if parallel_state.is_pipeline_last_stage():
            logits = out[0]["logits"][..., : expected.shape[-1]]
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        save_model_checkpoint(
            model, resaved, read_model_config(checkpoint), hf_assets=checkpoint / HF_ASSETS_DIR
        )
    finally:
        destroy_parallel()
