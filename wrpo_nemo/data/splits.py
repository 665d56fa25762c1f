"""Splits by a stable hash of the prompt id: a held-out evaluation slice, the SFT share, the WRPO rest.

The hash is SHA-256 of ``salt + prompt_id``, so a prompt lands in the same split on every machine, in every
run and whatever the order or the other contents of the data files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

Split = Literal["sft", "wrpo", "eval"]


@dataclass
class SplitConfig:
    """Shares of the prompts."""

    eval_fraction: float = 0.02
    """Share of all prompts held out for evaluation (never trained on)."""
    sft_fraction: float = 1 / 3
    """Share of the remaining prompts that go to stage 1 (SFT on y_ws); the rest go to stage 2 (WRPO)."""
    salt: str = "wrpo-split"
    """Mixed into the hash; change it to draw a different, still deterministic, split."""

    def validate(self, prefix: str = "data.split.") -> None:
        """Raise ``ValueError`` naming the offending key, written as ``prefix + field``."""
        for name in ("eval_fraction", "sft_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{prefix}{name} must lie in [0, 1), got {value}")


def unit_hash(prompt_id: str, salt: str) -> float:
    """A number in [0, 1) drawn from the prompt id alone."""
    digest = hashlib.sha256(f"{salt}\x00{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(prompt_id: str, cfg: SplitConfig) -> Split:
    """The split ``prompt_id`` belongs to."""
    u = unit_hash(prompt_id, cfg.salt)
    if u < cfg.eval_fraction:
        return "eval"
    # Rescale the rest to [0, 1) so sft_fraction is a share of the training prompts.
    v = (u - cfg.eval_fraction) / (1.0 - cfg.eval_fraction)
    return "sft" if v < cfg.sft_fraction else "wrpo"


def split_indices(prompt_ids: list[str], split: Split, cfg: SplitConfig) -> np.ndarray:
    """Positions of the prompts of ``split`` (ascending)."""
    cfg.validate()
    return np.array([i for i, p in enumerate(prompt_ids) if split_of(p, cfg) == split], dtype=np.int64)
