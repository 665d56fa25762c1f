"""The GPU path: a bf16 WRPO step with megatron's local layer spec on CUDA, and bf16 log-probs against fp64.

Run by ``scripts/gpu_check.sh`` on a machine with one GPU and no TransformerEngine; skipped without CUDA
(tests/conftest.py). The bodies are device-agnostic
(they also run on a CPU when called directly).
"""

import dataclasses
import importlib.util
import math
from functools import partial
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "bench_wrpo_step", ROOT / "scripts" / "gpu" / "bench_wrpo_step.py"
)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.fixture
def device():
    from wrpo_nemo.training.parallel import destroy_parallel, initialize_parallel

    yield initialize_parallel(1, 1, seed=0)
    destroy_parallel()


def with_own_reference(model, batches, vocab_size, device):
    """The batches with reference log-probs from ``model`` itself (forward only, the trainer's reference pass)."""
    from wrpo_nemo.training.engine import run_schedule
    from wrpo_nemo.training.step import make_forward_step, reference_loss_func

    step = make_forward_step(lambda b: partial(reference_loss_func, b, vocab_size), device)
    outputs = run_schedule(model, step, [b.to(device) for b in batches], forward_only=True)
    return [
        dataclasses.replace(b, reference_logps=out["reference_logps"].float().cpu())
        for b, out in zip(batches, outputs, strict=True)
    ]


def test_bf16_wrpo_step_starts_at_log_2_against_its_own_reference_and_lowers_the_loss(device):
    from wrpo_nemo.training.engine import OptimSettings, build_model, build_optimizer, train_step, wrap_ddp
    from wrpo_nemo.training.step import WrpoLossSettings, make_forward_step, wrpo_loss_func

    cfg = bench.llama3_8b_shaped(2, hidden=256, heads=8, groups=4, ffn=512, vocab=1000)
    model = build_model(cfg, precision="bf16").to(device)
    assert all(p.device.type == device.type for p in model.parameters())
    # Matrices in bf16; without apex megatron's local spec keeps its torch RMSNorm weights in fp32.
    assert {p.dtype for p in model.parameters() if p.dim() > 1} == {torch.bfloat16}
    shape = dict(rows=2, seq_length=256, prompt_len=24, response_len=40, vocab_size=cfg.vocab_size)
    batches = [bench.synthetic_wrpo_batch(seed=i, **shape) for i in range(2)]
    batches = with_own_reference(model, batches, cfg.vocab_size, device)
    ddp = wrap_ddp(model)
    optimizer, scheduler = build_optimizer(ddp, OptimSettings(lr=1e-3, warmup_ratio=0.0), total_steps=6)
    settings = WrpoLossSettings(beta=0.1)
    step = make_forward_step(lambda b: (lambda out, b=b: wrpo_loss_func(b, 0.05, settings, cfg.vocab_size, out)),
                             device)  # fmt: skip
    history = [train_step(ddp, optimizer, scheduler, step, batches) for _ in range(5)]
    losses = [m["loss"] for m in history]
    # Policy == reference before the first update: every implicit reward is 0 and the loss is -log sigmoid(0).
    assert losses[0] == pytest.approx(math.log(2), abs=5e-3)
    assert all(
        math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 for m in history
    )
    assert losses[-1] < losses[0] - 0.05, losses
    assert history[-1]["rewards/margins"] > 0
    # The matrices stay bf16 (updated from the optimizer's fp32 main copies).
    assert {p.dtype for p in model.parameters() if p.dim() > 1} == {torch.bfloat16}


def test_bf16_token_logprobs_match_fp64_for_llama3_vocabulary_and_their_gradient_too(device):
    from wrpo_nemo.logprobs import token_logprobs

    tokens, vocab = 2048, 128256
    gen = torch.Generator(device=device).manual_seed(0)
    logits64 = 3 * torch.randn(tokens, vocab, generator=gen, device=device, dtype=torch.float64)
    logits = logits64.to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    labels[::17] = -100
    got = token_logprobs(logits, labels)
    assert got.dtype == torch.float32
    # The reference sees the very same (bf16-rounded) logits, in fp64.
    exact = logits.detach().double().requires_grad_()
    want = torch.log_softmax(exact, dim=-1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]
    want = torch.where(labels >= 0, want, torch.zeros_like(want))
    assert (got.double() - want).abs().max().item() < 2e-4
    assert got.double().sum().item() == pytest.approx(want.sum().item(), abs=0.05)
    weights = torch.rand(tokens, generator=gen, device=device, dtype=torch.float64)
    (got * weights.float()).sum().backward()
    (want * weights).sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    # bf16 holds about 3 significant digits of softmax - onehot (|grad| <= 1 per entry).
    assert (logits.grad.double() - exact.grad).abs().max().item() < 8e-3


@pytest.mark.parametrize("layout", ["shared_prompt", "separate"])
def test_bf16_packed_logps_equal_each_sequence_run_alone(device, layout):
    """The packed THD path on the GPU's attention backend (TransformerEngine where installed, per-span SDPA
    otherwise), in bf16: every response's summed log-prob equals the same model run on ``prompt + response``
    alone (one causal sequence; the CPU tests tie that path to Hugging Face's Llama)."""
    import numpy as np

    from wrpo_nemo.data.layout import ROLE_NAMES
    from wrpo_nemo.data.packing import pack_micro_batch
    from wrpo_nemo.models.attention import causal_rows_params, packed_forward, params_from_spans
    from wrpo_nemo.training.engine import build_model, for_forward
    from wrpo_nemo.training.step import response_logps

    cfg = bench.llama3_8b_shaped(2, hidden=256, heads=8, groups=4, ffn=512, vocab=1000)
    model = for_forward(build_model(cfg, precision="bf16").to(device)).eval()
    data = bench.SyntheticPrompts(6, 24, 40, cfg.vocab_size, seed=3)
    batch = pack_micro_batch(data, np.arange(6), "wrpo", 512, rows=3, pad_id=0, layout=layout)
    with torch.no_grad():
        params = params_from_spans(batch.attn_spans, batch.position_ids, device)
        logits = packed_forward(model, batch.tokens.to(device), params)
        packed, _ = response_logps(logits, batch.to(device), cfg.vocab_size)
        alone = torch.zeros_like(packed)
        for k in range(6):
            for col, role in enumerate(ROLE_NAMES):
                seq = torch.from_numpy(np.concatenate([data.ids("prompt", k), data.ids(role, k)])).to(device)
                out = packed_forward(model, seq[None], causal_rows_params(1, len(seq), device)).float()
                logp = torch.log_softmax(out[0, :, : cfg.vocab_size], dim=-1)
                alone[k, col] = logp[23:-1].gather(1, seq[24:, None]).sum()
    torch.testing.assert_close(packed.float(), alone, rtol=2e-2, atol=0.5)
