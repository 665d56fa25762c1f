"""The prompt order: each step's global batch is shared out among data-parallel ranks without overlap, an
epoch sees each prompt once, the order is reproducible, and a restored position continues exactly."""

import numpy as np
import pytest
import torch

from wrpo_nemo.data.cache import DataConfig, build_or_load
from wrpo_nemo.data.loader import PackedBatchLoader, PromptOrder, balanced_bins
from wrpo_nemo.data.packing import PackingError
from wrpo_nemo.data.tokenize import TokenizeConfig
from wrpo_nemo.data.toy import build_toy_dataset, build_toy_tokenizer

SEQ = 256


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    paths = build_toy_dataset(str(root), num_examples=100, seed=2)
    cfg = DataConfig(
        sources=[paths["train"]],
        cache_dir=str(root / "cache"),
        num_workers=1,
        tokenize=TokenizeConfig(max_length=64, max_prompt_length=32, seq_length=SEQ),
    )
    return build_or_load(cfg, build_toy_tokenizer())


def _loader(dataset, indices=None, **kw):
    args = {
        "stage": "wrpo",
        "seq_length": SEQ,
        "global_batch_size": 16,
        "micro_batch_size": 2,
        "dp_rank": 0,
        "dp_size": 2,
        "seed": 7,
        "pad_id": 0,
        **kw,
    }
    return PackedBatchLoader(dataset, np.arange(len(dataset)) if indices is None else indices, **args)


