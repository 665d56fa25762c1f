"""Training layer (DESIGN.md layer 4), below the converters and the entry points.

- ``stages.py``: ``SFTStage`` and ``WRPOStage``, each owning its loss, per-step settings (alpha_t) and reference;
- ``loop.py``: ``TrainLoop`` (model, optimizer, loader, stage: one optimizer step at a time, callbacks between
  steps), ``Evaluator``, ``Throughput`` and the checkpoint state each component gives;
- ``engine.py`` / ``step.py``: model, Megatron DDP, optimizer and schedule; one step through megatron's
  schedules; the forward step and loss functions in megatron's shape;
- ``reference.py``: reference log-probs (precompute and store, or online);
- ``checkpoint.py``: training checkpoints (a model checkpoint of ``wrpo_nemo.checkpoint`` plus optimizer and
  trainer state), atomic, bit-exact resume;
- ``config.py`` / ``setup.py`` / ``run_stage.py``: the typed run config, the inputs it names, and one configured
  stage built from them; ``parallel.py``: process groups; ``outputs.py``: metrics, plots, FLOPs.
"""
