"""Throughput of one WRPO optimizer step on this machine's accelerator: tokens/s, model TFLOP/s and MFU.

    python scripts/gpu/bench_wrpo_step.py                 # Llama-3-8B shape with 4 layers, seq 4096, bf16
    python scripts/gpu/bench_wrpo_step.py --layers 2 --hidden 64 --heads 4 --groups 2 --ffn 128 --vocab 512 \
        --seq 128 --prompt-len 8 --response-len 12 --matmul-size 128      # seconds on a CPU, for tests

The step is the trainer's own (megatron's schedule, Megatron DDP and optimizer, the WRPO loss on packed rows of
three responses per prompt), on synthetic token ids with stored reference log-probs, as the WRPO stage runs
with ``wrpo.reference=precompute``. MFU is given against two peaks: a bf16 matmul measured here first (what the
card delivers to a large GEMM) and the vendor's dense figure (``wrpo_nemo.compat.peak_bf16_tflops``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from wrpo_nemo import compat
from wrpo_nemo.data.layout import ROLE_NAMES, PackedBatch
from wrpo_nemo.data.packing import group_lengths, pack_micro_batch
from wrpo_nemo.models.config import ModelConfig
from wrpo_nemo.models.presets import get_preset


class SyntheticPrompts:
    """Random token ids shaped like a tokenised dataset (``ids`` and ``lengths``), for the real packing code."""

    def __init__(
        self, count: int, prompt_len: int, response_len: int, vocab_size: int, seed: int = 0
    ) -> None:
        rng = np.random.default_rng(seed)
        self._ids = {"prompt": rng.integers(1, vocab_size, (count, prompt_len))}
        for name in ROLE_NAMES:
            self._ids[name] = rng.integers(1, vocab_size, (count, response_len))

    def ids(self, name: str, index: int) -> np.ndarray:
        return self._ids[name][index]

    def lengths(self, name: str) -> np.ndarray:
        count, length = self._ids[name].shape
        return np.full(count, length, dtype=np.int64)


def synthetic_wrpo_batch(
    *,
    rows: int,
    seq_length: int,
    prompt_len: int,
    response_len: int,
    vocab_size: int,
    seed: int = 0,
    layout: str = "shared_prompt",
) -> PackedBatch:
    """A packed WRPO micro-batch of random ids: as many whole prompts (three responses each) as fit a row,
    packed by the trainer's own packing code in ``layout``; reference log-probs are a plausible constant."""
    group = int(group_lengths(SyntheticPrompts(1, prompt_len, response_len, 2), "wrpo", layout)[0])
    per_row = seq_length // group
    if per_row < 1:
        raise ValueError(f"seq_length={seq_length} cannot hold one prompt's {group}-token group ({layout})")
    prompts = rows * per_row
    data = SyntheticPrompts(prompts, prompt_len, response_len, vocab_size, seed)
    batch = pack_micro_batch(data, np.arange(prompts), "wrpo", seq_length, rows, pad_id=0, layout=layout)
    batch.reference_logps = torch.full((prompts, 3), -2.0 * response_len)
    return batch


