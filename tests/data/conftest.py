"""Fixtures of the data tests: locally built tokenizers of every template family, JSONL writing, records."""

import json

import pytest

from tests.data.local_tokenizers import FAMILIES, WORDS, build_bpe_tokenizer
from wrpo_nemo.data.toy import build_word_tokenizer


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
