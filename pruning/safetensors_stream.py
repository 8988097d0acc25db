"""Read and write safetensors files one tensor at a time, with plain file I/O.

Format: an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte range), raw bytes.
Reads use ``readinto``, not mmap, so pages of a multi-GiB input never count in the reader's RSS; the writer
writes the header first (every output shape is known in advance) and then appends tensors in header order.
"""

from __future__ import annotations

import json
import math
import os
import struct
from contextlib import AbstractContextManager
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# A header larger than this is not a real checkpoint (the reference reader uses the same cap).
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_ALIGN = 8


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class SafetensorsReader(AbstractContextManager):
    """Lazy reader: validates the header against the file size on open, reads tensors on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {self.path}")
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close()/__exit__
        try:
            self._entries, self._data_start = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _read_header(self) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], int]:
        size = os.fstat(self._file.fileno()).st_size
        prefix = self._file.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{self.path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise ValueError(f"{self.path}: not a safetensors file or truncated (header length "
                             f"{header_len}, file size {size})")
        try:
            header = json.loads(self._file.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.path}: not a safetensors file (header is not JSON: {e})") from e
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: not a safetensors file (header is not a JSON object)")
        header.pop("__metadata__", None)
        data_start, entries = 8 + header_len, {}
        for name, info in header.items():
            try:
                dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
                dtype = DTYPES[dtype_name]
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{self.path}: malformed header entry for tensor {name!r}: {info!r}") from e
            if end - begin != _nbytes(shape, dtype):
                raise ValueError(f"{self.path}: tensor {name!r} has {end - begin} bytes for shape "
                                 f"{shape} {dtype_name}")
            if end > size - data_start:
                raise ValueError(f"{self.path}: truncated: tensor {name!r} ends at byte {data_start + end} "
                                 f"but the file has {size}")
            entries[name] = (dtype_name, shape, begin, end)
        return entries, data_start

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return sorted(self._entries, key=lambda k: self._entries[k][2])

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of a tensor, without reading it."""
        dtype_name, shape, _, _ = self._entries[name]
        return shape, DTYPES[dtype_name]

    def get(self, name: str) -> torch.Tensor:
        """A fresh CPU tensor holding ``name`` (the caller owns the memory)."""
        dtype_name, shape, begin, end = self._entries[name]
        return self._read(name, begin, end).view(DTYPES[dtype_name]).reshape(shape)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``name`` (the whole tensor if 0-dim), reading only their bytes."""
        dtype_name, shape, begin, end = self._entries[name]
        if not shape:
            return self.get(name)
        stop = min(stop, shape[0])
        start = min(start, stop)
        row = (end - begin) // shape[0] if shape[0] else 0
        data = self._read(name, begin + start * row, begin + stop * row)
        return data.view(DTYPES[dtype_name]).reshape(stop - start, *shape[1:])

    def _read(self, name: str, begin: int, end: int) -> torch.Tensor:
        buf = torch.empty(end - begin, dtype=torch.uint8)
        self._file.seek(self._data_start + begin)
        got = self._file.readinto(buf.numpy()) if end > begin else 0
        if got != end - begin:
            raise ValueError(f"{self.path}: truncated while reading tensor {name!r}")
        return buf

    def close(self) -> None:
        self._file.close()

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsWriter(AbstractContextManager):
    """Writes the header for ``specs`` up front, then tensors appended in exactly that order."""

    def __init__(self, path: str | os.PathLike, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._specs = [(name, tuple(shape), dtype) for name, shape, dtype in specs]
        if len({name for name, _, _ in self._specs}) != len(self._specs):
            raise ValueError(f"{self.path}: duplicate tensor names in the output")
        header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, shape, dtype in self._specs:
            end = offset + _nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % _ALIGN)  # the data section starts 8-byte aligned
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close()/__exit__
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; its name, shape and dtype must be the next spec's."""
        if self._next >= len(self._specs):
            raise ValueError(f"{self.path}: tensor {name!r} written after the last declared tensor")
        want_name, want_shape, want_dtype = self._specs[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (want_name, want_shape, want_dtype):
            raise ValueError(f"{self.path}: expected tensor {want_name!r} {want_shape} {want_dtype} next, "
                             f"got {name!r} {tuple(tensor.shape)} {tensor.dtype}")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            self._file.write(memoryview(flat.view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        """Close the file; raises if a declared tensor was never written."""
        self._file.close()
        if self._next != len(self._specs):
            raise ValueError(f"{self.path}: {len(self._specs) - self._next} declared tensors were not written "
                             f"(next: {self._specs[self._next][0]!r})")

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._file.close()
