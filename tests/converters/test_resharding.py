"""One imported checkpoint loads at TP=2 and at PP=2 (real gloo processes) and gives transformers' logits."""

from tests.converters.tiny_models import PAD_MULTIPLE, hf_logits
from tests.converters.workers import pp2_logits_equal, tp2_logits_equal
from tests.dist_utils import run_distributed
from wrpo_nemo.converters.hf_import import import_hf


def test_checkpoint_loaded_at_tp2_gives_the_same_logits_with_vocab_padding_that_tp2_changes(
    hf_dirs, tokens, tmp_path
):
    # vocab 100 is padded to 104 in the checkpoint (TP=1) but to 112 by a TP=2 model.
    hf_dir = hf_dirs("llama_gqa_untied")
    import_hf(hf_dir, tmp_path / "ckpt", make_vocab_size_divisible_by=PAD_MULTIPLE)
    run_distributed(tp2_logits_equal, 2, tmp_path / "ckpt", tokens, hf_logits(hf_dir, tokens))


def test_checkpoint_loaded_at_pp2_gives_the_same_logits_with_tied_embeddings(hf_dirs, tokens, tmp_path):
    hf_dir = hf_dirs("llama_mha_tied")
    import_hf(hf_dir, tmp_path / "ckpt", make_vocab_size_divisible_by=PAD_MULTIPLE)
    run_distributed(pp2_logits_equal, 2, tmp_path / "ckpt", tokens, hf_logits(hf_dir, tokens))
