"""Bodies of the engine's multi-process tests (module-level so spawned processes can import them)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from wrpo_nemo.alpha import AlphaSchedule
from wrpo_nemo.checkpoint.model import load_model_checkpoint, read_model_config, save_model_checkpoint
from wrpo_nemo.data.cache import TokenizedDataset
from wrpo_nemo.data.loader import PackedBatchLoader
from wrpo_nemo.models.presets import get_preset
from wrpo_nemo.training.engine import OptimSettings, build_model, build_optimizer, wrap_ddp
from wrpo_nemo.training.loop import TrainLoop
from wrpo_nemo.training.parallel import destroy_parallel, initialize_parallel
from wrpo_nemo.training.stages import Reference, SFTStage, WRPOStage
from wrpo_nemo.training.step import WrpoLossSettings

GLOBAL_BATCH = 8
STEPS = 2


def tiny_config(vocab_size: int):
    # 32 keeps the padded vocabulary the same at TP=1 and TP=2 (44 -> 64 either way).
    return dataclasses.replace(get_preset("tiny"), vocab_size=vocab_size, make_vocab_size_divisible_by=32)


def _loader(dataset, stage, micro_batch_size, reference):
    from megatron.core import parallel_state

    return PackedBatchLoader(
        dataset,
        np.arange(len(dataset)),
        stage=stage,
        seq_length=256,
        global_batch_size=GLOBAL_BATCH,
        micro_batch_size=micro_batch_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        seed=7,
        pad_id=0,
        rows_per_micro_batch=2,
        reference_logps=reference,
    )


def train_a_few_steps(rank, world_size, layout, stage, start_ckpt, cache_path, out_dir, create_start=False):
    """Train STEPS steps at ``layout`` = (tp, pp, micro_batch_size) from ``start_ckpt``; save metrics and weights."""
    tp, pp, micro_batch_size = layout
    device = initialize_parallel(tp, pp, seed=1)
    try:
        dataset = TokenizedDataset(cache_path)
        if create_start:
            # Random weights from a TP=PP=1 build, saved once: every layout starts from the same numbers.
            cfg = tiny_config(int(np.load(Path(cache_path).parent / "vocab_size.npy")))
            save_model_checkpoint(build_model(cfg), start_ckpt, cfg)
        model = build_model(read_model_config(start_ckpt))
        load_model_checkpoint(model, start_ckpt)
        ddp = wrap_ddp(model)
        # adam_eps well above the smallest gradients: with eps=1e-8, Adam turns a 1e-9 gradient into a full
        # lr-sized step whose sign is fp32 reduction noise, and the comparison would test that noise.
        settings = OptimSettings(lr=1e-3, warmup_ratio=0.0, adam_eps=1e-4)
        optimizer, scheduler = build_optimizer(ddp, settings, total_steps=STEPS)
        reference = np.random.default_rng(0).normal(-30, 3, size=(len(dataset), 3)).astype(np.float32)
        loader = _loader(dataset, stage, micro_batch_size, reference if stage == "wrpo" else None)
        vocab = read_model_config(start_ckpt).vocab_size
        if stage == "wrpo":  # alpha_t = 0.1 * step / STEPS
            alpha = AlphaSchedule(kind="linear", alpha_max=0.1)
            # With the NLL term on y_ws: its normalisation by the global batch's y_ws tokens must not depend on
            # how the batch is split into micro-batches (4 + 4 prompts here, 2 + 2 per rank at DP=2, ...).
            loss = WrpoLossSettings(beta=0.1, sft_weight=0.5)
            stage_obj = WRPOStage(vocab, loss, alpha, Reference("given", reference), device)
        else:
            stage_obj = SFTStage(vocab)
        # The loop the recipe runs.
        loop = TrainLoop(ddp, optimizer, scheduler, loader, stage_obj, device=device, total_steps=STEPS)
        history = [loop.train_step() for _ in range(STEPS)]
        save_model_checkpoint(model, Path(out_dir) / "weights", read_model_config(start_ckpt))
        if rank == 0:
            torch.save(history, Path(out_dir) / "metrics.pt")
    finally:
        destroy_parallel()
