"""Layer 2: records -> validated examples -> token ids -> tokenised cache -> packed micro-batches.

How the engine uses it (one process per rank)::

    tokenizer = AutoTokenizer.from_pretrained(model_path)           # its own chat template
    dataset = build_or_load(DataConfig(sources=[...]), tokenizer)    # rank 0 first, then a barrier
    train = split_indices(dataset.prompt_ids, "wrpo", SplitConfig())  # or "sft" / "eval"
    ref = load_reference_logps(dataset.path, reference_id, len(dataset))
    loader = PackedBatchLoader(dataset, train, stage="wrpo", seq_length=4096, global_batch_size=128,
                               micro_batch_size=8, dp_rank=dp_rank, dp_size=dp_size, seed=42,
                               pad_id=tokenizer.pad_token_id, reference_logps=ref)
    micro_batches = loader.next_global_batch()      # list of PackedBatch, one fixed shape, this rank's share
    checkpoint["data"] = loader.state_dict()        # loader.load_state_dict(...) on resume

The reference log-probs (``wrpo_nemo.training.reference``) are stored with ``save_reference_logps``. The toy task of the default run: ``build_toy_dataset``, ``build_toy_tokenizer``,
``score_answer`` (``wrpo_nemo.data.toy``).
"""

from wrpo_nemo.data.cache import DataConfig, TokenizedDataset, build_or_load
from wrpo_nemo.data.layout import PackedBatch
from wrpo_nemo.data.loader import PackedBatchLoader
from wrpo_nemo.data.packing import PackingError, pack_micro_batch, packing_efficiency
from wrpo_nemo.data.records import DataError, Example, ReadConfig, read_examples
from wrpo_nemo.data.reference import load_reference_logps, save_reference_logps
from wrpo_nemo.data.splits import SplitConfig, split_indices, split_of
from wrpo_nemo.data.tokenize import TemplateError, TokenizeConfig

__all__ = [
    "DataConfig",
    "DataError",
    "Example",
    "PackedBatch",
    "PackedBatchLoader",
    "PackingError",
    "ReadConfig",
    "SplitConfig",
    "TemplateError",
    "TokenizeConfig",
    "TokenizedDataset",
    "build_or_load",
    "load_reference_logps",
    "pack_micro_batch",
    "packing_efficiency",
    "read_examples",
    "save_reference_logps",
    "split_indices",
    "split_of",
]
