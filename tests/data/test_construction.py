"""The data-construction pipeline end to end on tiny randomly initialised models built here (nothing is
downloaded): generate -> score -> select gives records the reader accepts, and every step resumes."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from wrpo_nemo.data.construction.generate import GenerateConfig, generate
from wrpo_nemo.data.construction.score import ScoreConfig, score
from wrpo_nemo.data.construction.select import SelectConfig, select, select_records
from wrpo_nemo.data.construction.shards import iter_jsonl
from wrpo_nemo.data.records import ReadConfig, read_examples
from wrpo_nemo.data.toy import build_toy_dataset, build_toy_tokenizer

NUM_PROMPTS = 6


def _tiny_llama(tokenizer, cls, path, seed, **extra):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=None,  # a random model must not stop at once: every sample gets its max tokens
        **extra,
    )
    cls(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("construct")
    tok = build_toy_tokenizer()
    train = build_toy_dataset(str(root / "toy"), NUM_PROMPTS, seed=0)["train"]
    prompts = root / "prompts.jsonl"
    with open(train) as src, open(prompts, "w") as dst:
        for line in src:
            record = json.loads(line)
            dst.write(json.dumps({"prompt_id": record["prompt_id"], "prompt": record["prompt"]}) + "\n")
    models = {
        name: _tiny_llama(tok, LlamaForCausalLM, root / name, i)
        for i, name in enumerate(["src_a", "src_b", "tgt"])
    }
    models["rm"] = _tiny_llama(tok, LlamaForSequenceClassification, root / "rm", 9, num_labels=1)
    return root, str(prompts), models


def _generate(root, prompts, model, seeds, **kw):
    cfg = GenerateConfig(
        model=model,
        prompts=prompts,
        output_dir=str(root / "gen"),
        seeds=seeds,
        max_new_tokens=5,
        batch_size=4,
        backend="transformers",
        dtype="float32",
        **kw,
    )
    return generate(cfg)


def test_generate_score_select_end_to_end_gives_valid_wrpo_records(workspace):
    root, prompts, models = workspace
    gen = [_generate(root, prompts, models[m], [1, 2]) for m in ("src_a", "src_b")]
    gen.append(_generate(root, prompts, models["tgt"], [1, 2, 3]))
    scored = score(
        ScoreConfig(
            reward_model=models["rm"], inputs=tuple(gen), output=str(root / "scored.jsonl"), dtype="float32"
        )
    )
    out = select(SelectConfig(inputs=(scored,), target_model="tgt", output=str(root / "wrpo.jsonl")))
    examples, report = read_examples([out], ReadConfig())
    assert report.examples_valid == NUM_PROMPTS
    rows = list(iter_jsonl([scored]))
    assert len(rows) == NUM_PROMPTS * (2 + 2 + 3)
    for example in examples:
        mine = [r for r in rows if r["prompt_id"] == example.prompt_id]
        sources = [r for r in mine if r["model"] != "tgt"]
        targets = [r for r in mine if r["model"] == "tgt"]
        assert example.source_chosen == max(sources, key=lambda r: r["score"])["response"]
        assert example.target_chosen == max(targets, key=lambda r: r["score"])["response"]
        assert example.rejected == min(targets, key=lambda r: r["score"])["response"]


def test_generate_resumes_after_a_crash_mid_write(workspace):
    root, prompts, models = workspace
    path = _generate(root / "resume", prompts, models["src_a"], [5, 6], model_name="a")
    with open(path) as handle:
        complete = handle.readlines()
    with open(path, "w") as handle:
        handle.writelines(complete[:3])
        handle.write(complete[3][:10])  # the half-written line of a killed process
    _generate(root / "resume", prompts, models["src_a"], [5, 6], model_name="a")
    with open(path) as handle:
        resumed = handle.readlines()
    assert resumed[:3] == complete[:3]
    keys = [(json.loads(r)["prompt_id"], json.loads(r)["seed"]) for r in resumed]
    assert len(keys) == len(set(keys)) == NUM_PROMPTS * 2


def test_shards_split_the_prompts_without_overlap(workspace):
    root, prompts, models = workspace
    paths = [
        _generate(
            root / "sharded", prompts, models["src_b"], [1], shard_index=i, num_shards=2, model_name="b"
        )
        for i in range(2)
    ]
    ids = [{r["prompt_id"] for r in iter_jsonl([p])} for p in paths]
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == NUM_PROMPTS


CONFIG_PY = """
from transformers import PretrainedConfig


class TinyRMConfig(PretrainedConfig):
    model_type = "tiny_rm"
"""

MODELING_PY = """
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_tiny_rm import TinyRMConfig


@dataclass
class TinyRMOutput(ModelOutput):
    score: torch.FloatTensor = None
    logits: torch.FloatTensor = None


class TinyRM(PreTrainedModel):
    config_class = TinyRMConfig

    def __init__(self, config):
        super().__init__(config)
        self.dummy = torch.nn.Linear(1, 1)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        # ArmoRM's head returns its preference score in `score`; here: the number of real tokens.
        n = attention_mask.sum(-1, keepdim=True).float()
        return TinyRMOutput(score=n, logits=torch.zeros_like(n))
