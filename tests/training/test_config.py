"""The run config is checked against one typed schema before anything is built; errors name the key."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from wrpo_nemo.models.presets import get_preset
from wrpo_nemo.training.config import ConfigError, RunConfig, load_run_config
from wrpo_nemo.training.setup import validate_layout

CONF = Path(__file__).resolve().parents[2] / "conf"


def _yaml(name: str) -> dict:
    return yaml.safe_load((CONF / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_every_shipped_config_matches_the_schema(name):
    data = _yaml(name)
    data.pop("hydra", None)
    data.pop("defaults", None)
    # ${run_dir} interpolations are Hydra's; resolve the one the configs use for this check.
    text = yaml.safe_dump(data).replace("${run_dir}", data.get("run_dir", "runs/x"))
    cfg = load_run_config(yaml.safe_load(text))
    assert isinstance(cfg, RunConfig)


def test_paper_configs_carry_the_reference_hyperparameters():
    sft = load_run_config(_strip(_yaml("sft_llama3_8b")))
    wrpo = load_run_config(_strip(_yaml("wrpo_llama3_8b")))
    assert sft.stages == ["sft"] and wrpo.stages == ["wrpo"]
    assert sft.sft.optim.lr == 7e-6 and wrpo.wrpo.optim.lr == 3e-7
    for section in (sft.sft, wrpo.wrpo):
        assert section.optim.warmup_ratio == 0.1 and section.epochs == 1
    assert wrpo.wrpo.global_batch_size == 128  # prompts; SFT counts sequences, see conf/sft_llama3_8b.yaml
    assert wrpo.wrpo.loss.beta == 0.01 and wrpo.wrpo.loss.preference == "dpo"
    assert wrpo.wrpo.loss.label_smoothing == 0.0 and wrpo.wrpo.loss.sft_weight == 0.0
    assert wrpo.wrpo.alpha.kind == "linear" and wrpo.wrpo.alpha.alpha_max == 0.1
    assert (
        wrpo.data.source.tokenize.max_length == 2048 and wrpo.data.source.tokenize.max_prompt_length == 1800
    )
    assert sft.seed == wrpo.seed == 42


def _strip(data: dict) -> dict:
    data.pop("hydra", None)
    data.pop("defaults", None)
    return yaml.safe_load(yaml.safe_dump(data).replace("${run_dir}", data.get("run_dir", "runs/x")))


@pytest.mark.parametrize(
    "data, match",
    [
        ({"wrpo": {"loss": {"betta": 0.1}}}, r"unknown key wrpo\.loss\.betta"),
        ({"sft": {"global_batch_size": "many"}}, r"sft\.global_batch_size must be an integer"),
        ({"wrpo": {"loss": {"preference": "kto"}}}, r"wrpo\.loss\.preference must be one of"),
        ({"wrpo": {"alpha": {"alpha_max": 2.0}}}, r"alpha_schedule\.alpha_max"),
        ({"stages": ["sft", "ppo"]}, r"stages may hold"),
        ({"model": {"recompute": "some"}}, r"model\.recompute must be one of"),
        ({"checkpoint": {"resume": "yes"}}, r"checkpoint\.resume must be true or false"),
        (
            {"data": {"source": {"tokenize": {"max_length": 64, "max_prompt_length": 100}}}},
            r"data\.source\.tokenize\.max_prompt_length \(100\) must be positive and below "
            r"data\.source\.tokenize\.max_length \(64\)",
        ),
        (
            {"data": {"source": {"tokenize": {"max_length": 64, "max_prompt_length": 40, "seq_length": 32}}}},
            r"data\.source\.tokenize\.seq_length \(32\) must be at least",
        ),
    ],
)
def test_schema_errors_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        load_run_config(data)


def _layout_cfg(**overrides) -> RunConfig:
    cfg = RunConfig()
    for path, value in overrides.items():
        obj = cfg
        *parents, leaf = path.split("__")
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, leaf, value)
    return cfg


@pytest.mark.parametrize(
    "overrides, world, match",
    [
        ({"parallel__tensor": 3}, 3, r"num_attention_heads=32 is not divisible by TP=3"),
        ({"parallel__pipeline": 5}, 5, r"num_layers=32 is not divisible by PP=5"),
        ({"parallel__tensor": 2}, 3, r"does not divide the 3 launched processes"),
        (
            {"wrpo__micro_batch_size": 3},
            8,
            r"wrpo\.global_batch_size=128 is not a multiple of wrpo\.micro_batch_size=3",
        ),
        ({"model__fp8": "hybrid"}, 1, r"model\.fp8 is set but there is no GPU"),
        ({"parallel__context": 2}, 2, r"parallel\.context=2: context parallelism is not supported"),
        ({"data__layout": "packed"}, 1, r"data\.layout='packed' is not one of shared_prompt, separate"),
    ],
)
def test_impossible_layouts_stop_before_building_and_name_the_key(overrides, world, match):
    with pytest.raises(ConfigError, match=match):
        validate_layout(_layout_cfg(**overrides), get_preset("llama3_8b"), world)


def test_a_row_too_short_for_three_responses_is_refused():
    cfg = RunConfig()
    cfg.data.source.tokenize = dataclasses.replace(cfg.data.source.tokenize, max_length=2048, seq_length=4096)
    with pytest.raises(ConfigError, match=r"data\.source\.tokenize\.seq_length=4096 cannot hold one prompt"):
        validate_layout(cfg, get_preset("llama3_8b"), 8)


def test_a_valid_layout_returns_the_data_parallel_size():
    cfg = _layout_cfg(parallel__tensor=2, parallel__pipeline=2)
    cfg.data.source.tokenize = dataclasses.replace(cfg.data.source.tokenize, max_length=2048, seq_length=6144)
    assert validate_layout(cfg, get_preset("llama3_8b"), 16) == 4
