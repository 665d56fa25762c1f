"""Task accuracy of the embedded toy run: greedy answers of an exported model, scored by the toy scorer.

The exported Hugging Face folder is what users evaluate, so the default run scores exactly that, with
``transformers``' own ``generate``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wrpo_nemo.data.cache import TokenizedDataset
from wrpo_nemo.data.toy import score_answer


def toy_accuracy(
    hf_dir: str | Path, dataset: TokenizedDataset, indices: np.ndarray, *, max_new_tokens: int = 32
) -> float:
    """Share of the prompts ``indices`` whose greedy answer is correct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    correct = 0
    for index in indices:
        prompt = torch.as_tensor(np.asarray(dataset.ids("prompt", int(index)), dtype=np.int64))[None]
        with torch.no_grad():
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
        question = tokenizer.decode(prompt[0], skip_special_tokens=True)
        answer = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
        correct += score_answer(question, answer)
    return correct / max(1, len(indices))
