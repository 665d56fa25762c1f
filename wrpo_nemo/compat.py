"""Every difference between megatron-core on a GPU and megatron-core on a CPU-only machine, in one place.

megatron-core 0.16.1 is written for CUDA. On a CPU build of torch (every developer machine and CI) a handful
of its code paths reach for the GPU even when no tensor lives there. This module is the only place in the
tree that asks whether CUDA is available; the training code calls :func:`prepare_runtime` once per process
and then runs the same step, schedule and optimizer code on both kinds of machine.

What is handled (numbers refer to the list in ``shared/STACK.md``):

1. The CUDA RNG tracker: ``DotProductAttention`` always enters ``get_cuda_rng_tracker().fork()``. On CPU the
   tracker is replaced by megatron's own inference tracker, whose fork is a no-op (exact with dropout 0).
2. ``get_default_causal_mask`` allocates on CUDA: never reached, the model's core attention is our
   segment-aware one (:mod:`wrpo_nemo.models.attention`), which takes no mask.
3. ``torch.cuda.current_device()`` (the global memory buffer, p2p shape exchange) returns the CPU device
   inside :func:`redirect_cuda_to_cpu` instead of raising (patched on entry, restored on exit).
4. Tensors built with a literal ``device="cuda"`` (pipeline schedules, the optimizer, gradient clipping) are
   redirected to the CPU by :func:`redirect_cuda_to_cpu`, a ``TorchFunctionMode`` entered only around
   megatron calls and only when CUDA is unavailable.
5. Gradient clipping asserts ``grad.type() == "torch.cuda.FloatTensor"``: inside the same mode a CPU
   tensor's ``type()`` answers with the CUDA name. ``GPTModel`` construction with tied embeddings and
   pipeline parallelism (``LanguageModule.setup_embeddings_and_output_layer`` calls ``weight.data.cuda()``)
   is wrapped the same way by ``wrpo_nemo.models.builder.build_gpt_model``.
4b. Pipeline p2p: ``batch_isend_irecv`` is NCCL-only; :func:`configure_model_parallel` switches a model
   config to plain isend/irecv on CPU, which gloo supports.
11. ``torch.cuda.synchronize()`` (dist checkpointing, p2p) is a no-op inside the same context.
12. Activation recomputation saves and restores the CUDA RNG state around each recomputed block: on a CPU
    build there is none, so megatron's two private accessors get an empty state and a no-op (the CPU RNG,
    which megatron saves alongside, is still restored).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "Runtime",
    "check_megatron",
    "configure_model_parallel",
    "cuda_available",
    "default_backend",
    "device",
    "outside_redirect",
    "peak_bf16_tflops",
    "prepare_runtime",
    "redirect_cuda_to_cpu",
    "runtime",
]


@dataclass(frozen=True)
class Runtime:
    """What this process runs on, decided once (:func:`runtime`); the layers above read its decisions instead
    of asking torch themselves."""

    cuda: bool
    """A CUDA GPU is this process's compute device."""
    transformer_engine: bool
    """TransformerEngine layers are used: a GPU and TransformerEngine (with megatron's wrappers) importable."""

    @property
    def default_dtype(self) -> torch.dtype:
        """Parameter dtype of ``precision: auto``: bf16 on a GPU (fp32 main copies in the optimizer), fp32 on a CPU."""
        return torch.bfloat16 if self.cuda else torch.float32

    @property
    def distributed_optimizer(self) -> bool:
        """megatron's distributed optimizer (sharded optimizer state); it needs CUDA tensors."""
        return self.cuda

    @property
    def cpu_initialization(self) -> bool:
        """Initialise weights on the CPU (megatron's ``use_cpu_initialization``)."""
        return not self.cuda


def _transformer_engine_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions import transformer_engine as _te  # noqa: F401
    except Exception:  # TE raises more than ImportError when its CUDA libraries are missing.
        return False
    return True