def llama3_8b_shaped(layers: int, **overrides: int) -> ModelConfig:
    """Llama-3-8B's hidden size, heads, GQA groups, FFN and vocabulary with fewer layers (or other overrides)."""
    fields = {"hidden": "hidden_size", "heads": "num_attention_heads", "groups": "num_query_groups",
              "ffn": "ffn_hidden_size", "vocab": "vocab_size"}  # fmt: skip
    changes = {fields[k]: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(get_preset("llama3_8b"), num_layers=layers, **changes)


def _sync() -> None:
    if compat.runtime().cuda:
        torch.cuda.synchronize()


def measure_matmul_tflops(size: int, iters: int = 50) -> tuple[float, str]:
    """Achieved TFLOP/s of a square matmul (bf16 on a GPU; fp32 on a CPU, where bf16 GEMMs are emulated)."""
    dtype = torch.bfloat16 if compat.runtime().cuda else torch.float32
    a = torch.randn(size, size, dtype=dtype, device=compat.device())
    b = torch.randn(size, size, dtype=dtype, device=compat.device())
    for _ in range(3):
        a @ b
    _sync()
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync()
    return 2 * size**3 * iters / (time.perf_counter() - start) / 1e12, str(dtype).removeprefix("torch.")


class _SameBatches:
    """A loader that hands out the same global batch at every step."""

    def __init__(self, batches: list[PackedBatch]) -> None:
        self.batches = batches

    def next_global_batch(self) -> list[PackedBatch]:
        return self.batches


def time_wrpo_steps(cfg: ModelConfig, batches: list[PackedBatch], steps: int, warmup: int) -> dict:
    """Build the model and optimizer, run ``warmup + steps`` WRPO steps on ``batches``; time the last ``steps``."""
    from wrpo_nemo.alpha import AlphaSchedule
    from wrpo_nemo.training.engine import OptimSettings, build_model, build_optimizer, wrap_ddp
    from wrpo_nemo.training.loop import TrainLoop
    from wrpo_nemo.training.stages import Reference, WRPOStage
    from wrpo_nemo.training.step import WrpoLossSettings

    device = compat.device()
    model = build_model(cfg, precision="bf16" if compat.runtime().cuda else "fp32")
    if compat.runtime().cuda:
        model = model.cuda()
    ddp = wrap_ddp(model)
    optimizer, scheduler = build_optimizer(ddp, OptimSettings(lr=1e-6), total_steps=steps + warmup)
    # The batches carry their own reference log-probs (synthetic_wrpo_batch); alpha fixed at 0.05.
    stage = WRPOStage(
        cfg.vocab_size,
        WrpoLossSettings(beta=0.01),
        AlphaSchedule(kind="constant", alpha_max=0.05),
        Reference("synthetic"),
        device,
    )
    loader = _SameBatches([b.to(device) for b in batches])
    # The recipe's loop, on the same global batch every step.
    loop = TrainLoop(ddp, optimizer, scheduler, loader, stage, device=device, total_steps=steps + warmup)
    elapsed, losses = 0.0, []
    for step in range(warmup + steps):
        _sync()
        start = time.perf_counter()
        metrics = loop.train_step()
        _sync()
        losses.append(metrics["loss"])
        if step >= warmup:
            elapsed += time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated() / 2**30 if compat.runtime().cuda else float("nan")
    return {"seconds": elapsed, "losses": losses, "peak_memory_gib": memory,
            "params": sum(p.numel() for p in model.parameters())}  # fmt: skip


def benchmark(args: argparse.Namespace) -> dict:
    """Measure the matmul peak, then the WRPO step; returns every number the table prints."""
    from wrpo_nemo.training.outputs import model_flops_per_token
    from wrpo_nemo.training.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(1, 1, seed=0)
    try:
        peak, peak_dtype = measure_matmul_tflops(args.matmul_size)
        cfg = llama3_8b_shaped(args.layers, hidden=args.hidden, heads=args.heads, groups=args.groups,
                               ffn=args.ffn, vocab=args.vocab)  # fmt: skip
        shape = dict(seq_length=args.seq, prompt_len=args.prompt_len, response_len=args.response_len)
        batches = [
            synthetic_wrpo_batch(
                rows=args.rows, vocab_size=cfg.vocab_size, seed=i, layout=args.layout, **shape
            )
            for i in range(args.micro_batches)
        ]
        timing = time_wrpo_steps(cfg, batches, args.steps, args.warmup)
    finally:
        destroy_parallel()
    tokens = args.steps * sum(int((b.segment_ids >= 0).sum()) for b in batches)
    tokens_per_s = tokens / timing["seconds"]
    flops_per_token = model_flops_per_token(cfg, args.prompt_len + args.response_len)
    tflops = flops_per_token * tokens_per_s / 1e12
    vendor = compat.peak_bf16_tflops()
    return {
        "device": torch.cuda.get_device_name() if compat.runtime().cuda else "cpu",
        "torch": torch.__version__,
        "model": f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}/"
        f"{cfg.num_query_groups}, ffn {cfg.ffn_hidden_size}, vocab {cfg.vocab_size}",
        "params": timing["params"],
        "seq_length": args.seq,
        "tokens_per_step": tokens // args.steps,
        "prompts_per_step": sum(b.num_prompts for b in batches),
        "step_s": timing["seconds"] / args.steps,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token,
        "model_tflops": tflops,
        "matmul_peak_tflops": peak,
        "matmul_dtype": peak_dtype,
        "mfu_measured_peak": tflops / peak,
        "vendor_peak_tflops": vendor,
        "mfu_vendor_peak": tflops / vendor if vendor else None,
        "peak_memory_gib": timing["peak_memory_gib"],
        "losses": timing["losses"],
    }


def table(result: dict, extra: list[tuple[str, str]] = ()) -> str:
    """The numbers (and ``extra`` rows first) as one aligned two-column table."""
    vendor = result["vendor_peak_tflops"]
    rows = [*extra,
        ("device", result["device"]), ("torch", result["torch"]), ("model", result["model"]),
        ("parameters", f"{result['params'] / 1e6:,.1f} M"),
        ("tokens / step", f"{result['tokens_per_step']} ({result['prompts_per_step']} prompts x 3, seq {result['seq_length']})"),
        ("step time", f"{result['step_s']:.3f} s"), ("tokens/s", f"{result['tokens_per_s']:,.0f}"),
        ("model TFLOP/s", f"{result['model_tflops']:.4g} ({result['flops_per_token'] / 1e9:.4g} GFLOP/token)"),
        (f"matmul peak ({result['matmul_dtype']})", f"{result['matmul_peak_tflops']:.4g} TFLOP/s measured"),
        ("MFU vs measured peak", f"{100 * result['mfu_measured_peak']:.1f} %"),
        ("vendor bf16 peak", f"{vendor:.0f} TFLOP/s" if vendor else "unknown"),
        ("MFU vs vendor peak", f"{100 * result['mfu_vendor_peak']:.1f} %" if vendor else "n/a"),
        ("peak memory", f"{result['peak_memory_gib']:.1f} GiB"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    for name in ("hidden", "heads", "groups", "ffn", "vocab"):
        p.add_argument(f"--{name}", type=int, help="override Llama-3-8B's value")
    p.add_argument("--seq", type=int, default=4096, help="packed row length")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--response-len", type=int, default=768)
    p.add_argument("--rows", type=int, default=1, help="packed rows per micro-batch")
    p.add_argument(
        "--layout", choices=["shared_prompt", "separate"], default="shared_prompt", help="row layout"
    )
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--json", type=Path, help="also write the numbers here")
    p.add_argument("--table-from", type=Path, help="print the table of a --json file instead of measuring")
    p.add_argument("--row", action="append", default=[], metavar="NAME=VALUE", help="extra first rows")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    extra = [tuple(r.split("=", 1)) for r in args.row]
    if args.table_from:
        result = json.loads(args.table_from.read_text())
        print(table(result, extra), flush=True)
        return result
    result = benchmark(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    print(table(result, extra), flush=True)
    return result


if __name__ == "__main__":
    main()
