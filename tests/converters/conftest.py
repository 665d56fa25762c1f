import pytest
import torch

from tests.converters.tiny_models import VOCAB, save_hf
from tests.models.megatron_env import megatron_single_process  # noqa: F401


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
