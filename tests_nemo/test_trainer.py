"""``WRPOTrainer``: reference log-probs reach each response's key; the model learns the optimizer step."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf


def _trainer(model: Any, collate: Any = None) -> Any:
    from wrpo_nemo.integrations.nemo_aligner.trainer import WRPOTrainer

    # DPOTrainer's constructor needs dataloaders with Megatron samplers; the methods under test read only these.
    trainer = object.__new__(WRPOTrainer)
    trainer.model, trainer.collate_fn, trainer.pad_seq_length_to_mult = model, collate, 16
    return trainer


def test_reference_logprobs_of_a_role_major_batch_land_on_each_responses_key(
    parallel_state: Any, nemo_tokenizer: Any, toy_records: Any
) -> None:
    from wrpo_nemo.integrations.nemo_aligner.dataset import ROLES, WRPOModelDataset, wrpo_custom_collate

    path, records = toy_records
    cfg = OmegaConf.create({"data": {"max_prompt_length": 30}})
    dataset = WRPOModelDataset(cfg, nemo_tokenizer, "train", path, np.arange(len(records)), records, 48, 0)

    class Reference:
        def get_ref_policy_logprobs(self, batch: dict) -> torch.Tensor:
            # Role-major rows, as MegatronGPTWRPOModel.get_logprob_batch returns them; values mark their row.
            return torch.cat([batch[role].float() + 1000 * r for r, role in enumerate(ROLES)])

    collate = partial(wrpo_custom_collate, eos_id=nemo_tokenizer.eos_id)
    batches = list(
        _trainer(Reference(), collate).augment_dataloader([[dataset[0], dataset[1]], [dataset[2]]])
    )

    assert len(batches) == 2
    for batch in batches:
        for r, role in enumerate(ROLES):
            torch.testing.assert_close(batch[f"ref_policy_log_probs_{role}"], batch[role].float() + 1000 * r)


def test_training_and_validation_steps_tell_the_model_the_optimizer_step_first(
    make_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nemo_aligner.algorithms.dpo import DPOTrainer

    model = make_model(alpha=0.1)
    # The parent steps call the model's loss; here they report the alpha the model sees at that moment.
    monkeypatch.setattr(DPOTrainer, "train_single_step", lambda self, batch: (self.model.current_alpha(), {}))
    monkeypatch.setattr(DPOTrainer, "validation_step", lambda self, batch: (self.model.current_alpha(), {}))
    trainer = _trainer(model)
    trainer.max_steps = 300

    trainer.step = 0
    assert trainer.train_single_step({})[0] == 0.0
    trainer.step = 150
    assert trainer.train_single_step({})[0] == pytest.approx(0.05)
    trainer.step = 300
    assert trainer.validation_step({})[0] == pytest.approx(0.1)
