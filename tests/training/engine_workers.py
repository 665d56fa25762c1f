"""Bodies of the engine's multi-process tests (module-level so spawned processes can import them)."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import numpy as np
import torch

from wrpo_nemo.converters.checkpoint_io import load_model_checkpoint, read_model_config, save_model_checkpoint
from wrpo_nemo.data.cache import TokenizedDataset
from wrpo_nemo.data.loader import PackedBatchLoader
from wrpo_nemo.models.presets import get_preset
from wrpo_nemo.training.engine import OptimSettings, build_model, build_optimizer, train_step, wrap_ddp
from wrpo_nemo.training.parallel import destroy_parallel, initialize_parallel
from wrpo_nemo.training.step import WrpoLossSettings, make_forward_step, sft_loss_func, wrpo_loss_func

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
        optimizer, scheduler = build_optimizer(ddp, settings, total_steps=4)
        reference = np.random.default_rng(0).normal(-30, 3, size=(len(dataset), 3)).astype(np.float32)
        loader = _loader(dataset, stage, micro_batch_size, reference if stage == "wrpo" else None)
        loss_settings = WrpoLossSettings(beta=0.1)
        vocab = read_model_config(start_ckpt).vocab_size
        history = []
        for step in range(STEPS):
            alpha = 0.1 * step / STEPS
            if stage == "wrpo":
                forward_step = make_forward_step(
                    lambda b, a=alpha: partial(wrpo_loss_func, b, a, loss_settings, vocab), device
                )
            else:
                forward_step = make_forward_step(lambda b: partial(sft_loss_func, b, vocab), device)
            history.append(train_step(ddp, optimizer, scheduler, forward_step, loader.next_global_batch()))
        save_model_checkpoint(model, Path(out_dir) / "weights", read_model_config(start_ckpt))
        if rank == 0:
            torch.save(history, Path(out_dir) / "metrics.pt")
    finally:
        destroy_parallel()
