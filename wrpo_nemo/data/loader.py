"""Deterministic, resumable order of prompts, and the per-data-parallel-rank micro-batches of each step.

A *global batch* is ``global_batch_size`` prompts (128 in the paper), one optimizer step. It is cut into
``global_batch_size / micro_batch_size`` micro-batches of ``micro_batch_size`` prompts each, dealt by length
(longest first, to the lightest) so that they carry similar token counts; data-parallel rank ``r`` takes the
``r``-th contiguous ``1 / dp_size`` of them and runs them as its gradient-accumulation steps. Every
micro-batch is packed into the same ``[rows_per_micro_batch, seq_length]`` shape, which megatron's pipeline
schedules need; unless given, ``rows_per_micro_batch`` is the most rows any micro-batch of the planned
epochs needs. Loss normalisation is the engine's: a micro-batch holds ``micro_batch_size`` prompts and a
step ``global_batch_size``.

The order of an epoch is a permutation seeded by ``(seed, epoch)``, length-stratified over windows of
``stratify_window`` global batches (see :meth:`PromptOrder.epoch_order`); the position is the number of prompts
consumed in the current epoch. So the checkpointed state is a small dict, and it stays valid when the number
of data-parallel ranks changes (neither the order nor the micro-batches depend on it; only which rank takes
which micro-batches does). A different seed, prompt set, dataset, global batch size or window is refused.
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np

from wrpo_nemo.data.cache import TokenizedDataset
from wrpo_nemo.data.layout import Layout, PackedBatch
from wrpo_nemo.data.packing import PackingError, Stage, group_lengths, pack_micro_batch, rows_needed


class PromptOrder:
    """The prompt order of every epoch and the share of each data-parallel rank."""

    def __init__(
        self,
        indices: np.ndarray,
        global_batch_size: int,
        micro_batch_size: int,
        dp_size: int,
        seed: int,
        lengths: np.ndarray | None = None,
        stratify_window: int = 32,
    ) -> None:
        if micro_batch_size < 1 or dp_size < 1:
            raise ValueError("micro_batch_size and the data-parallel size must be at least 1")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global_batch_size={global_batch_size} is not a multiple of micro_batch_size={micro_batch_size} x "
                f"data-parallel size {dp_size}: change global_batch_size or micro_batch_size"
            )
        self.indices = np.asarray(indices, dtype=np.int64)
        if len(self.indices) < global_batch_size:
            raise ValueError(
                f"{len(self.indices)} prompts do not fill one global batch of global_batch_size={global_batch_size}"
            )
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_size = dp_size
        self.seed = seed
        self.lengths = lengths
        """Row tokens of every dataset position; when given, micro-batches are balanced by them."""
        self.stratify_window = stratify_window
        """Global batches whose prompts are dealt out by length so each gets a similar mix (1: plain shuffle)."""
        self.steps_per_epoch = len(self.indices) // global_batch_size
        """Optimizer steps per epoch; the last partial global batch of an epoch is left out."""

    def epoch_order(self, epoch: int) -> np.ndarray:
        """A permutation of the prompts seeded by ``(seed, epoch)``, length-stratified by window."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.indices)
        if self.lengths is None or self.stratify_window < 2:
            return order
        # Global batches of a shuffled window are dealt its prompts longest first in snake order, so every
        # global batch holds a similar mix of lengths: the fixed rows of a micro-batch, sized for the worst
        # micro-batch of the epoch, then sit close to the average. Each epoch still sees every prompt once.
        size = self.global_batch_size
        usable = self.steps_per_epoch * size
        for start in range(0, usable, self.stratify_window * size):
            window = order[start : min(start + self.stratify_window * size, usable)]
            count = len(window) // size
            ranked = window[np.argsort(-self.lengths[window], kind="stable")]
            lap, slot = np.divmod(np.arange(len(ranked)), count)
            batch = np.where(lap % 2 == 0, slot, count - 1 - slot)
            order[start : start + len(window)] = np.concatenate([ranked[batch == b] for b in range(count)])
        return order

    def step_micro_batches(self, order: np.ndarray, step: int) -> list[np.ndarray]:
        """Dataset positions of every micro-batch of step ``step`` (all ranks, rank-major)."""
        batch = order[step * self.global_batch_size : (step + 1) * self.global_batch_size]
        if self.lengths is None:
            return list(batch.reshape(-1, self.micro_batch_size))
        return balanced_bins(batch, self.lengths[batch], len(batch) // self.micro_batch_size)

    def micro_batches(self, order: np.ndarray, step: int, dp_rank: int) -> list[np.ndarray]:
        """Dataset positions of each micro-batch of ``dp_rank`` in step ``step`` of an epoch's ``order``."""
        per_rank = self.global_batch_size // (self.micro_batch_size * self.dp_size)
        return self.step_micro_batches(order, step)[dp_rank * per_rank : (dp_rank + 1) * per_rank]


def balanced_bins(items: np.ndarray, lengths: np.ndarray, num_bins: int) -> list[np.ndarray]:
    """Deal ``items`` into ``num_bins`` bins of equal count, longest first into the lightest bin with room.

    Micro-batches of a fixed prompt count then carry similar token counts, so the fixed number of rows a
    micro-batch gets is rarely much more than it needs, and data-parallel ranks get similar work.
    """
    capacity = len(items) // num_bins
    heap = [(0, b) for b in range(num_bins)]
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    for pos in np.argsort(-np.asarray(lengths), kind="stable"):
        total, b = heapq.heappop(heap)
        bins[b].append(int(items[pos]))
        if len(bins[b]) < capacity:
            heapq.heappush(heap, (total + int(lengths[pos]), b))
    return [np.array(b, dtype=np.int64) for b in bins]


class PackedBatchLoader:
    """Yields, step after step, this rank's packed micro-batches; its position is part of the checkpoint.

    ``indices`` are the dataset positions to train on (a split); ``stage`` is ``"wrpo"`` (three segments per
    prompt) or ``"sft"`` (y_ws only); ``pad_id`` fills padding (any valid id; the loss never sees it);
    ``reference_logps`` (``[len(dataset), 3]``) rides along into every batch; ``plan_epochs`` is how many
    epochs the run trains (rows are planned over them; a later epoch may need more and then fails with
    :class:`PackingError`); ``stratify_window`` is described in :class:`PromptOrder`; ``layout`` is the WRPO
    row layout (``shared_prompt`` or ``separate``, see :mod:`wrpo_nemo.data.layout`).
    """

    def __init__(
        self,
        dataset: TokenizedDataset,
        indices: np.ndarray,
        *,
        stage: Stage,
        seq_length: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        pad_id: int,
        rows_per_micro_batch: int | None = None,
        reference_logps: np.ndarray | None = None,
        plan_epochs: int = 1,
        stratify_window: int = 32,
        layout: Layout = "shared_prompt",
    ) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is outside the data-parallel size {dp_size}")
        if reference_logps is not None and len(reference_logps) != len(dataset):
            raise ValueError(
                f"reference log-probs have {len(reference_logps)} rows, the dataset {len(dataset)}"
            )
        self.dataset = dataset
        self.layout = layout
        self.order = PromptOrder(
            indices,
            global_batch_size,
            micro_batch_size,
            dp_size,
            seed,
            group_lengths(dataset, stage, layout),
            stratify_window,
        )
        self.stage, self.seq_length, self.pad_id = stage, seq_length, pad_id
        self.dp_rank = dp_rank
        self.reference_logps = reference_logps
        self.epoch = 0
        self.consumed = 0
        self._order_cache: tuple[int, np.ndarray] | None = None
        needed = self.plan_rows(plan_epochs)
        if rows_per_micro_batch is not None and rows_per_micro_batch < needed:
            # Found now, at start-up, rather than at the step whose prompts would not fit.
            raise PackingError(
                f"rows_per_micro_batch={rows_per_micro_batch} is too small: a micro-batch of {micro_batch_size} "
                f"prompts in the first {plan_epochs} epoch(s) needs {needed} rows of seq_length={seq_length}; "
                "raise it (or leave it unset), raise seq_length or lower micro_batch_size"
            )
        self.rows_per_micro_batch = needed if rows_per_micro_batch is None else rows_per_micro_batch

    @property
    def steps_per_epoch(self) -> int:
        return self.order.steps_per_epoch

    def plan_rows(self, epochs: int) -> int:
        """Most rows a micro-batch of any rank needs over the first ``epochs`` epochs (first-fit decreasing).

        Also sets :attr:`planned_tokens`, the real tokens of those micro-batches, for :meth:`efficiency`.
        """
        lengths = group_lengths(self.dataset, self.stage, self.layout)
        most, tokens, count = 1, 0, 0
        for epoch in range(epochs):
            order = self.order.epoch_order(epoch)
            for step in range(self.steps_per_epoch):
                for micro in self.order.step_micro_batches(order, step):
                    most = max(most, rows_needed(lengths[micro], self.seq_length))
                    tokens += int(lengths[micro].sum())
                    count += 1
        self.planned_tokens, self.planned_micro_batches = tokens, count
        return most

    def efficiency(self) -> float:
        """Real tokens / row tokens over the planned epochs at this loader's fixed micro-batch shape."""
        return self.planned_tokens / (
            self.planned_micro_batches * self.rows_per_micro_batch * self.seq_length
        )

    def _epoch_order(self) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != self.epoch:
            self._order_cache = (self.epoch, self.order.epoch_order(self.epoch))
        return self._order_cache[1]

    def next_indices(self) -> list[np.ndarray]:
        """Dataset positions of this rank's micro-batches for the next step; advances the position."""
        step = self.consumed // self.order.global_batch_size
        micro = self.order.micro_batches(self._epoch_order(), step, self.dp_rank)
        self.consumed += self.order.global_batch_size
        if self.consumed // self.order.global_batch_size >= self.steps_per_epoch:
            self.epoch += 1
            self.consumed = 0
        return micro

    def next_global_batch(self) -> list[PackedBatch]:
        """This rank's packed micro-batches for the next optimizer step."""
        return [
            pack_micro_batch(
                self.dataset,
                micro,
                self.stage,
                self.seq_length,
                self.rows_per_micro_batch,
                self.pad_id,
                self.reference_logps,
                layout=self.layout,
            )
            for micro in self.next_indices()
        ]

    def state_dict(self) -> dict[str, Any]:
        """The data position for a checkpoint: plain ints and a string, identical on every rank."""
        return {
            "epoch": self.epoch,
            "consumed_in_epoch": self.consumed,
            "seed": self.order.seed,
            "num_prompts": len(self.order.indices),
            "dataset_key": self.dataset.key,
            "global_batch_size": self.order.global_batch_size,
            "stratify_window": self.order.stratify_window,
            "layout": self.layout,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses a state of another order (seed, prompts, dataset)."""
        for name, mine in (
            ("seed", self.order.seed),
            ("num_prompts", len(self.order.indices)),
            ("dataset_key", self.dataset.key),
            ("global_batch_size", self.order.global_batch_size),
            ("stratify_window", self.order.stratify_window),
        ):
            if state[name] != mine:
                raise ValueError(f"the checkpoint's data {name} is {state[name]!r}, this run's is {mine!r}")
        # The order is stratified by each layout's lengths. Checkpoints from before the option were separate.
        saved = state.get("layout", "separate")
        if self.stage == "wrpo" and saved != self.layout:
            raise ValueError(
                f"the checkpoint's data layout is {saved!r}, this run's is {self.layout!r} (the prompt order "
                f"differs between layouts): set data.layout={saved} to resume it"
            )
        if state["consumed_in_epoch"] % self.order.global_batch_size:
            raise ValueError(
                f"the checkpoint consumed {state['consumed_in_epoch']} prompts of its epoch, not a multiple of "
                f"global_batch_size={self.order.global_batch_size}"
            )
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed_in_epoch"])
