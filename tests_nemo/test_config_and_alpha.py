"""The WRPO keys of the ``dpo`` section, and alpha following the trainer's optimizer step."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from wrpo_nemo.integrations.nemo_aligner.config import WRPOLossConfig


def test_beta_is_ref_policy_kl_penalty_and_alpha_keys_set_the_schedule() -> None:
    cfg = WRPOLossConfig.from_dpo_section(
        {
            "ref_policy_kl_penalty": 0.01,
            "alpha": 0.2,
            "alpha_schedule": "linear_until",
            "alpha_ramp_fraction": 0.5,
        }
    )
    assert cfg.beta == 0.01
    assert (cfg.schedule.kind, cfg.schedule.alpha_max, cfg.schedule.ramp_fraction) == (
        "linear_until",
        0.2,
        0.5,
    )
    assert cfg.preference == "dpo"


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"preference_loss": "rpo_sq"}, "preference_loss"),
        ({"preference_loss": "kto"}, "preference_loss"),
        ({"preference_average_log_probs": True}, "preference_average_log_probs"),
        ({"preference_loss_weight": 0.5}, "preference_loss_weight"),
        ({"ref_policy_kl_penalty": 0.0}, "ref_policy_kl_penalty"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha_schedule": "cosine"}, "alpha_schedule"),
    ],
)
def test_bad_dpo_section_value_is_refused_naming_its_key(section: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        WRPOLossConfig.from_dpo_section({"ref_policy_kl_penalty": 0.01, **section})


def test_alpha_follows_optimizer_step_over_max_steps(make_model: Any) -> None:
    model = make_model(alpha=0.1)
    seen = []
    for step in (0, 75, 150, 300, 400):
        model.set_training_progress(step, 300)
        seen.append(model.current_alpha())
    assert seen == pytest.approx([0.0, 0.025, 0.05, 0.1, 0.1])


def test_loss_at_step_zero_is_dpo_on_target_chosen_and_rejected(make_model: Any) -> None:
    model = make_model(ref_policy_kl_penalty=0.1)
    model.set_training_progress(0, 100)
    gen = torch.Generator().manual_seed(0)
    policy, reference = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    labels = torch.ones(6, 4, dtype=torch.long)

    loss, _ = model.loss_func(policy, reference, labels)

    reward = (policy - reference).sum(-1)  # rows: 2 source, 2 target, 2 rejected
    expected = -F.logsigmoid(0.1 * (reward[2:4] - reward[4:6])).mean()
    torch.testing.assert_close(loss, expected)


def test_alpha_without_training_progress_is_an_error(make_model: Any) -> None:
    with pytest.raises(RuntimeError, match="set_training_progress"):
        make_model().current_alpha()
