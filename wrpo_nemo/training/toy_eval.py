"""Task accuracy of the embedded toy run: greedy answers of an exported model, scored by the toy scorer.

The exported Hugging Face folder is what users evaluate, so the default run scores exactly that, with
``transformers``' own ``generate``, several prompts per call (left-padded, as batched generation requires).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wrpo_nemo.data.cache import TokenizedDataset
from wrpo_nemo.data.toy import score_answer


def toy_answers(
    hf_dir: str | Path,
    dataset: TokenizedDataset,
    indices: np.ndarray,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
) -> list[tuple[str, str]]:
    """``(question, greedy answer)`` of each prompt in ``indices``, the answer cut after its end-of-turn token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" of a model the run just wrote
    try:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out: list[tuple[str, str]] = []
    for start in range(0, len(indices), batch_size):
        prompts = [
            np.asarray(dataset.ids("prompt", int(i)), dtype=np.int64)
            for i in indices[start : start + batch_size]
        ]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[row, width - len(prompt) :] = torch.from_numpy(prompt)
            mask[row, width - len(prompt) :] = 1
        with torch.no_grad():
            generated = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        for row, prompt in enumerate(prompts):
            answer = generated[row, width:].tolist()
            if eos in answer:  # a finished row is padded after its end-of-turn token
                answer = answer[: answer.index(eos) + 1]
            out.append(
                (
                    tokenizer.decode(prompt.tolist(), skip_special_tokens=True),
                    tokenizer.decode(answer, skip_special_tokens=True),
                )
            )
    return out


def toy_accuracy(
    hf_dir: str | Path, dataset: TokenizedDataset, indices: np.ndarray, *, max_new_tokens: int = 32
) -> float:
    """Share of the prompts ``indices`` whose greedy answer is correct."""
    answers = toy_answers(hf_dir, dataset, indices, max_new_tokens=max_new_tokens)
    return sum(score_answer(q, a) for q, a in answers) / max(1, len(indices))
