"""Choosing y_ws, y_wt and y_l per prompt from scored responses, written in the released layout.

y_ws is the best-scored response of any source model, y_wt the best and y_l the worst of the target model's
own samples (WRPO.md). Ties are broken by ``(model, seed)`` order so the choice is deterministic. A prompt is
left out, and counted, when it has no usable source response, fewer than two target responses, or target
scores that are all equal (then no response is worse than another).
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from wrpo_nemo.data.construction.shards import iter_jsonl


@dataclass
class SelectConfig:
    """Which model is the target, and the files in and out."""

    inputs: tuple[str, ...] = ()
    """Scored JSONL files (``score``'s output) of every source model and of the target model."""
    target_model: str = ""
    """The ``model`` name of the target (SFT) model's samples; every other model is a source."""
    output: str = ""
    """The WRPO records (JSONL, released layout); the selection report goes beside it."""


def _message(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _best(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    return min(candidates, key=lambda r: (-r["score"], r["model"], r["seed"]))


def _worst(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    return min(candidates, key=lambda r: (r["score"], r["model"], r["seed"]))


def select_records(
    scored: Iterable[dict[str, Any]], target_model: str
) -> tuple[list[dict[str, Any]], Counter]:
    """WRPO records (released layout) in first-seen prompt order, and the count of prompts left out by cause."""
    by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    skipped: Counter = Counter()
    for record in scored:
        if not record["response"].strip():
            skipped["empty_response"] += 1
            continue
        by_prompt[record["prompt_id"]].append(record)
    out = []
    for prompt_id, candidates in by_prompt.items():
        sources = [r for r in candidates if r["model"] != target_model]
        targets = [r for r in candidates if r["model"] == target_model]
        if not sources:
            skipped["no_source_response"] += 1
        elif len(targets) < 2:
            skipped["fewer_than_two_target_responses"] += 1
        elif _best(targets)["score"] == _worst(targets)["score"]:
            skipped["target_scores_tied"] += 1
        else:
            ws, wt, wl = _best(sources), _best(targets), _worst(targets)
            out.append(
                {
                    "prompt_id": prompt_id,
                    "prompt": candidates[0]["prompt"],
                    "chosen": [_message(ws["response"]), _message(wt["response"])],
                    "rejected": [_message(wl["response"])],
                    "scores": {
                        "source_chosen": ws["score"],
                        "target_chosen": wt["score"],
                        "rejected": wl["score"],
                    },
                    "models": {"source_chosen": ws["model"]},
                }
            )
    return out, skipped


def select(cfg: SelectConfig) -> str:
    """Write the selected records to ``cfg.output`` (atomically) and ``<output>.report.json``; returns the path."""
    records, skipped = select_records(iter_jsonl(cfg.inputs), cfg.target_model)
    if not records:
        raise ValueError(f"no prompt had both source and target responses to choose from: {dict(skipped)}")
    os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
    tmp = f"{cfg.output}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(tmp, cfg.output)
    with open(f"{cfg.output}.report.json", "w", encoding="utf-8") as handle:
        json.dump({"selected": len(records), "skipped_by_cause": dict(skipped)}, handle, indent=1)
    return cfg.output
