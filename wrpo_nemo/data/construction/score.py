"""Scoring (prompt, response) pairs with a reward model, batched and resumable.

Any ``AutoModelForSequenceClassification`` reward model scores by its first logit; a model whose output
carries a ``score`` field (ArmoRM-Llama3-8B-v0.1's custom gating head, loaded through ``trust_remote_code``)
scores by that field, which is how ArmoRM's card reads its preference score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wrpo_nemo.data.construction.shards import JsonlSink, iter_jsonl, resume_keys, shard_of


@dataclass
class ScoreConfig:
    """Which reward model scores which generation files."""

    reward_model: str = ""
    """Path (or hub name) of the reward model, e.g. ``RLHFlow/ArmoRM-Llama3-8B-v0.1``."""
    trust_remote_code: bool = False
    """Needed for reward models with custom code (ArmoRM)."""
    inputs: tuple[str, ...] = ()
    """Generation JSONL files (``generate``'s output)."""
    output: str = ""
    """Scored records are appended here (``{..., "score": float}``)."""
    batch_size: int = 8
    """Pairs per forward pass."""
    max_length: int = 4096
    """Longest tokenised conversation; longer ones are truncated from the right and counted as such."""
    shard_index: int = 0
    """Which shard of the records this process scores."""
    num_shards: int = 1
    """How many processes share the records."""
    dtype: str = "auto"
    """Reward model weights' dtype."""


def record_key(record: dict[str, Any]) -> tuple:
    """The identity of one sampled response."""
    return (record["prompt_id"], record["model"], record["seed"])


def reward_of(output: Any) -> Any:
    """The scalar reward per row of a reward model's output."""
    score = getattr(output, "score", None)
    if score is not None:
        return score.reshape(len(score), -1)[:, 0]
    return output.logits[:, 0]


def _load(cfg: ScoreConfig) -> tuple[Any, Any, int]:
    """Tokenizer, model, and how many pairs one forward pass may hold."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.reward_model, trust_remote_code=cfg.trust_remote_code)
    tokenizer.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg.reward_model, trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype
    ).eval()
    special = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in special:
        # Without a pad token of its own, padding with eos would make the classifier read its score at the
        # wrong position (the first or the last end-of-turn token): score one pair per pass, unpadded.
        return tokenizer, model, 1
    if getattr(model.config, "pad_token_id", None) is None:
        # Sequence classifiers read the last non-pad token; they need to know which id pads.
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model, cfg.batch_size


def _forward(tokenizer: Any, model: Any, texts: list[str], max_length: int) -> list[float]:
    import torch

    inputs = tokenizer(
        texts,
        return_tensors="pt",
        padding=len(texts) > 1,
        truncation=True,
        max_length=max_length,
        add_special_tokens=False,
    )
    with torch.no_grad():
        return reward_of(model(**inputs)).float().tolist()


def score(cfg: ScoreConfig) -> str:
    """Score every record of ``cfg.inputs`` (this shard) not yet in ``cfg.output``; returns the output path."""
    records = shard_of(list(iter_jsonl(cfg.inputs)), cfg.shard_index, cfg.num_shards)
    done = resume_keys(cfg.output, record_key)
    todo = [r for r in records if record_key(r) not in done]
    if not todo:
        return cfg.output
    tokenizer, model, batch_size = _load(cfg)
    with JsonlSink(cfg.output) as sink:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            texts = [
                tokenizer.apply_chat_template(
                    [*r["prompt"], {"role": "assistant", "content": r["response"]}], tokenize=False
                )
                for r in batch
            ]
            lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
            rewards = _forward(tokenizer, model, texts, cfg.max_length)
            sink.write(
                [
                    {**r, "score": s, "score_truncated": n > cfg.max_length}
                    for r, s, n in zip(batch, rewards, lengths, strict=True)
                ]
            )
    return cfg.output
