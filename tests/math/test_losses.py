"""wrpo_loss against float64 formulas written here, independently of wrpo_nemo.losses."""

import math

import pytest
import torch

from wrpo_nemo.losses import PREFERENCES, wrpo_loss


def _logsig(x: torch.Tensor) -> torch.Tensor:
    # log sigmoid(x) = -log(1 + exp(-x)), written stably without F.logsigmoid.
    return torch.minimum(x, torch.zeros_like(x)) - torch.log1p(torch.exp(-x.abs()))


def reference_loss(
    pol, ref, lengths, *, alpha, beta, preference, label_smoothing=0.0, gamma=0.0, sft_weight=0.0
):
    """Per-example loops in float64, straight from WRPO.md / the IPO and SimPO papers."""
    terms = []
    for i in range(pol.shape[0]):
        p, q, n = pol[i], (ref[i] if ref is not None else None), lengths[i]
        if preference == "simpo":
            s = [p[k] / n[k] for k in range(3)]
        elif preference == "ipo":
            s = [(p[k] - q[k]) / n[k] for k in range(3)]
        else:
            s = [p[k] - q[k] for k in range(3)]
        h = alpha * s[0] + (1 - alpha) * s[1] - s[2]
        if preference == "dpo":
            z = beta * h
            terms.append(-(1 - label_smoothing) * _logsig(z) - label_smoothing * _logsig(-z))
        elif preference == "ipo":
            terms.append((h - 1 / (2 * beta)) ** 2)
        elif preference == "simpo":
            z = beta * h - gamma
            terms.append(-(1 - label_smoothing) * _logsig(z) - label_smoothing * _logsig(-z))
        else:
            a = -(1 - label_smoothing) * _logsig(beta * (s[0] - s[2])) - label_smoothing * _logsig(
                -beta * (s[0] - s[2])
            )
            b = -(1 - label_smoothing) * _logsig(beta * (s[1] - s[2])) - label_smoothing * _logsig(
                -beta * (s[1] - s[2])
            )
            terms.append((a + b) / 2)
    loss = torch.stack(terms).mean()
    if sft_weight:
        loss = loss + sft_weight * (-pol[:, 0].sum() / lengths[:, 0].sum())
    return loss


def _inputs(batch=6, seed=0, scale=30.0):
    g = torch.Generator().manual_seed(seed)
    pol = -torch.rand(batch, 3, generator=g, dtype=torch.float64) * scale - 1
    ref = pol.detach() + torch.randn(batch, 3, generator=g, dtype=torch.float64) * 2
    lengths = torch.randint(1, 40, (batch, 3), generator=g).to(torch.float64)
    return pol.requires_grad_(), ref, lengths


@pytest.mark.parametrize(
    "preference, label_smoothing",
    [(p, ls) for p in PREFERENCES for ls in (0.0, 0.1) if not (p == "ipo" and ls)],  # IPO has no smoothing
)
@pytest.mark.parametrize("alpha", [0.0, 0.37, 1.0])
def test_loss_and_gradient_match_float64_reference(preference, alpha, label_smoothing):
    pol, ref, lengths = _inputs(seed=hash((preference, alpha)) % 1000)
    kw = dict(alpha=alpha, beta=0.1, preference=preference, label_smoothing=label_smoothing, gamma=0.5)
    ref_in = None if preference == "simpo" else ref
    loss, _ = wrpo_loss(pol, ref_in, lengths=lengths, **kw)
    (grad,) = torch.autograd.grad(loss, pol)
    pol2 = pol.detach().clone().requires_grad_()
    expected = reference_loss(pol2, ref, lengths, **kw)
    (expected_grad,) = torch.autograd.grad(expected, pol2)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_float32_inputs_match_float64_reference():
    pol, ref, lengths = _inputs(seed=3)
    loss, _ = wrpo_loss(pol.detach().float(), ref.float(), alpha=0.05, beta=0.01)
    expected = reference_loss(pol.detach(), ref, lengths, alpha=0.05, beta=0.01, preference="dpo")
    assert abs(loss.item() - expected.item()) < 1e-6


def _plain_dpo(chosen_ratio, rejected_ratio, beta):
    return (-_logsig(beta * (chosen_ratio - rejected_ratio))).mean()


def test_alpha_zero_is_dpo_on_target_chosen_vs_rejected():
    pol, ref, _ = _inputs(seed=4)
    loss, _ = wrpo_loss(pol, ref, alpha=0.0, beta=0.01)
    r = pol - ref
    torch.testing.assert_close(loss, _plain_dpo(r[:, 1], r[:, 2], 0.01), rtol=1e-12, atol=0)
    # y_ws has no influence at all at alpha = 0.
    (grad,) = torch.autograd.grad(loss, pol)
    assert torch.all(grad[:, 0] == 0)


def test_alpha_one_is_dpo_on_source_chosen_vs_rejected():
    pol, ref, _ = _inputs(seed=5)
    loss, _ = wrpo_loss(pol, ref, alpha=1.0, beta=0.01)
    r = pol - ref
    torch.testing.assert_close(loss, _plain_dpo(r[:, 0], r[:, 2], 0.01), rtol=1e-12, atol=0)


