import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _no_preemption_left_over():
    """A test that preempts a run in this process leaves a recorded signal and its handlers behind: clear them,
    so the next in-process run is not stopped at its first step."""
    yield
    from wrpo_nemo.training import preemption

    preemption.clear()