@functools.cache
def runtime() -> Runtime:
    """This process's :class:`Runtime`, computed on first use and fixed for the process's life."""
    cuda = torch.cuda.is_available()
    return Runtime(cuda=cuda, transformer_engine=cuda and _transformer_engine_importable())


def cuda_available() -> bool:
    """Whether this process trains on a GPU (``runtime().cuda``)."""
    return runtime().cuda


def device() -> torch.device:
    """The device this process computes on (its local GPU, or the CPU)."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_backend() -> str:
    """The torch.distributed backend for this machine: NCCL on GPUs, gloo on CPUs."""
    return "nccl" if cuda_available() else "gloo"


def _cpu_patches() -> list[tuple[Any, str, Any]]:
    """``(owner, attribute, replacement)`` of every function replaced while megatron code runs on a CPU build
    (inside :func:`redirect_cuda_to_cpu`), and only then:

    - ``torch.cuda.current_device`` (used as ``device=torch.cuda.current_device()``: the CPU is the right
      answer) and ``torch.cuda.synchronize`` (nothing to wait for), items 3 and 11;
    - megatron's private CUDA RNG accessors of activation recomputation, item 12 (:func:`check_megatron`
      checks that they exist, so a rename fails loudly instead of leaving the patch a silent no-op).
    """
    from megatron.core.tensor_parallel import random as mcore_random

    return [
        (torch.cuda, "current_device", lambda: torch.device("cpu")),
        (torch.cuda, "synchronize", lambda device=None: None),
        (mcore_random, "_get_cuda_rng_state", lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)),
        (mcore_random, "_set_cuda_rng_state", lambda *args, **kwargs: None),
    ]


_PATCH_DEPTH = 0
_ORIGINALS: list[tuple[Any, str, Any]] = []


@contextlib.contextmanager
def _patched_for_cpu() -> Iterator[None]:
    """Apply :func:`_cpu_patches` for the duration of the block (nested blocks share one application) and put
    the originals back after the outermost."""
    global _PATCH_DEPTH
    if _PATCH_DEPTH == 0:
        for owner, name, replacement in _cpu_patches():
            _ORIGINALS.append((owner, name, getattr(owner, name)))
            setattr(owner, name, replacement)
    _PATCH_DEPTH += 1
    try:
        yield
    finally:
        _PATCH_DEPTH -= 1
        if _PATCH_DEPTH == 0:
            while _ORIGINALS:
                owner, name, original = _ORIGINALS.pop()
                setattr(owner, name, original)


SUPPORTED_MEGATRON = ((0, 16), (0, 17))
"""megatron-core versions this module's patches and the model layer were written against: [0.16, 0.17)."""
_PATCHED_PRIVATE = ("_get_cuda_rng_state", "_set_cuda_rng_state")
"""Private functions of ``megatron.core.tensor_parallel.random`` replaced on a CPU build (item 12)."""


def check_megatron(version: str | None = None) -> str:
    """Refuse a megatron-core outside :data:`SUPPORTED_MEGATRON`, or one that lacks a private symbol patched
    here, with a message that says what to install; returns the version. ``WRPO_UNSUPPORTED_MEGATRON=1``
    turns the version check into a warning (for trying a newer megatron-core), never the symbol check."""
    import warnings

    from megatron.core import package_info
    from megatron.core.tensor_parallel import random as mcore_random

    version = version or package_info.__version__
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    low, high = SUPPORTED_MEGATRON
    if not low <= parts < high:
        message = (
            f"megatron-core {version} is not supported: wrpo-nemo is written and tested against "
            f"{low[0]}.{low[1]}.x (requirements/cpu.txt pins megatron-core==0.16.1)"
        )
        if os.environ.get("WRPO_UNSUPPORTED_MEGATRON") != "1":
            raise RuntimeError(message + "; set WRPO_UNSUPPORTED_MEGATRON=1 to try it anyway")
        warnings.warn(message, stacklevel=2)
    if not cuda_available():
        missing = [name for name in _PATCHED_PRIVATE if not hasattr(mcore_random, name)]
        if missing:
            raise RuntimeError(
                f"megatron-core {version} has no megatron.core.tensor_parallel.random.{', '.join(missing)}: "
                "wrpo_nemo.compat's CPU patch for activation recomputation must be updated for it"
            )
    return version


