"""WRPO for NeMo-Aligner 0.7.0 users (NeMo 2.4, megatron-core 0.13: the ``nemo:25.07`` container).

- :mod:`.config` (no NeMo needed): the WRPO keys of the model's ``dpo`` config section.
- :mod:`.stack` (no NeMo needed): the tested NeMo stack and container, and the installed one.
- :mod:`.segments` (torch only): per-response sums of per-token log-probs, unpacked and packed.
- :mod:`.dataset` (no NeMo needed): :class:`~.dataset.WRPOModelDataset` and :func:`~.dataset.wrpo_custom_collate`.
- :mod:`.packed` (needs NeMo-Aligner): :class:`~.packed.WRPOPackedDataset` and the dataset builders.
- :mod:`.model` (needs NeMo-Aligner): :class:`~.model.MegatronGPTWRPOModel`.
- :mod:`.trainer` (needs NeMo-Aligner): :class:`~.trainer.WRPOTrainer`.

This package imports none of them, so importing it never needs NeMo.
"""
