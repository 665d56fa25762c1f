"""``MegatronGPTWRPOModel``: NeMo-Aligner's DPO model with WRPO's three responses (needs NeMo-Aligner 0.7.0).

What changes against ``MegatronGPTDPOModel`` (and nothing else does: optimizer, PEFT, checkpointing, the
reference policy by CPU weight swap or with LoRA adapters switched off are the parent's):

- a batch stacks each prompt's three responses, ``[y_ws rows; y_wt rows; y_l rows]`` (unpacked) or three
  segments per prompt (packed), and outputs are split three ways instead of two;
- the loss and its metrics are the project's :func:`wrpo_nemo.losses.wrpo_loss` on summed log-probs, with
  beta = ``dpo.ref_policy_kl_penalty`` and alpha = ``alpha_at(step, max_steps)`` of the trainer's optimizer
  step, which :class:`~wrpo_nemo.integrations.nemo_aligner.trainer.WRPOTrainer` sets before every step;
- metrics are ``wrpo_loss``'s (TRL names plus ``alpha`` and the per-response rewards), averaged over the
  data-parallel group and the micro-batches;
- with context parallelism the loss is multiplied by the CP size only on megatron-core < 0.12
  (:func:`loss_cp_factor`): from 0.12 on, megatron's ``forward_step`` does it itself, and the parent's
  unconditional ``loss * cp_size`` then multiplies the gradient by the CP size.

The parent's two-way ``gather_and_split_rewards`` and ``sft_loss_func`` are left unused: only the parent's
forward step called them, and this class replaces it (the SFT term is ``wrpo_loss``'s ``sft_weight``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from megatron.core import package_info as megatron_package_info
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.pipeline_parallel.schedules import get_forward_backward_func
from megatron.core.utils import divide
from nemo.collections.nlp.modules.common.megatron.utils import (
    average_losses_across_data_parallel_group,
    get_iterator_k_split,
)
from nemo.collections.nlp.parts.utils_funcs import get_last_rank
from nemo_aligner.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
from nemo_aligner.utils import parallel_state
from nemo_aligner.utils.distributed import broadcast_2d_tensor, from_parallel_logits_to_logprobs
from nemo_aligner.utils.train_utils import set_sync_funcs

from wrpo_nemo import compat
from wrpo_nemo.alpha import alpha_at
from wrpo_nemo.integrations.nemo_aligner.config import WRPOLossConfig
from wrpo_nemo.integrations.nemo_aligner.dataset import ROLES
from wrpo_nemo.integrations.nemo_aligner.segments import (
    NUM_ROLES,
    as_columns,
    reduce_response_logps,
    split_roles,
)
from wrpo_nemo.integrations.nemo_aligner.stack import megatron_scales_cp_loss
from wrpo_nemo.losses import wrpo_loss

PACKED_KEYS = (
    "cu_seqlens",
    "max_seqlen",
    "cu_seqlens_argmin",
    "cu_seqlens_unpadded",
    "cu_seqlens_unpadded_argmin",
)
UNPACKED_SEQUENCE_KEYS = (*ROLES, *(f"{role}_labels" for role in ROLES), "attention_mask")
"""Keys whose sequence dimension context parallelism splits (unpacked batches)."""


MEGATRON_SCALES_CP_LOSS = megatron_scales_cp_loss(megatron_package_info.__version__)
"""Whether the installed megatron-core's schedules multiply the returned loss by the context-parallel size."""


def device() -> torch.device:
    """Where batches and collectives live: the current GPU, or the CPU on a machine without CUDA (tests)."""
    return compat.device()


def loss_cp_factor() -> int:
    """What the loss function multiplies its loss by for context parallelism: the CP size, or 1 where megatron
    does it.

    Each CP rank's loss is the whole micro-batch's (the per-response sums are all-reduced over the CP group)
    but its gradient covers only that rank's tokens; the gradient reduction then averages over the data- and
    context-parallel ranks together (DP x CP: the distributed optimizer's process group, megatron's DDP), so
    the loss must be multiplied by the CP size exactly once. megatron-core >= 0.12 does it in ``forward_step``
    for a loss function that returns ``(loss, metrics)``, as this one does; before, the loss function had to.
    """
    return 1 if MEGATRON_SCALES_CP_LOSS else parallel_state.get_context_parallel_world_size()


