"""Two training steps give the same losses and the same updated weights at TP=2, PP=2 and DP=2 as at 1x1x1.

Real processes joined by gloo run megatron's schedules, Megatron DDP and Megatron's optimizer on the same
global batch (8 prompts) from the same starting weights, in fp32, through the training loop the recipe runs
(``TrainLoop`` with ``SFTStage`` / ``WRPOStage``). WRPO adds the NLL term on y_ws (``sft_weight``), whose
normalisation by the global batch's y_ws tokens makes it independent of the micro-batch split too.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.dist_utils import run_distributed
from tests.training.engine_workers import train_a_few_steps
from wrpo_nemo.converters.dcp_stream import CheckpointReader
from wrpo_nemo.data.cache import DataConfig, build_or_load
from wrpo_nemo.data.tokenize import TokenizeConfig
from wrpo_nemo.data.toy import build_toy_dataset, build_toy_tokenizer

LAYOUTS = {"tp2": ((2, 1, 2), 2), "pp2": ((1, 2, 2), 2), "dp2": ((1, 1, 2), 2)}


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    tokenizer = build_toy_tokenizer()
    paths = build_toy_dataset(str(root / "records"), num_examples=64, seed=3)
    cfg = DataConfig(
        sources=[paths["train"]],
        cache_dir=str(root / "cache"),
        tokenize=TokenizeConfig(max_length=96, max_prompt_length=48, seq_length=256),
        num_workers=1,
    )
    dataset = build_or_load(cfg, tokenizer)
    np.save(Path(dataset.path).parent / "vocab_size.npy", np.array(len(tokenizer)))
    return dataset.path


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(directory / "weights" / "weights")
    keys = [k for k in reader._metadata.state_dict_metadata if reader.has(k)]
    return {k: reader.read(k) for k in keys}


@pytest.fixture(scope="module", params=["wrpo", "sft"])
def baseline(request, toy_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"base-{request.param}")
    start = root / "start"
    run_distributed(
        train_a_few_steps, 1, (1, 1, 4), request.param, str(start), toy_cache, str(root / "run"), True
    )
    return request.param, start, root / "run"


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_step_matches_single_process_at_layout(layout, baseline, toy_cache, tmp_path):
    stage, start, base_dir = baseline
    (tp, pp, mbs), world = LAYOUTS[layout]
    run_distributed(train_a_few_steps, world, (tp, pp, mbs), stage, str(start), toy_cache, str(tmp_path))
    expected, got = torch.load(base_dir / "metrics.pt"), torch.load(tmp_path / "metrics.pt")
    for step, (e, g) in enumerate(zip(expected, got, strict=True)):
        assert e.keys() == g.keys()
        for name in e:
            assert g[name] == pytest.approx(e[name], rel=1e-5, abs=1e-6), f"step {step} {name}"
    base_w, new_w = _weights(base_dir), _weights(tmp_path)
    assert base_w.keys() == new_w.keys()
    # Each Adam step moves a weight by up to lr = 1e-3; a layout bug (a gradient scaled by the DP size, a
    # missing TP reduction, a lost micro-batch) moves it by that much. fp32 reduction order differs by ~1e-6.
    for key in base_w:
        torch.testing.assert_close(
            new_w[key], base_w[key], rtol=1e-4, atol=5e-6, msg=lambda m, k=key: f"{k}: {m}"
        )
