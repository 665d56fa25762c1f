"""The run configuration: one typed schema, checked before anything is built.

Hydra composes ``conf/<name>.yaml`` with the command line's ``key=value`` overrides over
:func:`structured_schema` (this schema as an OmegaConf structured config), so a misspelt key, a wrong type or
a value outside a fixed set of choices fails at composition, naming the key; :func:`load_run_config` turns the
result into these dataclasses (the same checks, for mappings from elsewhere), and
:mod:`wrpo_nemo.training.validate` checks the values against each other, the world size and the model before
anything is written.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from wrpo_nemo.alpha import AlphaSchedule
from wrpo_nemo.data.cache import DataConfig
from wrpo_nemo.data.splits import SplitConfig
from wrpo_nemo.training.engine import OptimSettings
from wrpo_nemo.training.step import WrpoLossSettings


@dataclass
class ModelSection:
    """Which model to train and how to run it."""

    preset: str | None = "tiny"
    """Built-in architecture (tiny, llama3_8b, llama3_70b, llama31_8b, llama31_70b); unused with ``hf_path``."""
    hf_path: str | None = None
    """Hugging Face model folder to start from (config, weights, tokenizer), imported on the fly."""
    checkpoint: str | None = None
    """Model checkpoint (weights, any TP/PP) to start from; takes precedence over ``hf_path``'s weights."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """``auto``: bf16 (fp32 main params and grads) on GPUs, fp32 on CPUs."""
    fp8: str | None = None
    """TransformerEngine FP8 recipe (``hybrid`` or ``e4m3``); needs TransformerEngine and a Hopper-class GPU."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation (the paper used gradient checkpointing: ``full``)."""


@dataclass
class ParallelSection:
    """Model-parallel layout; data parallelism takes the remaining ranks."""

    tensor: int = 1
    """Tensor-parallel size."""
    pipeline: int = 1
    """Pipeline-parallel size (megatron's 1F1B schedule)."""
    context: int = 1
    """Context-parallel size. Only 1: packed THD rows are not split across context-parallel ranks yet."""


@dataclass
class DataSection:
    """Records, tokenizer, splits."""

    toy: bool = False
    """Use the embedded toy task (its records and word-level tokenizer are generated into ``run_dir``)."""
    toy_examples: int = 3000
    """Records of the toy task."""
    toy_max_operand: int = 99
    """Largest operand of the toy task's questions (smaller is easier to learn)."""
    tokenizer: str | None = None
    """Tokenizer folder; defaults to ``model.hf_path``. Ignored with ``toy``."""
    source: DataConfig = field(default_factory=DataConfig)
    """Files, layout, lengths and cache (``data.source.tokenize.seq_length`` is the packed row length)."""
    layout: str = "shared_prompt"
    """WRPO row layout: ``shared_prompt`` (each prompt once, its three responses after it, each attending to the
    prompt and itself) or ``separate`` (``prompt + response`` three times). Same log-probs; shared computes each
    prompt once. SFT always packs one ``prompt + y_ws`` per sequence."""
    split: SplitConfig = field(default_factory=SplitConfig)
    """SFT / WRPO / evaluation shares by prompt-id hash."""


@dataclass
class StageSection:
    """Optimizer, batch and length of one stage."""

    optim: OptimSettings = field(default_factory=OptimSettings)
    """AdamW and the cosine schedule with warm-up."""
    global_batch_size: int = 128
    """Prompts per optimizer step (SFT: y_ws sequences), over all data-parallel ranks."""
    micro_batch_size: int = 1
    """Prompts per micro-batch on one rank (gradient accumulation covers the rest)."""
    rows_per_micro_batch: int | None = None
    """Packed rows per micro-batch; ``None``: the most any micro-batch of the run needs."""
    epochs: int = 1
    """Passes over the stage's split."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (the schedules still span ``max_steps``)."""


@dataclass
class WrpoSection(StageSection):
    """Stage 2: WRPO on the three responses of each prompt."""

    loss: WrpoLossSettings = field(default_factory=WrpoLossSettings)
    """beta, objective, label smoothing, SimPO gamma, SFT weight."""
    alpha: AlphaSchedule = field(default_factory=AlphaSchedule)
    """Schedule of the source response's weight in the chosen reward."""
    reference: Literal["precompute", "online"] = "precompute"
    """``precompute``: one forward pass of the frozen starting model over the split, stored beside the data
    cache and reused; ``online``: a frozen copy computes them every step (as the reference program)."""
    reference_precision: Literal["model", "bf16"] = "model"
    """Precision of the reference pass: ``model`` runs it in the policy's (bf16 on GPUs, fp32 on CPUs); ``bf16``
    runs a frozen bf16 copy of the starting weights whatever the policy's precision (stored log-probs are keyed by
    the precision they were computed in)."""


@dataclass
class CheckpointSection:
    """Training checkpoints (megatron dist checkpoints: weights, optimizer, schedule, data position, RNG)."""

    save_interval: int = 0
    """Save every N optimizer steps (0: only at the end of each stage)."""
    keep_last: int = 2
    """Checkpoints kept per stage; older ones are deleted after a newer one is complete."""
    resume: bool = False
    """Continue from the newest checkpoint in ``run_dir`` (bit-for-bit at the same layout)."""
    async_save: bool = False
    """Write the periodic checkpoints in the background (megatron's asynchronous dist-checkpoint save): training
    goes on while a forked writer stores the tensors; a checkpoint is published only once written everywhere.
    The final (and preemption) save is synchronous."""


