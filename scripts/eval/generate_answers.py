"""Answers of an exported Hugging Face model to the three benchmarks of the paper, in each judge's own format.

    python scripts/eval/generate_answers.py mt_bench    --model runs/x/wrpo/hf --questions question.jsonl \
        --output data/mt_bench/model_answer/            # -> model_answer/<model-id>.jsonl (FastChat llm_judge)
    python scripts/eval/generate_answers.py alpaca_eval --model ... --questions alpaca_eval.json \
        --output results/<model-id>/model_outputs.json  # AlpacaEval 2
    python scripts/eval/generate_answers.py arena_hard  --model ... --questions question.jsonl \
        --output data/arena-hard-v0.1/model_answer/     # -> model_answer/<model-id>.jsonl (Arena-Hard-Auto
                                                        #    v0.1, the format of ARENA_HARD_COMMIT below)

Decoding follows each harness: MT-Bench samples at its per-category temperatures (FastChat's table below,
0 = greedy), AlpacaEval 2 and Arena-Hard-Auto decode greedily (Arena-Hard's own configuration: temperature 0).
vLLM generates when it imports (``--backend auto``), transformers otherwise; both render prompts with the
model's own chat template. Question files are read from the given path; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Conversation = list[dict[str, str]]
Generate = Callable[[Sequence[Conversation], float, int], list[str]]
"""(conversations, temperature, max_new_tokens) -> one answer per conversation."""

MT_BENCH_TEMPERATURE = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
    "arena-hard-200": 0.0,
}
"""FastChat llm_judge's ``temperature_config`` (common.py); other categories sample at 0.7 there too."""
MT_BENCH_DEFAULT_TEMPERATURE = 0.7
MAX_NEW_TOKENS = {"mt_bench": 1024, "alpaca_eval": 4096, "arena_hard": 4096}
"""FastChat's ``--max-new-token`` default, and the 4096 of Arena-Hard's gen_answer_config (used for AE2 too)."""

ARENA_HARD_REPOSITORY = "https://github.com/lmarena/arena-hard-auto"
ARENA_HARD_COMMIT = "3071ef95d913bb5cd632641db336a3b6c7fe4bdd"
"""The Arena-Hard-Auto version whose answer format :func:`arena_hard_answers` writes: the benchmark
``arena-hard-v0.1`` as ``gen_answer.py`` writes it at this commit of ``lmarena/arena-hard-auto`` (2025-03-19,
the last before the v2.0 pre-release; the repository has no tags). One JSON record per line of
``data/arena-hard-v0.1/model_answer/<model_id>.jsonl``:

- ``question_id``, ``answer_id``, ``model_id``, ``tstamp``;
- ``choices``: ``[{"index": 0, "turns": [{"content": answer}]}]`` (``gen_judgment.py`` reads the contents);
- ``conv_metadata``: ``token_len`` (tiktoken's gpt-3.5-turbo encoding, cl100k_base, no special tokens) and the
  markdown counts ``header_count`` (``h1``-``h6``), ``list_count`` (``ordered``, ``unordered``) and
  ``bold_count`` (``**``, ``__``) of the answer without the text of its code blocks. ``show_result.py`` reads
  ``token_len`` for ``avg_tokens`` and the counts for ``--style-control``.

Other versions differ: until commit 8f2f44d (2024-09-01) ``token_len`` sat in each turn and there was no
``conv_metadata``; v2.0 (commits 9a1d386 to 57451f3, April 2025) writes ``uid``, ``ans_id``, ``model``,
``messages`` and ``metadata`` instead, and this file is not read there."""
ARENA_HARD_CODE_BLOCK = re.compile(r"```([^`]*)```")


def read_questions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A JSONL file (MT-Bench, Arena-Hard) or a JSON list (AlpacaEval) of question records."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _answer_id() -> str:
    return uuid.uuid4().hex


