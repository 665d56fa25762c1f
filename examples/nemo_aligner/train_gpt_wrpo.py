"""Train a NeMo GPT model (a ``.nemo`` checkpoint) with WRPO in NeMo-Aligner's DPO loop.

The flow is NeMo-Aligner's ``examples/nlp/gpt/train_gpt_dpo.py`` with three classes swapped: the model
(:class:`MegatronGPTWRPOModel`), the datasets (three responses per prompt, unpacked or packed) and the trainer
(:class:`WRPOTrainer`, which gives the model its optimizer step for alpha_t). Run it in the NeMo container
(``nvcr.io/nvidia/nemo:25.07``, NeMo 2.4 with megatron-core 0.13) with NeMo-Aligner 0.7.0 and this repository
on ``PYTHONPATH`` (see README.md beside this file)::

    torchrun --nproc_per_node=8 examples/nemo_aligner/train_gpt_wrpo.py \\
        pretrained_checkpoint.restore_from_path=/models/llama3-8b-sft.nemo \\
        "model.data.data_prefix={train: /data/train.jsonl, validation: /data/val.jsonl, test: /data/val.jsonl}"

It needs CUDA (NeMo's Megatron strategy and apex's fused optimizer); on a CPU machine the lane's tests
(``bash scripts/nemo_lane.sh``) cover the model's loss and the datasets instead.
"""

from __future__ import annotations

from functools import partial

import torch.multiprocessing as mp
from nemo.core.config import hydra_runner
from nemo.utils import logging
from nemo.utils.exp_manager import exp_manager
from nemo_aligner.data.nlp.builders import build_dataloader, identity_collate
from nemo_aligner.utils.distributed import Timer
from nemo_aligner.utils.train_script_utils import (
    CustomLoggerWrapper,
    add_custom_checkpoint_callback,
    extract_optimizer_scheduler_from_ptl_model,
    init_distributed,
    init_peft,
    init_using_ptl,
    resolve_and_create_trainer,
    retrieve_custom_trainer_state_dict,
)
from nemo_aligner.utils.utils import (
    load_and_override_model_config,
    load_from_nemo,
    retrieve_model_state_dict_in_cpu,
)
from omegaconf.omegaconf import OmegaConf

from wrpo_nemo.integrations.nemo_aligner import stack
from wrpo_nemo.integrations.nemo_aligner.dataset import wrpo_custom_collate
from wrpo_nemo.integrations.nemo_aligner.model import MegatronGPTWRPOModel
from wrpo_nemo.integrations.nemo_aligner.packed import (
    build_train_valid_test_wrpo_datasets,
    build_train_valid_test_wrpo_packed_datasets,
)
from wrpo_nemo.integrations.nemo_aligner.trainer import WRPOTrainer

