"""The engine's log-probs (packed rows, megatron GPTModel, segment attention, vocab-parallel log-probs) and their
gradients equal those of the same weights in Hugging Face's LlamaForCausalLM, computed sequence by sequence
unpacked with plain torch: in both row layouts, in one process, at TP=2 and at PP=2."""

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.dist_utils import run_distributed
from wrpo_nemo.data.cache import DataConfig, TokenizedDataset, build_or_load
from wrpo_nemo.data.layout import ROLE_NAMES
from wrpo_nemo.data.tokenize import TokenizeConfig
from wrpo_nemo.data.toy import build_toy_tokenizer

INDICES = np.arange(12)


def _varied_records(path: Path) -> str:
    """Records whose lengths vary a lot from one prompt to the next (consecutive micro-batches need
    different numbers of packed rows), in the toy vocabulary."""
    import json
    import random

    from wrpo_nemo.data.toy import TOY_WORDS

    rng = random.Random(0)
    words = [w for w in TOY_WORDS if w not in ("system", "user", "assistant")]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    with open(path, "w") as handle:
        for i in range(16):
            size = 60 if i % 4 == 0 else 4
            record = {
                "prompt_id": f"p{i}",
                "prompt": text(size // 2 + 1),
                "chosen": [text(size), text(size // 2 + 1)],
                "rejected": [text(size // 3 + 1)],
            }
            handle.write(json.dumps(record) + "\n")
    return str(path)


def _engine_logps(rank, world_size, tp, hf_dir, cache_path, out_dir, runs):
    """The reference pass at TP=``tp`` for each ``(layout, precision)`` of ``runs``; rank 0 saves each."""
    from wrpo_nemo.converters.hf_import import load_hf_weights
    from wrpo_nemo.models import model_config_from_hf
    from wrpo_nemo.training.engine import build_model, for_forward
    from wrpo_nemo.training.parallel import destroy_parallel, initialize_parallel
    from wrpo_nemo.training.reference import compute_reference_logps

    device = initialize_parallel(tp, 1, seed=0)
    try:
        cfg = model_config_from_hf(hf_dir)
        dataset = TokenizedDataset(cache_path)
        for layout, precision in runs:
            model = build_model(cfg, precision=precision)
            load_hf_weights(model, hf_dir, Path(out_dir) / f"imported-tp{tp}")
            logps = compute_reference_logps(
                for_forward(model), dataset, INDICES, micro_batch_size=2, seq_length=256, pad_id=0,
                device=device, vocab_size=cfg.vocab_size, layout=layout,
            )  # fmt: skip
            if rank == 0:
                np.save(Path(out_dir) / f"engine-tp{tp}-{layout}-{precision}.npy", logps)
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def hf_and_data(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("hfref")
    tokenizer = build_toy_tokenizer(str(root / "hf"))
    torch.manual_seed(0)
    # 44 tokens: megatron pads the vocabulary (to 64 at TP=1, 128 at TP=2); those columns must not count.
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        tie_word_embeddings=False, attn_implementation="eager",
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(root / "hf")
    paths = {"train": _varied_records(root / "records.jsonl")}
    dataset = build_or_load(
        DataConfig(
            sources=[paths["train"]], cache_dir=str(root / "cache"), num_workers=1,
            tokenize=TokenizeConfig(max_length=96, max_prompt_length=48, seq_length=256),
        ),
        tokenizer,
    )  # fmt: skip
    expected = np.zeros((len(INDICES), 3))
    for row, index in enumerate(INDICES):
        prompt = np.asarray(dataset.ids("prompt", int(index)), dtype=np.int64)
        for col, role in enumerate(ROLE_NAMES):
            response = np.asarray(dataset.ids(role, int(index)), dtype=np.int64)
            ids = torch.from_numpy(np.concatenate([prompt, response]))[None]
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            targets = ids[0, len(prompt) :]
            expected[row, col] = logp[len(prompt) - 1 : -1].gather(1, targets[:, None]).sum().item()
    return root, dataset.path, expected


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_reference_pass_logps_equal_hf_llama(hf_and_data, tp):
    """fp32: equal to HF's float64 sums (separate layout at TP=1, shared_prompt at TP=2). bf16
    (``wrpo.reference_precision=bf16``, TP=1): measured on these 12 prompts (responses of 3 to 70 tokens), at
    most 0.004 nats per response (0.03%); the tiny random model's logits are flat, a trained model's sharper
    ones will err more (measure on a GPU)."""
    root, cache_path, expected = hf_and_data
    runs = [("separate", "fp32"), ("shared_prompt", "bf16")] if tp == 1 else [("shared_prompt", "fp32")]
    run_distributed(_engine_logps, tp, tp, str(root / "hf"), cache_path, str(root), runs)
    for layout, precision in runs:
        got = np.load(root / f"engine-tp{tp}-{layout}-{precision}.npy")[INDICES]
        if precision == "fp32":
            np.testing.assert_allclose(got, expected, rtol=0, atol=2e-4)
        else:
            err = np.abs(got - expected)
            assert err.max() < 0.05 and np.max(err / np.abs(expected)) < 0.005, err.max()


# Micro-batches of the gradient test: a row of many short prompts, long prompts alone, odd lengths, padding.
GRAD_MICRO_BATCHES = [[1, 2, 3, 5, 6, 7], [0, 9], [4, 10, 11]]
GRAD_ROWS, GRAD_SEQ = 3, 384
_HF_NORMS = ("input_layernorm", "post_attention_layernorm")
_MEGATRON_NORMS = ("input_layernorm", "pre_mlp_layernorm")


def _segment_weights(num_prompts: int) -> torch.Tensor:
    """Fixed, distinct weights of each (prompt, role) log-prob in the test objective."""
    return torch.linspace(-1.0, 1.5, num_prompts * 3, dtype=torch.float64).reshape(num_prompts, 3)


def _engine_logps_and_grads(rank, world_size, tp, pp, layouts, hf_dir, cache_path, out_dir):
    """Forward and backward of sum(w * log p(y|x)) through megatron's schedule; saves each rank's log-probs
    (last stage) and the gradients of the norms and attention output projections it holds (HF names)."""
    from functools import partial

    from megatron.core import parallel_state

    from wrpo_nemo.converters.hf_import import load_hf_weights
    from wrpo_nemo.data.packing import pack_micro_batch
    from wrpo_nemo.models import model_config_from_hf
    from wrpo_nemo.training.engine import build_model, run_schedule
    from wrpo_nemo.training.parallel import destroy_parallel, initialize_parallel
    from wrpo_nemo.training.step import make_forward_step, response_logps

    device = initialize_parallel(tp, pp, seed=0)
    try:
        cfg = model_config_from_hf(hf_dir)
        dataset = TokenizedDataset(cache_path)

        def loss_func(batch, logits):
            logps, _ = response_logps(logits, batch, cfg.vocab_size)
            weights = _segment_weights(batch.num_prompts).to(logps.dtype)
            loss = (logps * weights).sum()
            return loss, torch.tensor(1, dtype=torch.int), {"logps": logps.detach()}

        for layout in layouts:
            model = build_model(cfg)
            load_hf_weights(model, hf_dir, Path(out_dir) / f"imported-tp{tp}-pp{pp}")
            batches = [
                pack_micro_batch(dataset, m, "wrpo", GRAD_SEQ, GRAD_ROWS, pad_id=0, layout=layout)
                for m in GRAD_MICRO_BATCHES
            ]
            forward_step = make_forward_step(lambda b: partial(loss_func, b), device)
            outputs = run_schedule(model, forward_step, batches, forward_only=False)
            result = {}
            if parallel_state.is_pipeline_last_stage():
                result["logps"] = torch.cat([o["logps"] for o in outputs]).double()
                result["final_norm"] = model.decoder.final_layernorm.weight.grad.double()
            for layer in model.decoder.layers:
                i = layer.layer_number - 1
                for hf, mg in zip(_HF_NORMS, _MEGATRON_NORMS, strict=True):
                    result[f"layers.{i}.{hf}"] = getattr(layer, mg).weight.grad.double()
                # Row-parallel: this rank holds the input columns [rank * cols, (rank + 1) * cols).
                result[f"layers.{i}.o_proj"] = layer.self_attention.linear_proj.weight.grad.double()
            result["tp_rank"] = parallel_state.get_tensor_model_parallel_rank()
            torch.save(result, Path(out_dir) / f"grads-tp{tp}-pp{pp}-{layout}-rank{rank}.pt")
    finally:
        destroy_parallel()


def _hf_logps_and_grads(hf_dir, dataset):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").double()
    logps = []
    total = 0.0
    for micro in GRAD_MICRO_BATCHES:
        weights = _segment_weights(len(micro))
        for row, index in enumerate(micro):
            prompt = np.asarray(dataset.ids("prompt", int(index)), dtype=np.int64)
            values = []
            for col, role in enumerate(ROLE_NAMES):
                response = np.asarray(dataset.ids(role, int(index)), dtype=np.int64)
                ids = torch.from_numpy(np.concatenate([prompt, response]))[None]
                logp = torch.log_softmax(model(ids).logits[0], dim=-1)
                value = logp[len(prompt) - 1 : -1].gather(1, ids[0, len(prompt) :, None]).sum()
                values.append(value)
                total = total + weights[row, col] * value
            logps.append(torch.stack(values).detach())
    total.backward()
    grads = {"final_norm": model.model.norm.weight.grad}
    for i, layer in enumerate(model.model.layers):
        for name in _HF_NORMS:
            grads[f"layers.{i}.{name}"] = getattr(layer, name).weight.grad
        grads[f"layers.{i}.o_proj"] = layer.self_attn.o_proj.weight.grad
    return torch.stack(logps), grads


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tp", "pp", "layouts"),
    [
        (1, 1, ("shared_prompt", "separate")),
        (2, 1, ("shared_prompt", "separate")),
        (1, 2, ("shared_prompt", "separate")),
    ],
)
def test_packed_logps_and_gradients_equal_hf_unpacked(hf_and_data, tp, pp, layouts):
    """Both layouts in one process (padding dropped), at TP=2 and at PP=2 (fixed-shape rows with padding)."""
    root, cache_path, _ = hf_and_data
    dataset = TokenizedDataset(cache_path)
    expected_logps, expected_grads = _hf_logps_and_grads(str(root / "hf"), dataset)
    world = tp * pp
    run_distributed(_engine_logps_and_grads, world, tp, pp, layouts, str(root / "hf"), cache_path, str(root))
    for layout in layouts:
        results = [torch.load(root / f"grads-tp{tp}-pp{pp}-{layout}-rank{r}.pt") for r in range(world)]
        seen = set()
        for result in results:
            if "logps" in result:
                torch.testing.assert_close(result["logps"], expected_logps, rtol=1e-5, atol=1e-4)
                seen.add("logps")
            for name, grad in result.items():
                if name in ("logps", "tp_rank"):
                    continue
                want = expected_grads[name]
                if name.endswith("o_proj") and tp > 1:
                    cols = want.shape[1] // tp
                    want = want[:, result["tp_rank"] * cols : (result["tp_rank"] + 1) * cols]
                scale = float(want.abs().max())
                torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-5 * scale, msg=f"{layout} {name}")
                seen.add(name)
        assert seen == {"logps", *expected_grads}, layout
