"""The on-disk formats every layer above the model shares (DESIGN.md: below training and the converters).

- :mod:`wrpo_nemo.checkpoint.model`: the model checkpoint (``model_config.json`` + a megatron dist checkpoint
  of the weights, loadable at any TP/PP), which a training checkpoint extends (``wrpo_nemo.training.checkpoint``)
  and the converters read and write;
- :mod:`wrpo_nemo.checkpoint.atomic`: all-or-nothing outputs (a hidden staging sibling renamed into place);
- :mod:`wrpo_nemo.checkpoint.damage`: a failed read of a dist checkpoint told as the damaged file.
"""
