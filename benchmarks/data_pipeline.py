"""Data pipeline throughput and packing efficiency on synthetic records with UltraFeedback-like lengths.

    python benchmarks/data_pipeline.py [--records 20000] [--workers 2] [--seq-length 4096]

Records: prompts around 150 tokens, responses around 350, log-normal with long tails, one token per word
through a word-level tokenizer with the Llama 3 chat template. Measured: records/s of reading + checking +
tokenising into the cache with ``--workers`` processes, and of packing; the share of real tokens when every
global batch of 128 prompts is packed into rows of ``seq_length`` (first-fit decreasing), when it is cut into
fixed-shape micro-batches as the loader makes them, and when every sequence is padded to the longest of its
batch (the reference program's layout).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import string
import tempfile
import time

import numpy as np

from wrpo_nemo.data.cache import DataConfig, build_or_load
from wrpo_nemo.data.layout import ROLE_NAMES
from wrpo_nemo.data.loader import PackedBatchLoader
from wrpo_nemo.data.packing import group_lengths, pack_micro_batch, packing_efficiency, rows_needed
from wrpo_nemo.data.tokenize import TokenizeConfig
from wrpo_nemo.data.toy import build_word_tokenizer

# Letters only: the word-level tokenizer splits digits, and one word must be one token here.
WORDS = ["".join(w) for w in itertools.product(string.ascii_lowercase, repeat=3)][:2000]


def _lengths(rng: np.random.Generator, median: float, sigma: float, size: int, high: int) -> np.ndarray:
    return np.clip(rng.lognormal(np.log(median), sigma, size=size).astype(int), 1, high)


def write_records(path: str, n: int, seed: int = 0) -> None:
    """``n`` records in the released layout: prompts ~150 words, responses ~350, long tails."""
    rng = np.random.default_rng(seed)
    prompt_len = _lengths(rng, 150, 0.8, n, 1700)
    response_len = _lengths(rng, 350, 0.6, (n, 3), 3000)
    words = np.array(WORDS)

    def text(k: int) -> str:
        return " ".join(words[rng.integers(0, len(words), size=k)])

    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            ys = [{"role": "assistant", "content": text(int(k))} for k in response_len[i]]
            record = {
                "prompt_id": f"b{i}",
                "prompt": text(int(prompt_len[i])),
                "chosen": ys[:2],
                "rejected": ys[2:],
            }
            handle.write(json.dumps(record) + "\n")


def padding_efficiency(dataset, batches: list[np.ndarray]) -> float:
    """Real tokens / padded tokens when each of a batch's 3 x prompts sequences is padded to its longest."""
    prompt = dataset.lengths("prompt")
    seqs = np.stack([prompt + dataset.lengths(name) for name in ROLE_NAMES], axis=1)
    real = sum(int(seqs[b].sum()) for b in batches)
    padded = sum(int(seqs[b].max()) * seqs[b].size for b in batches)
    return real / padded


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--batch-prompts", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    args = parser.parse_args()
    tokenizer = build_word_tokenizer(WORDS, "llama3")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "records.jsonl")
        write_records(path, args.records)
        cfg = DataConfig(
            sources=[path],
            cache_dir=os.path.join(tmp, "cache"),
            num_workers=args.workers,
            tokenize=TokenizeConfig(max_length=2048, max_prompt_length=1800, seq_length=args.seq_length),
        )
        start = time.perf_counter()
        dataset = build_or_load(cfg, tokenizer)
        build_s = time.perf_counter() - start
        order = np.random.default_rng(0).permutation(len(dataset))
        batches = [
            order[i : i + args.batch_prompts]
            for i in range(0, len(order) - args.batch_prompts + 1, args.batch_prompts)
        ]
        groups = group_lengths(dataset, "wrpo")
        start = time.perf_counter()
        packed = [
            pack_micro_batch(dataset, b, "wrpo", args.seq_length, rows_needed(groups[b], args.seq_length), 0)
            for b in batches
        ]
        pack_s = time.perf_counter() - start
        packed_eff = sum(int((p.segment_ids >= 0).sum()) for p in packed) / sum(
            p.tokens.numel() for p in packed
        )
        loader = PackedBatchLoader(
            dataset,
            np.arange(len(dataset)),
            stage="wrpo",
            seq_length=args.seq_length,
            global_batch_size=args.batch_prompts,
            micro_batch_size=args.micro_batch_size,
            dp_rank=0,
            dp_size=1,
            seed=0,
            pad_id=0,
        )
        micro = [
            packing_efficiency(b)
            for _ in range(min(20, loader.steps_per_epoch))
            for b in loader.next_global_batch()
        ]
        kept, tokens = len(dataset), int(groups.sum())
        rows = [
            (
                "records",
                f"{args.records} read, {kept} kept, dropped by length {dataset.report['dropped_by_length']}",
            ),
            (
                f"read + check + tokenise + cache ({args.workers} workers)",
                f"{args.records / build_s:,.0f} records/s ({build_s:.1f} s)",
            ),
            (
                "pack (global batches of 128 prompts)",
                f"{len(packed) * args.batch_prompts / pack_s:,.0f} prompts/s",
            ),
            ("tokenise + pack", f"{args.records / (build_s + pack_s):,.0f} records/s"),
            ("mean tokens per prompt (3 segments)", f"{tokens / kept:,.0f}"),
            (
                f"packed, {args.batch_prompts} prompts into rows of {args.seq_length}",
                f"{100 * packed_eff:.1f}% real tokens",
            ),
            (
                f"fixed micro-batches of {args.micro_batch_size} prompts x {loader.rows_per_micro_batch} rows",
                f"{100 * np.mean(micro):.1f}% real tokens",
            ),
            (
                f"padded to the longest of {args.batch_prompts} prompts (reference)",
                f"{100 * padding_efficiency(dataset, batches):.1f}% real tokens",
            ),
        ]
        width = max(len(k) for k, _ in rows)
        print(f"{'measure':<{width}}  value\n{'-' * width}  {'-' * 40}")
        for key, value in rows:
            print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
