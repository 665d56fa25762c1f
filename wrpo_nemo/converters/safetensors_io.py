"""Hugging Face safetensors, read lazily and written one tensor at a time.

Reading opens a file only for the tensor asked for (``safe_open`` maps it and copies that tensor out), so the
pages of the rest of the file are never touched. Writing lays out the header from shapes and dtypes known in
advance, then appends each tensor's bytes as it is produced: no shard is ever held in memory.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from wrpo_nemo.errors import InputError, first_line, read_json

_DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
INDEX_FILE = "model.safetensors.index.json"


class HFWeights:
    """The tensors of an HF folder: name -> file, shape and dtype, read one at a time."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.hf_dir = Path(hf_dir)
        files = sorted(self.hf_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {self.hf_dir}")
        self._file: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, torch.dtype] = {}
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                        sl = f.get_slice(name)
                        self._file[name] = path
                        self._shape[name] = tuple(sl.get_shape())
                        if sl.get_dtype() not in _NAME_DTYPES:
                            raise InputError(path, f"tensor {name} has unsupported dtype {sl.get_dtype()}")
                        self._dtype[name] = _NAME_DTYPES[sl.get_dtype()]
            except (SafetensorError, OSError) as exc:
                raise _unreadable(path, exc) from exc
        self._check_index()

    def _check_index(self) -> None:
        index = self.hf_dir / INDEX_FILE
        if not index.is_file():
            return
        payload = read_json(index)
        listed = payload.get("weight_map", {}) if isinstance(payload, dict) else None
        if not isinstance(listed, dict):
            raise InputError(index, "expected an object with a 'weight_map' object")
        absent = sorted(set(listed) - set(self._file))
        if absent:
            raise FileNotFoundError(f"{index} lists tensors missing from the shards: {absent[:5]}")

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtype[name]

    def read(self, name: str) -> torch.Tensor:
        """A copy of tensor ``name``; the file is closed again afterwards."""
        path = self._file[name]
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise _unreadable(path, exc) from exc


def _unreadable(path: Path, exc: BaseException) -> InputError:
    size = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
    return InputError(path, f"not a readable safetensors file ({size}): {first_line(exc)}")


def safetensors_header(entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]]) -> tuple[bytes, int]:
    """The encoded header (length prefix included) for tensors in this order, and the data size in bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data start to 8 bytes
    return struct.pack("<Q", len(encoded)) + encoded, offset


class StreamingSafetensorsWriter:
    """Writes one safetensors file whose tensors (names, shapes, dtypes) are declared up front."""

    def __init__(self, path: str | Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        self._entries = entries
        self._next = 0
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        header, _ = safetensors_header(entries)
        self._file.write(header)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``; it must be the next declared one, with the declared shape (cast to its dtype)."""
        expected, shape, dtype = self._entries[self._next]
        if name != expected or tuple(tensor.shape) != shape:
            raise ValueError(f"writing {name} {tuple(tensor.shape)}, expected {expected} {shape}")
        data = tensor.detach().to(dtype).contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        """Finish the file; every declared tensor must have been written."""
        self._file.close()
        if self._next != len(self._entries):
            raise ValueError(f"only {self._next} of {len(self._entries)} tensors were written")
