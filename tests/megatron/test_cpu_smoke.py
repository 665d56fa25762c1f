"""megatron-core runs on a CPU machine through wrpo_nemo.compat: a tiny GPTModel's gradients are its loss's
derivatives, it fits a fixed batch, and a packed row equals its sequences run alone."""

import math
import os

import pytest
import torch
import torch.distributed as dist

from wrpo_nemo import compat


def attention_mask_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """megatron's convention (True = masked out): causal within each segment id, [rows, 1, seq, seq]."""
    seq = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return ~(same & torch.ones(seq, seq, dtype=torch.bool).tril()).unsqueeze(1)


@pytest.fixture
def single_process_megatron():
    from megatron.core import parallel_state

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group(compat.default_backend(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    compat.prepare_runtime(seed=1234)
    # Raw megatron (its own rotary embedding asks torch.cuda.current_device()): all of it is megatron code.
    with compat.redirect_cuda_to_cpu():
        yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _tiny_gpt():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=64,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
    )
    return GPTModel(
        config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=64,
        max_sequence_length=16,
        position_embedding_type="rope",
    )


def test_tiny_gpt_backward_is_the_derivative_of_its_loss_and_a_few_steps_fit_a_fixed_batch(
    single_process_megatron,
):
    """Forward, backward and parameter updates of megatron-core on a CPU, each against something it must equal."""
    model = _tiny_gpt()
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    segments = torch.tensor([[0] * 10 + [1] * 6, [2] * 16])
    positions = torch.cat([torch.arange(10), torch.arange(6)]).expand(2, 16).clone()
    positions[1] = torch.arange(16)
    mask = attention_mask_from_segments(segments)
    targets = tokens[:, 1:].reshape(-1)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_fn() -> torch.Tensor:
        logits = model(tokens, positions, mask)
        assert logits.shape == (2, 16, 64)
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), targets)

    loss = loss_fn()
    # Initialised with std 0.02, the logits are nearly equal: the loss is that of a uniform guess, ln(64).
    assert loss.item() == pytest.approx(math.log(64), abs=0.1)
    loss.backward()
    assert all(p.grad is not None for p in params)
    # The gradient is the derivative: along its own direction the loss changes at the rate |g| (central
    # differences, whose error is third order in the step).
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)).item()
    assert norm > 0.1
    step = 1e-2 / norm
    with torch.no_grad():
        for p in params:
            p.add_(p.grad, alpha=step)
        up = loss_fn().item()
        for p in params:
            p.add_(p.grad, alpha=-2 * step)
        down = loss_fn().item()
        for p in params:
            p.add_(p.grad, alpha=step)
    assert (up - down) / (2 * step * norm) == pytest.approx(norm, rel=1e-2)
    # Adam on the same batch drives the loss far below its starting value.
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for _ in range(25):
        optimizer.zero_grad()
        final = loss_fn()
        final.backward()
        optimizer.step()
    assert final.item() < 0.5 * loss.item()


def test_packed_row_matches_separate_sequences(single_process_megatron):
    """A block-diagonal mask with restarting positions reproduces each sequence's own logits."""
    model = _tiny_gpt().eval()
    a, b = torch.randint(0, 64, (1, 9)), torch.randint(0, 64, (1, 7))
    packed = torch.cat([a, b], dim=1)
    seg = torch.tensor([[0] * 9 + [1] * 7])
    pos = torch.cat([torch.arange(9), torch.arange(7)]).unsqueeze(0)
    with torch.no_grad():
        out = model(packed, pos, attention_mask_from_segments(seg))
        out_a = model(
            a, torch.arange(9)[None], attention_mask_from_segments(torch.zeros(1, 9, dtype=torch.long))
        )
        out_b = model(
            b, torch.arange(7)[None], attention_mask_from_segments(torch.zeros(1, 7, dtype=torch.long))
        )
    torch.testing.assert_close(out[:, :9], out_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 9:], out_b, atol=1e-5, rtol=1e-5)


def test_an_unsupported_megatron_core_is_refused_with_what_to_install(monkeypatch):
    monkeypatch.delenv("WRPO_UNSUPPORTED_MEGATRON", raising=False)
    assert compat.check_megatron() == "0.16.1"
    with pytest.raises(
        RuntimeError, match=r"megatron-core 0\.18\.0 is not supported.*megatron-core==0\.16\.1"
    ):
        compat.check_megatron("0.18.0")
    with pytest.raises(RuntimeError, match=r"megatron-core 0\.13\.1 is not supported"):
        compat.check_megatron("0.13.1")
    monkeypatch.setenv("WRPO_UNSUPPORTED_MEGATRON", "1")
    with pytest.warns(UserWarning, match="0.18.0 is not supported"):
        compat.check_megatron("0.18.0")


def test_a_megatron_core_without_a_patched_private_function_is_refused(monkeypatch):
    """A rename in megatron-core must not turn compat's CPU patch into a silent no-op."""
    from megatron.core.tensor_parallel import random as mcore_random

    monkeypatch.delattr(mcore_random, "_set_cuda_rng_state")
    with pytest.raises(
        RuntimeError, match=r"no megatron\.core\.tensor_parallel\.random\._set_cuda_rng_state"
    ):
        compat.check_megatron()
