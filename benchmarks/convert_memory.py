"""Peak memory and time of HF -> model checkpoint (import) and model checkpoint -> HF (export, bf16).

A synthetic Llama-shaped model of about 1.1B parameters (random bf16, written straight with safetensors in a
temporary folder) is converted both ways. Each conversion runs in a fresh subprocess; its peak RSS comes from
the kernel (``VmHWM``), and a subprocess that only imports the same modules gives the baseline.

    python benchmarks/convert_memory.py [--layers 16] [--hidden 2048] [--ffn 8192] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1024**3
_IMPORTS = "import torch, wrpo_nemo.converters.hf_import, wrpo_nemo.converters.hf_export, megatron.core"
# VmHWM is the process's own peak RSS since exec (ru_maxrss from wait4 would include the parent's pages at fork).
_REPORT_PEAK = "; print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
_STEPS = {
    "baseline": _IMPORTS,
    "import": _IMPORTS
    + "; from wrpo_nemo.converters.hf_import import import_hf; import_hf({hf!r}, {ckpt!r})",
    "export": _IMPORTS
    + "; from wrpo_nemo.converters.hf_export import export_hf; export_hf({ckpt!r}, {out!r})",
}


def write_synthetic_hf(directory: Path, layers: int, hidden: int, ffn: int, vocab: int) -> int:
    """A random bf16 Llama (GQA 16 heads / 8 groups) as one safetensors shard per 4 layers; returns its bytes."""
    import torch
    from safetensors.torch import save_file

    heads, groups = 16, 8
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": groups, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": "bfloat16",
    }  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.bfloat16)

    total = 0
    shards = [{"model.embed_tokens.weight": rand(vocab, hidden)}]
    for i in range(layers):
        if i % 4 == 0:
            shards.append({})
        p = f"model.layers.{i}."
        shards[-1].update({
            p + "input_layernorm.weight": rand(hidden), p + "post_attention_layernorm.weight": rand(hidden),
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rand(groups * head_dim, hidden),
            p + "self_attn.v_proj.weight": rand(groups * head_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": rand(ffn, hidden), p + "mlp.up_proj.weight": rand(ffn, hidden),
            p + "mlp.down_proj.weight": rand(hidden, ffn),
        })  # fmt: skip
    shards[-1].update({"model.norm.weight": rand(hidden), "lm_head.weight": rand(vocab, hidden)})
    for n, shard in enumerate(shards):
        save_file(shard, directory / f"model-{n:05d}.safetensors", metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    return total


def run_step(code: str) -> tuple[float, int]:
    """Run ``code`` in a fresh Python; returns (seconds, peak RSS bytes)."""
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code + _REPORT_PEAK], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"step failed: {code}\n{result.stderr[-2000:]}")
    return time.perf_counter() - start, int(result.stdout.split()[-1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="convert-bench-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "hf").mkdir()
        size = write_synthetic_hf(tmp_path / "hf", args.layers, args.hidden, args.ffn, args.vocab)
        paths = {"hf": str(tmp_path / "hf"), "ckpt": str(tmp_path / "ckpt"), "out": str(tmp_path / "out")}
        results = {name: run_step(code.format(**paths)) for name, code in _STEPS.items()}
    base = results["baseline"][1]
    print(f"model: {size / 2 / 1e9:.2f}B parameters, {size / GIB:.2f} GiB in bf16; import-only baseline RSS "
          f"{base / GIB:.2f} GiB")  # fmt: skip
    print(
        f"{'direction':<10} {'time s':>8} {'peak GiB':>9} {'above base GiB':>15} {'peak/size':>10} {'above/size':>11}"
    )
    for name in ("import", "export"):
        seconds, peak = results[name]
        print(f"{name:<10} {seconds:8.1f} {peak / GIB:9.2f} {(peak - base) / GIB:15.2f} "
              f"{peak / size:10.2f} {(peak - base) / size:11.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
