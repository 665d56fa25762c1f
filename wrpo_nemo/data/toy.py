"""The embedded toy task of the default run: two-number arithmetic, a locally built tokenizer, a scorer.

The three responses mean what they mean in the paper: y_ws (source chosen) is a strong source model's
correct answer with its working, y_wt (target chosen) is the target's near miss (off by one or by ten),
y_l (rejected) is clearly wrong (a far-off number or no answer). The tokenizer is a word-level
``tokenizers`` model wrapped in ``PreTrainedTokenizerFast`` with the Llama 3 chat template, so the default
run goes through the same chat-template code path as a real model. Everything is deterministic in ``seed``.
"""

from __future__ import annotations

import json
import os
import random
import re

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from wrpo_nemo.data.cache import DataConfig
from wrpo_nemo.data.templates import SPECIAL_TOKENS, TEMPLATES
from wrpo_nemo.data.tokenize import TokenizeConfig

PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
TOY_WORDS = [
    "what",
    "is",
    "the",
    "answer",
    "of",
    "+",
    "-",
    "=",
    ".",
    "?",
    "i",
    "do",
    "not",
    "know",
    "it",
    "maybe",
    "plus",
    "minus",
    "compute",
    "system",
    "user",
    "assistant",
    "you",
    "are",
    "a",
    "helpful",
    "calculator",
]
"""Every word the toy data uses; numbers are written digit by digit."""


def build_word_tokenizer(words: list[str], family: str = "llama3") -> PreTrainedTokenizerFast:
    """A word-level tokenizer (digits split one by one) with the special tokens and chat template of ``family``.

    ``family`` is a key of :data:`wrpo_nemo.data.templates.TEMPLATES` (``llama3``, ``chatml``, ``mistral``).
    """
    special = SPECIAL_TOKENS[family]
    specials = [PAD_TOKEN, UNK_TOKEN] + [t for t in (special["bos"], special["eos"]) if t] + special["extra"]
    vocab: dict[str, int] = {}
    for token in [*specials, *(str(d) for d in range(10)), *words]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=special["bos"],
        eos_token=special["eos"],
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[t for t in specials if t not in (PAD_TOKEN, UNK_TOKEN)],
    )
    tokenizer.chat_template = TEMPLATES[family]
    return tokenizer


def build_toy_tokenizer(out_dir: str | None = None) -> PreTrainedTokenizerFast:
    """The toy task's tokenizer (Llama 3 template, a few dozen tokens); saved with ``save_pretrained`` if
    ``out_dir`` is given, so ``AutoTokenizer.from_pretrained(out_dir)`` loads it like any model's."""
    tokenizer = build_word_tokenizer(list(TOY_WORDS), "llama3")
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


def _question(rng: random.Random, max_operand: int = 99) -> tuple[str, int]:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    op = rng.choice("+-")
    return f"what is {a} {op} {b} ?", a + b if op == "+" else a - b


def _near_miss(rng: random.Random, value: int) -> int:
    return value + rng.choice((-10, -1, 1, 10))


def _far_off(rng: random.Random, value: int) -> int:
    wrong = value
    while abs(wrong - value) < 20:
        wrong = rng.randint(-99, 198)
    return wrong


def toy_example(rng: random.Random, index: int, max_operand: int = 99) -> dict:
    """One record in the released layout (AALF/ultrafeedback_wrpo); operands lie in ``[0, max_operand]``."""
    question, value = _question(rng, max_operand)
    a, op, b = question.split()[2:5]
    source = f"{a} {op} {b} = {value} . the answer is {value} ."
    target = f"the answer is {_near_miss(rng, value)} ."
    rejected = rng.choice((f"the answer is {_far_off(rng, value)} .", "i do not know ."))
    return {
        "prompt_id": f"toy-{index:06d}",
        "prompt": {"role": "user", "content": question},
        "chosen": [{"role": "assistant", "content": source}, {"role": "assistant", "content": target}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def build_toy_dataset(
    out_dir: str, num_examples: int = 4000, seed: int = 0, max_operand: int = 99
) -> dict[str, str]:
    """Write ``num_examples`` toy records to ``out_dir/train.jsonl``; returns ``{"train": path}``.

    The file is written to a temporary name and renamed, so a crash never leaves half a file.
    """
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    path = os.path.join(out_dir, "train.jsonl")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        for i in range(num_examples):
            handle.write(json.dumps(toy_example(rng, i, max_operand)) + "\n")
    os.replace(tmp, path)
    return {"train": path}


TOY_MAX_LENGTH = 64
"""Longest toy segment the default lengths allow (prompts are about 16 tokens, answers at most about 20)."""


def toy_data_config(
    out_dir: str, num_examples: int = 4000, seed: int = 0, seq_length: int = 256
) -> DataConfig:
    """Write the toy records under ``out_dir`` and return the data config of the default run for them.

    The tokenised cache goes to ``out_dir/cache``; ``seq_length`` must match the run's packed row length.
    """
    paths = build_toy_dataset(out_dir, num_examples, seed)
    tokenize = TokenizeConfig(max_length=TOY_MAX_LENGTH, max_prompt_length=32, seq_length=seq_length)
    return DataConfig(sources=[paths["train"]], cache_dir=os.path.join(out_dir, "cache"), tokenize=tokenize)


_QUESTION = re.compile(r"what is (\d+) ([+-]) (\d+)")
_ANSWER = re.compile(r"answer is (-?\s*[\d\s]*\d)")


def toy_target(prompt: str) -> int:
    """The true value of a toy question (spaces between digits tolerated, as a decoded answer has them)."""
    match = _QUESTION.search(re.sub(r"(?<=\d) (?=\d)", "", prompt))
    if match is None:
        raise ValueError(f"not a toy question: {prompt!r}")
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    return a + b if op == "+" else a - b


def score_answer(prompt: str, response: str) -> bool:
    """True when the last ``answer is N`` in ``response`` gives the right value of the question in ``prompt``."""
    found = _ANSWER.findall(response)
    if not found:
        return False
    return int(re.sub(r"\s", "", found[-1])) == toy_target(prompt)