OmegaConf.register_new_resolver("multiply", lambda x, y: x * y, replace=True)
OmegaConf.register_new_resolver("int_div", lambda x, y: x // y, replace=True)


def log_stack() -> None:
    """Log the NeMo, NeMo-Aligner and megatron-core versions, and warn about those the CI lane does not test."""
    versions = stack.installed()
    logging.info("WRPO on " + ", ".join(f"{name} {version}" for name, version in versions.items()))
    for line in stack.differences(versions):
        logging.warning(
            f"untested version: {line}; the tested stack is {stack.CONTAINER} with "
            f"nemo-aligner=={stack.TESTED['nemo_aligner']} (examples/nemo_aligner/README.md)"
        )


@hydra_runner(config_path="conf", config_name="gpt_wrpo")
def main(cfg) -> None:
    log_stack()
    cfg.model = load_and_override_model_config(cfg.pretrained_checkpoint.restore_from_path, cfg.model)
    logging.info(f"\n{OmegaConf.to_yaml(cfg)}")

    trainer = resolve_and_create_trainer(cfg, "dpo")
    exp_manager(trainer, cfg.exp_manager)
    logger = CustomLoggerWrapper(trainer.loggers)

    ptl_model = load_from_nemo(
        MegatronGPTWRPOModel,
        cfg.model,
        trainer,
        strict=True,
        load_base_model_only=False,
        restore_path=cfg.pretrained_checkpoint.restore_from_path,
    )
    init_peft(ptl_model, cfg.model)
    if cfg.model.peft.peft_scheme == "none":
        # The reference policy is the starting model, kept on the CPU and swapped in for its log-probs;
        # with LoRA it is the same model with the adapters switched off.
        ptl_model.ref_policy_state_dict = retrieve_model_state_dict_in_cpu(
            ptl_model, megatron_amp_O2=cfg.model.get("megatron_amp_O2", False)
        )

    custom_trainer_state_dict = None
    consumed_samples = 0
    if trainer.ckpt_path is not None:
        custom_trainer_state_dict = retrieve_custom_trainer_state_dict(trainer)
        consumed_samples = custom_trainer_state_dict["consumed_samples"]

    init_distributed(trainer, ptl_model, cfg.model.get("transformer_engine", False))

    packed = cfg.model.data.get("packed_sequence", False)
    build = build_train_valid_test_wrpo_packed_datasets if packed else build_train_valid_test_wrpo_datasets
    train_ds, validation_ds, _ = build(
        cfg=cfg.model,
        data_prefix=cfg.model.data.data_prefix,
        data_impl=cfg.model.data.data_impl,
        splits_string=cfg.model.data.splits_string,
        train_valid_test_num_samples=[-1 * cfg.model.global_batch_size] * 3,
        seq_length=cfg.model.data.seq_length,
        seed=cfg.model.seed,
        tokenizer=ptl_model.tokenizer,
    )
    if packed:
        # As in NeMo-Aligner's packed DPO, the batch sizes count packed rows, not prompts.
        rows = cfg.model.global_batch_size
        logging.info(
            f"packed WRPO: model.global_batch_size={rows} rows, about {rows * train_ds.prompts_per_row:.0f} "
            f"prompts per optimizer step ({train_ds.prompts_per_row:.2f} prompts per row)"
        )
    loaders = {}
    for name, dataset, consumed, random in (
        ("train", train_ds, consumed_samples, True),
        ("validation", validation_ds, 0, False),
    ):
        loaders[name] = build_dataloader(
            cfg=cfg,
            dataset=dataset,
            consumed_samples=consumed,
            mbs=cfg.model.micro_batch_size,
            gbs=cfg.model.global_batch_size,
            load_gbs=True,
            pad_samples_to_global_batch_size=False,
            collate_fn=identity_collate,
            use_random_sampler=random,
        )

    init_using_ptl(trainer, ptl_model, loaders["train"], train_ds)
    optimizer, scheduler = extract_optimizer_scheduler_from_ptl_model(ptl_model)
    ckpt_callback = add_custom_checkpoint_callback(trainer, ptl_model)
    logger.log_hyperparams(OmegaConf.to_container(cfg))
    timer = Timer(cfg.exp_manager.get("max_time_per_run") if cfg.exp_manager else None)

    collate = train_ds.global_collate_fn if packed else wrpo_custom_collate
    wrpo_trainer = WRPOTrainer(
        cfg=cfg.trainer.dpo,
        model=ptl_model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_dataloader=loaders["train"],
        val_dataloader=loaders["validation"],
        test_dataloader=None,
        collate_fn=partial(
            collate,
            eos_id=ptl_model.tokenizer.eos_id,
            reset_position_ids=cfg.model.data.get("reset_position_ids", False),
            reset_attention_mask=cfg.model.data.get("reset_attention_mask", False),
            eod_mask_loss=cfg.model.data.get("eod_mask_loss", False),
        ),
        logger=logger,
        ckpt_callback=ckpt_callback,
        run_timer=timer,
        pad_length_to_multiple_of=cfg.model.data.get("pad_length_to_multiple_of", None),
    )
    if custom_trainer_state_dict is not None:
        wrpo_trainer.load_state_dict(custom_trainer_state_dict)
    wrpo_trainer.fit()


if __name__ == "__main__":
    mp.set_start_method("spawn", force=True)
    main()
