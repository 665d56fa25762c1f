"""Tokenizers built locally for the data tests: the Llama 3, ChatML and Mistral special tokens and templates
over a byte-level BPE (trained here on a few sentences) or a word-level vocabulary."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from wrpo_nemo.data.templates import SPECIAL_TOKENS, TEMPLATES
from wrpo_nemo.data.toy import build_word_tokenizer

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Write a haiku about the sea. Waves fold into foam, the tide keeps its old promise.",
    "You are a helpful assistant. Answer briefly and correctly.",
    "Explain recursion: a function that calls itself until a base case stops it.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ! ? : ; - ( ) [ ] unicode é ü 東京",
]
WORDS = sorted(
    {w.strip(".,?!:;()") for line in CORPUS for w in line.split()} | {"Paris", "Rome", "no", "yes"}
)
FAMILIES = ("llama3", "chatml", "mistral")


def build_bpe_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2/Llama 3 style) with ``family``'s special tokens and chat template."""
    special = SPECIAL_TOKENS[family]
    specials = ["<pad>"] + [t for t in (special["bos"], special["eos"]) if t] + special["extra"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS * 3, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=special["bos"],
        eos_token=special["eos"],
        pad_token="<pad>",
        additional_special_tokens=[t for t in specials if t != "<pad>"],
    )
    tokenizer.chat_template = TEMPLATES[family]
    return tokenizer


@pytest.fixture(params=[(f, k) for f in FAMILIES for k in ("bpe", "word")], ids=lambda p: f"{p[0]}-{p[1]}")
def family_tokenizer(request):
    """``(family, tokenizer)`` for every family and both tokenizer kinds."""
    family, kind = request.param
    tok = build_bpe_tokenizer(family) if kind == "bpe" else build_word_tokenizer(WORDS, family)
    return family, tok


@pytest.fixture
def write_jsonl(tmp_path):
    """Write records (dicts, or raw strings/bytes for a line) to a JSONL file; returns its path."""

    def write(records, name="data.jsonl"):
        path = tmp_path / name
        with open(path, "wb") as handle:
            for r in records:
                line = r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()
                handle.write(line + b"\n")
        return str(path)

    return write


@pytest.fixture
def released():
    """Builder of records in the released layout."""
    return released_record


def released_record(i: int, question: str = "What is the capital of France?") -> dict:
    """A record in the released (AALF/ultrafeedback_wrpo) layout."""
    return {
        "prompt_id": f"p{i}",
        "prompt": {"role": "user", "content": f"{question} {i}"},
        "chosen": [
            {"role": "assistant", "content": f"The capital of France is Paris. {i}"},
            {"role": "assistant", "content": "Paris."},
        ],
        "rejected": [{"role": "assistant", "content": "Rome."}],
    }
