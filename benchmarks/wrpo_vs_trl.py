"""WRPO step throughput of this engine beside TRL 1.16's DPOTrainer, same weights, same data, same batch.

Both train a small Llama (random weights, saved once as a Hugging Face folder and loaded by both) on the toy
task for the same number of optimizer steps of ``--batch`` prompts, with reference log-probs precomputed.
TRL sees only the (y_wt, y_l) pair of each prompt, the engine all three responses: compare tokens/s for the
work done and prompts/s for the data consumed. Timing starts after ``--warmup`` steps; one CPU thread each.

    python benchmarks/wrpo_vs_trl.py [--steps 12] [--batch 16] [--preset toy]
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

ROOT = Path(__file__).resolve().parents[1]


def _prepare(folder: Path, preset: str, examples: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from wrpo_nemo.data.toy import build_toy_dataset, build_toy_tokenizer
    from wrpo_nemo.models.presets import get_preset

    tokenizer = build_toy_tokenizer(str(folder / "hf"))
    cfg = get_preset(preset)
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_query_groups, max_position_embeddings=512, tie_word_embeddings=False,
        )
    ).save_pretrained(folder / "hf")  # fmt: skip
    build_toy_dataset(str(folder / "records"), examples, seed=0)


def _run_engine(folder: Path, steps: int, warmup: int, batch: int, seq_length: int) -> dict:
    import numpy as np

    from wrpo_nemo.converters.hf_import import load_hf_weights
    from wrpo_nemo.data.cache import DataConfig, build_or_load
    from wrpo_nemo.data.loader import PackedBatchLoader
    from wrpo_nemo.data.tokenize import TokenizeConfig
    from wrpo_nemo.models import model_config_from_hf
    from wrpo_nemo.training.engine import OptimSettings, build_model, build_optimizer, train_step, wrap_ddp
    from wrpo_nemo.training.parallel import destroy_parallel, initialize_parallel
    from wrpo_nemo.training.reference import compute_reference_logps
    from wrpo_nemo.training.step import WrpoLossSettings, make_forward_step, wrpo_loss_func

    device = initialize_parallel(1, 1, seed=0)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder / "hf")
    data_cfg = DataConfig(
        sources=[str(folder / "records" / "train.jsonl")], cache_dir=str(folder / "cache"), num_workers=1,
        tokenize=TokenizeConfig(max_length=64, max_prompt_length=40, seq_length=seq_length),
    )  # fmt: skip
    dataset = build_or_load(data_cfg, tokenizer)
    cfg = model_config_from_hf(folder / "hf")
    model = build_model(cfg)
    load_hf_weights(model, folder / "hf", folder / "imported")
    indices = np.arange(len(dataset))
    reference = compute_reference_logps(
        model, dataset, indices, micro_batch_size=batch, seq_length=seq_length, pad_id=tokenizer.pad_token_id,
        device=device, vocab_size=cfg.vocab_size,
    )  # fmt: skip
    loader = PackedBatchLoader(
        dataset, indices, stage="wrpo", seq_length=seq_length, global_batch_size=batch, micro_batch_size=batch,
        dp_rank=0, dp_size=1, seed=0, pad_id=tokenizer.pad_token_id, reference_logps=reference,
    )  # fmt: skip
    ddp = wrap_ddp(model)
    optimizer, scheduler = build_optimizer(ddp, OptimSettings(lr=5e-6), total_steps=steps + warmup)
    settings = WrpoLossSettings(beta=0.1)
    tokens = elapsed = 0.0
    for step in range(steps + warmup):
        batches = loader.next_global_batch()
        forward_step = make_forward_step(
            lambda b: lambda out, b=b: wrpo_loss_func(b, 0.05, settings, cfg.vocab_size, out), device
        )
        start = time.perf_counter()
        train_step(ddp, optimizer, scheduler, forward_step, batches)
        if step >= warmup:
            elapsed += time.perf_counter() - start
            tokens += sum(int((b.segment_ids >= 0).sum()) for b in batches)
    destroy_parallel()
    return {"seconds": elapsed, "tokens": tokens, "prompts": steps * batch}


def _run_trl(folder: Path, steps: int, warmup: int, batch: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(folder / "hf")
    rows = [json.loads(line) for line in (folder / "records" / "train.jsonl").read_text().splitlines()]
    data = Dataset.from_list(
        [{"prompt": [r["prompt"]], "chosen": [r["chosen"][1]], "rejected": [r["rejected"][0]]} for r in rows]
    )
    model = AutoModelForCausalLM.from_pretrained(folder / "hf", attn_implementation="sdpa")
    ref = AutoModelForCausalLM.from_pretrained(folder / "hf", attn_implementation="sdpa")

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.elapsed, self.tokens, self.step = 0.0, 0, 0

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step += 1
            if self.step > warmup:
                self.elapsed += time.perf_counter() - self.start

    timer = Timer()
    args = DPOConfig(
        output_dir=str(folder / "trl"), per_device_train_batch_size=batch, max_steps=steps + warmup, beta=0.1,
        learning_rate=5e-6, report_to=[], use_cpu=True, logging_steps=1000, save_strategy="no",
        precompute_ref_log_probs=True, dataloader_num_workers=0, disable_dropout=True,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tokenizer
    )
    trainer.add_callback(timer)
    collator_tokens = []
    original = trainer.data_collator

    def counting(examples):
        out = original(examples)
        collator_tokens.append(int(out["attention_mask"].sum()))
        return out

    trainer.data_collator = counting
    trainer.train()
    tokens = sum(collator_tokens[-steps:])
    return {"seconds": timer.elapsed, "tokens": tokens, "prompts": steps * batch}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--preset", default="toy")
    p.add_argument("--seq-length", type=int, default=256, help="packed row length of the engine")
    p.add_argument("--child", choices=["engine", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        if a.child == "engine":
            result = _run_engine(Path(a.folder), a.steps, a.warmup, a.batch, a.seq_length)
        else:
            result = _run_trl(Path(a.folder), a.steps, a.warmup, a.batch)
        print("RESULT " + json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _prepare(folder, a.preset, examples=max(400, (a.steps + a.warmup) * a.batch))
        results = {}
        for name in ("engine", "trl"):
            cmd = [sys.executable, __file__, "--child", name, "--folder", tmp, "--steps", str(a.steps),
                   "--warmup", str(a.warmup), "--batch", str(a.batch), "--seq-length", str(a.seq_length)]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": "29531"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                raise SystemExit(f"{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
            results[name] = json.loads(line[-1][len("RESULT ") :])
    print(
        f"WRPO step throughput, preset {a.preset}, {a.batch} prompts/step, {a.steps} timed steps, 1 CPU thread"
    )
    print(f"{'trainer':<28} {'prompts/s':>10} {'tokens/s':>10} {'s/step':>8}")
    rate = {}
    for name, label in (("engine", "wrpo-nemo (3 responses)"), ("trl", "TRL DPOTrainer (2 responses)")):
        r = results[name]
        rate[name] = (r["prompts"] / r["seconds"], r["tokens"] / r["seconds"])
        print(f"{label:<28} {rate[name][0]:10.2f} {rate[name][1]:10.0f} {r['seconds'] / a.steps:8.3f}")
    print(
        f"ratio wrpo-nemo / TRL: prompts/s {rate['engine'][0] / rate['trl'][0]:.2f}x, "
        f"tokens/s {rate['engine'][1] / rate['trl'][1]:.2f}x"
    )


if __name__ == "__main__":
    main()
