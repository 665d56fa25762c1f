"""compat's CPU replacements exist only while megatron code runs inside ``redirect_cuda_to_cpu``."""

import pytest
import torch

from wrpo_nemo import compat

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the CPU replacements apply on CPU builds only"
)


def _originals():
    from megatron.core.tensor_parallel import random as mcore_random

    return (
        torch.cuda.current_device,
        torch.cuda.synchronize,
        mcore_random._get_cuda_rng_state,
        mcore_random._set_cuda_rng_state,
    )


def test_prepare_runtime_patches_nothing_process_wide():
    before = _originals()
    compat.prepare_runtime()
    assert _originals() == before
    with pytest.raises((AssertionError, RuntimeError)):  # a CPU build of torch has no CUDA device
        torch.cuda.current_device()


def test_replacements_apply_inside_the_context_and_nested_contexts_restore_once():
    before = _originals()
    with compat.redirect_cuda_to_cpu():
        assert torch.cuda.current_device() == torch.device("cpu")
        torch.cuda.synchronize()
        with compat.redirect_cuda_to_cpu():
            assert torch.zeros(2, device="cuda").device.type == "cpu"
            with compat.outside_redirect():  # the function mode is suspended, the replacements stay
                assert torch.cuda.current_device() == torch.device("cpu")
        # The inner exit must not undo the outer context's replacements.
        assert torch.cuda.current_device() == torch.device("cpu")
    assert _originals() == before


def test_an_exception_inside_the_context_still_restores_the_originals():
    before = _originals()
    with pytest.raises(ValueError, match="boom"), compat.redirect_cuda_to_cpu():
        raise ValueError("boom")
    assert _originals() == before
