"""Peak memory and time of token log-probs: chunked ``token_logprobs`` against a naive full log-softmax.

Each (method, dtype, pass) runs in its own subprocess; peak memory is the process's peak RSS above its
RSS once the logits exist (so the logits themselves are not counted). Default shape: Llama 3's vocabulary
(128256) and 4096 tokens.

    python benchmarks/logprobs_memory.py [--tokens 4096] [--vocab 128256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GIB = 1024**3


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _one(method: str, dtype: str, backward: bool, tokens: int, vocab: int, chunk: int) -> dict:
    import torch

    from wrpo_nemo.logprobs import token_logprobs

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    g = torch.Generator().manual_seed(0)
    logits = torch.empty(tokens, vocab, dtype=getattr(torch, dtype)).normal_(0.0, 2.0, generator=g)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    logits.requires_grad_(backward)
    _reset_peak_rss()
    base = _status_bytes("VmRSS")
    start = time.perf_counter()
    with torch.set_grad_enabled(backward):
        if method == "naive":
            out = logits.float().log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
        else:
            out = token_logprobs(
                logits, labels, chunk_tokens=chunk, inplace_backward=method == "chunked_inplace"
            )
        if backward:
            out.sum().backward()
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    return {"extra_gib": (peak - base) / GIB, "seconds": seconds, "checksum": float(out.double().sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--child", nargs=3, metavar=("METHOD", "DTYPE", "BACKWARD"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        method, dtype, backward = a.child
        print(json.dumps(_one(method, dtype, backward == "1", a.tokens, a.vocab, a.chunk_tokens)))
        return

    print(f"token log-probs, {a.tokens} tokens x vocab {a.vocab}, chunk {a.chunk_tokens} tokens, 1 thread")
    print("peak memory above the logits (GiB) and time (s); ratio = naive / chunked")
    header = f"{'logits':>8} {'pass':>7} | {'naive':>6} {'chunked':>7} {'ratio':>6} | {'naive s':>7} {'chunk s':>7} | {'|diff|':>8}"
    print(header)
    print("-" * len(header))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [
        (dt, bw, m)
        for dt in ("float32", "bfloat16")
        for bw in ("0", "1")
        for m in ("chunked", "chunked_inplace")
    ]
    for dtype, backward, method in runs:
        if backward == "0" and method == "chunked_inplace":
            continue  # identical to chunked without a backward pass
        res = {name: _child(a, name, dtype, backward, env) for name in ("naive", method)}
        n, c = res["naive"], res[method]
        diff = abs(n["checksum"] - c["checksum"]) / a.tokens
        label = "fwd" if backward == "0" else ("fwd+bwd" if method == "chunked" else "f+b inp")
        print(
            f"{dtype:>8} {label:>7} | {n['extra_gib']:6.2f} {c['extra_gib']:7.2f} "
            f"{n['extra_gib'] / max(c['extra_gib'], 1e-9):5.1f}x | {n['seconds']:7.2f} {c['seconds']:7.2f} | {diff:8.1e}"
        )
    print("f+b inp: chunked with inplace_backward=True (the gradient overwrites the logits, as in training)")
    print("|diff|: mean absolute difference per token of the log-probs, naive vs chunked")


def _child(a: argparse.Namespace, method: str, dtype: str, backward: str, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--tokens", str(a.tokens), "--vocab", str(a.vocab),
           "--chunk-tokens", str(a.chunk_tokens), "--child", method, dtype, backward]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
