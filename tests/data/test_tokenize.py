"""Tokenisation through the chat template: response ids are exactly what the template appends, ending with one
end-of-turn token; checked against the documented Llama 3, ChatML and Mistral formats written out by hand."""

import pytest

from tests.data.local_tokenizers import WORDS, build_bpe_tokenizer
from wrpo_nemo.data.records import DataError, Example
from wrpo_nemo.data.templates import SPECIAL_TOKENS, TEMPLATES
from wrpo_nemo.data.tokenize import (
    TemplateError,
    TokenizeConfig,
    apply_length_policy,
    eot_token_id,
    tokenize_example,
)
from wrpo_nemo.data.toy import build_word_tokenizer

QUESTION = "What is the capital of France?"
ANSWERS = ("The capital of France is Paris.", "Paris.", "Rome.")

# The formats as the model cards document them, written independently of the Jinja templates under test.
EXPECTED_PROMPT = {
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
    "<|im_start|>assistant\n",
    "mistral": "<s>[INST] {q} [/INST]",
}
EXPECTED_RESPONSE = {"llama3": "{a}<|eot_id|>", "chatml": "{a}<|im_end|>", "mistral": "{a}</s>"}
HEADER_TOKENS = {"llama3": "<|start_header_id|>", "chatml": "<|im_start|>", "mistral": "[/INST]"}


def _example(prompt=None, answers=ANSWERS):
    prompt = prompt or ({"role": "user", "content": QUESTION},)
    return Example("p0", prompt, *answers, where="data.jsonl: line 1")


def _tokenize(tok, example=None, **cfg):
    cfg = TokenizeConfig(**{"max_length": 256, "max_prompt_length": 128, "seq_length": 1024, **cfg})
    return tokenize_example(tok, example or _example(), cfg, eot_token_id(tok, cfg))


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_ids_are_the_documented_prompt_with_generation_header(family_tokenizer):
    family, tok = family_tokenizer
    out = _tokenize(tok)
    assert out["prompt_ids"] == _ids(tok, EXPECTED_PROMPT[family].format(q=QUESTION))


def test_response_ids_are_exactly_the_documented_assistant_turn(family_tokenizer):
    family, tok = family_tokenizer
    out = _tokenize(tok)
    prompt_text = EXPECTED_PROMPT[family].format(q=QUESTION)
    for name, answer in zip(("source_chosen", "target_chosen", "rejected"), ANSWERS, strict=True):
        full = _ids(tok, prompt_text + EXPECTED_RESPONSE[family].format(a=answer))
        assert out[f"{name}_ids"] == full[len(out["prompt_ids"]) :]


def test_response_ends_with_one_end_of_turn_and_holds_no_header(family_tokenizer):
    family, tok = family_tokenizer
    out = _tokenize(tok)
    eot = tok.convert_tokens_to_ids(SPECIAL_TOKENS[family]["eos"])
    header = tok.convert_tokens_to_ids(HEADER_TOKENS[family])
    for name in ("source_chosen", "target_chosen", "rejected"):
        ids = out[f"{name}_ids"]
        assert ids[-1] == eot and ids.count(eot) == 1
        assert header not in ids


@pytest.mark.parametrize("family", ["llama3", "chatml"])
def test_byte_level_response_decodes_to_the_answer_text(family):
    tok = build_bpe_tokenizer(family)
    out = _tokenize(tok)
    assert tok.decode(out["source_chosen_ids"], skip_special_tokens=True) == ANSWERS[0]


@pytest.mark.parametrize("family", ["llama3", "mistral"])
@pytest.mark.parametrize("kind", ["bpe", "word"])
def test_bos_appears_once_in_the_prompt(family, kind):
    tok = build_bpe_tokenizer(family) if kind == "bpe" else build_word_tokenizer(WORDS, family)
    bos = tok.convert_tokens_to_ids(SPECIAL_TOKENS[family]["bos"])
    assert _tokenize(tok)["prompt_ids"].count(bos) == 1


def test_template_that_is_not_prefix_stable_is_refused():
    tok = build_word_tokenizer(["hi", "user", "assistant", "bot", "a", "b", "c"], "chatml")
    tok.chat_template = TEMPLATES["chatml"].replace("'<|im_start|>' + message['role']", "'<|im_start|>bot'")
    with pytest.raises(TemplateError, match="not prefix-stable"):
        _tokenize(tok, _example(answers=("a", "b", "c")))


