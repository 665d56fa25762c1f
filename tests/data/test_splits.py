"""Splits by a stable hash of the prompt id: independent of order and company, disjoint, near their shares."""

import hashlib

import pytest

from wrpo_nemo.data.splits import SplitConfig, split_indices, split_of, unit_hash

IDS = [f"prompt-{i}" for i in range(6000)]


def test_split_of_a_prompt_ignores_the_order_and_the_other_prompts():
    cfg = SplitConfig()
    alone = {p: split_of(p, cfg) for p in IDS[:50]}
    shuffled = list(reversed(IDS))
    together = dict(zip(shuffled, (split_of(p, cfg) for p in shuffled), strict=True))
    assert all(together[p] == s for p, s in alone.items())


def test_unit_hash_is_sha256_of_salt_and_id():
    digest = hashlib.sha256(b"s\x00abc").digest()
    assert unit_hash("abc", "s") == int.from_bytes(digest[:8], "big") / 2.0**64


def test_splits_are_disjoint_cover_everything_and_match_their_shares():
    cfg = SplitConfig(eval_fraction=0.05, sft_fraction=1 / 3)
    parts = {s: set(split_indices(IDS, s, cfg).tolist()) for s in ("sft", "wrpo", "eval")}
    assert set().union(*parts.values()) == set(range(len(IDS)))
    assert sum(len(p) for p in parts.values()) == len(IDS)
    assert len(parts["eval"]) / len(IDS) == pytest.approx(0.05, abs=0.01)
    train = len(IDS) - len(parts["eval"])
    assert len(parts["sft"]) / train == pytest.approx(1 / 3, abs=0.02)


def test_another_salt_draws_another_split():
    a = split_indices(IDS, "sft", SplitConfig())
    b = split_indices(IDS, "sft", SplitConfig(salt="other"))
    assert set(a.tolist()) != set(b.tolist())


def test_fraction_outside_the_unit_interval_names_the_key():
    with pytest.raises(ValueError, match=r"data\.split\.sft_fraction"):
        split_indices(IDS, "sft", SplitConfig(sft_fraction=1.0))
