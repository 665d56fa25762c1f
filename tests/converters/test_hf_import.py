"""HF folder -> model checkpoint -> megatron GPTModel reproduces transformers' logits."""

import pytest
import torch

from tests.converters.tiny_models import CONFIGS, PAD_MULTIPLE, hf_logits, megatron_logits
from wrpo_nemo.checkpoint.model import load_model_checkpoint, read_model_config
from wrpo_nemo.converters.hf_import import import_hf
from wrpo_nemo.models import build_gpt_model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_imported_checkpoint_gives_the_logits_of_transformers(
    name, hf_dirs, tokens, tmp_path, megatron_single_process
):
    checkpoint = tmp_path / "checkpoint"
    import_hf(hf_dirs(name), checkpoint, make_vocab_size_divisible_by=PAD_MULTIPLE)
    model = build_gpt_model(read_model_config(checkpoint)).eval()
    load_model_checkpoint(model, checkpoint)
    expected = hf_logits(hf_dirs(name), tokens)
    torch.testing.assert_close(megatron_logits(model, tokens), expected, atol=1e-5, rtol=1e-5)
