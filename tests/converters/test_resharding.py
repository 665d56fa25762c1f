"""One imported checkpoint loads at TP=2 and at PP=2 (real gloo processes) and gives transformers' logits; saved
again from those shards, it exports to the original HF tensors bit for bit."""

import torch

from tests.converters.test_hf_export import hf_tensors
from tests.converters.tiny_models import PAD_MULTIPLE, hf_logits
from tests.converters.workers import pp2_logits_equal, tp2_logits_equal
from tests.dist_utils import run_distributed
from wrpo_nemo.converters.hf_export import export_hf
from wrpo_nemo.converters.hf_import import import_hf


def assert_exports_to(checkpoint, hf_dir, out):
    original, exported = hf_tensors(hf_dir), hf_tensors(export_hf(checkpoint, out, dtype=None))
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], v) for k, v in original.items())


def test_tp2_load_gives_the_same_logits_and_a_tp2_save_exports_exactly_with_vocab_padding_that_tp2_changes(
    hf_dirs, tokens, tmp_path
):
    # vocab 100 is padded to 104 in the imported checkpoint (TP=1) but to 112 by a TP=2 model.
    hf_dir = hf_dirs("llama_gqa_untied")
    import_hf(hf_dir, tmp_path / "ckpt", make_vocab_size_divisible_by=PAD_MULTIPLE)
    expected = hf_logits(hf_dir, tokens)
    run_distributed(tp2_logits_equal, 2, tmp_path / "ckpt", tokens, expected, tmp_path / "tp2")
    assert_exports_to(tmp_path / "tp2", hf_dir, tmp_path / "hf")


def test_pp2_load_gives_the_same_logits_and_a_pp2_save_exports_exactly_with_tied_embeddings(
    hf_dirs, tokens, tmp_path
):
    hf_dir = hf_dirs("llama_mha_tied")
    import_hf(hf_dir, tmp_path / "ckpt", make_vocab_size_divisible_by=PAD_MULTIPLE)
    expected = hf_logits(hf_dir, tokens)
    run_distributed(pp2_logits_equal, 2, tmp_path / "ckpt", tokens, expected, tmp_path / "pp2")
    assert_exports_to(tmp_path / "pp2", hf_dir, tmp_path / "hf")
