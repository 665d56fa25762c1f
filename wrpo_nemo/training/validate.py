"""Every check of a run config's values, run once at start-up before anything is written.

:func:`validate_config` needs only the config, the world size and whether there is a GPU; :func:`validate_model`
adds the rules that need the model's architecture (heads and query groups vs TP, layers vs PP, the attention
window vs the sequence length). :func:`check_before_writing` runs both, resolving the architecture from
``model.*`` without the tokenizer, so the recipe can stop a bad run before the toy data, the cache or
``run_dir`` exist. Each failure raises :class:`ConfigError` naming the dotted key as the user writes it.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from wrpo_nemo.data.layout import check_layout
from wrpo_nemo.losses import PREFERENCES
from wrpo_nemo.models.builder import FP8_FORMATS
from wrpo_nemo.models.config import ModelConfig
from wrpo_nemo.training.config import ConfigError, RunConfig, StageSection

STAGES = ("sft", "wrpo")


def _at_least(value: int | float | None, minimum: int | float, key: str, none_means: str = "") -> None:
    if value is None:
        return
    if value < minimum:
        extra = f" (or null: {none_means})" if none_means else ""
        raise ConfigError(f"{key} must be >= {minimum}{extra}, got {value}")


def _check_choices(obj: Any, prefix: str) -> None:
    """Every ``Literal`` field of the dataclass tree ``obj`` holds one of its choices (the configs built in
    code, not through :func:`load_run_config`, skip that check otherwise)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
        elif typing.get_origin(hint) is Literal and value not in typing.get_args(hint):
            raise ConfigError(f"{prefix}{f.name} must be one of {list(typing.get_args(hint))}, got {value!r}")


def _check_stage(section: StageSection, stage: str) -> None:
    for name in ("global_batch_size", "micro_batch_size", "epochs"):
        _at_least(getattr(section, name), 1, f"{stage}.{name}")
    _at_least(section.rows_per_micro_batch, 1, f"{stage}.rows_per_micro_batch", "planned from the data")
    _at_least(section.max_steps, 1, f"{stage}.max_steps", "no limit")
    o, key = section.optim, f"{stage}.optim"
    _at_least(o.lr, 0.0, f"{key}.lr")
    if not 0.0 <= o.min_lr <= o.lr:
        raise ConfigError(f"{key}.min_lr={o.min_lr} must lie in [0, {key}.lr={o.lr}]")
    if not 0.0 <= o.warmup_ratio <= 1.0:
        raise ConfigError(f"{key}.warmup_ratio must lie in [0, 1], got {o.warmup_ratio}")
    _at_least(o.weight_decay, 0.0, f"{key}.weight_decay")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(o, name) < 1.0:
            raise ConfigError(f"{key}.{name} must lie in [0, 1), got {getattr(o, name)}")
    if o.adam_eps <= 0:
        raise ConfigError(f"{key}.adam_eps must be > 0, got {o.adam_eps}")
    _at_least(o.clip_grad, 0.0, f"{key}.clip_grad")


