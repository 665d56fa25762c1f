import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
# The subprocesses tests start (the recipe, torchrun, the scripts) import this checkout's wrpo_nemo, as this
# process does (pytest's pythonpath), not whichever copy the environment installed (another checkout's editable
# install, say): a script's own folder comes first on its sys.path, the repository root does not.
ROOT = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


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
