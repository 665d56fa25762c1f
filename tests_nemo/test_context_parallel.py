"""Context parallelism leaves the WRPO gradient and loss as they are without it.

Each context-parallel rank holds a share of every sequence; the per-response sums are all-reduced over the CP
group, so every rank's loss is the whole micro-batch's, but its gradient covers only its own tokens. The
gradient reduction then averages over the data- and context-parallel ranks together (DP x CP), which divides
by the CP size once too often: the loss must be multiplied by the CP size exactly once. megatron-core 0.12 and
later do it in ``forward_step`` for a loss function that returns ``(loss, metrics)``; before, the loss
function had to. The model multiplies by the CP size itself only before 0.12 (``model.loss_cp_factor``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CP = 2


def _cp_step() -> Any:
    """``cp_step.py`` beside this file (the lane imports test modules by path, not as a package)."""
    spec = importlib.util.spec_from_file_location("wrpo_nemo_lane_cp_step", HERE / "cp_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_megatron_forward_step_multiplies_a_two_tuple_loss_by_the_cp_size(
    parallel_state: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the model's scaling relies on, checked on the installed megatron-core: ``forward_step`` returns
    ``loss * cp / num_microbatches`` for a ``(loss, metrics)`` loss function."""
    from megatron.core.pipeline_parallel import schedules

    model = _cp_step().TableGPT(torch.zeros(4, 4))
    monkeypatch.setattr(schedules.parallel_state, "get_context_parallel_world_size", lambda: CP)
    loss = torch.tensor(1.5)
    output, _ = schedules.forward_step(
        lambda data, module: (torch.zeros(1), lambda out: (loss.clone(), {"avg": loss})),
        iter([None]),
        model,
        4,
        None,
        [],
        model.config,
    )
    assert float(output) == pytest.approx(1.5 * CP / 4)
    # The model's version gate says the same of this megatron-core.
    from wrpo_nemo.integrations.nemo_aligner.model import MEGATRON_SCALES_CP_LOSS

    assert MEGATRON_SCALES_CP_LOSS


@pytest.mark.parametrize(
    ("version", "scales"),
    [
        ("0.10.0", False),
        ("0.11.1", False),
        ("0.12.0rc2", True),
        ("0.12.0", True),
        ("0.13.1", True),
        ("1.0.0", True),
    ],
)
def test_megatron_scales_cp_losses_from_0_12(version: str, scales: bool) -> None:
    from wrpo_nemo.integrations.nemo_aligner.stack import megatron_scales_cp_loss

    assert megatron_scales_cp_loss(version) is scales


def test_the_model_scales_its_loss_by_cp_only_where_megatron_does_not(
    parallel_state: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from megatron.core import parallel_state as mcore_parallel_state

    from wrpo_nemo.integrations.nemo_aligner import model as wrpo_model

    monkeypatch.setattr(mcore_parallel_state, "get_context_parallel_world_size", lambda: CP)
    monkeypatch.setattr(wrpo_model, "MEGATRON_SCALES_CP_LOSS", True)
    assert wrpo_model.loss_cp_factor() == 1
    monkeypatch.setattr(wrpo_model, "MEGATRON_SCALES_CP_LOSS", False)
    assert wrpo_model.loss_cp_factor() == CP


def _toy_batch(nemo_tokenizer: Any, records: list, prompts: int) -> dict[str, torch.Tensor]:
    from omegaconf import OmegaConf

    from wrpo_nemo.integrations.nemo_aligner.dataset import WRPOModelDataset, wrpo_custom_collate

    cfg = OmegaConf.create({"data": {"max_prompt_length": 40}})
    dataset = WRPOModelDataset(cfg, nemo_tokenizer, "train", None, range(len(records)), records, 64, 0)
    # Context parallelism splits every sequence into 2 * CP chunks.
    return wrpo_custom_collate(
        [dataset[i] for i in range(prompts)], eos_id=nemo_tokenizer.eos_id, pad_length_to_multiple_of=2 * CP
    )


def test_a_cp2_training_step_gives_the_cp1_gradient_and_loss(
    parallel_state: Any, nemo_tokenizer: Any, toy_records: Any, tmp_path: Path
) -> None:
    """Two processes in a CP = 2 gloo group run the model's training step through megatron's schedule; their
    gradients averaged (as the optimizer's DP x CP gradient reduction does) and their metrics equal a
    one-process step's. Scaling the loss by the CP size on top of megatron's doubles the gradient here."""
    cp_step = _cp_step()
    batch = _toy_batch(nemo_tokenizer, toy_records[1], prompts=2 * cp_step.MICRO_BATCH_SIZE)
    vocab = nemo_tokenizer.vocab_size
    policy = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(11))
    reference = policy + 0.3 * torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(12))
    data_file = tmp_path / "data.pt"
    torch.save({"batch": batch, "policy": policy, "reference": reference}, data_file)

    path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}
    logs = [tmp_path / f"rank{rank}.log" for rank in range(CP)]
    ranks = []
    try:
        for rank in range(CP):
            with open(logs[rank], "w") as log:
                args = [
                    str(rank),
                    str(CP),
                    str(tmp_path / "init"),
                    str(data_file),
                    str(tmp_path / f"rank{rank}.pt"),
                ]
                ranks.append(
                    subprocess.Popen(
                        [sys.executable, str(HERE / "cp_step.py"), *args],
                        cwd=REPO,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        # The one-process step runs while the two ranks start up.
        metrics, grad = cp_step.train_step(batch, policy, reference)
        for rank, process in enumerate(ranks):
            process.wait(timeout=600)
            assert process.returncode == 0, f"CP rank {rank}:\n{logs[rank].read_text()[-4000:]}"
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(CP)]

    assert grad.abs().sum() > 0
    cp_grad = sum(result["grad"] for result in results) / CP
    torch.testing.assert_close(cp_grad, grad, rtol=1e-4, atol=1e-7)
    for result in results:
        assert set(result["metrics"]) == set(metrics)
        for name, value in metrics.items():
            assert result["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
