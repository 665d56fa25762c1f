"""FLOPs accounting and the plots of a run."""

import json

import pytest

from tests.flop_reference import counted_training_flops_per_token
from wrpo_nemo.models.presets import get_preset
from wrpo_nemo.training.outputs import model_flops_per_token, plot_metrics


@pytest.mark.parametrize("preset", ["tiny", "toy"])
def test_flops_per_token_equal_the_flops_counted_in_a_training_step_of_hf_llama(preset):
    """Against torch's FLOP counter on Hugging Face's Llama of the same shape (tests/flop_reference.py): the
    grouped-query K/V, the SwiGLU MLP, the output layer, backward = 2 x forward and the causal attention term."""
    cfg = get_preset(preset)
    for context in (16, 100):
        assert model_flops_per_token(cfg, context) == pytest.approx(
            counted_training_flops_per_token(cfg, context), rel=1e-12
        )


def test_llama3_8b_flops_per_token_is_about_six_n():
    flops = model_flops_per_token(get_preset("llama3_8b"), mean_context=1)
    non_embedding = 8.03e9 - 128256 * 4096  # published parameter count less the input embedding
    assert flops == pytest.approx(6 * non_embedding, rel=0.01)


def test_plots_are_written_for_each_stage_with_metrics(tmp_path):
    records = [
        {"stage": "wrpo", "split": "train", "step": s, "loss": 0.7 - 0.01 * s, "alpha": 0.01 * s}
        for s in range(1, 6)
    ]
    records.append({"stage": "wrpo", "split": "eval", "step": 5, "loss": 0.6, "alpha": 0.05})
    (tmp_path / "wrpo").mkdir()
    (tmp_path / "wrpo" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    written = plot_metrics(tmp_path, ["sft", "wrpo"])
    assert written == [tmp_path / "curves_wrpo.png"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
