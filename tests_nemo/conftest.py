"""Fixtures of the NeMo-Aligner lane: megatron's parallel state on gloo, a WRPO model object, toy data.

NeMo's model constructor needs a Lightning trainer with NeMo's Megatron strategy, which needs CUDA and apex;
the tests therefore build the model object without running it and set the attributes its WRPO methods read
(the config is read by the same ``WRPOLossConfig.from_dpo_section`` that ``__init__`` calls).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from typing import Any

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def parallel_state() -> Any:
    """A one-process gloo group with megatron's model-parallel state (TP = PP = CP = DP = 1), as NeMo-Aligner's
    loss needs for its data-parallel averages and vocab-parallel log-probs."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mcore_parallel_state

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    if not mcore_parallel_state.model_parallel_is_initialized():
        mcore_parallel_state.initialize_model_parallel(1, 1)
    yield mcore_parallel_state


@pytest.fixture
def make_model(parallel_state: Any) -> Callable[..., Any]:
    """``make_model(**dpo_keys)``: a ``MegatronGPTWRPOModel`` with ``model.dpo`` = the paper's values + overrides."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "wrpo_nemo_lane_cp_step", Path(__file__).parent / "cp_step.py"
    )
    cp_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cp_step)

    def build(**dpo: Any) -> Any:
        paper = {"ref_policy_kl_penalty": 0.01, "alpha": 0.1, "alpha_schedule": "linear"}
        return cp_step.wrpo_model(1, **{**paper, **dpo})

    return build


@pytest.fixture(scope="session")
def toy_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The project's toy tokenizer (Llama 3 chat template, eos = ``<|eot_id|>``) saved like a model's."""
    from wrpo_nemo.data.toy import build_toy_tokenizer

    path = str(tmp_path_factory.mktemp("toy_tokenizer"))
    build_toy_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def nemo_tokenizer(toy_tokenizer_dir: str) -> Any:
    """NeMo's ``AutoTokenizer`` over the toy tokenizer: what ``model.tokenizer`` is in a NeMo-Aligner run."""
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

    return AutoTokenizer(toy_tokenizer_dir)


@pytest.fixture(scope="session")
def toy_records(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict[str, Any]]]:
    """A JSONL file of toy records in the released layout, and its records as NeMo-Aligner loads them."""
    from wrpo_nemo.data.toy import build_toy_dataset

    path = build_toy_dataset(str(tmp_path_factory.mktemp("toy_data")), 24, seed=3)["train"]
    with open(path, encoding="utf-8") as handle:
        return path, [json.loads(line) for line in handle]
