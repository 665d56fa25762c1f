"""One WRPO training step through the model's own ``get_loss_and_metrics``, for the context-parallel tests.

The step is the real one: the reference log-probs from ``get_logprob_batch`` (as ``WRPOTrainer`` stores them,
one shard per context-parallel rank), then ``get_loss_and_metrics(batch, forward_only=False)``, which runs
megatron-core's own pipeline schedule (``forward_step`` multiplies the returned loss by the CP size and divides
it by the number of micro-batches, ``backward_step`` backpropagates it). Only the network is a stand-in:
:class:`TableGPT`, whose logits at a position are a learnable row of a table picked by the input token, so
its output at a token does not depend on which context-parallel rank holds the token.

The pytest process runs :func:`train_step` itself (CP = 1); each rank of a CP = 2 gloo group runs this file
as a script (``python cp_step.py RANK WORLD_SIZE INIT_FILE DATA_FILE OUT_FILE``) and saves its metrics and
gradient. It is not a test module (pytest collects ``test_*.py`` only).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

MICRO_BATCH_SIZE = 2
"""Prompts per micro-batch; the tests' global batch holds two micro-batches."""


class TableGPT(torch.nn.Module):
    """A one-stage stand-in for megatron's ``GPTModel``: ``logits[b, s] = table[input_ids[b, s]]``."""

    def __init__(self, table: torch.Tensor) -> None:
        from megatron.core import ModelParallelConfig
        from megatron.core.enums import ModelType

        super().__init__()
        self.table = torch.nn.Parameter(table.clone())
        self.config = ModelParallelConfig()  # what megatron's schedules read (timers, sync funcs, autocast)
        self.model_type = ModelType.encoder_or_decoder

    def set_input_tensor(self, input_tensor: Any) -> None:
        """Megatron hands the previous stage's output here; a single stage takes its input from the batch."""

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.table[input_ids]


def wrpo_model(micro_batch_size: int = MICRO_BATCH_SIZE, **dpo_keys: Any) -> Any:
    """A ``MegatronGPTWRPOModel`` object (no weights) whose ``model.dpo`` section is this test's, with overrides."""
    from omegaconf import OmegaConf

    from wrpo_nemo.integrations.nemo_aligner.config import WRPOLossConfig
    from wrpo_nemo.integrations.nemo_aligner.model import MegatronGPTWRPOModel

    dpo = {
        "ref_policy_kl_penalty": 0.5,
        "alpha": 0.1,
        "alpha_schedule": "constant",
        "log_prob_forward_micro_batch_size": micro_batch_size,
        **dpo_keys,
    }
    cfg = OmegaConf.create({"micro_batch_size": micro_batch_size, "dpo": dpo, "data": {}, "optim": {}})
    model = object.__new__(MegatronGPTWRPOModel)
    model.cfg = cfg
    model.wrpo = WRPOLossConfig.from_dpo_section(cfg.dpo)
    model.training_progress = None
    model.mcore_gpt = True
    model.autocast_dtype = torch.float32
    # Plain gradients: no distributed optimizer, so no asynchronous reduction hooks (the test reduces them).
    model.with_distributed_adam = False
    model.use_mcore_dist_optim = False
    return model


def train_step(
    batch: dict[str, torch.Tensor], policy: torch.Tensor, reference: torch.Tensor
) -> tuple[dict[str, float], torch.Tensor]:
    """The metrics of one training step on ``batch`` and the gradient it leaves on the policy's table.

    Megatron's parallel state must be initialised; the micro-batch calculator is set up here for one
    data-parallel rank and the global batch in ``batch``.
    """
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator,
        init_num_microbatches_calculator,
    )

    from wrpo_nemo import compat
    from wrpo_nemo.integrations.nemo_aligner.dataset import ROLES
    from wrpo_nemo.integrations.nemo_aligner.segments import split_roles

    prompts = batch[ROLES[0]].shape[0]
    init_num_microbatches_calculator(0, None, prompts, MICRO_BATCH_SIZE, 1)
    try:
        model = wrpo_model()
        model.set_training_progress(3, 10)
        batch = dict(batch)
        # megatron's schedules allocate a few tensors on "cuda": compat sends them to the CPU on this machine.
        with compat.redirect_cuda_to_cpu():
            model.model = [TableGPT(reference)]
            logprobs = model.get_logprob_batch(dict(batch))
            for role, part in zip(ROLES, split_roles(logprobs), strict=True):
                batch[f"ref_policy_log_probs_{role}"] = part
            model.model = [TableGPT(policy)]
            _, metrics = model.get_loss_and_metrics(batch, forward_only=False)
        return metrics, model.model[0].table.grad.detach().clone()
    finally:
        destroy_num_microbatches_calculator()


def main(argv: list[str]) -> None:
    """One rank of a context-parallel gloo group (TP = PP = DP = 1, CP = world size) runs :func:`train_step`."""
    from datetime import timedelta

    import torch.distributed as dist
    from megatron.core import parallel_state

    rank, world_size, init_file, data_file, out_file = argv
    torch.set_num_threads(1)
    # A bounded wait: a rank that failed must not leave the other one waiting for half an hour.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        timeout=timedelta(minutes=5),
        rank=int(rank),
        world_size=int(world_size),
    )
    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=int(world_size))
    data = torch.load(data_file)
    metrics, grad = train_step(data["batch"], data["policy"], data["reference"])
    torch.save({"metrics": metrics, "grad": grad}, out_file)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