def _global_batch(dataset, dp_size, steps, state=None, **kw):
    """For each step, the micro-batches of every rank (rank-major), from independent loaders."""
    loaders = [_loader(dataset, dp_rank=r, dp_size=dp_size, **kw) for r in range(dp_size)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    return [[m for loader in loaders for m in loader.next_indices()] for _ in range(steps)]


def test_ranks_share_each_global_batch_without_overlap(dataset):
    for step in _global_batch(dataset, dp_size=2, steps=3):
        assert len(step) == 16 // 2 and all(len(m) == 2 for m in step)
        flat = np.concatenate(step)
        assert len(set(flat.tolist())) == 16


def test_an_epoch_sees_each_prompt_at_most_once_and_the_next_epoch_reshuffles(dataset):
    loader = _loader(dataset, dp_size=1)
    assert loader.steps_per_epoch == 100 // 16
    epochs = []
    for _ in range(2):
        seen = [np.concatenate(loader.next_indices()) for _ in range(loader.steps_per_epoch)]
        epochs.append(np.concatenate(seen))
        assert len(set(epochs[-1].tolist())) == loader.steps_per_epoch * 16
    assert loader.state_dict()["epoch"] == 2
    assert not np.array_equal(epochs[0], epochs[1])


def test_order_depends_on_the_seed_only(dataset):
    a = _global_batch(dataset, 2, 4)
    b = _global_batch(dataset, 2, 4)
    c = _global_batch(dataset, 2, 4, seed=8)
    assert all(np.array_equal(x, y) for sa, sb in zip(a, b, strict=True) for x, y in zip(sa, sb, strict=True))
    assert not all(np.array_equal(np.concatenate(x), np.concatenate(y)) for x, y in zip(a, c, strict=True))


def test_restored_position_continues_with_identical_packed_batches(dataset):
    straight = _loader(dataset, dp_rank=1)
    for _ in range(9):  # crosses the end of the first epoch (6 steps)
        straight.next_global_batch()
    state = straight.state_dict()
    expected = [straight.next_global_batch() for _ in range(3)]
    resumed = _loader(dataset, dp_rank=1)
    resumed.load_state_dict(state)
    for want, got in zip(expected, [resumed.next_global_batch() for _ in range(3)], strict=True):
        for w, g in zip(want, got, strict=True):
            assert torch.equal(w.tokens, g.tokens) and torch.equal(w.prompt_index, g.prompt_index)


def test_a_new_data_parallel_size_continues_the_same_global_batches(dataset):
    state = _loader(dataset).state_dict()
    state["consumed_in_epoch"] = 32
    two = [np.sort(np.concatenate(s)) for s in _global_batch(dataset, 2, 3, state=state)]
    four = [np.sort(np.concatenate(s)) for s in _global_batch(dataset, 4, 3, state=state)]
    assert all(np.array_equal(x, y) for x, y in zip(two, four, strict=True))


@pytest.mark.parametrize("layout", ["shared_prompt", "separate"])
def test_every_micro_batch_of_the_planned_epoch_has_the_planned_shape(dataset, layout):
    loader = _loader(dataset, micro_batch_size=8, dp_size=1, layout=layout)
    assert loader.rows_per_micro_batch >= 2
    real = total = 0
    for _ in range(loader.steps_per_epoch):
        for batch in loader.next_global_batch():
            batch.validate()
            assert tuple(batch.tokens.shape) == (loader.rows_per_micro_batch, SEQ)
            real += int((batch.segment_ids >= 0).sum())
            total += batch.tokens.numel()
    assert loader.efficiency() == pytest.approx(real / total)


def test_sft_stage_yields_one_source_chosen_segment_per_prompt(dataset):
    batch = _loader(dataset, stage="sft").next_global_batch()[0]
    assert batch.num_segments == batch.num_prompts and (batch.segment_role == 0).all()


def test_impossible_batch_settings_name_the_key(dataset):
    with pytest.raises(ValueError, match="global_batch_size=15 is not a multiple"):
        _loader(dataset, global_batch_size=15)
    with pytest.raises(ValueError, match="do not fill one global batch"):
        _loader(dataset, indices=np.arange(10))
    with pytest.raises(ValueError, match="dp_rank=2"):
        _loader(dataset, dp_rank=2)
    with pytest.raises(PackingError, match=r"rows_per_micro_batch=1 is too small.*needs \d+ rows"):
        _loader(dataset, micro_batch_size=8, rows_per_micro_batch=1)


def test_a_position_from_another_order_is_refused(dataset):
    state = _loader(dataset).state_dict()
    changed = (
        ("seed", 8),
        ("num_prompts", 99),
        ("dataset_key", "other"),
        ("global_batch_size", 32),
        ("stratify_window", 1),
    )
    for key, value in changed:
        with pytest.raises(ValueError, match=f"data {key}"):
            _loader(dataset).load_state_dict({**state, key: value})
    with pytest.raises(ValueError, match="not a multiple"):
        _loader(dataset).load_state_dict({**state, "consumed_in_epoch": 8})


def test_balanced_bins_partition_the_batch_into_equal_counts_of_similar_weight():
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = rng.lognormal(7, 0.6, size=128).astype(int) + 1
        items = rng.permutation(1000)[:128]
        bins = balanced_bins(items, lengths, 16)
        assert sorted(np.concatenate(bins).tolist()) == sorted(items.tolist())
        assert all(len(b) == 8 for b in bins)
        weight = dict(zip(items.tolist(), lengths.tolist(), strict=True))
        totals = [sum(weight[i] for i in b.tolist()) for b in bins]
        chunked = [int(c.sum()) for c in lengths.reshape(16, 8)]
        assert max(totals) - min(totals) <= max(chunked) - min(chunked)
        assert max(totals) - min(totals) <= lengths.max()


def test_length_stratified_epochs_see_each_prompt_once_in_global_batches_of_similar_weight():
    rng = np.random.default_rng(1)
    lengths = rng.lognormal(7, 0.7, size=5000).astype(np.int64)
    indices = np.arange(5000)

    def spread(window):
        order = PromptOrder(indices, 128, 8, 1, seed=3, lengths=lengths, stratify_window=window)
        epoch = order.epoch_order(0)
        used = epoch[: order.steps_per_epoch * 128]
        assert sorted(epoch.tolist()) == indices.tolist() and len(set(used.tolist())) == len(used)
        totals = [int(lengths[used[i : i + 128]].sum()) for i in range(0, len(used), 128)]
        return max(totals) - min(totals)

    assert spread(32) < spread(1) / 4


def test_a_resume_in_the_other_layout_is_refused_naming_the_key(dataset):
    """Each layout stratifies the order by its own lengths: resuming in the other would change the data order."""
    shared = _loader(dataset, layout="shared_prompt")
    shared.next_indices()
    state = shared.state_dict()
    with pytest.raises(ValueError, match=r"data layout is 'shared_prompt'.*set data\.layout=shared_prompt"):
        _loader(dataset, layout="separate").load_state_dict(state)
    old = {k: v for k, v in _loader(dataset, layout="separate").state_dict().items() if k != "layout"}
    _loader(dataset, layout="separate").load_state_dict(old)  # checkpoints from before the option: separate
    with pytest.raises(ValueError, match=r"data\.layout=separate"):
        _loader(dataset, layout="shared_prompt").load_state_dict(old)
