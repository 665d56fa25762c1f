"""Peer parity: at alpha = 0, wrpo_loss equals the loss TRL 1.16's own DPOTrainer computes.

TRL runs its real code path (its tokenisation, collator and ``compute_loss``) on a tiny random
LlamaForCausalLM with a locally built tokenizer. Our side computes the summed log-probs of the same
batch from the same HF models with ``token_logprobs`` and feeds them to ``wrpo_loss``; the y_ws column
is filled with unrelated values, which alpha = 0 must ignore.
"""

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer

from wrpo_nemo.logprobs import IGNORE_INDEX, token_logprobs
from wrpo_nemo.losses import wrpo_loss

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "mat",
    "fast",
    "slow",
    "red",
    "blue",
    "one",
    "two",
    "three",
    "yes",
    "no",
]


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _model(vocab_size: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).eval()


def _summed_logps(model, input_ids, attention_mask, completion_mask) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(completion_mask[:, 1:].bool(), input_ids[:, 1:], IGNORE_INDEX)
    return token_logprobs(logits, labels).sum(-1)


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_wrpo_loss_at_alpha_zero_equals_trl_dpo_sigmoid_loss(tmp_path, beta):
    tok = _tokenizer()
    data = Dataset.from_dict(
        {
            "prompt": ["the cat sat on", "a dog ran", "one two", "red blue red"],
            "chosen": [" the mat", " fast", " three yes", " blue"],
            "rejected": [" a red dog ran fast", " slow no", " one", " the cat sat"],
        }
    )
    policy, reference = _model(len(tok), 0), _model(len(tok), 1)
    args = DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        beta=beta,
        loss_type=["sigmoid"],
        report_to=[],
        use_cpu=True,
        disable_dropout=True,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=data, processing_class=tok
    )
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)

    ids, attn, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    pol = _summed_logps(trainer.model, ids, attn, comp).double()
    ref = _summed_logps(reference, ids, attn, comp).double()
    n = ids.shape[0] // 2  # TRL's batch is [chosen..., rejected...]
    unrelated = torch.randn(n, dtype=torch.float64) * 50
    ours, _ = wrpo_loss(
        torch.stack([unrelated, pol[:n], pol[n:]], dim=1),
        torch.stack([unrelated * 0.5, ref[:n], ref[n:]], dim=1),
        alpha=0.0,
        beta=beta,
    )
    assert trl_loss.item() == pytest.approx(ours.item(), rel=1e-5, abs=1e-6)