def _reset_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    if cuda_available():
        mcore_random.initialize_rng_tracker(force_reset=True)
    else:
        # The inference tracker's add/fork are no-ops: no CUDA RNG state is needed.
        mcore_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def prepare_runtime(seed: int | None = None) -> torch.device:
    """Prepare this process for megatron-core on whatever it has; returns the compute device.

    On a GPU: selects ``LOCAL_RANK``'s device and seeds megatron's model-parallel CUDA RNG streams (call it
    after ``parallel_state`` is initialised when ``seed`` is given). On a CPU: installs megatron's no-op
    inference RNG tracker. Nothing process-wide is patched: the CPU replacements apply only inside
    :func:`redirect_cuda_to_cpu`. Idempotent.
    """
    check_megatron()
    if cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _reset_rng_tracker()
    if seed is not None:
        torch.manual_seed(seed)
        if cuda_available():
            from megatron.core import tensor_parallel

            tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return device()


_PEAK_BF16_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "B200": 2250.0,
}
"""Dense BF16 tensor-core peaks (vendor figures, no sparsity) by GPU name, for MFU."""


def peak_bf16_tflops() -> float | None:
    """This GPU's dense BF16 peak in TFLOP/s when known (``WRPO_PEAK_TFLOPS`` overrides), else ``None``."""
    if "WRPO_PEAK_TFLOPS" in os.environ:
        return float(os.environ["WRPO_PEAK_TFLOPS"])
    if not cuda_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in _PEAK_BF16_TFLOPS.items() if k in name), None)


def configure_model_parallel(config: Any) -> None:
    """Adjust a megatron ``ModelParallelConfig`` for this machine (pipeline p2p on gloo)."""
    if not cuda_available():
        config.batch_p2p_comm = False
        config.batch_p2p_sync = False


def _is_cuda_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value.split(":", 1)[0] == "cuda"
    return False


class _CudaToCpu(TorchFunctionMode):
    """Rewrites ``device="cuda"`` arguments to the CPU, makes ``Tensor.cuda()`` a no-op and reports CPU
    tensors' type names as their CUDA names (megatron asserts on them)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Type-name asserts (``grad.type() == "torch.cuda.FloatTensor"`` in gradient clipping).
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not args[0].is_cuda else name
        if _is_cuda_device(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if func in (torch.Tensor.to,):
            args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def outside_redirect() -> Iterator[None]:
    """Suspend :func:`redirect_cuda_to_cpu`'s ``TorchFunctionMode`` for code that needs no redirection (the
    model's forward, which megatron's schedules call inside it): every torch call under the mode pays a Python
    dispatch. The function replacements stay (recomputation reads the RNG accessors in the forward)."""
    from torch.overrides import _get_current_function_mode_stack, _pop_mode_temporarily

    stack = _get_current_function_mode_stack()
    if not stack or not isinstance(stack[-1], _CudaToCpu):
        yield
        return
    with _pop_mode_temporarily():
        yield


@contextlib.contextmanager
def redirect_cuda_to_cpu() -> Iterator[None]:
    """Run megatron code written for CUDA on a CPU machine; a no-op on a GPU machine.

    Inside: ``device="cuda"`` arguments go to the CPU (a ``TorchFunctionMode``) and :func:`_cpu_patches` are
    applied; both are undone on exit, so nothing outside megatron's calls sees them."""
    if cuda_available():
        yield
        return
    with _patched_for_cpu(), _CudaToCpu():
        yield
