import pytest
import torch

from tests.converters.tiny_models import VOCAB, save_hf


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """name -> HF folder of a tiny random model, built once per session on first use."""
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = save_hf(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get


@pytest.fixture(scope="session")
def tokens():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (2, 24), generator=generator)


@pytest.fixture(scope="module")
def megatron_single_process():
    """One-process gloo group with megatron's TP=PP=1 groups, torn down after the module."""
    import os

    from tests.dist_utils import free_port
    from wrpo_nemo.training.parallel import destroy_parallel, initialize_parallel

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    os.environ["WORLD_SIZE"], os.environ["RANK"] = "1", "0"
    initialize_parallel(1, 1, seed=1234)
    yield
    destroy_parallel()
