"""The WRPO model's loss and metrics equal the project's ``wrpo_loss`` on independently summed log-probs."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from wrpo_nemo.alpha import AlphaSchedule, alpha_at
from wrpo_nemo.losses import wrpo_loss

ROLES = 3


def _batch(prompts: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token policy and reference log-probs and labels, ``[3 * prompts, seq]``, role-major rows."""
    gen = torch.Generator().manual_seed(seed)
    policy = -torch.rand(ROLES * prompts, seq, generator=gen) * 3
    reference = -torch.rand(ROLES * prompts, seq, generator=gen) * 3
    labels = torch.randint(0, 50, (ROLES * prompts, seq), generator=gen)
    for row in range(ROLES * prompts):  # a prompt of random length, then the response, then padding
        start = int(torch.randint(1, seq // 2, (1,), generator=gen))
        end = int(torch.randint(start + 1, seq + 1, (1,), generator=gen))
        labels[row, :start] = -100
        labels[row, end:] = -100
    return policy, reference, labels


def _columns_by_hand(values: torch.Tensor, labels: torch.Tensor, prompts: int) -> torch.Tensor:
    """``[prompts, 3]`` sums over labelled tokens, row ``role * prompts + prompt``, by plain loops."""
    out = torch.zeros(prompts, ROLES)
    for role in range(ROLES):
        for prompt in range(prompts):
            row = role * prompts + prompt
            out[prompt, role] = sum(
                float(values[row, j]) for j in range(labels.shape[1]) if labels[row, j] >= 0
            )
    return out


def _assert_same(loss: torch.Tensor, metrics: dict, expected: tuple[torch.Tensor, dict]) -> None:
    torch.testing.assert_close(loss, expected[0], rtol=1e-5, atol=1e-6)
    assert set(metrics) == set(expected[1])
    for name, value in expected[1].items():
        torch.testing.assert_close(metrics[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "dpo",
    [
        {},
        {"preference_loss": "ipo", "ref_policy_kl_penalty": 0.5},
        {"preference_loss": "simpo", "ref_policy_kl_penalty": 2.0, "simpo_gamma": 0.5},
        {"preference_loss": "dpo_pair_mean"},
        {"label_smoothing": 0.1, "sft_loss_weight": 0.3, "alpha_schedule": "constant"},
    ],
    ids=["dpo", "ipo", "simpo", "dpo_pair_mean", "smoothing_and_sft"],
)
def test_unpacked_loss_and_metrics_equal_wrpo_loss(make_model: Any, dpo: dict) -> None:
    model = make_model(**dpo)
    model.set_training_progress(40, 100)
    prompts = 4
    policy, reference, labels = _batch(prompts, 12, seed=0)

    loss, metrics = model.loss_func(policy, reference, labels)

    lengths = _columns_by_hand(torch.ones_like(policy), labels, prompts)
    schedule = AlphaSchedule(kind=dpo.get("alpha_schedule", "linear"), alpha_max=0.1)
    expected = wrpo_loss(
        _columns_by_hand(policy, labels, prompts),
        _columns_by_hand(reference, labels, prompts),
        alpha=alpha_at(40, 100, schedule),
        beta=dpo.get("ref_policy_kl_penalty", 0.01),
        preference=dpo.get("preference_loss", "dpo"),
        label_smoothing=dpo.get("label_smoothing", 0.0),
        gamma=dpo.get("simpo_gamma", 0.0),
        lengths=lengths,
        sft_weight=dpo.get("sft_loss_weight", 0.0),
    )
    _assert_same(loss, metrics, expected)


@pytest.mark.parametrize("row_padding", [0, 5], ids=["full_row", "padded_row"])
def test_packed_loss_equals_wrpo_loss_on_the_same_segments(make_model: Any, row_padding: int) -> None:
    """A packed row holds each prompt's three segments in role order; its loss is the unpacked batch's."""
    model = make_model()
    model.set_training_progress(7, 10)
    prompts, seq = 3, 9
    policy, reference, labels = _batch(prompts, seq, seed=1)
    # Packed order is prompt-major: p0 (s, t, r), p1 (s, t, r), ... each segment its unpadded length.
    order = [role * prompts + prompt for prompt in range(prompts) for role in range(ROLES)]
    ends = [int((labels[row] >= 0).nonzero().max()) + 1 for row in order]
    packed = [
        torch.cat([t[row, :end] for row, end in zip(order, ends, strict=True)]) for t in (policy, reference)
    ]
    packed_labels = torch.cat([labels[row, :end] for row, end in zip(order, ends, strict=True)])
    bounds = torch.tensor([0, *torch.tensor(ends).cumsum(0).tolist()], dtype=torch.int32)
    if row_padding:  # the collate appends one boundary for a padded row's tail
        packed = [torch.cat([t, torch.full((row_padding,), -9.0)]) for t in packed]
        packed_labels = torch.cat([packed_labels, torch.full((row_padding,), -100)])
        bounds = torch.cat([bounds, bounds[-1:] + row_padding])

    loss, metrics = model.loss_func(packed[0][None], packed[1][None], packed_labels[None], bounds)

    expected = model.loss_func(policy, reference, labels)
    _assert_same(loss, metrics, expected)


def test_packed_reduction_refuses_rows_that_split_a_prompt(make_model: Any) -> None:
    model = make_model()
    with pytest.raises(ValueError, match="three segments per prompt"):
        model.get_reduced_masked_logps(
            torch.zeros(1, 6), torch.zeros(1, 6, dtype=torch.long), torch.tensor([0, 3, 6])
        )


def test_forward_step_loss_equals_wrpo_loss_on_log_softmax_of_the_model_output(
    make_model: Any, nemo_tokenizer: Any, toy_records: Any
) -> None:
    """The whole forward step (batch stacking, vocab-parallel log-probs, reduction, DP averaging) on gloo."""
    from omegaconf import OmegaConf

    from wrpo_nemo.integrations.nemo_aligner.dataset import ROLES as ROLE_NAMES
    from wrpo_nemo.integrations.nemo_aligner.dataset import WRPOModelDataset, wrpo_custom_collate

    cfg = OmegaConf.create({"data": {"max_prompt_length": 40}})
    records = toy_records[1]
    dataset = WRPOModelDataset(cfg, nemo_tokenizer, "train", None, range(len(records)), records, 64, 0)
    batch = wrpo_custom_collate([dataset[i] for i in range(3)], eos_id=nemo_tokenizer.eos_id)
    vocab = nemo_tokenizer.vocab_size
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(5))

    def fake_gpt(
        input_ids: torch.Tensor, position_ids: Any, attention_mask: Any, labels: Any
    ) -> torch.Tensor:
        return table.to(input_ids.device)[input_ids]  # [rows, seq, vocab], like megatron's GPTModel

    gen = torch.Generator().manual_seed(6)
    for role in ROLE_NAMES:
        batch[f"ref_policy_log_probs_{role}"] = -torch.rand(batch[role].shape, generator=gen)
    model = make_model()
    model.set_training_progress(3, 12)

    output, loss_fn = model.get_forward_output_and_loss_func()(iter([dict(batch)]), fake_gpt)
    loss, report = loss_fn(output)
    loss, report = (
        loss.cpu(),
        {name: value.cpu() for name, value in report.items()},
    )  # on CUDA, batches move there

    tokens = torch.cat([batch[r] for r in ROLE_NAMES])
    labels = torch.cat([batch[f"{r}_labels"] for r in ROLE_NAMES])
    logps = torch.log_softmax(table[tokens], -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    reference = torch.cat([batch[f"ref_policy_log_probs_{r}"] for r in ROLE_NAMES])
    expected_loss, expected_metrics = wrpo_loss(
        _columns_by_hand(logps, labels, 3),
        _columns_by_hand(reference, labels, 3),
        alpha=alpha_at(3, 12, AlphaSchedule("linear", 0.1)),
        beta=0.01,
    )
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(report["avg"], expected_loss, rtol=1e-5, atol=1e-6)
    for name, value in expected_metrics.items():
        torch.testing.assert_close(report[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_packed_forward_step_loss_equals_wrpo_loss_on_each_segments_log_softmax(
    make_model: Any, nemo_tokenizer: Any, toy_records: Any
) -> None:
    """A packed row as NeMo-Aligner's collate gives it (cu_seqlens with a padded tail and -1 fill) through the
    forward step: the loss is ``wrpo_loss`` on per-segment sums, segments in role order per prompt."""
    from omegaconf import OmegaConf

    from wrpo_nemo.integrations.nemo_aligner.packed import WRPOPackedDataset

    cfg = OmegaConf.create({"data": {"max_prompt_length": 40}})
    path, records = toy_records
    dataset = WRPOPackedDataset(cfg, nemo_tokenizer, "train", path, range(len(records)), records, 160, 0)
    row = dataset.data[0]
    batch = dataset.global_collate_fn([row], eos_id=nemo_tokenizer.eos_id)
    batch["ref_policy_log_probs"] = -torch.rand(
        batch["input_ids"].shape, generator=torch.Generator().manual_seed(8)
    )
    vocab = nemo_tokenizer.vocab_size
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(9))

    def fake_gpt(input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        assert kwargs["packed_seq_params"].qkv_format == "thd"
        return table.to(input_ids.device)[input_ids]

    model = make_model()
    model.set_training_progress(5, 10)
    output, loss_fn = model.get_forward_output_and_loss_func()(iter([dict(batch)]), fake_gpt)
    loss, report = loss_fn(output)

    tokens, labels = batch["input_ids"][0], batch["labels"][0]
    logps = torch.log_softmax(table[tokens], -1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]
    bounds = batch["cu_seqlens"][0].tolist()
    prompts = len(row["prompts"])
    policy, reference = torch.zeros(prompts, ROLES), torch.zeros(prompts, ROLES)
    for segment in range(ROLES * prompts):
        start, end = bounds[segment], bounds[segment + 1]
        used = labels[start:end] >= 0
        policy[segment // ROLES, segment % ROLES] = logps[start:end][used].sum()
        reference[segment // ROLES, segment % ROLES] = batch["ref_policy_log_probs"][0, start:end][used].sum()
    expected_loss, expected_metrics = wrpo_loss(
        policy, reference, alpha=alpha_at(5, 10, AlphaSchedule("linear", 0.1)), beta=0.01
    )
    assert (
        prompts > 1 and bounds[ROLES * prompts] < batch["input_ids"].shape[1]
    )  # several prompts, padded tail
    torch.testing.assert_close(loss.cpu(), expected_loss, rtol=1e-5, atol=1e-6)
    for name, value in expected_metrics.items():
        torch.testing.assert_close(report[name].cpu(), value, rtol=1e-5, atol=1e-6, msg=name)
