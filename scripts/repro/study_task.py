"""The study's toy task: addition of one- to three-digit numbers, two styles of working, a blind scorer.

The *target* model's native style is column arithmetic in words; a tiny Llama learns it from correct answers
(the study's "Target", the stand-in for LLaMA-3-8B-Instruct) and is imperfect at it, the more so the more
digits and carries a question has. The *source* is an oracle, always right, that writes the same columns in a
shorter symbolic style the target never produces:

    what is 47 + 38 ?
    target (native):  units : 7 plus 8 makes 15 , keep 5 , carry 1 . tens : 4 plus 3 plus 1 makes 8 , keep 8 ,
                      carry 0 . the answer is 85 .
    source:           8 + 7 = 15 . write 5 carry 1 . 4 + 3 + 1 = 8 . write 8 carry 0 . the answer is 85 .

The scorer sees only the prompt and the response (never which model wrote it): one point for a correct final
answer, a penalty for a response without a readable answer, and a small cost per token. Numbers are written
digit by digit by the word-level tokenizer.
"""

from __future__ import annotations

import random
import re

from wrpo_nemo.data.toy import build_word_tokenizer, score_answer

COLUMNS = ("units", "tens", "hundreds")
WORDS = ["user", "assistant", "what", "is", "the", "answer", "+", "=", ".", "?", "write", "carry", ",", ":", "plus",
         "makes", "keep", *COLUMNS]  # fmt: skip
"""Every word the task uses besides the digits."""

MAX_DIGITS = 3
"""Operands have one to three digits."""

CORRECT, NO_ANSWER, PER_TOKEN = 1.0, -0.5, 0.01
"""The scorer's terms: a correct final answer, a response with no ``answer is N``, the cost of each token."""

_ANSWER = re.compile(r"answer is\s+(\d[\d\s]*)")


def build_tokenizer(out_dir: str | None = None):
    """The task's word-level tokenizer with the Llama 3 chat template (saved to ``out_dir`` if given)."""
    tokenizer = build_word_tokenizer(list(WORDS), "llama3")
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


def question(a: int, b: int) -> str:
    return f"what is {a} + {b} ?"


def worked_answer(a: int, b: int) -> str:
    """The source's style: one step per column from the units (the sum, the digit written, the carry), then
    the answer. The first column adds two digits, the others add the carry too. Like a sampled model, the
    source writes the two digits of a column in either order (drawn per question and column by a generator
    seeded with the question; same length either way): the order cannot be read from the question."""
    rng = random.Random(f"source:{a}+{b}")
    steps, carry = [], 0
    for column in range(len(str(max(a, b)))):
        da, db = a // 10**column % 10, b // 10**column % 10
        if rng.random() < 0.5:
            da, db = db, da
        total = da + db + carry
        terms = f"{da} + {db}" + (f" + {carry}" if column else "")
        steps.append(f"{terms} = {total} . write {total % 10} carry {total // 10} .")
        carry = total // 10
    return " ".join(steps) + f" the answer is {a + b} ."


def native_answer(a: int, b: int) -> str:
    """The target's native style: the same column arithmetic in words, longer than the source's."""
    steps, carry = [], 0
    for column in range(len(str(max(a, b)))):
        da, db = a // 10**column % 10, b // 10**column % 10
        total = da + db + carry
        terms = f"{da} plus {db}" + (f" plus {carry}" if column else "")
        steps.append(f"{COLUMNS[column]} : {terms} makes {total} , keep {total % 10} , carry {total // 10} .")
        carry = total // 10
    return " ".join(steps) + f" the answer is {a + b} ."


def _operand(rng: random.Random) -> int:
    digits = rng.randint(1, MAX_DIGITS)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def prompts(count: int, seed: int) -> list[tuple[str, int, int]]:
    """``count`` distinct questions ``(prompt_id, a, b)``, each operand of 1 to ``MAX_DIGITS`` digits (the
    number of digits uniform, then the value), deterministic in ``seed``."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < count:
        a, b = _operand(rng), _operand(rng)
        if (a, b) not in seen:
            seen.add((a, b))
            out.append((f"add-{a}-{b}", a, b))
    return out


def style(response: str) -> str:
    """Whose style a response is written in: ``source`` (``=`` and ``write``), ``native`` (``makes`` and
    ``keep``), ``mixed`` (both), ``other`` (neither)."""
    source = "=" in response or "write" in response
    native = "makes" in response or "keep" in response
    return "mixed" if source and native else "source" if source else "native" if native else "other"


def tokens(response: str) -> list[str]:
    """A response as the word-level tokenizer splits it (digits one by one), so ``67`` and the decoded
    ``6 7`` are the same."""
    return re.findall(r"\d|[^\W\d]+|[^\w\s]", response)


def num_tokens(response: str) -> int:
    return len(tokens(response))


def has_answer(response: str) -> bool:
    return _ANSWER.search(response) is not None


def score(prompt: str, response: str) -> float:
    """The blind reward: correctness of the last ``answer is N``, minus a cost per token and for no answer."""
    correct = CORRECT if score_answer(prompt, response) else 0.0
    value = correct if has_answer(response) else NO_ANSWER
    return value - PER_TOKEN * num_tokens(response)


def message(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}
