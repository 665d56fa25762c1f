"""WRPO and the DPO family behind one weighting of the chosen reward (layer 1: pure torch).

Every objective here takes per-response log-probabilities laid out as ``[batch, 3]`` with columns in role
order: source chosen ``y_ws``, target chosen ``y_wt``, rejected ``y_l``. Each entry is the SUM of the
response's token log-probs. WRPO's internal reward mixes the two chosen responses::

    r(y)   = log pi_theta(y|x) - log pi_ref(y|x)
    h      = alpha * r(y_ws) + (1 - alpha) * r(y_wt) - r(y_l)
    L_dpo  = -log sigmoid(beta * h)                               (the paper's loss, alpha = alpha_t)

With ``alpha = 0`` every objective reduces to its plain two-response form on ``(y_wt, y_l)``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Preference = Literal["dpo", "ipo", "simpo", "dpo_pair_mean"]
PREFERENCES: tuple[str, ...] = ("dpo", "ipo", "simpo", "dpo_pair_mean")
"""The objectives ``wrpo_loss`` accepts:

- ``dpo``: sigmoid loss on the weighted reward margin (the paper's WRPO). Optional conservative label
  smoothing ``eps``: ``-(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
- ``ipo``: ``(h - 1/(2 beta))^2`` on per-token average log-ratios (TRL's normalisation); needs ``lengths``.
- ``simpo``: reference-free; rewards are ``beta`` times per-token average policy log-probs, loss
  ``-log sigmoid(beta h_avg - gamma)``; needs ``lengths``; ``reference_logps`` may be ``None``.
- ``dpo_pair_mean``: the reference program's second variant, the mean of two DPO losses
  ``(y_ws vs y_l)`` and ``(y_wt vs y_l)``; it does not use ``alpha`` (reported for the record only).
"""

SOURCE, TARGET, REJECTED = 0, 1, 2


def _check_inputs(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor | None,
    lengths: torch.Tensor | None,
    preference: str,
    beta: float,
    label_smoothing: float,
) -> None:
    if preference not in PREFERENCES:
        raise ValueError(f"preference must be one of {PREFERENCES}, got {preference!r}")
    if policy_logps.ndim != 2 or policy_logps.shape[1] != 3:
        raise ValueError(
            f"policy_logps must have shape [batch, 3] (source_chosen, target_chosen, rejected), "
            f"got {tuple(policy_logps.shape)}"
        )
    if preference != "simpo":
        if reference_logps is None:
            raise ValueError(f"preference={preference!r} needs reference_logps")
        if reference_logps.shape != policy_logps.shape:
            raise ValueError(
                f"reference_logps shape {tuple(reference_logps.shape)} != policy_logps shape "
                f"{tuple(policy_logps.shape)}"
            )
    if preference in ("ipo", "simpo") and lengths is None:
        raise ValueError(f"preference={preference!r} averages log-probs over tokens: pass lengths [batch, 3]")
    if lengths is not None and lengths.shape != policy_logps.shape:
        raise ValueError(
            f"lengths shape {tuple(lengths.shape)} != policy_logps shape {tuple(policy_logps.shape)}"
        )
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")


def _sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    # logsigmoid is evaluated in a numerically stable form: finite for |logits| of any size.
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def weighted_chosen(values: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """``alpha * values[:, y_ws] + (1 - alpha) * values[:, y_wt]``: WRPO's mix of the two chosen columns."""
    return alpha * values[:, SOURCE] + (1.0 - alpha) * values[:, TARGET]


def wrpo_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor | None,
    *,
    alpha: float | torch.Tensor,
    beta: float,
    preference: Preference = "dpo",
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    lengths: torch.Tensor | None = None,
    sft_weight: float = 0.0,
    sft_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The WRPO loss (mean over prompts) and its metrics.

    Args:
        policy_logps: ``[batch, 3]`` summed response log-probs under the trained policy.
        reference_logps: ``[batch, 3]`` summed log-probs under the frozen reference (``None`` for simpo).
        alpha: weight of the source response in the chosen reward (``alpha_t`` of the schedule).
        beta: inverse temperature of the implicit reward (0.01 in the paper).
        preference: the objective, see ``PREFERENCES``.
        label_smoothing: conservative-DPO smoothing for the sigmoid objectives (0 in the paper).
        gamma: SimPO's target reward margin (only used by ``simpo``).
        lengths: ``[batch, 3]`` response token counts; needed by ipo, simpo and the SFT term.
        sft_weight: weight of an added NLL term on y_ws (per-token mean over the batch); 0 disables it.
        sft_tokens: the y_ws token count the NLL sum is divided by (default: this batch's). A trainer that
            splits a global batch passes its share of the global count (see ``training.stages``), so the
            term is the mean over the global batch's y_ws tokens whatever the split.

    Returns:
        ``(loss, metrics)``; metrics are detached 0-d tensors averaged over the batch, named as in TRL where
        the meaning matches (``rewards/chosen`` is WRPO's weighted chosen reward).
    """
    _check_inputs(policy_logps, reference_logps, lengths, preference, beta, label_smoothing)
    if sft_weight and lengths is None:
        raise ValueError("sft_weight > 0 needs lengths to average the NLL over y_ws tokens")
    alpha_t = torch.as_tensor(alpha, dtype=policy_logps.dtype, device=policy_logps.device)

    if preference == "simpo":
        scores = policy_logps / lengths.clamp(min=1)
    else:
        scores = policy_logps - reference_logps
        if preference == "ipo":
            scores = scores / lengths.clamp(min=1)

    chosen = weighted_chosen(scores, alpha_t)
    margin = chosen - scores[:, REJECTED]
    if preference == "dpo":
        per_prompt = _sigmoid_loss(beta * margin, label_smoothing)
    elif preference == "ipo":
        per_prompt = (margin - 1.0 / (2.0 * beta)) ** 2
    elif preference == "simpo":
        per_prompt = _sigmoid_loss(beta * margin - gamma, label_smoothing)
    else:  # dpo_pair_mean
        source_vs_rejected = _sigmoid_loss(beta * (scores[:, SOURCE] - scores[:, REJECTED]), label_smoothing)
        target_vs_rejected = _sigmoid_loss(beta * (scores[:, TARGET] - scores[:, REJECTED]), label_smoothing)
        per_prompt = 0.5 * (source_vs_rejected + target_vs_rejected)
    loss = per_prompt.mean()

    metrics = _reward_metrics(policy_logps, scores, alpha_t, beta)
    if sft_weight:
        tokens = lengths[:, SOURCE].sum().clamp(min=1) if sft_tokens is None else max(sft_tokens, 1e-12)
        nll = -policy_logps[:, SOURCE].sum() / tokens
        loss = loss + sft_weight * nll
        metrics["nll_loss"] = nll.detach()
    return loss, metrics


def _reward_metrics(
    policy_logps: torch.Tensor, scores: torch.Tensor, alpha: torch.Tensor, beta: float
) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        rewards = beta * scores
        chosen = weighted_chosen(rewards, alpha)
        rejected = rewards[:, REJECTED]
        return {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            # One comparison per prompt: [batch] > [batch], never a broadcast [batch] vs [batch, 1].
            "rewards/accuracies": (chosen > rejected).to(policy_logps.dtype).mean(),
            "rewards/source_chosen": rewards[:, SOURCE].mean(),
            "rewards/target_chosen": rewards[:, TARGET].mean(),
            "logps/source_chosen": policy_logps[:, SOURCE].mean(),
            "logps/target_chosen": policy_logps[:, TARGET].mean(),
            "logps/rejected": policy_logps[:, REJECTED].mean(),
            "alpha": alpha.detach().clone(),
        }
