"""The safetensors on-disk format: dtype codes and a validating header parser.

We parse headers ourselves instead of going through ``safetensors.safe_open`` so that a
corrupt or truncated file produces one precise message (which file, which tensor, which
byte range) before anything is merged, and so tensors can be exposed as zero-copy views
over a memory map.

Layout: ``u64 little-endian N`` | ``N bytes of JSON`` | data. Each JSON entry is
``{"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}`` relative to the data
start; ``__metadata__`` holds string pairs.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from mergequant.errors import CheckpointError

DTYPE_FROM_CODE: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODE_FROM_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPE_FROM_CODE.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit


def dtype_itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives inside a safetensors file (absolute byte offsets)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate a safetensors header. Returns (entries by name, metadata).

    Raises CheckpointError naming the file (and tensor) for every kind of damage: too
    short, absurd header length, bad JSON, unknown dtype, size/shape disagreement, data
    past the end of the file.
    """
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: corrupt safetensors file: {file_size} bytes, too short for a header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > file_size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors header: header length {n} but file has {file_size} bytes"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: invalid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: expected a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    entries: dict[str, TensorEntry] = {}
    for name, spec in header.items():
        try:
            code, shape, (begin, end) = spec["dtype"], spec["shape"], spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header: bad entry for tensor {name}") from None
        if code not in DTYPE_FROM_CODE:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {code!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise CheckpointError(f"{path}: corrupt safetensors header: bad shape {shape!r} for tensor {name}")
        dtype = DTYPE_FROM_CODE[code]
        expected = math.prod(shape) * dtype_itemsize(dtype)
        if not (isinstance(begin, int) and isinstance(end, int)) or end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: tensor {name} spans [{begin}, {end}) but "
                f"{code}{shape} needs {expected} bytes"
            )
        if data_start + end > file_size:
            raise CheckpointError(
                f"{path}: truncated file: tensor {name} needs bytes up to {data_start + end} but the file has {file_size}"
            )
        entries[name] = TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)
    return entries, metadata