@pytest.mark.parametrize("preference", PREFERENCES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_loss_and_gradient_are_finite_at_extreme_margins(preference, sign):
    beta = 0.01
    # |beta * margin| = 1e4: margin of 1e6 nats between the responses, in float32.
    pol = torch.tensor([[0.0, 0.0, -sign * 1e6]], requires_grad=True)
    ref = torch.zeros(1, 3)
    lengths = torch.ones(1, 3)
    loss, metrics = wrpo_loss(
        pol,
        None if preference == "simpo" else ref,
        alpha=0.1,
        beta=beta,
        preference=preference,
        lengths=lengths,
    )
    (grad,) = torch.autograd.grad(loss, pol)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())
    if preference in ("dpo", "dpo_pair_mean") and sign < 0:
        assert loss.item() == pytest.approx(1e4, rel=1e-3)  # -log sigmoid(-1e4) = 1e4


def test_metrics_follow_trl_definitions_with_weighted_chosen_reward():
    pol = torch.tensor([[-10.0, -12.0, -20.0], [-30.0, -5.0, -4.0], [-8.0, -9.0, -7.0]], dtype=torch.float64)
    ref = torch.tensor([[-11.0, -11.0, -18.0], [-29.0, -6.0, -6.0], [-8.0, -8.0, -9.0]], dtype=torch.float64)
    beta, alpha = 0.5, 0.25
    _, m = wrpo_loss(pol, ref, alpha=alpha, beta=beta)
    r = beta * (pol - ref)
    chosen = [alpha * r[i, 0] + (1 - alpha) * r[i, 1] for i in range(3)]
    rejected = [r[i, 2] for i in range(3)]
    wins = [float(c > j) for c, j in zip(chosen, rejected, strict=True)]
    assert m["rewards/chosen"].item() == pytest.approx(sum(chosen) / 3)
    assert m["rewards/rejected"].item() == pytest.approx(sum(rejected) / 3)
    assert m["rewards/margins"].item() == pytest.approx((sum(chosen) - sum(rejected)) / 3)
    assert m["rewards/accuracies"].item() == pytest.approx(sum(wins) / 3)
    assert m["rewards/source_chosen"].item() == pytest.approx(r[:, 0].mean().item())
    assert m["rewards/target_chosen"].item() == pytest.approx(r[:, 1].mean().item())
    assert m["logps/source_chosen"].item() == pytest.approx(pol[:, 0].mean().item())
    assert m["logps/target_chosen"].item() == pytest.approx(pol[:, 1].mean().item())
    assert m["logps/rejected"].item() == pytest.approx(pol[:, 2].mean().item())
    assert m["alpha"].item() == alpha


def test_accuracy_is_per_prompt_not_a_broadcast():
    # Two prompts, one won and one lost: per-prompt accuracy is 0.5. The reference program compared a
    # [batch] tensor with a [batch, 1] tensor, which gives a [batch, batch] grid and 0.25 or 0.75 here.
    pol = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    _, m = wrpo_loss(pol, torch.zeros(2, 3), alpha=0.0, beta=1.0)
    assert m["rewards/accuracies"].item() == 0.5


def test_sft_term_adds_weighted_token_mean_nll_on_source_chosen():
    pol, ref, lengths = _inputs(seed=8)
    base, _ = wrpo_loss(pol, ref, alpha=0.1, beta=0.01)
    loss, m = wrpo_loss(pol, ref, alpha=0.1, beta=0.01, lengths=lengths, sft_weight=0.3)
    nll = -pol[:, 0].sum() / lengths[:, 0].sum()
    torch.testing.assert_close(loss - base, 0.3 * nll)
    torch.testing.assert_close(m["nll_loss"], nll.detach())


def test_simpo_ignores_the_reference_and_uses_length_normalised_policy_logps():
    pol = torch.tensor([[-4.0, -6.0, -9.0]], dtype=torch.float64)
    lengths = torch.tensor([[2.0, 3.0, 3.0]], dtype=torch.float64)
    loss, m = wrpo_loss(pol, None, alpha=0.5, beta=2.0, gamma=0.3, preference="simpo", lengths=lengths)
    h = 0.5 * (-2.0) + 0.5 * (-2.0) - (-3.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-(2.0 * h - 0.3))))
    assert m["rewards/rejected"].item() == pytest.approx(2.0 * -3.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(preference="kto"), "preference must be one of"),
        (dict(beta=0.0), "beta must be > 0"),
        (dict(label_smoothing=0.5), "label_smoothing"),
        (dict(preference="ipo"), "pass lengths"),
        (dict(sft_weight=1.0), "sft_weight"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    pol, ref, _ = _inputs()
    args = dict(alpha=0.1, beta=0.1) | kwargs
    with pytest.raises(ValueError, match=match):
        wrpo_loss(pol, ref, **args)


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\[batch, 3\]"):
        wrpo_loss(torch.zeros(4, 2), torch.zeros(4, 2), alpha=0.1, beta=0.1)
    with pytest.raises(ValueError, match="needs reference_logps"):
        wrpo_loss(torch.zeros(4, 3), None, alpha=0.1, beta=0.1)