"""


def test_custom_head_reward_model_through_remote_code_is_read_by_its_score(workspace, tmp_path):
    root, prompts, models = workspace
    rm = tmp_path / "tiny_rm"
    rm.mkdir()
    (rm / "configuration_tiny_rm.py").write_text(CONFIG_PY)
    (rm / "modeling_tiny_rm.py").write_text(MODELING_PY)
    auto_map = {
        "AutoConfig": "configuration_tiny_rm.TinyRMConfig",
        "AutoModelForSequenceClassification": "modeling_tiny_rm.TinyRM",
    }
    (rm / "config.json").write_text(
        json.dumps({"model_type": "tiny_rm", "architectures": ["TinyRM"], "auto_map": auto_map})
    )
    save_file(
        {"dummy.weight": torch.zeros(1, 1), "dummy.bias": torch.zeros(1)}, str(rm / "model.safetensors")
    )
    tok = build_toy_tokenizer(str(rm))
    gen = _generate(root / "armo", prompts, models["tgt"], [1], model_name="t")
    out = score(
        ScoreConfig(
            reward_model=str(rm), trust_remote_code=True, inputs=(gen,), output=str(tmp_path / "s.jsonl")
        )
    )
    for r in iter_jsonl([out]):
        text = tok.apply_chat_template(
            [*r["prompt"], {"role": "assistant", "content": r["response"]}], tokenize=False
        )
        assert r["score"] == len(tok(text, add_special_tokens=False)["input_ids"])


def _scored(prompt_id, model, seed, value, response=None):
    return {
        "prompt_id": prompt_id,
        "prompt": [{"role": "user", "content": "q"}],
        "model": model,
        "seed": seed,
        "response": response if response is not None else f"{model}-{seed}",
        "score": value,
    }


def test_select_breaks_ties_by_model_and_seed_and_counts_what_it_leaves_out():
    rows = [
        _scored("a", "s2", 1, 5.0),
        _scored("a", "s1", 9, 5.0),
        _scored("a", "t", 2, 1.0),
        _scored("a", "t", 1, 1.0),
        _scored("a", "t", 3, 0.5),
        _scored("b", "t", 1, 1.0),
        _scored("b", "t", 2, 0.0),
        _scored("c", "s1", 1, 1.0),
        _scored("c", "t", 1, 1.0),
        _scored("d", "s1", 1, 1.0),
        _scored("d", "t", 1, 2.0),
        _scored("d", "t", 2, 2.0),
        _scored("e", "s1", 1, 1.0, response=" "),
        _scored("e", "t", 1, 2.0),
        _scored("e", "t", 2, 1.0),
    ]
    records, skipped = select_records(rows, "t")
    assert [r["prompt_id"] for r in records] == ["a"]
    a = records[0]
    assert [m["content"] for m in a["chosen"]] == ["s1-9", "t-1"] and a["rejected"][0]["content"] == "t-3"
    assert skipped == {
        "no_source_response": 2,  # b has none, e only an empty one
        "fewer_than_two_target_responses": 1,
        "target_scores_tied": 1,
        "empty_response": 1,
    }


def test_command_line_runs_a_step_from_dashed_options(tmp_path):
    import importlib.util

    script = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "data", "construct.py")
    spec = importlib.util.spec_from_file_location("construct_cli", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    scored = tmp_path / "scored.jsonl"
    rows = [_scored("a", "s", 1, 1.0), _scored("a", "t", 1, 2.0), _scored("a", "t", 2, 0.0)]
    scored.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "wrpo.jsonl")
    assert cli.main(["select", "--inputs", str(scored), "--target-model", "t", "--output", out]) == out
    (example,), _ = read_examples([out], ReadConfig())
    assert (example.source_chosen, example.target_chosen, example.rejected) == ("s-1", "t-1", "t-2")
    with open(f"{out}.report.json") as handle:
        assert json.load(handle) == {"selected": 1, "skipped_by_cause": {}}


@pytest.mark.parametrize("pad", ["own", "none"])
def test_scores_equal_the_reward_model_on_each_pair_alone(workspace, tmp_path, pad):
    root, prompts, models = workspace
    tok = build_toy_tokenizer()
    if pad == "none":
        tok.pad_token = None  # like Llama 3: batching must not pad with the end-of-turn token
    rm = _tiny_llama(tok, LlamaForSequenceClassification, tmp_path / "rm", 11, num_labels=1)
    gen = _generate(root / f"alone-{pad}", prompts, models["src_a"], [1, 2], model_name="a")
    out = score(ScoreConfig(reward_model=rm, inputs=(gen,), output=str(tmp_path / "s.jsonl"), batch_size=4))
    model = LlamaForSequenceClassification.from_pretrained(rm).eval()
    for r in iter_jsonl([out]):
        conversation = [*r["prompt"], {"role": "assistant", "content": r["response"]}]
        text = tok.apply_chat_template(conversation, tokenize=False)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            assert r["score"] == pytest.approx(float(model(input_ids=ids).logits[0, 0]), abs=1e-5)


def test_prompt_file_with_a_repeated_id_is_refused_naming_both_lines(tmp_path):
    from wrpo_nemo.data.construction.shards import read_prompts
    from wrpo_nemo.data.records import DataError

    path = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt_id": "a", "prompt": "one"},
        {"prompt_id": "b", "prompt": "two"},
        {"prompt_id": "a", "prompt": "3"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        read_prompts(str(path))
    message = str(err.value)
    assert "prompts.jsonl" in message and "line 3" in message and "line 1" in message
    assert err.value.field_name == "prompt_id" and err.value.cause == "duplicate_prompt_id"