def mt_bench_answers(
    questions: list[dict], generate: Generate, model_id: str, max_new_tokens: int
) -> list[dict]:
    """FastChat ``model_answer`` records: every turn answered in one conversation, turn by turn."""
    conversations: list[Conversation] = [[] for _ in questions]
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max(len(q["turns"]) for q in questions)):
        # One generate call per temperature, so a whole category batches together.
        by_temperature: dict[float, list[int]] = {}
        for i, q in enumerate(questions):
            if turn < len(q["turns"]):
                t = MT_BENCH_TEMPERATURE.get(q.get("category", ""), MT_BENCH_DEFAULT_TEMPERATURE)
                by_temperature.setdefault(t, []).append(i)
                conversations[i].append({"role": "user", "content": q["turns"][turn]})
        for temperature, indices in by_temperature.items():
            outputs = generate([conversations[i] for i in indices], temperature, max_new_tokens)
            for i, text in zip(indices, outputs, strict=True):
                conversations[i].append({"role": "assistant", "content": text})
                answers[i].append(text)
    return [
        {
            "question_id": q["question_id"],
            "answer_id": _answer_id(),
            "model_id": model_id,
            "choices": [{"index": 0, "turns": turns}],
            "tstamp": time.time(),
        }
        for q, turns in zip(questions, answers, strict=True)
    ]


def alpaca_eval_outputs(
    questions: list[dict], generate: Generate, model_id: str, max_new_tokens: int
) -> list[dict]:
    """AlpacaEval ``model_outputs.json`` entries, greedy."""
    outputs = generate(
        [[{"role": "user", "content": q["instruction"]}] for q in questions], 0.0, max_new_tokens
    )
    return [
        {
            "instruction": q["instruction"],
            "output": text,
            "generator": model_id,
            "dataset": q.get("dataset", ""),
        }
        for q, text in zip(questions, outputs, strict=True)
    ]


def markdown_counts(text: str) -> dict[str, dict[str, int]]:
    """The markdown elements Arena-Hard-Auto v0.1's style control counts in an answer (``conv_metadata``): the
    text between each pair of ``` fences is removed first, then headers by level, ordered and unordered list
    items and bold spans are counted line by line as its ``add_markdown_info.py`` does."""
    for block in ARENA_HARD_CODE_BLOCK.findall(text):
        text = text.replace(block, "")

    def count(pattern: str) -> int:
        return len(re.findall(pattern, text, re.MULTILINE))

    return {
        "header_count": {f"h{level}": count(rf"^#{{{level}}}\s") for level in range(1, 7)},
        "list_count": {"ordered": count(r"^\s*\d+\.\s"), "unordered": count(r"^\s*[-*+]\s")},
        "bold_count": {"**": count(r"\*\*[^*\n]+\*\*"), "__": count(r"__[^_\n]+__")},
    }


def arena_hard_answers(
    questions: list[dict],
    generate: Generate,
    model_id: str,
    max_new_tokens: int,
    count_tokens: Callable[[str], int],
) -> list[dict]:
    """Arena-Hard-Auto v0.1 ``model_answer`` records in the format of :data:`ARENA_HARD_COMMIT`, greedy
    (temperature 0, as its gen_answer_config)."""
    conversations = [[{"role": "user", "content": q["turns"][0]["content"]}] for q in questions]
    outputs = generate(conversations, 0.0, max_new_tokens)
    return [
        {
            "question_id": q["question_id"],
            "answer_id": _answer_id(),
            "model_id": model_id,
            "choices": [{"index": 0, "turns": [{"content": text}]}],
            "tstamp": time.time(),
            "conv_metadata": {"token_len": count_tokens(text), **markdown_counts(text)},
        }
        for q, text in zip(questions, outputs, strict=True)
    ]


