"""A one-process megatron environment for tests (gloo, TP=PP=1), torn down after each module."""

import os

import pytest

from tests.dist_utils import free_port
from wrpo_nemo.training.parallel import destroy_parallel, initialize_parallel


@pytest.fixture(scope="module")
def megatron_single_process():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="1", RANK="0")
    initialize_parallel(1, 1, seed=1234)
    yield
    destroy_parallel()
