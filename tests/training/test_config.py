"""The run config is checked against one typed schema and every start-up rule before anything is written;
each error names the dotted key as the user writes it."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from wrpo_nemo.data.records import ReadConfig
from wrpo_nemo.models.presets import get_preset
from wrpo_nemo.training.config import ConfigError, RunConfig, load_run_config
from wrpo_nemo.training.hydra_config import compose_run_config, preflight
from wrpo_nemo.training.setup import resolve_model_config, validate_layout
from wrpo_nemo.training.validate import check_before_writing, validate_config, validate_model

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
RECIPE = ROOT / "recipes" / "wrpo.py"
# The architectures the GPU recipes start from (their model.hf_path exists only on the cluster).
SHIPPED_ARCHITECTURES = {
    "sft_llama3_8b": "llama3_8b",
    "wrpo_llama3_8b": "llama3_8b",
    "wrpo_llama3_70b": "llama3_70b",
}


def _strip(data: dict) -> dict:
    data.pop("hydra", None)
    data.pop("defaults", None)
    # ${run_dir} interpolations are Hydra's; resolve the one the configs use for the plain-mapping path.
    return yaml.safe_load(yaml.safe_dump(data).replace("${run_dir}", data.get("run_dir", "runs/x")))


def _yaml(name: str) -> dict:
    return _strip(yaml.safe_load((CONF / f"{name}.yaml").read_text()))


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_every_shipped_config_composes_through_hydra_and_passes_every_check(name):
    cfg = compose_run_config(CONF, name)
    assert cfg == load_run_config(_yaml(name))  # the typed Hydra schema changes no value
    p = cfg.parallel
    world = p.tensor * p.pipeline * p.context  # the GPU recipes' model-parallel group, data-parallel 1
    validate_config(cfg, world, cuda=False)
    if name in SHIPPED_ARCHITECTURES:
        validate_model(cfg, get_preset(SHIPPED_ARCHITECTURES[name]))
    else:
        assert check_before_writing(cfg, world, cuda=False) == 1


def test_paper_configs_carry_the_reference_hyperparameters():
    sft = compose_run_config(CONF, "sft_llama3_8b")
    wrpo = compose_run_config(CONF, "wrpo_llama3_8b")
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


@pytest.mark.parametrize(
    "override, key",
    [
        ("wrpo.loss.betta=0.1", "wrpo.loss.betta"),
        ("seeed=1", "seeed"),
        ("sft.global_batch_size=many", "sft.global_batch_size"),
        ("data.source.tokenize.max_length=1.5", "data.source.tokenize.max_length"),
        ("checkpoint.resume=maybe", "checkpoint.resume"),
        ("wrpo.loss.preference=kto", "wrpo.loss.preference"),
        ("wrpo.alpha.kind=cosine", "wrpo.alpha.kind"),
        ("model.recompute=some", "model.recompute"),
        ("data.source.read.layout=columns", "data.source.read.layout"),
        ("data.source.read.on_invalid=ignore", "data.source.read.on_invalid"),
        ("data.source.tokenize.length_policy=cut", "data.source.tokenize.length_policy"),
        ("export.dtype=int8", "export.dtype"),
    ],
)
def test_hydra_refuses_unknown_keys_wrong_types_and_bad_choices_at_composition(override, key):
    with pytest.raises(ConfigError, match=rf"full_key: {key}\b"):
        compose_run_config(CONF, "wrpo_tiny", [override])


@pytest.mark.parametrize(
    "data, match",
    [
        ({"wrpo": {"loss": {"betta": 0.1}}}, r"unknown key wrpo\.loss\.betta"),
        ({"sft": {"global_batch_size": "many"}}, r"sft\.global_batch_size must be an integer"),
        ({"wrpo": {"loss": {"preference": "kto"}}}, r"wrpo\.loss\.preference must be one of"),
        ({"wrpo": {"alpha": {"alpha_max": 2.0}}}, r"^wrpo\.alpha\.alpha_max must lie in \[0, 1\]"),
        ({"wrpo": {"alpha": {"kind": "linear_until", "ramp_fraction": 0}}}, r"^wrpo\.alpha\.ramp_fraction"),
        ({"model": {"recompute": "some"}}, r"model\.recompute must be one of"),
        ({"checkpoint": {"resume": "yes"}}, r"checkpoint\.resume must be true or false"),
        ({"data": {"split": {"eval_fraction": 1.0}}}, r"^data\.split\.eval_fraction must lie in \[0, 1\)"),
        (
            {"data": {"source": {"tokenize": {"max_length": 64, "max_prompt_length": 100}}}},
            r"data\.source\.tokenize\.max_prompt_length \(100\) must be positive and below "
            r"data\.source\.tokenize\.max_length \(64\)",
        ),
    ],
)
def test_a_plain_mapping_is_typed_with_the_same_key_names(data, match):
    with pytest.raises(ConfigError, match=match):
        load_run_config(data)


def _check(*overrides: str, world: int = 1, cuda: bool = False, model: str | None = None) -> None:
    """What the recipe runs before writing anything, on ``conf/wrpo_tiny.yaml`` with ``overrides``."""
    cfg = compose_run_config(CONF, "wrpo_tiny", overrides)
    if model is None:
        check_before_writing(cfg, world, cuda)
    else:
        validate_config(cfg, world, cuda)
        validate_model(cfg, get_preset(model))


@pytest.mark.parametrize(
    "overrides, world, match",
    [
        # layout
        (["parallel.tensor=0"], 1, r"parallel\.tensor must be >= 1, got 0"),
        (["parallel.pipeline=-1"], 1, r"parallel\.pipeline must be >= 1"),
        (["parallel.context=0"], 1, r"parallel\.context must be >= 1"),
        (["parallel.tensor=2"], 3, r"parallel\.tensor x .* = 2 does not divide the 3 launched processes"),
        (["parallel.context=2"], 2, r"parallel\.context=2: context parallelism is not supported"),
        # batch multiples
        (
            ["wrpo.micro_batch_size=3"],
            1,
            r"wrpo\.global_batch_size=32 is not a multiple of wrpo\.micro_batch_s",
        ),
        (
            ["sft.global_batch_size=48"],
            2,
            r"sft\.global_batch_size=48 .* sft\.micro_batch_size=16 x data-parallel size 2",
        ),
        # sizes, counts and intervals
        (["sft.micro_batch_size=0"], 1, r"sft\.micro_batch_size must be >= 1, got 0"),
        (["sft.global_batch_size=0"], 1, r"sft\.global_batch_size must be >= 1, got 0"),
        (["sft.epochs=0"], 1, r"sft\.epochs must be >= 1, got 0"),
        (["wrpo.max_steps=-1"], 1, r"wrpo\.max_steps must be >= 1 \(or null: no limit\), got -1"),
        (["sft.max_steps=0"], 1, r"sft\.max_steps must be >= 1"),
        (["wrpo.rows_per_micro_batch=0"], 1, r"wrpo\.rows_per_micro_batch must be >= 1"),
        (["logging.log_interval=-1"], 1, r"logging\.log_interval must be >= 0"),
        (["logging.eval_interval=-5"], 1, r"logging\.eval_interval must be >= 0"),
        (["logging.eval_prompts=-1"], 1, r"logging\.eval_prompts must be >= 0"),
        (["checkpoint.keep_last=-1"], 1, r"checkpoint\.keep_last must be >= 0"),
        (["checkpoint.save_interval=-2"], 1, r"checkpoint\.save_interval must be >= 0"),
        (["seed=-1"], 1, r"seed must be >= 0"),
        (["run_dir="], 1, r"run_dir must not be empty"),
        (["data.toy_examples=0"], 1, r"data\.toy_examples must be >= 1"),
        (["data.toy_max_operand=0"], 1, r"data\.toy_max_operand must be >= 1"),
        (["data.source.num_workers=-1"], 1, r"data\.source\.num_workers must be >= 0"),
        # optimizer
        (["sft.optim.lr=-1"], 1, r"sft\.optim\.lr must be >= 0"),
        (["sft.optim.min_lr=0.01"], 1, r"sft\.optim\.min_lr=0\.01 must lie in \[0, sft\.optim\.lr=0\.003\]"),
        (["wrpo.optim.warmup_ratio=1.5"], 1, r"wrpo\.optim\.warmup_ratio must lie in \[0, 1\]"),
        (["sft.optim.weight_decay=-0.1"], 1, r"sft\.optim\.weight_decay must be >= 0"),
        (["wrpo.optim.adam_beta2=1.0"], 1, r"wrpo\.optim\.adam_beta2 must lie in \[0, 1\)"),
        (["sft.optim.adam_eps=0"], 1, r"sft\.optim\.adam_eps must be > 0"),
        (["wrpo.optim.clip_grad=-1"], 1, r"wrpo\.optim\.clip_grad must be >= 0"),
        # tokenize lengths
        (
            ["data.source.tokenize.max_prompt_length=100"],
            1,
            r"^data\.source\.tokenize\.max_prompt_length \(100\)",
        ),
        (["data.source.tokenize.seq_length=32"], 1, r"^data\.source\.tokenize\.seq_length \(32\) must be at"),
        (["data.source.tokenize.max_length=100"], 1, r"^data\.source\.tokenize\.seq_length=256 cannot hold"),
        (["data.split.sft_fraction=1.0"], 1, r"data\.split\.sft_fraction must lie in \[0, 1\)"),
        # fp8, stages, data
        (["model.fp8=hybrid"], 1, r"model\.fp8 is set but there is no GPU: set model\.fp8=null"),
        (["stages=[sft,ppo]"], 1, r"stages may hold 'sft' and 'wrpo', got 'ppo'"),
        (["stages=[sft,sft]"], 1, r"stages names a stage twice"),
        (["data.layout=packed"], 1, r"data\.layout='packed' is not one of shared_prompt, separate"),
        (["data.toy=false"], 1, r"data\.source\.sources is empty"),
        (["data.toy=false", "data.source.sources=[x.jsonl]"], 1, r"data\.tokenizer \(or model\.hf_path\)"),
        (["model.preset=null"], 1, r"set one of model\.preset, model\.hf_path or model\.checkpoint"),
        (["model.preset=gpt5"], 1, r"model\.preset: unknown model preset 'gpt5'"),
        # WRPO objective and alpha schedule
        (["wrpo.loss.beta=0"], 1, r"wrpo\.loss\.beta must be > 0"),
        (["wrpo.loss.label_smoothing=0.5"], 1, r"wrpo\.loss\.label_smoothing must lie in \[0, 0\.5\)"),
        (["wrpo.loss.sft_weight=-1"], 1, r"wrpo\.loss\.sft_weight must be >= 0"),
        (["wrpo.alpha.alpha_max=2"], 1, r"^wrpo\.alpha\.alpha_max must lie in \[0, 1\], got 2\.0"),
        (
            ["wrpo.alpha.kind=linear_until", "wrpo.alpha.ramp_fraction=0"],
            1,
            r"^wrpo\.alpha\.ramp_fraction must lie",
        ),
    ],
)
def test_every_start_up_rule_names_the_key(overrides, world, match):
    with pytest.raises(ConfigError, match=match):
        _check(*overrides, world=world)


def test_fp8_names_the_recipes_it_knows_on_a_gpu():
    with pytest.raises(ConfigError, match=r"model\.fp8='e5m2' is not one of \('e4m3', 'hybrid'\)"):
        _check("model.fp8=e5m2", cuda=True)
    _check("model.fp8=hybrid", cuda=True)


@pytest.mark.parametrize(
    "overrides, world, match",
    [
        (["parallel.tensor=3"], 3, r"num_attention_heads=32 is not divisible by TP=3 \(parallel\.tensor=3"),
        (["parallel.tensor=16"], 16, r"num_query_groups=8 is not divisible by TP=16 \(parallel\.tensor=16"),
        (["parallel.pipeline=5"], 5, r"num_layers=32 is not divisible by PP=5 \(.*parallel\.pipeline=5\)"),
    ],
)
def test_the_model_must_split_as_parallel_asks(overrides, world, match):
    with pytest.raises(ConfigError, match=match):
        _check(*overrides, world=world, model="llama3_8b")


def test_sequences_longer_than_a_sliding_window_are_refused():
    cfg = compose_run_config(CONF, "wrpo_tiny")
    mistral = dataclasses.replace(get_preset("llama3_8b"), family="mistral", sliding_window=32)
    with pytest.raises(ConfigError, match=r"^data\.source\.tokenize\.max_length=64 .* sliding_window=32"):
        validate_model(cfg, mistral)
    validate_model(cfg, dataclasses.replace(mistral, sliding_window=64))


def test_a_config_built_in_code_gets_the_same_checks():
    cfg = compose_run_config(CONF, "wrpo_tiny")
    cfg.wrpo.loss = dataclasses.replace(cfg.wrpo.loss, preference="kto")
    with pytest.raises(ConfigError, match=r"^wrpo\.loss\.preference must be one of"):
        validate_config(cfg, 1, cuda=False)
    cfg = compose_run_config(CONF, "wrpo_tiny")
    cfg.data.source.read = ReadConfig(on_invalid="ignore")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^data\.source\.read\.on_invalid must be one of"):
        validate_config(cfg, 1, cuda=False)
    with pytest.raises(ValueError, match=r"^data\.source\.read\.on_invalid must be 'error' or 'skip'"):
        cfg.data.source.read.validate(prefix="data.source.read.")


def test_validate_layout_runs_every_check_and_returns_the_data_parallel_size():
    cfg = RunConfig()
    cfg.data.toy = True
    cfg.parallel.tensor = cfg.parallel.pipeline = 2
    cfg.data.source.tokenize = dataclasses.replace(cfg.data.source.tokenize, max_length=2048, seq_length=6144)
    assert validate_layout(cfg, get_preset("llama3_8b"), 16) == 4
    cfg.wrpo.micro_batch_size = 3
    with pytest.raises(ConfigError, match=r"wrpo\.global_batch_size=128 is not a multiple"):
        validate_layout(cfg, get_preset("llama3_8b"), 16)


def test_the_toy_architecture_is_checked_without_its_tokenizer():
    cfg = compose_run_config(CONF, "wrpo_tiny")
    assert resolve_model_config(cfg, None) == get_preset("tiny")


@pytest.mark.parametrize(
    "override, key",
    [
        ("sft.micro_batchsize=3", "sft.micro_batchsize"),  # Hydra, at composition
        ("sft.micro_batch_size=abc", "sft.micro_batch_size"),  # Hydra, at composition
        ("sft.micro_batch_size=0", "sft.micro_batch_size"),  # the start-up rules
    ],
)
def test_preflight_exits_2_naming_the_key_and_writes_nothing(tmp_path, capsys, override, key):
    with pytest.raises(SystemExit) as stopped:
        preflight([f"run_dir={tmp_path / 'run'}", override], RECIPE, "../conf", "wrpo_tiny")
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: ") and key in err
    assert not (tmp_path / "run").exists()


def test_preflight_passes_a_good_config_and_leaves_other_commands_to_hydra(tmp_path):
    preflight([f"run_dir={tmp_path / 'run'}"], RECIPE, "../conf", "wrpo_tiny")
    preflight(["--config-name", "wrpo_tiny", "sft.epochs=2"], RECIPE, "../conf", "sft_llama3_8b")
    preflight(["--cfg", "job", "sft.epochs=0"], RECIPE, "../conf", "wrpo_tiny")  # Hydra prints it as is
    assert not (tmp_path / "run").exists()


def test_preflight_finds_a_primary_config_in_config_dir_and_checks_it(tmp_path, capsys):
    (tmp_path / "mine.yaml").write_text(
        "defaults: [wrpo_schema, _self_]\ndata: {toy: true}\nsft: {micro_batchsize: 4}\n"
    )
    with pytest.raises(SystemExit) as stopped:
        preflight(["--config-dir", str(tmp_path), "--config-name", "mine"], RECIPE, "../conf", "wrpo_tiny")
    assert stopped.value.code == 2 and "full_key: sft.micro_batchsize" in capsys.readouterr().err