def test_tokens_merging_across_the_prompt_end_are_refused():
    tok = build_word_tokenizer(["hi", "capital", "a", "b", "c"], "chatml")
    # Text-wise prefix-stable, but " capital" + "a" is one (unknown) word: the ids are not a prefix.
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ ' capital' + m['content'] + '<|im_end|>' }}"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %} capital{% endif %}"
    )
    with pytest.raises(TemplateError, match="merges tokens"):
        _tokenize(tok, _example(prompt=({"role": "user", "content": "hi"},), answers=("a", "b", "c")))


def test_end_of_turn_token_the_template_never_writes_is_refused(family_tokenizer):
    family, tok = family_tokenizer
    other = {"llama3": "<|end_of_text|>", "chatml": "<|endoftext|>", "mistral": "[INST]"}[family]
    with pytest.raises(TemplateError, match="did not close the assistant turn") as err:
        _tokenize(tok, eot_token=other)
    assert "data.source.tokenize.eot_token" in str(err.value)  # the key a recipe user sets


def test_end_of_turn_token_outside_the_vocabulary_is_refused(family_tokenizer):
    _, tok = family_tokenizer
    with pytest.raises(ValueError, match="not a token of the tokenizer") as err:
        eot_token_id(tok, TokenizeConfig(eot_token="<|no-such-token|>"))
    assert "data.source.tokenize.eot_token" in str(err.value) and "model.data.eot_token" in str(err.value)


def test_response_containing_the_end_of_turn_token_is_a_data_error(family_tokenizer):
    family, tok = family_tokenizer
    answers = (f"Paris{SPECIAL_TOKENS[family]['eos']} more", "Paris.", "Rome.")
    with pytest.raises(DataError, match=r"data.jsonl: line 1: field 'source_chosen'.*end-of-turn") as info:
        _tokenize(tok, _example(answers=answers))
    assert info.value.cause == "contains_eot"


def test_role_the_template_refuses_is_a_data_error_naming_the_record():
    tok = build_word_tokenizer(["hi", "be", "brief"], "mistral")
    prompt = ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"})
    with pytest.raises(DataError, match=r"line 1: field 'prompt': the chat template refused it"):
        _tokenize(tok, _example(prompt=prompt))


# ----------------------------------------------------------------------------------------- length policy


def _cfg(policy, **kw):
    return TokenizeConfig(
        **{"max_length": 10, "max_prompt_length": 6, "seq_length": 40, "length_policy": policy, **kw}
    )


def test_drop_policy_names_the_cause_and_keeps_ids_untouched():
    prompt, ok = list(range(4)), [[7, 8], [7], [9]]
    assert apply_length_policy(prompt, ok, _cfg("drop"))["status"] == "ok"
    assert apply_length_policy(list(range(7)), ok, _cfg("drop"))["status"] == "prompt_too_long"
    long = [[1] * 7, [7], [9]]
    out = apply_length_policy(prompt, long, _cfg("drop"))
    assert out["status"] == "response_too_long" and out["source_chosen_ids"] == [1] * 7


def test_truncate_keeps_the_prompt_end_and_cuts_each_response_on_its_own():
    prompt = list(range(8))
    out = apply_length_policy(prompt, [[1] * 9, [2] * 3, [3] * 5], _cfg("truncate"))
    assert out["status"] == "ok" and out["prompt_truncated"]
    assert out["prompt_ids"] == [2, 3, 4, 5, 6, 7]
    assert out["source_chosen_ids"] == [1] * 4 and out["target_chosen_ids"] == [2] * 3
    assert out["rejected_ids"] == [3] * 4
    assert out["responses_truncated"] == 2


def test_prompt_whose_three_segments_exceed_a_row_is_dropped_under_both_policies():
    for policy in ("drop", "truncate"):
        out = apply_length_policy([0] * 6, [[1] * 4] * 3, _cfg(policy, seq_length=20))
        assert out["status"] == "exceeds_seq_length"


def test_impossible_lengths_name_the_key():
    with pytest.raises(ValueError, match="max_prompt_length"):
        TokenizeConfig(max_length=10, max_prompt_length=10).validate()
    with pytest.raises(ValueError, match="seq_length"):
        TokenizeConfig(max_length=10, max_prompt_length=5, seq_length=8).validate()
    with pytest.raises(ValueError, match="length_policy"):
        TokenizeConfig(length_policy="cut").validate()
