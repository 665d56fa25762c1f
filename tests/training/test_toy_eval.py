"""The default run's toy accuracy: batched, left-padded greedy answers equal one-prompt-at-a-time ``generate``."""

import numpy as np
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from wrpo_nemo.data.cache import DataConfig, build_or_load
from wrpo_nemo.data.tokenize import TokenizeConfig
from wrpo_nemo.data.toy import build_toy_dataset, build_toy_tokenizer
from wrpo_nemo.training.toy_eval import toy_answers


def _model_folder(path, tokenizer) -> str:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # peaked logits: no near-ties for a padding-sized float difference to flip
        eos_token_id=tokenizer.convert_tokens_to_ids(tokenizer.eos_token),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # make the end-of-turn token win at some steps, so answers end at different lengths
        eos = cfg.eos_token_id
        other = tokenizer.convert_tokens_to_ids("7")
        model.lm_head.weight[eos] = 1.5 * model.lm_head.weight[other]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_batched_greedy_answers_equal_unpadded_generation_of_each_prompt(tmp_path):
    tokenizer = build_toy_tokenizer()
    paths = build_toy_dataset(str(tmp_path / "toy"), num_examples=23, seed=5)
    tokenize = TokenizeConfig(max_length=64, max_prompt_length=40, seq_length=256)
    dataset = build_or_load(
        DataConfig(
            sources=[paths["train"]], tokenize=tokenize, cache_dir=str(tmp_path / "cache"), num_workers=1
        ),
        tokenizer,
    )
    folder = _model_folder(tmp_path / "hf", tokenizer)
    indices = np.arange(len(dataset))
    batched = toy_answers(folder, dataset, indices, max_new_tokens=12, batch_size=8)

    # The reference: plain generate on each prompt alone (no padding), decoded whole.
    hf_tok = AutoTokenizer.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    expected = []
    for index in indices:
        prompt = torch.tensor(dataset.ids("prompt", int(index)), dtype=torch.long)[None]
        with torch.no_grad():
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=model.config.eos_token_id,
                pad_token_id=hf_tok.pad_token_id,
            )
        expected.append(
            (
                hf_tok.decode(prompt[0], skip_special_tokens=True),
                hf_tok.decode(out[0, prompt.shape[1] :], skip_special_tokens=True),
            )
        )
    assert batched == expected
    prompt_lengths = {len(dataset.ids("prompt", int(i))) for i in indices}
    answer_lengths = {len(a.split()) for _, a in expected}
    assert len(prompt_lengths) > 1 and len(answer_lengths) > 1  # padding on both sides was exercised