class MegatronGPTWRPOModel(MegatronGPTDPOModel):
    """Megatron GPT trained with WRPO (three responses per prompt) in NeMo-Aligner's DPO loop."""

    def __init__(self, cfg: Any, trainer: Any) -> None:
        super().__init__(cfg, trainer=trainer)
        self.wrpo = WRPOLossConfig.from_dpo_section(self.cfg.dpo)
        self.training_progress: tuple[int, int] | None = None

    # ------------------------------------------------------------------ alpha and the loss

    def set_training_progress(self, step: int, total_steps: int) -> None:
        """Record the optimizer steps completed and the run's total; alpha follows them."""
        self.training_progress = (int(step), int(total_steps))

    def current_alpha(self) -> float:
        """alpha_t for the current optimizer step (constant inside one global batch)."""
        if self.training_progress is None:
            raise RuntimeError(
                "alpha follows the trainer's optimizer step: call model.set_training_progress(step, max_steps) "
                "first (WRPOTrainer does it before every training and validation step)"
            )
        step, total = self.training_progress
        return alpha_at(step, total, self.wrpo.schedule)

    def get_reduced_masked_logps(
        self,
        logps: torch.Tensor,
        labels: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        average_log_probs: bool = False,
    ) -> torch.Tensor:
        """Per-response sums (or per-token means) of ``logps``, role-major ``[3 * B]``, summed over CP ranks."""
        cp_size = parallel_state.get_context_parallel_world_size()
        if cu_seqlens is not None:
            # Each context-parallel rank holds 1/cp of every packed segment.
            cu_seqlens = cu_seqlens // cp_size
        sums = reduce_response_logps(logps, labels, cu_seqlens)
        counts = (
            reduce_response_logps(torch.ones_like(logps), labels, cu_seqlens) if average_log_probs else None
        )
        if cp_size > 1:
            group = parallel_state.get_context_parallel_group()
            torch.distributed.all_reduce(sums, group=group)
            if counts is not None:
                torch.distributed.all_reduce(counts, group=group)
        return sums if counts is None else sums / counts.clamp(min=1)

    def split_output_tensor(
        self, output_tensor: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Role-major rows as (source_chosen, target_chosen, rejected)."""
        return split_roles(output_tensor)

    def loss_func(
        self,
        pi_logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor,
        labels: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``wrpo_loss`` on the per-response sums of per-token policy and reference log-probs."""
        policy = as_columns(self.get_reduced_masked_logps(pi_logprobs, labels, cu_seqlens))
        reference = None
        if self.wrpo.preference != "simpo":
            reference = as_columns(self.get_reduced_masked_logps(ref_logprobs, labels, cu_seqlens))
        lengths = as_columns(self.get_reduced_masked_logps(torch.ones_like(pi_logprobs), labels, cu_seqlens))
        return wrpo_loss(
            policy,
            reference,
            alpha=self.current_alpha(),
            beta=self.wrpo.beta,
            preference=self.wrpo.preference,  # type: ignore[arg-type]
            label_smoothing=self.wrpo.label_smoothing,
            gamma=self.wrpo.gamma,
            lengths=lengths,
            sft_weight=self.wrpo.sft_weight,
        )

    def metric_names(self) -> list[str]:
        """The names ``loss_func`` reports, known on every pipeline stage (only the last computes them)."""
        one = torch.ones(1, NUM_ROLES)
        _, metrics = wrpo_loss(
            one,
            one,
            alpha=0.0,
            beta=self.wrpo.beta,
            preference=self.wrpo.preference,  # type: ignore[arg-type]
            lengths=one,
            sft_weight=self.wrpo.sft_weight,
        )
        return sorted(metrics)

    # ------------------------------------------------------------------ batches

    def get_batch_on_this_context_parallel_rank(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The parent's load-balanced context-parallel slicing, over the three responses' keys."""
        batch["num_valid_tokens_in_ub"] = None
        cp_size = parallel_state.get_context_parallel_world_size()
        if cp_size == 1 or "cu_seqlens" in batch:
            return batch
        cp_rank = parallel_state.get_context_parallel_rank()
        index = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=device())
        for key in UNPACKED_SEQUENCE_KEYS:
            val = batch.get(key)
            if val is None:
                continue
            seq_dim = 2 if key == "attention_mask" else 1
            val = val.view(
                *val.shape[:seq_dim],
                2 * cp_size,
                val.shape[seq_dim] // (2 * cp_size),
                *val.shape[seq_dim + 1 :],
            )
            val = val.index_select(seq_dim, index)
            batch[key] = val.view(*val.shape[:seq_dim], -1, *val.shape[seq_dim + 2 :])
        return batch

    def _required_keys(self, batch: dict[str, Any], packed: bool) -> set[str]:
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return set(batch)
        keys = {"attention_mask", *(k for k in PACKED_KEYS if k in batch)}
        if parallel_state.is_pipeline_first_stage():
            keys.update(("input_ids", "position_ids") if packed else (*ROLES, "position_ids"))
        if parallel_state.is_pipeline_last_stage():
            if packed:
                keys.update(("labels", "ref_policy_log_probs"))
            else:
                keys.update(f"{role}_labels" for role in ROLES)
                keys.update(f"ref_policy_log_probs_{role}" for role in ROLES)
        return keys

    def _packed_forward_args(self, batch: dict[str, Any], forward_args: dict[str, Any]) -> torch.Tensor:
        """The parent's THD arguments for a packed row (TransformerEngine attention); returns ``cu_seqlens``."""
        from megatron.core.packed_seq_params import PackedSeqParams

        cu_seqlens = batch["cu_seqlens"].squeeze()
        cu_seqlens = cu_seqlens[: int(batch["cu_seqlens_argmin"].item())]
        unpadded = batch["cu_seqlens_unpadded"].squeeze()
        unpadded = unpadded[: int(batch["cu_seqlens_unpadded_argmin"].item())]
        max_seqlen = batch["max_seqlen"].squeeze()
        cp_size = parallel_state.get_context_parallel_world_size()
        if cp_size > 1:
            import transformer_engine_torch as tex

            cp_rank = parallel_state.get_context_parallel_rank()
            for key in ("input_ids", "labels", "position_ids"):
                if batch.get(key) is not None:
                    index = tex.thd_get_partitioned_indices(cu_seqlens, batch[key].size(1), cp_size, cp_rank)
                    batch[key] = batch[key].index_select(1, index)
        forward_args["input_ids"] = batch["input_ids"]
        forward_args["position_ids"] = batch["position_ids"]
        forward_args["packed_seq_params"] = PackedSeqParams(
            cu_seqlens_q=unpadded,
            cu_seqlens_kv=unpadded,
            cu_seqlens_q_padded=cu_seqlens,
            cu_seqlens_kv_padded=cu_seqlens,
            max_seqlen_q=max_seqlen,
            max_seqlen_kv=max_seqlen,
            qkv_format="thd",
        )
        return cu_seqlens

    def get_forward_output_and_loss_func(
        self, validation_step: bool = False, logprobs_only: bool = False
    ) -> Callable[..., tuple[torch.Tensor, Callable]]:
        """The forward step of megatron's schedules: model output plus the WRPO loss (or log-probs) function."""

        def fwd_output_and_loss_func(
            dataloader_iter: Iterator[dict[str, Any]],
            model: Any,
            checkpoint_activations_all_layers: Any = None,
        ) -> tuple[torch.Tensor, Callable]:
            batch = next(dataloader_iter)
            packed = "input_ids" in batch
            required = self._required_keys(batch, packed)
            batch = {
                k: v.to(device(), non_blocking=True) if k in required else None for k, v in batch.items()
            }
            batch = self.get_batch_on_this_context_parallel_rank(batch)

            def stacked(keys: list[str]) -> torch.Tensor | None:
                values = [batch.get(k) for k in keys]
                return None if any(v is None for v in values) else torch.cat(values, dim=0)

            # All rows of one micro-batch share the causal mask and position ids (no reset): pass one row.
            forward_args: dict[str, Any] = {"labels": None}
            cu_seqlens = None
            if packed:
                forward_args["attention_mask"] = None
                cu_seqlens = self._packed_forward_args(batch, forward_args)
                labels, ref_logprobs = batch["labels"], batch.get("ref_policy_log_probs")
            else:
                forward_args["input_ids"] = stacked(list(ROLES))
                forward_args["position_ids"] = (
                    batch["position_ids"][0:1] if batch["position_ids"] is not None else None
                )
                forward_args["attention_mask"] = (
                    batch["attention_mask"][0:1] if batch["attention_mask"] is not None else None
                )
                labels = stacked([f"{role}_labels" for role in ROLES])
                ref_logprobs = stacked([f"ref_policy_log_probs_{role}" for role in ROLES])
            if not self.mcore_gpt:
                forward_args["checkpoint_activations_all_layers"] = checkpoint_activations_all_layers
            output_tensor = model(**forward_args)
            if not parallel_state.is_pipeline_last_stage():
                output_tensor = output_tensor.to(dtype=self.autocast_dtype)

            def logprobs_func(
                output_tensor: torch.Tensor, non_loss_data: bool = True
            ) -> dict[str, torch.Tensor]:
                logprobs = from_parallel_logits_to_logprobs(
                    vocab_parallel_logits=output_tensor,
                    target=labels,
                    inference_only=True,
                    higher_stability=True,
                    ignore_last=False,
                )
                return {"logprobs": logprobs}

            def loss_func(output_tensor: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
                if validation_step and not self.cfg.data.get("validation_drop_last", True):
                    raise NotImplementedError("WRPO, like DPO, needs cfg.data.validation_drop_last=True")
                per_token_logps = from_parallel_logits_to_logprobs(
                    vocab_parallel_logits=output_tensor,
                    target=labels,
                    inference_only=validation_step,
                    higher_stability=True,
                    ignore_last=False,
                )
                loss, metrics = self.loss_func(per_token_logps, ref_logprobs, labels, cu_seqlens)
                names = self.metric_names()
                reduced = average_losses_across_data_parallel_group([loss, *(metrics[n] for n in names)])
                report = {"avg": reduced[0], **dict(zip(names, reduced[1:], strict=True))}
                # The gradient reduction averages over DP x CP: see loss_cp_factor for who multiplies by CP.
                return loss * loss_cp_factor(), report

            return output_tensor, (logprobs_func if logprobs_only else loss_func)

        return fwd_output_and_loss_func

    def get_loss_and_metrics(
        self, batch: dict[str, torch.Tensor], forward_only: bool
    ) -> tuple[float, dict[str, float]]:
        """One global batch through megatron's schedules; the loss and metrics averaged over micro-batches."""
        packed = "input_ids" in batch
        seq_length = batch["input_ids" if packed else ROLES[0]].shape[1]
        micro_batch_size = self.cfg.micro_batch_size
        if packed:
            if micro_batch_size != 1:
                raise ValueError(f"packed WRPO batches need model.micro_batch_size=1, got {micro_batch_size}")
            if not self.cfg.get("transformer_engine", False):
                raise ValueError(
                    "packed WRPO batches need TransformerEngine attention: model.transformer_engine=True"
                )
        else:
            micro_batch_size *= NUM_ROLES  # a micro-batch holds three rows per prompt
        set_sync_funcs(self, forward_only)
        outputs = get_forward_backward_func()(
            forward_step_func=self.get_forward_output_and_loss_func(forward_only),
            data_iterator=get_iterator_k_split(batch, get_num_microbatches()),
            model=self.model,
            num_microbatches=get_num_microbatches(),
            forward_only=forward_only,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
        )
        names = ["avg", *self.metric_names()]
        values = torch.zeros(len(names), device=device())
        if outputs:  # only the last pipeline stage computes the loss
            values = torch.stack([torch.stack([out[n] for out in outputs]).mean() for n in names]).to(values)
        # Logging happens on rank 0: every rank gets the last rank's values.
        torch.distributed.broadcast(values, get_last_rank())
        metrics = dict(zip(["loss", *names[1:]], values.tolist(), strict=True))
        return metrics["loss"], metrics

    @torch.no_grad()
    def get_logprob_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Per-token log-probs of a global batch (role-major rows when unpacked), broadcast over PP stages."""
        packed = "input_ids" in batch
        rows = batch["input_ids" if packed else ROLES[0]]
        micro_batch_size = self.cfg.dpo.log_prob_forward_micro_batch_size
        num_microbatches = divide(rows.shape[0], micro_batch_size)
        if packed and micro_batch_size != 1:
            raise ValueError(
                f"packed WRPO batches need dpo.log_prob_forward_micro_batch_size=1, got {micro_batch_size}"
            )
        set_sync_funcs(self, forward_only=True)
        outputs = get_forward_backward_func()(
            forward_step_func=self.get_forward_output_and_loss_func(logprobs_only=True),
            data_iterator=get_iterator_k_split(batch, num_microbatches),
            model=self.model,
            num_microbatches=num_microbatches,
            forward_only=True,
            seq_length=rows.shape[1],
            micro_batch_size=micro_batch_size if packed else NUM_ROLES * micro_batch_size,
            collect_non_loss_data=True,
        )
        logprobs = None
        if outputs:
            if packed:
                logprobs = torch.cat([out["logprobs"] for out in outputs], dim=0)
            else:
                # Each micro-batch is role-major on its own; make the whole batch role-major.
                parts = [split_roles(out["logprobs"]) for out in outputs]
                logprobs = torch.cat([torch.cat([p[r] for p in parts]) for r in range(NUM_ROLES)], dim=0)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            logprobs = broadcast_2d_tensor(
                logprobs,
                parallel_state.get_pipeline_model_parallel_last_rank(),
                parallel_state.get_pipeline_model_parallel_group(),
            )
        return logprobs
