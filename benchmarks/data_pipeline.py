"""Data pipeline throughput and packing efficiency on synthetic records with UltraFeedback-like lengths.

    python benchmarks/data_pipeline.py [--records 20000] [--workers 2] [--seq-length 4096]

Records: prompts around 150 tokens, responses around 350, log-normal with long tails, one token per word
through a word-level tokenizer with the Llama 3 chat template. Measured: records/s of reading + checking +
tokenising into the cache with ``--workers`` processes, and of packing; the share of real tokens when every
global batch of 128 prompts is packed into rows of ``seq_length`` (first-fit decreasing), when it is cut into
fixed-shape micro-batches as the loader makes them, and when every sequence is padded to the longest of its
batch (the reference program's layout).

Measured 2026-11-27 on the 2-core CPU machine (shared with other jobs, load ~3), defaults: 19,540 of 20,000
records kept (266 response_too_long, 194 exceeds_seq_length); 471 records/s to read, check, tokenise and
cache with 2 workers; 16,300 prompts/s to pack; 458 records/s for both (43.6 s); 1,838 tokens per prompt's
three segments on average. Real tokens: 95.9% packed (128 prompts into rows of 4096); 89.7% in the loader's
fixed-shape micro-batches of 8 / 16 / 32 prompts (4 / 8 / 16 rows, the most any micro-batch of the epoch
needs); 32.6% padded to the longest of 128 prompts (the reference layout).
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


def _fixed_shape(dataset, args: argparse.Namespace, micro_batch_size: int, layout: str) -> tuple[str, str]:
    """Efficiency of the loader's fixed-shape micro-batches (rows planned over the epoch), first 20 steps."""
    loader = PackedBatchLoader(
        dataset,
        np.arange(len(dataset)),
        stage="wrpo",
        seq_length=args.seq_length,
        global_batch_size=args.batch_prompts,
        micro_batch_size=micro_batch_size,
        dp_rank=0,
        dp_size=1,
        seed=0,
        pad_id=0,
        layout=layout,
    )
    steps = min(20, loader.steps_per_epoch)
    eff = np.mean([packing_efficiency(b) for _ in range(steps) for b in loader.next_global_batch()])
    name = (
        f"loader ({layout}): micro-batches of {micro_batch_size} prompts x {loader.rows_per_micro_batch} rows"
        f" (planned {100 * loader.efficiency():.1f}%)"
    )
    return name, f"{100 * eff:.1f}% real tokens"


def _pack_global_batches(dataset, args: argparse.Namespace) -> tuple[list[np.ndarray], float, float]:
    """Global batches of the benchmark, seconds to pack them, and their share of real tokens."""
    order = np.random.default_rng(0).permutation(len(dataset))
    size = args.batch_prompts
    batches = [order[i : i + size] for i in range(0, len(order) - size + 1, size)]
    groups = group_lengths(dataset, "wrpo", "separate")
    start = time.perf_counter()
    packed = [
        pack_micro_batch(
            dataset, b, "wrpo", args.seq_length, rows_needed(groups[b], args.seq_length), 0, layout="separate"
        )
        for b in batches
    ]
    seconds = time.perf_counter() - start
    real = sum(int((p.segment_ids >= 0).sum()) for p in packed)
    return batches, seconds, real / sum(p.tokens.numel() for p in packed)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--batch-prompts", type=int, default=128)
    parser.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--layouts", nargs="+", default=["shared_prompt", "separate"])
    args = parser.parse_args()
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
        dataset = build_or_load(cfg, build_word_tokenizer(WORDS, "llama3"))
        build_s = time.perf_counter() - start
        batches, pack_s, packed_eff = _pack_global_batches(dataset, args)
        kept, n, size = len(dataset), args.records, args.batch_prompts
        rows = [
            ("records", f"{n} read, {kept} kept, dropped by length {dataset.report['dropped_by_length']}"),
            (f"read + check + tokenise + cache, {args.workers} workers", f"{n / build_s:,.0f} records/s"),
            (f"pack (global batches of {size} prompts)", f"{len(batches) * size / pack_s:,.0f} prompts/s"),
            ("tokenise + pack", f"{n / (build_s + pack_s):,.0f} records/s ({build_s + pack_s:.1f} s)"),
            *(
                (
                    f"mean tokens per prompt ({layout})",
                    f"{group_lengths(dataset, 'wrpo', layout).mean():,.0f}",
                )
                for layout in args.layouts
            ),
            (
                f"packed (separate): {size} prompts into rows of {args.seq_length}",
                f"{100 * packed_eff:.1f}% real tokens",
            ),
            *(
                _fixed_shape(dataset, args, m, layout)
                for layout in args.layouts
                for m in args.micro_batch_sizes
            ),
            (
                f"padded to the longest of {size} prompts (reference)",
                f"{100 * padding_efficiency(dataset, batches):.1f}% real tokens",
            ),
        ]
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}}  value\n{'-' * width}  {'-' * 40}")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