@dataclass
class LoggingSection:
    """What the run reports."""

    log_interval: int = 1
    """Console line every N steps (metrics.jsonl and TensorBoard get every step)."""
    eval_interval: int = 0
    """Evaluate on the held-out split every N steps (0: only at the end of each stage)."""
    eval_prompts: int = 64
    """Held-out prompts per evaluation."""
    tensorboard: bool = True
    """Write TensorBoard events under ``run_dir/tensorboard``."""
    wandb_project: str | None = None
    """Weights & Biases project (``pip install -e .[wandb]``): one W&B run per stage with every metrics.jsonl
    record, continued on resume (``WANDB_MODE=offline`` for a later ``wandb sync``); ``None`` disables it."""
    plots: bool = True
    """Write PNG plots of loss, margins, accuracies and alpha at the end."""


@dataclass
class ExportSection:
    """Hugging Face export at the end of the run."""

    hf: bool = True
    """Write ``run_dir/hf`` (safetensors, config, tokenizer) from the final weights."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype of the exported weights."""


@dataclass
class RunConfig:
    """Everything a run needs; ``conf/*.yaml`` mirror it key for key."""

    run_dir: str = "runs/default"
    """Where checkpoints, metrics, plots and the export go."""
    seed: int = 42
    """Seeds model initialisation and data order."""
    stages: list[str] = field(default_factory=lambda: ["sft", "wrpo"])
    """Stages to run, in order: ``sft`` (stage 1, NLL on y_ws) and/or ``wrpo`` (stage 2)."""
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    sft: StageSection = field(default_factory=StageSection)
    wrpo: WrpoSection = field(default_factory=WrpoSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    export: ExportSection = field(default_factory=ExportSection)


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or impossible; the message names the key."""


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key} must not be null")
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{key} must be one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported schema type {hint!r}")


def build_dataclass(cls: type, data: Any, key: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, recursively; unknown keys and wrong types name the key.

    A class with ``validate(prefix)`` (alpha schedule, read, tokenize and split settings) is checked before it
    is built, its messages naming ``key.field``.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{key}." if key else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} (known: {sorted(names)})")
    kwargs = {
        name: _convert(value, hints[name], f"{key}.{name}" if key else name) for name, value in data.items()
    }
    check = getattr(cls, "validate", None)
    if check is not None:
        # A section with ``validate(prefix)`` is checked under its dotted key before it is built: checks of
        # its own construction (AlphaSchedule's) would name the field alone.
        values = {f.name: getattr(_defaults(cls), f.name) for f in dataclasses.fields(cls)} | kwargs
        try:
            check(types.SimpleNamespace(**values), prefix=f"{key}." if key else "")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key or 'config'}: {exc}") from exc


@functools.cache
def _defaults(cls: type) -> Any:
    return cls()


def load_run_config(data: dict[str, Any]) -> RunConfig:
    """The typed run config of a plain mapping (Hydra's composed config, ``hydra`` key removed).

    Unknown keys and wrong types raise :class:`ConfigError` naming the dotted key; the values are checked
    against each other by :func:`wrpo_nemo.training.validate.validate_config`.
    """
    return build_dataclass(RunConfig, {k: v for k, v in data.items() if k not in ("hydra", "defaults")})


# ---------------------------------------------------------------------------------- Hydra's structured schema


def _structured_type(hint: Any, name: str) -> Any:
    """The OmegaConf-supported type of ``hint``: a ``Literal`` of strings becomes an Enum of the same names
    (OmegaConf has no ``Literal``; an Enum node refuses other values at composition, naming the key)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        values = typing.get_args(hint)
        if not all(isinstance(v, str) for v in values):
            return Any  # checked by load_run_config
        return enum.Enum(name, {v: v for v in values})
    if origin in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(hint) if o is not type(None)]
        if len(options) != 1:
            return Any  # OmegaConf 2.3 has no unions: load_run_config checks them
        inner = _structured_type(options[0], name)
        return inner | None if type(None) in typing.get_args(hint) else inner
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return list[_structured_type(item, name)]
    if dataclasses.is_dataclass(hint):
        return _structured_class(hint)
    return hint


@functools.cache
def _structured_class(cls: type) -> type:
    """A plain (mutable, unchecked) copy of dataclass ``cls`` with OmegaConf-supported field types."""
    hints = typing.get_type_hints(cls)
    fields = [
        (f.name, _structured_type(hints[f.name], f"{cls.__name__}_{f.name}"), dataclasses.field(default=None))
        for f in dataclasses.fields(cls)
        if f.init
    ]
    return dataclasses.make_dataclass(cls.__name__, fields)


def _structured_value(value: Any, hint: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return _structured_instance(value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint[value]
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return [_structured_value(v, item) for v in value]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and value is not None:
        (inner,) = [o for o in typing.get_args(hint) if o is not type(None)]
        return _structured_value(value, inner)
    return value


def _structured_instance(obj: Any) -> Any:
    cls = _structured_class(type(obj))
    hints = typing.get_type_hints(cls)
    return cls(
        **{f.name: _structured_value(getattr(obj, f.name), hints[f.name]) for f in dataclasses.fields(cls)}
    )


def structured_schema() -> Any:
    """:class:`RunConfig`'s defaults as an OmegaConf structured config for Hydra's ConfigStore: every key with
    its type, ``Literal`` choices as Enums of the same names. Convert the composed config back with
    ``enum_to_str=True`` for :func:`load_run_config`."""
    from omegaconf import OmegaConf

    return OmegaConf.structured(_structured_instance(RunConfig()))
