"""Activation recomputation (the paper's gradient checkpointing) runs on a CPU and changes nothing numerically."""

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import free_port
from wrpo_nemo import compat
from wrpo_nemo.models.attention import causal_rows_params, packed_forward
from wrpo_nemo.models.presets import get_preset


@pytest.fixture
def single_process_megatron(monkeypatch):
    from megatron.core import parallel_state

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group(compat.default_backend(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    compat.prepare_runtime(seed=3)
    # As megatron's schedules run the model in the engine: recomputation reads the CUDA RNG accessors that
    # compat replaces on a CPU build, inside this context only.
    with compat.redirect_cuda_to_cpu():
        yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _loss_and_grads(recompute: str, state: dict | None):
    from wrpo_nemo.training.engine import build_model

    torch.manual_seed(0)
    model = build_model(get_preset("tiny"), recompute=recompute)
    if state is not None:
        model.load_state_dict(state)
    tokens = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(1))
    logits = packed_forward(model, tokens, causal_rows_params(2, 32))
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
    )
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, model.state_dict()


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_recomputation_gives_the_same_loss_and_gradients(single_process_megatron, recompute):
    loss, grads, state = _loss_and_grads("none", None)
    loss_rc, grads_rc, _ = _loss_and_grads(recompute, state)
    torch.testing.assert_close(loss_rc, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_rc[name], grad, rtol=1e-6, atol=1e-7, msg=name)