def transformers_backend(model_path: str, batch_size: int = 8, seed: int = 0) -> tuple[Generate, Any]:
    """Batched ``generate`` of a transformers model (left padding) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"  # every row continues from its own last prompt token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()

    def generate(conversations: Sequence[Conversation], temperature: float, max_new_tokens: int) -> list[str]:
        out: list[str] = []
        sampling = (
            {"do_sample": False} if temperature < 1e-4 else {"do_sample": True, "temperature": temperature}
        )
        for start in range(0, len(conversations), batch_size):
            texts = [
                tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                for c in conversations[start : start + batch_size]
            ]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(
                model.device
            )
            torch.manual_seed(seed + start)
            with torch.no_grad():
                ids = model.generate(
                    **inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
                )
            new = ids[:, inputs["input_ids"].shape[1] :]
            out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        return out

    return generate, tokenizer


def vllm_backend(model_path: str, seed: int = 0) -> tuple[Generate, Any]:
    """``generate`` through vLLM's chat API (the model's chat template) and its tokenizer."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, seed=seed)

    def generate(conversations: Sequence[Conversation], temperature: float, max_new_tokens: int) -> list[str]:
        params = SamplingParams(temperature=temperature, max_tokens=max_new_tokens, seed=seed)
        results = llm.chat(list(conversations), params, use_tqdm=False)
        return [r.outputs[0].text.strip() for r in results]

    return generate, llm.get_tokenizer()


def pick_backend(name: str) -> str:
    """``auto``: vLLM when it imports, transformers otherwise."""
    if name != "auto":
        return name
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "transformers"
    return "vllm"


def token_counter(tokenizer: Any) -> Callable[[str], int]:
    """Arena-Hard counts answer tokens with tiktoken's cl100k_base; the model's tokenizer stands in offline."""
    try:
        import tiktoken

        encoding = tiktoken.get_encoding("cl100k_base")
        return lambda text: len(encoding.encode(text, disallowed_special=()))
    except Exception:  # not installed, or its encoding file cannot be fetched on an offline machine
        return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def output_path(bench: str, output: str, model_id: str) -> Path:
    """Where the answers go: ``<dir>/<model-id>.jsonl`` for the two ``model_answer`` formats."""
    path = Path(output)
    if bench == "alpaca_eval":
        return path / "model_outputs.json" if path.suffix != ".json" else path
    return path / f"{model_id}.jsonl" if path.suffix != ".jsonl" else path


def write_answers(bench: str, records: list[dict], path: Path) -> None:
    """Write atomically, so a crash never leaves a half file that a restarted pipeline would take as done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if bench == "alpaca_eval":
        tmp.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    else:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> Path:
    """Generate the answers of one benchmark and write them; returns the file written."""
    model_id = args.model_id or Path(os.path.normpath(args.model)).name
    questions = read_questions(args.questions)[: args.limit]
    random.seed(args.seed)
    if pick_backend(args.backend) == "vllm":
        generate, tokenizer = vllm_backend(args.model, args.seed)
    else:
        generate, tokenizer = transformers_backend(args.model, args.batch_size, args.seed)
    max_new = args.max_new_tokens or MAX_NEW_TOKENS[args.bench]
    if args.bench == "mt_bench":
        records = mt_bench_answers(questions, generate, model_id, max_new)
    elif args.bench == "alpaca_eval":
        records = alpaca_eval_outputs(questions, generate, model_id, max_new)
    else:
        records = arena_hard_answers(questions, generate, model_id, max_new, token_counter(tokenizer))
    path = output_path(args.bench, args.output, model_id)
    write_answers(args.bench, records, path)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", choices=sorted(MAX_NEW_TOKENS))
    p.add_argument("--model", required=True, help="exported Hugging Face folder (config, weights, tokenizer)")
    p.add_argument(
        "--questions", required=True, help="the harness's question file (JSONL, or AlpacaEval JSON)"
    )
    p.add_argument("--output", required=True, help="model_answer/ folder (or .jsonl), or model_outputs.json")
    p.add_argument("--model-id", help="name in the answer files (default: the model folder's name)")
    p.add_argument("--backend", choices=["auto", "vllm", "transformers"], default="auto")
    p.add_argument("--max-new-tokens", type=int, help="default: 1024 for MT-Bench, 4096 otherwise")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (transformers)")
    p.add_argument("--limit", type=int, help="answer only the first N questions (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


if __name__ == "__main__":
    print(run(parse_args()))
