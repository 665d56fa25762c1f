"""Sampling responses from a model: one sample per (prompt, seed), with vLLM when installed, transformers otherwise.

The paper samples 5 responses per prompt and model at temperature 0.8, top-p 0.95, with seeds 13/21/42/79/100
and at most 4096 new tokens (WRPO.md); those are the defaults. Output records are
``{"prompt_id", "prompt", "model", "seed", "response"}``; a rerun skips the (prompt, seed) pairs already written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from wrpo_nemo.data.construction.shards import JsonlSink, read_prompts, resume_keys, shard_of


@dataclass
class GenerateConfig:
    """What to sample and where to write it."""

    model: str = ""
    """Path (or hub name) of the model to sample from; its tokenizer's chat template renders the prompts."""
    model_name: str | None = None
    """Name written into every record (selection tells source from target by it); defaults to the folder name."""
    prompts: str = ""
    """JSONL/Parquet file of ``{"prompt_id", "prompt"}`` records."""
    output_dir: str = ""
    """Records go to ``<output_dir>/<model_name>/shard-<index>-of-<count>.jsonl``."""
    seeds: list[int] = field(default_factory=lambda: [13, 21, 42, 79, 100])
    """One sample per seed and prompt."""
    temperature: float = 0.8
    """Sampling temperature; 0 samples greedily."""
    top_p: float = 0.95
    """Nucleus sampling mass."""
    max_new_tokens: int = 4096
    """Most tokens of one response."""
    batch_size: int = 8
    """Prompts per generate call (transformers backend)."""
    shard_index: int = 0
    """Which shard of the prompts this process samples."""
    num_shards: int = 1
    """How many processes share the prompts."""
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    """``auto`` uses vLLM when it imports."""
    dtype: str = "auto"
    """Model weights' dtype (``auto``, ``bfloat16``, ``float32``)."""

    @property
    def name(self) -> str:
        return self.model_name or os.path.basename(os.path.normpath(self.model))

    def output_path(self) -> str:
        return os.path.join(
            self.output_dir, self.name, f"shard-{self.shard_index:05d}-of-{self.num_shards:05d}.jsonl"
        )


def _pick_backend(cfg: GenerateConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "transformers"
    return "vllm"


def generate(cfg: GenerateConfig) -> str:
    """Sample every missing (prompt, seed) of this shard; returns the output path."""
    prompts = shard_of(read_prompts(cfg.prompts), cfg.shard_index, cfg.num_shards)
    path = cfg.output_path()
    done = resume_keys(path, lambda r: (r["prompt_id"], r["seed"]))
    todo = {seed: [p for p in prompts if (p["prompt_id"], seed) not in done] for seed in cfg.seeds}
    if not any(todo.values()):
        return path
    sample = _sample_vllm if _pick_backend(cfg) == "vllm" else _sample_transformers
    with JsonlSink(path) as sink:
        sample(cfg, todo, sink)
    return path


def _record(cfg: GenerateConfig, prompt: dict[str, Any], seed: int, response: str) -> dict[str, Any]:
    return {**prompt, "model": cfg.name, "seed": seed, "response": response}


def _sample_transformers(cfg: GenerateConfig, todo: dict[int, list[dict]], sink: JsonlSink) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=cfg.dtype).eval()
    sampling = {"do_sample": cfg.temperature > 0, "max_new_tokens": cfg.max_new_tokens}
    if cfg.temperature > 0:
        sampling.update(temperature=cfg.temperature, top_p=cfg.top_p)
    for seed, prompts in todo.items():
        for start in range(0, len(prompts), cfg.batch_size):
            batch = prompts[start : start + cfg.batch_size]
            texts = [
                tokenizer.apply_chat_template(p["prompt"], tokenize=False, add_generation_prompt=True)
                for p in batch
            ]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            # Seeded per batch: a resumed run samples its remaining batches as a fresh run would.
            torch.manual_seed(seed * 1_000_003 + start)
            with torch.no_grad():
                out = model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, **sampling)
            texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            sink.write([_record(cfg, p, seed, t.strip()) for p, t in zip(batch, texts, strict=True)])


def _sample_vllm(cfg: GenerateConfig, todo: dict[int, list[dict]], sink: JsonlSink) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=cfg.model, dtype=cfg.dtype)
    for seed, prompts in todo.items():
        if not prompts:
            continue
        params = SamplingParams(
            n=1, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens, seed=seed
        )
        outputs = llm.chat([p["prompt"] for p in prompts], params, use_tqdm=False)
        sink.write(
            [_record(cfg, p, seed, o.outputs[0].text.strip()) for p, o in zip(prompts, outputs, strict=True)]
        )
