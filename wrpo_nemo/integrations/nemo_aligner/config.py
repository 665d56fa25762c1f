"""The WRPO keys of a NeMo-Aligner model's ``dpo`` config section (no NeMo needed).

WRPO extends NeMo-Aligner's DPO section rather than adding one of its own, so a NeMo-Aligner user reads it at
once: ``ref_policy_kl_penalty`` is beta, ``preference_loss`` picks the objective, ``sft_loss_weight`` adds the
NLL term; ``alpha``, ``alpha_schedule`` and ``alpha_ramp_fraction`` are WRPO's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from wrpo_nemo.alpha import AlphaSchedule
from wrpo_nemo.losses import PREFERENCES

UNSUPPORTED_PARENT_LOSSES = ("rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl")
"""NeMo-Aligner's reward-aware losses compare one chosen with one rejected ground-truth reward; WRPO's weighted
chosen reward has no such counterpart, so they are refused rather than silently changed."""


@dataclass(frozen=True)
class WRPOLossConfig:
    """Everything the model passes to :func:`wrpo_nemo.losses.wrpo_loss`, read from ``model.dpo``."""

    beta: float
    """``dpo.ref_policy_kl_penalty``: the inverse temperature of the implicit reward (0.01 in the paper)."""
    schedule: AlphaSchedule
    """``dpo.alpha`` (alpha_max), ``dpo.alpha_schedule`` (kind), ``dpo.alpha_ramp_fraction``."""
    preference: str = "dpo"
    """``dpo.preference_loss``: one of ``wrpo_nemo.losses.PREFERENCES`` (dpo, ipo, simpo, dpo_pair_mean)."""
    label_smoothing: float = 0.0
    """``dpo.label_smoothing``: conservative-DPO smoothing of the sigmoid objectives (0 in the paper)."""
    gamma: float = 0.0
    """``dpo.simpo_gamma``: SimPO's target reward margin (simpo only)."""
    sft_weight: float = 0.0
    """``dpo.sft_loss_weight``: weight of the NLL term on y_ws (per-token mean); 0 in the paper."""

    @classmethod
    def from_dpo_section(cls, dpo: Mapping[str, Any]) -> WRPOLossConfig:
        """Read and check ``model.dpo``; a bad value raises ``ValueError`` naming its key."""
        preference = str(dpo.get("preference_loss", "dpo"))
        if preference in UNSUPPORTED_PARENT_LOSSES:
            raise ValueError(
                f"model.dpo.preference_loss={preference!r} needs one chosen and one rejected ground-truth reward; "
                f"WRPO supports {PREFERENCES}"
            )
        if preference not in PREFERENCES:
            raise ValueError(f"model.dpo.preference_loss must be one of {PREFERENCES}, got {preference!r}")
        if dpo.get("preference_average_log_probs", False) or dpo.get("sft_average_log_probs", False):
            raise ValueError(
                "model.dpo.preference_average_log_probs / sft_average_log_probs must be False: the WRPO objective "
                "decides the normalisation itself (dpo sums log-probs, ipo and simpo average them per token, "
                "the SFT term is a per-token mean)"
            )
        if float(dpo.get("preference_loss_weight", 1.0)) != 1.0:
            raise ValueError(
                "model.dpo.preference_loss_weight must be 1 for WRPO; weigh the NLL term with model.dpo.sft_loss_weight"
            )
        beta = float(dpo.get("ref_policy_kl_penalty", 0.0))
        if beta <= 0:
            raise ValueError(f"model.dpo.ref_policy_kl_penalty (beta) must be > 0, got {beta}")
        try:
            schedule = AlphaSchedule(
                kind=str(dpo.get("alpha_schedule", "linear")),  # type: ignore[arg-type]
                alpha_max=float(dpo.get("alpha", 0.1)),
                ramp_fraction=float(dpo.get("alpha_ramp_fraction", 1.0)),
            )
        except ValueError as err:  # its messages name the schedule's fields, not this section's keys
            raise ValueError(f"model.dpo.alpha / alpha_schedule / alpha_ramp_fraction: {err}") from err
        sft_weight = float(dpo.get("sft_loss_weight", 0.0))
        if sft_weight < 0:
            raise ValueError(f"model.dpo.sft_loss_weight must be >= 0, got {sft_weight}")
        return cls(
            beta=beta,
            schedule=schedule,
            preference=preference,
            label_smoothing=float(dpo.get("label_smoothing", 0.0)),
            gamma=float(dpo.get("simpo_gamma", 0.0)),
            sft_weight=sft_weight,
        )
