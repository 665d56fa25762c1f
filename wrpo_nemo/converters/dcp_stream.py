"""Write and read megatron dist checkpoints (``torch_dist`` format) one tensor chunk at a time.

megatron's ``torch_dist`` format is a PyTorch Distributed Checkpoint (``.metadata`` + ``__*.distcp`` files) whose
keys are megatron's sharded keys, plus megatron's ``metadata.json`` and ``common.pt``. ``dist_checkpointing.load``
reads it through DCP's resharding, so a checkpoint written here loads at any TP/PP.

``dist_checkpointing.save`` needs the whole (sharded) model in memory, and its writer stages every tensor before
writing. For conversion we plan the checkpoint from shapes alone and produce each chunk only when DCP's writer
asks for it (``SavePlanner.resolve_data``), so peak memory is about one chunk: one layer's tensor, or the
embedding. Reading is the mirror image: DCP's reader fills exactly the requested region (one layer) of a tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from wrpo_nemo.checkpoint.damage import checkpoint_read_error, read_failures
from wrpo_nemo.errors import InputError


@dataclass(frozen=True)
class Chunk:
    """A block of a checkpoint tensor, produced on demand."""

    offsets: tuple[int, ...]
    """Where the block starts in the global tensor."""
    sizes: tuple[int, ...]
    """The block's shape."""
    produce: Callable[[], torch.Tensor]
    """Returns the block's data (any dtype; cast to the tensor's dtype on write)."""


@dataclass(frozen=True)
class StreamedTensor:
    """One checkpoint tensor (by megatron sharded key) written as ``chunks`` that tile its global shape."""

    key: str
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: Sequence[Chunk]


class _LazySavePlanner(DefaultSavePlanner):
    """Plans from shapes only; each chunk's data is produced when the writer reaches it."""

    def __init__(self, tensors: Sequence[StreamedTensor]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._tensors = {t.key: t for t in tensors}
        self._chunks = {(t.key, c.offsets): c for t in tensors for c in t.chunks}

    def create_local_plan(self) -> SavePlan:
        items = [
            WriteItem(
                index=MetadataIndex(t.key, torch.Size(c.offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)),
                    properties=TensorProperties(dtype=t.dtype),
                    size=torch.Size(t.global_shape),
                ),
            )
            for t in self._tensors.values()
            for c in t.chunks
        ]
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        key = write_item.index.fqn
        chunk = self._chunks[(key, tuple(write_item.index.offset))]
        data = chunk.produce()
        if tuple(data.shape) != chunk.sizes:
            raise ValueError(f"{key}: produced shape {tuple(data.shape)}, expected {chunk.sizes}")
        return data.to(self._tensors[key].dtype).contiguous()


def write_checkpoint(directory: str | Path, tensors: Sequence[StreamedTensor]) -> None:
    """Write ``tensors`` as a megatron ``torch_dist`` checkpoint into the (empty or new) ``directory``."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # One writer thread: chunks are produced (and freed) strictly one after another.
    writer = FileSystemWriter(str(directory), single_file_per_rank=True, thread_count=1, overwrite=True)
    try:
        dcp_save({}, storage_writer=writer, planner=_LazySavePlanner(tensors), no_dist=True)
    except CheckpointException as exc:
        # Surface the producer's own error (a missing file, a bad shape), not DCP's per-rank wrapper; an error
        # raised from another (a damaged input's InputError) keeps that cause.
        error = next(iter(exc.failures.values()))[0]
        raise error from (error.__cause__ or exc)
    # What dist_checkpointing.save writes beside the DCP files for a model state dict (no common objects).
    torch.save({}, directory / "common.pt")
    save_config(CheckpointingConfig(sharded_backend="torch_dist", sharded_backend_version=1), str(directory))


class _FillPlanner:
    """The part of a ``LoadPlanner`` that ``FileSystemReader.read_data`` uses: it copies every read item into
    the right region of one preallocated tensor (the plan itself is built by :class:`CheckpointReader`)."""

    def __init__(self, target: torch.Tensor) -> None:
        self._target = target

    def load_bytes(self, read_item: ReadItem, value) -> None:
        raise ValueError(f"{read_item.dest_index.fqn} is not a tensor")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        region = self._target
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            region = region.narrow(dim, start, length)
        return region

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass


class CheckpointReader:
    """Reads whole tensors, or one layer of a per-layer tensor, from a ``torch_dist`` checkpoint.

    Works on checkpoints saved at any TP/PP (DCP reassembles the shards). ``prefix`` is prepended to every key
    (NeMo stores the model under ``model.``). A damaged checkpoint raises :class:`~wrpo_nemo.errors.InputError`
    naming the file.
    """

    def __init__(self, directory: str | Path, prefix: str = "") -> None:
        self.directory = Path(directory)
        if not (self.directory / ".metadata").is_file():
            raise FileNotFoundError(f"{self.directory} is not a torch_dist checkpoint (no .metadata)")
        self.prefix = prefix
        self._reader = FileSystemReader(str(self.directory))
        try:
            self._metadata = self._reader.read_metadata()
        except Exception as exc:  # truncated, not a pickle, or not DCP's: the index is unreadable
            raise checkpoint_read_error(self.directory, exc, [".metadata"]) from exc
        self._reader.set_up_storage_reader(self._metadata, True)

    def _tensor_metadata(self, key: str) -> TensorStorageMetadata:
        md = self._metadata.state_dict_metadata.get(self.prefix + key)
        if not isinstance(md, TensorStorageMetadata):
            raise InputError(self.directory, f"tensor {self.prefix + key!r} is not in this checkpoint")
        return md

    def tensor_keys(self) -> list[str]:
        """Every tensor key in the checkpoint, prefix included (non-tensor objects are skipped)."""
        return [
            k for k, v in self._metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        ]

    def has(self, key: str) -> bool:
        """Whether the checkpoint holds tensor ``key``."""
        return isinstance(self._metadata.state_dict_metadata.get(self.prefix + key), TensorStorageMetadata)

    def shape(self, key: str) -> tuple[int, ...]:
        """Global shape of ``key`` (with the leading layer axis for per-layer tensors)."""
        return tuple(self._tensor_metadata(key).size)

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype of ``key``."""
        return self._tensor_metadata(key).properties.dtype

    def read(self, key: str, layer: int | None = None) -> torch.Tensor:
        """The whole tensor ``key``, or its slice ``[layer]`` along the leading layer axis."""
        md = self._tensor_metadata(key)
        size = tuple(md.size)
        if layer is None:
            offsets, sizes = (0,) * len(size), size
        else:
            offsets, sizes = (layer,) + (0,) * (len(size) - 1), (1, *size[1:])
        target = torch.empty(sizes, dtype=md.properties.dtype)
        chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
        items = create_read_items_for_chunk_list(self.prefix + key, md, [chunk])
        try:
            self._reader.read_data(LoadPlan(items), _FillPlanner(target)).wait()  # type: ignore[arg-type]
        except read_failures() as exc:
            files = sorted({self._metadata.storage_data[item.storage_index].relative_path for item in items})
            raise checkpoint_read_error(self.directory, exc, files) from exc
        return target if layer is None else target[0]
