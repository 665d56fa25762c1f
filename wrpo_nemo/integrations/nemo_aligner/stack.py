"""The NeMo stack the integration is tested against, and the one it runs on (no NeMo needed to import).

The CI lane (``scripts/nemo_lane.sh``, ``requirements/nemo-lane.txt``) pins :data:`TESTED`; :data:`CONTAINER`
is the NGC NeMo container of the same NeMo and megatron-core minor versions (NeMo 2.4 with megatron-core
0.13: NeMo's ``r2.4.0`` branch builds against Megatron-LM's ``core_r0.13.0``). NeMo-Aligner 0.7.0, its last
release, is not tied to a container: ``examples/nemo_aligner/README.md`` installs it beside the repository.
"""

from __future__ import annotations

import importlib
import re

TESTED = {"nemo": "2.4.1", "nemo_aligner": "0.7.0", "megatron.core": "0.13.1"}
"""Package (import name) -> the version the CI lane tests."""

CONTAINER = "nvcr.io/nvidia/nemo:25.07"
"""The NGC container of NeMo 2.4 and megatron-core 0.13 (Docker's notation; enroot's is ``nvcr.io#nvidia/...``)."""


def minor(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``0.13.1``, ``0.12.0rc2`` or ``2.4.0+a1b2c3``."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None:
        raise ValueError(f"not a version: {version!r}")
    return int(found[1]), int(found[2])


def megatron_scales_cp_loss(version: str) -> bool:
    """Whether megatron-core ``version``'s pipeline schedules multiply a ``(loss, metrics)`` loss by the
    context-parallel size (``forward_step``: ``output_tensor *= get_context_parallel_world_size()``).

    They do from 0.12 on (Megatron-LM ``!2756``, 2025-03-08, first released in ``core_v0.12.0rc2``); 0.11 and
    earlier leave it to the loss function. Development builds tagged ``0.12.0rc0``/``rc1`` from before that
    change are not told apart.
    """
    return minor(version) >= (0, 12)


def installed() -> dict[str, str]:
    """Package (import name) -> the installed version, for the packages of :data:`TESTED`."""
    return {name: importlib.import_module(f"{name}.package_info").__version__ for name in TESTED}


def differences(versions: dict[str, str]) -> list[str]:
    """One line per package whose ``major.minor`` differs from :data:`TESTED` (patch releases are accepted)."""
    return [
        f"{name} {versions[name]} (the CI lane tests {tested})"
        for name, tested in TESTED.items()
        if minor(versions[name]) != minor(tested)
    ]
