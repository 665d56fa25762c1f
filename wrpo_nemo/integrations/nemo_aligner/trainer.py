"""``WRPOTrainer``: NeMo-Aligner's DPO loop, telling the model its optimizer step and splitting three ways.

Everything else (optimizer step, gradient clipping, validation schedule, checkpoints with ``step`` and
``consumed_samples``, resume) is ``DPOTrainer``'s. alpha_t depends only on the optimizer steps completed
(``self.step``, restored on resume) and the run's total (``self.max_steps``, from ``max_epochs`` and
``max_steps``), so it does not change with the number of GPUs or the micro-batch size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from nemo_aligner.algorithms.dpo import DPOTrainer

from wrpo_nemo.integrations.nemo_aligner.dataset import ROLES
from wrpo_nemo.integrations.nemo_aligner.segments import split_roles


class WRPOTrainer(DPOTrainer):
    """``DPOTrainer`` for :class:`~wrpo_nemo.integrations.nemo_aligner.model.MegatronGPTWRPOModel`."""

    def _tell_progress(self) -> None:
        self.model.set_training_progress(self.step, self.max_steps)

    def train_single_step(self, global_batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, Any]]:
        self._tell_progress()
        return super().train_single_step(global_batch)

    def validation_step(self, global_batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, Any]]:
        self._tell_progress()
        return super().validation_step(global_batch)

    def augment_dataloader(self, dataloader: Iterable[Any]) -> Iterator[dict[str, torch.Tensor]]:
        """Collated global batches with the reference policy's per-token log-probs, one key per response."""
        for batch in dataloader:
            batch = self.collate_fn(batch, pad_length_to_multiple_of=self.pad_seq_length_to_mult)
            logprobs = self.model.get_ref_policy_logprobs(batch).cpu()
            if "input_ids" in batch:
                batch["ref_policy_log_probs"] = logprobs
            else:
                for role, part in zip(ROLES, split_roles(logprobs), strict=True):
                    batch[f"ref_policy_log_probs_{role}"] = part
            yield batch
