"""The two-stage pipeline of WRPO.md: SFT on y_ws, then WRPO, then the Hugging Face export.

This is the entry layer's orchestration (DESIGN.md layer 6): it uses the converters (an HF starting model is
imported into a model checkpoint once; each stage's final weights are exported) and the training layer (each
stage trains from a model checkpoint to its final checkpoint). Each stage starts from the previous stage's
final checkpoint (the configured start for the first), so stage boundaries are checkpoints and a resumed run
skips finished stages.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from wrpo_nemo.data.splits import split_indices
from wrpo_nemo.training.config import RunConfig
from wrpo_nemo.training.outputs import plot_metrics
from wrpo_nemo.training.parallel import destroy_parallel, initialize_parallel
from wrpo_nemo.training.run_stage import Preemption, StageResult, StartWeights, run_stage
from wrpo_nemo.training.setup import (
    RunInputs,
    load_tokenizer,
    prepare_dataset,
    resolve_model_config,
    validate_layout,
    world_size,
)


def _export(cfg: RunConfig, stage: str, checkpoint: str) -> str | None:
    if not cfg.export.hf or dist.get_rank() != 0:
        return None
    from wrpo_nemo.converters.hf_export import export_hf

    out = Path(cfg.run_dir) / stage / "hf"
    export_hf(checkpoint, out, dtype=getattr(torch, cfg.export.dtype), overwrite=True)
    print(f"[{stage}] exported Hugging Face model to {out}", flush=True)
    return str(out)


def start_weights(cfg: RunConfig, inputs: RunInputs, previous: str | None) -> StartWeights:
    """Where a stage starts: the previous stage's final checkpoint, ``model.checkpoint``, ``model.hf_path``
    (imported once into ``run_dir/imported_hf`` by rank 0, visible to every rank) or a random initialisation.
    The identity names the start for the reference log-prob store."""
    from wrpo_nemo.checkpoint.model import is_model_checkpoint

    if previous is not None:
        return StartWeights(previous, f"checkpoint:{Path(previous).resolve()}")
    if cfg.model.checkpoint:
        return StartWeights(cfg.model.checkpoint, f"checkpoint:{Path(cfg.model.checkpoint).resolve()}")
    if cfg.model.hf_path:
        imported = Path(cfg.run_dir) / "imported_hf"
        if dist.get_rank() == 0 and not is_model_checkpoint(imported):
            from wrpo_nemo.converters.hf_import import import_hf

            import_hf(cfg.model.hf_path, imported, overwrite=True)
        dist.barrier()
        return StartWeights(str(imported), f"hf:{Path(cfg.model.hf_path).resolve()}")
    return StartWeights(
        None, f"random:seed={cfg.seed}:{json.dumps(inputs.model_cfg.to_dict(), sort_keys=True)}"
    )


def run(cfg: RunConfig) -> dict[str, StageResult]:
    """Run the configured stages; returns each stage's result (identical on every rank).

    megatron-core's INFO records (every parameter of every gradient bucket, optimizer configs) stay off the
    console; ``WRPO_MEGATRON_LOG_LEVEL=INFO`` shows them.
    """
    logging.getLogger("megatron").setLevel(os.environ.get("WRPO_MEGATRON_LOG_LEVEL", "WARNING").upper())
    # A preemption signal during the set-up (data, model, reference pass) is kept and honoured at the first step
    # boundary; the recipe installs the handler even earlier, before its imports.
    preemption = Preemption()
    tokenizer, tokenizer_dir = load_tokenizer(cfg)
    model_cfg = resolve_model_config(cfg, tokenizer)
    dp = validate_layout(cfg, model_cfg, world_size())
    device = initialize_parallel(
        cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.context, seed=cfg.seed
    )
    try:
        dataset = prepare_dataset(cfg, tokenizer)
        splits = {n: split_indices(dataset.prompt_ids, n, cfg.data.split) for n in ("sft", "wrpo", "eval")}
        inputs = RunInputs(model_cfg, tokenizer, dataset, splits, cfg.model.hf_path or tokenizer_dir)
        if dist.get_rank() == 0:
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.run_dir) / "run_config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
            print(f"data: {len(dataset)} prompts -> sft {len(splits['sft'])}, wrpo {len(splits['wrpo'])}, "
                  f"eval {len(splits['eval'])}; report {dataset.path}/report.json", flush=True)  # fmt: skip
        previous, results = None, {}
        for stage in cfg.stages:
            result = run_stage(
                cfg, stage, inputs, start_weights(cfg, inputs, previous), dp, device, preemption
            )
            results[stage] = result
            if result.preempted:
                break
            previous = result.checkpoint
            exported = _export(cfg, stage, previous)
            if exported and cfg.data.toy:
                from wrpo_nemo.training.toy_eval import toy_accuracy

                result.eval_metrics["toy_accuracy"] = toy_accuracy(exported, dataset, splits["eval"])
                print(f"[{stage}] toy task accuracy on {len(splits['eval'])} held-out prompts: "
                      f"{result.eval_metrics['toy_accuracy']:.3f}", flush=True)  # fmt: skip
        dist.barrier()
        if dist.get_rank() == 0:
            if cfg.logging.plots:
                plot_metrics(Path(cfg.run_dir), list(results))
            summary = {k: asdict(v) for k, v in results.items()}
            (Path(cfg.run_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
        return results
    finally:
        destroy_parallel()
