"""Reference log-probs stored beside the tokenised cache, one file per reference-model identity.

The engine's precompute pass runs the frozen reference model once over the dataset and stores, for every
example, the summed log-probs of its three responses (``[N, 3]``, columns in role order). The identity string
it passes (e.g. a checkpoint path plus its step) names the file, so a different reference never reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

_FOLDER = "reference_logps"


def _paths(cache_dir: str, model_id: str) -> tuple[str, str]:
    name = hashlib.sha256(model_id.encode()).hexdigest()[:24]
    folder = os.path.join(cache_dir, _FOLDER)
    return os.path.join(folder, f"{name}.npy"), os.path.join(folder, f"{name}.json")


def save_reference_logps(cache_dir: str, model_id: str, logps: np.ndarray) -> str:
    """Store ``logps`` (``[N, 3]`` float) for ``model_id`` in the cache folder ``cache_dir``; returns the path.

    Written to a temporary name and renamed, so a crash never leaves a partial file that would be loaded.
    """
    logps = np.asarray(logps, dtype=np.float32)
    if logps.ndim != 2 or logps.shape[1] != 3:
        raise ValueError(f"reference log-probs must be [N, 3], got shape {logps.shape}")
    if not np.isfinite(logps).all():
        raise ValueError("reference log-probs contain NaN or infinity")
    array_path, meta_path = _paths(cache_dir, model_id)
    os.makedirs(os.path.dirname(array_path), exist_ok=True)
    with open(meta_path, "w", encoding="utf-8") as handle:
        json.dump({"model_id": model_id, "shape": list(logps.shape)}, handle)
    tmp = f"{array_path}.tmp-{os.getpid()}.npy"
    np.save(tmp, logps)
    os.replace(tmp, array_path)
    return array_path


def load_reference_logps(cache_dir: str, model_id: str, num_examples: int | None = None) -> np.ndarray | None:
    """The stored ``[N, 3]`` log-probs of ``model_id``, or ``None`` when there are none yet.

    ``num_examples`` (the dataset's length) is checked when given: a mismatch means the file belongs to
    another build and is an error, not something to use.
    """
    array_path, _ = _paths(cache_dir, model_id)
    if not os.path.exists(array_path):
        return None
    logps = np.load(array_path, mmap_mode="r")
    if num_examples is not None and logps.shape[0] != num_examples:
        raise ValueError(
            f"{array_path} holds {logps.shape[0]} rows of reference log-probs, the dataset has {num_examples}"
        )
    return logps
