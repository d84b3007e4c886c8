"""Reading safetensors files with plain reads instead of a memory map: one tensor, or some rows of
one, at a time.

Why not ``safetensors.safe_open``: it maps the whole file, and every page a read touches then
counts in the process's resident set for as long as the file stays open; loading a model that
way shows the file's size on top of the model's, and a streamed export of a 10 GB checkpoint
shows 10 GB "in use". Here each read copies exactly the bytes asked for into a fresh tensor
(``os.pread``), and nothing else of the file is resident. The format is simple enough to read
directly: an 8-byte little-endian header length, a JSON header (dtype, shape and byte offsets of
every tensor, plus ``__metadata__``), then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class TensorFile:
    """One safetensors file, read a tensor (or rows of dim 0) at a time."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            if n > os.fstat(self._fd).st_size:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(os.pread(self._fd, n, 8))
        except Exception:
            os.close(self._fd)
            raise
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._info = header

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
            self._fd = None

    def keys(self) -> list[str]:
        return list(self._info)

    def shape(self, key: str) -> torch.Size:
        return torch.Size(self._info[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self._info[key]["dtype"]]

    def get(self, key: str) -> torch.Tensor:
        shape = self.shape(key)
        return self.rows(key, 0, shape[0]) if len(shape) else self._read(key, 0, 1).view(())

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of dim 0 (clamped to the tensor, as slicing is)."""
        shape = self.shape(key)
        start, stop = max(0, min(start, shape[0])), max(0, min(stop, shape[0]))
        stop = max(start, stop)
        per_row = 1
        for d in shape[1:]:
            per_row *= d
        return self._read(key, start * per_row, stop * per_row).view(stop - start, *shape[1:])

    def _read(self, key: str, first: int, end: int) -> torch.Tensor:
        """Elements ``first:end`` of the flattened tensor."""
        dtype = self.dtype(key)
        size = torch.empty((), dtype=dtype).element_size()
        begin = self._start + self._info[key]["data_offsets"][0]
        out = torch.empty(end - first, dtype=dtype)
        if end > first:
            buffer = out.view(torch.uint8).numpy() if dtype != torch.bool else out.numpy()
            view, offset = memoryview(buffer).cast("B"), begin + first * size
            done = 0
            while done < len(view):
                got = os.preadv(self._fd, [view[done:]], offset + done)
                if got <= 0:
                    raise OSError(f"{self.path}: file ends inside tensor {key!r}")
                done += got
        return out
