"""The engine's step-0 log-probs (packed rows, megatron GPTModel, vocab-parallel log-probs) equal those of
the same weights in Hugging Face's LlamaForCausalLM, computed sequence by sequence with plain torch."""

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


def _engine_logps(rank, world_size, tp, hf_dir, cache_path, out_file):
    from wrpo_nemo.converters.hf_import import load_hf_weights
    from wrpo_nemo.models import model_config_from_hf
    from wrpo_nemo.training.engine import build_model
    from wrpo_nemo.training.parallel import destroy_parallel, initialize_parallel
    from wrpo_nemo.training.reference import compute_reference_logps

    device = initialize_parallel(tp, 1, seed=0)
    try:
        cfg = model_config_from_hf(hf_dir)
        model = build_model(cfg)
        load_hf_weights(model, hf_dir, Path(out_file).parent / f"imported-tp{tp}")
        dataset = TokenizedDataset(cache_path)
        logps = compute_reference_logps(
            model, dataset, INDICES, micro_batch_size=2, seq_length=256, pad_id=0, device=device,
            vocab_size=cfg.vocab_size,
        )  # fmt: skip
        if rank == 0:
            np.save(out_file, logps)
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
def test_engine_reference_logps_equal_hf_llama(hf_and_data, tp):
    root, cache_path, expected = hf_and_data
    out_file = root / f"engine-tp{tp}.npy"
    run_distributed(_engine_logps, tp, tp, str(root / "hf"), cache_path, str(out_file))
    got = np.load(out_file)[INDICES]
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-4)