def validate_config(cfg: RunConfig, world_size: int, cuda: bool) -> int:
    """Refuse a config that cannot run on ``world_size`` processes (with or without a GPU), naming the key;
    returns the data-parallel size. Needs no model, tokenizer or data."""
    _check_choices(cfg, "")
    for stage in cfg.stages:
        if stage not in STAGES:
            raise ConfigError(f"stages may hold 'sft' and 'wrpo', got {stage!r}")
    if len(set(cfg.stages)) != len(cfg.stages):
        raise ConfigError(f"stages names a stage twice: {cfg.stages}")
    if not cfg.run_dir:
        raise ConfigError("run_dir must not be empty")
    _at_least(cfg.seed, 0, "seed")

    m = cfg.model
    if not (m.preset or m.hf_path or m.checkpoint):
        raise ConfigError("set one of model.preset, model.hf_path or model.checkpoint")
    if m.fp8 is not None:
        if m.fp8 not in FP8_FORMATS:
            raise ConfigError(f"model.fp8={m.fp8!r} is not one of {FP8_FORMATS} (or null)")
        if not cuda:
            raise ConfigError("model.fp8 is set but there is no GPU: set model.fp8=null")

    p = cfg.parallel
    for name in ("tensor", "pipeline", "context"):
        _at_least(getattr(p, name), 1, f"parallel.{name}")
    model_parallel = p.tensor * p.pipeline * p.context
    if world_size % model_parallel:
        raise ConfigError(
            f"parallel.tensor x parallel.pipeline x parallel.context = {model_parallel} does not divide the "
            f"{world_size} launched processes"
        )
    if p.context > 1:
        raise ConfigError(
            f"parallel.context={p.context}: context parallelism is not supported (packed THD rows are not split "
            "across context-parallel ranks); set parallel.context=1 and use parallel.tensor/pipeline instead"
        )
    dp = world_size // model_parallel

    d = cfg.data
    try:
        check_layout(d.layout)
        d.source.read.validate(prefix="data.source.read.")
        d.source.tokenize.validate(prefix="data.source.tokenize.")
        d.split.validate(prefix="data.split.")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if d.toy:
        _at_least(d.toy_examples, 1, "data.toy_examples")
        _at_least(d.toy_max_operand, 1, "data.toy_max_operand")
    else:
        if not d.source.sources:
            raise ConfigError("data.source.sources is empty: list the record files (or set data.toy=true)")
        if not (d.tokenizer or m.hf_path):
            raise ConfigError("data.tokenizer (or model.hf_path) must name a tokenizer folder")
    _at_least(d.source.num_workers, 0, "data.source.num_workers")
    tok = d.source.tokenize
    if "wrpo" in cfg.stages and tok.seq_length < 3 * tok.max_length:
        raise ConfigError(
            f"data.source.tokenize.seq_length={tok.seq_length} cannot hold one prompt with its three responses "
            f"(3 x data.source.tokenize.max_length = {3 * tok.max_length}): raise seq_length or lower max_length"
        )

    for stage in STAGES:
        _check_stage(getattr(cfg, stage), stage)
    for stage in cfg.stages:
        section = getattr(cfg, stage)
        if section.global_batch_size % (section.micro_batch_size * dp):
            raise ConfigError(
                f"{stage}.global_batch_size={section.global_batch_size} is not a multiple of "
                f"{stage}.micro_batch_size={section.micro_batch_size} x data-parallel size {dp}"
            )

    loss = cfg.wrpo.loss
    if loss.preference not in PREFERENCES:
        raise ConfigError(f"wrpo.loss.preference must be one of {list(PREFERENCES)}, got {loss.preference!r}")
    if loss.beta <= 0:
        raise ConfigError(f"wrpo.loss.beta must be > 0, got {loss.beta}")
    if not 0.0 <= loss.label_smoothing < 0.5:
        raise ConfigError(f"wrpo.loss.label_smoothing must lie in [0, 0.5), got {loss.label_smoothing}")
    _at_least(loss.sft_weight, 0.0, "wrpo.loss.sft_weight")
    try:
        cfg.wrpo.alpha.validate(prefix="wrpo.alpha.")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    _at_least(cfg.checkpoint.save_interval, 0, "checkpoint.save_interval")
    _at_least(cfg.checkpoint.keep_last, 0, "checkpoint.keep_last")
    for name in ("log_interval", "eval_interval", "eval_prompts"):
        _at_least(getattr(cfg.logging, name), 0, f"logging.{name}")
    return dp


def validate_model(cfg: RunConfig, model_cfg: ModelConfig) -> None:
    """Refuse a model that cannot be split as ``parallel.*`` asks or that needs attention the trainer does not
    implement, naming the key."""
    p = cfg.parallel
    try:
        model_cfg.check_parallel_layout(p.tensor, p.pipeline)
    except ValueError as exc:
        raise ConfigError(f"{exc} (parallel.tensor={p.tensor}, parallel.pipeline={p.pipeline})") from None
    # Packed rows are attended per sequence (a prompt and one response, at most max_length tokens), so the
    # longest span any token attends over is max_length, not the row's seq_length.
    max_length = cfg.data.source.tokenize.max_length
    try:
        model_cfg.check_seq_length(max_length)
    except ValueError:
        raise ConfigError(
            f"data.source.tokenize.max_length={max_length} (a prompt with one response) exceeds the model's "
            f"sliding_window={model_cfg.sliding_window}: sliding-window attention is not implemented; lower "
            "data.source.tokenize.max_length"
        ) from None


def check_before_writing(cfg: RunConfig, world_size: int, cuda: bool) -> int:
    """:func:`validate_config` and :func:`validate_model` on the architecture ``model.*`` names (read without
    the tokenizer: the toy vocabulary does not change any rule); returns the data-parallel size."""
    from wrpo_nemo.training.setup import resolve_model_config

    dp = validate_config(cfg, world_size, cuda)
    validate_model(cfg, resolve_model_config(cfg, None))
    return dp
