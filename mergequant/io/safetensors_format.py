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
from mergequant.io.model_files import json_type_name

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


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object hook: the spec forbids duplicate keys, and ``json`` would silently keep the last one
    (a second entry for a tensor would shadow the first, which other readers might use)."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true/false are Python ints too


def _read_prefix(path: Path) -> tuple[int, bytes, int]:
    """(header length N, the N header bytes, file size), after checking the 8-byte length prefix."""
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
            return n, f.read(n), file_size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None


def _parse_json(path: Path, raw: bytes) -> dict:
    """The header JSON object (duplicate keys refused)."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: invalid JSON ({e})") from None
    except _DuplicateKey as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: key {e.args[0]!r} appears twice") from None
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt safetensors header: invalid JSON (nested too deeply)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: expected a JSON object")
    return header


def _parse_metadata(path: Path, value: object) -> dict[str, str]:
    """``__metadata__``: the spec allows only a string-to-string map (or nothing)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ must be an object of strings, "
                              f"found {json_type_name(value)}")
    for k, v in value.items():
        if not isinstance(v, str):
            raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ key {k!r} must be a string, "
                                  f"found {json_type_name(v)} {json.dumps(v)[:40]}")
    return value


def _parse_entry(path: Path, name: str, spec: object, data_start: int) -> TensorEntry:
    """One tensor's entry, with its own fields checked: dtype code, shape, and a byte span that is exactly
    shape x itemsize long. (Where the span lies relative to the others is :func:`_check_tiling`'s job.)"""
    where = f"{path}: corrupt safetensors header: tensor {name}"
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
        raise CheckpointError(f"{where}: expected an object with dtype, shape and data_offsets")
    code, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(code, str):
        raise CheckpointError(f"{where}: dtype must be a string such as 'BF16', found {json.dumps(code)[:40]}")
    if code not in DTYPE_FROM_CODE:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {code!r} "
                              f"(supported: {', '.join(DTYPE_FROM_CODE)})")
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise CheckpointError(f"{where}: bad shape {json.dumps(shape)[:60]} (expected a list of non-negative integers)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise CheckpointError(f"{where}: bad data_offsets {json.dumps(offsets)[:60]} "
                              "(expected [begin, end], non-negative integers)")
    begin, end = offsets
    dtype = DTYPE_FROM_CODE[code]
    expected = math.prod(shape) * dtype_itemsize(dtype)
    if end - begin != expected:
        raise CheckpointError(f"{where} spans [{begin}, {end}) ({end - begin} bytes) but {code}{shape} needs {expected} bytes")
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_tiling(path: Path, entries: list[TensorEntry], data_start: int, file_size: int) -> None:
    """The spec requires the data section to be covered exactly: tensors, taken in offset order, start
    where the previous one ended, and the last one ends at the end of the file. Overlaps would let two
    tensors alias the same bytes; holes and trailing bytes hide data no reader sees (polyglot files);
    loaders built on the reference implementation refuse all three, so mergequant must not write
    something downstream that it read from such a file."""
    cursor, prev = data_start, None
    for e in sorted(entries, key=lambda e: (e.start, e.end)):
        if e.start < cursor:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: tensor {e.name} (data bytes [{e.start - data_start}, "
                f"{e.end - data_start})) overlaps tensor {prev} (which ends at {cursor - data_start})")
        if e.start > cursor:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: data bytes [{cursor - data_start}, {e.start - data_start}) "
                f"before tensor {e.name} belong to no tensor (tensors must tile the data section with no holes)")
        cursor, prev = e.end, e.name
    if cursor > file_size:
        raise CheckpointError(
            f"{path}: truncated file: tensor {prev} needs bytes up to {cursor} but the file has {file_size}")
    if cursor < file_size:
        after = f"after the last tensor {prev}" if prev is not None else "in a file with no tensors"
        raise CheckpointError(
            f"{path}: corrupt safetensors file: {file_size - cursor} bytes {after} belong to no tensor "
            "(the data section must end where the last tensor ends)")


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate a safetensors header. Returns (entries by name, metadata).

    Everything the format spec requires is checked before any tensor is read, and each kind of damage
    is one CheckpointError naming the file (and tensor or key): too short, absurd header length, bad
    JSON or duplicate keys, ``__metadata__`` that is not a string map, a dtype that is not a known code,
    a shape that is not non-negative integers, a byte span that is not shape x itemsize, and spans that
    overlap, leave holes, run past the end of the file or stop short of it.
    """
    n, raw, file_size = _read_prefix(path)
    header = _parse_json(path, raw)
    metadata = _parse_metadata(path, header.pop("__metadata__", None))
    data_start = 8 + n
    entries = {name: _parse_entry(path, name, spec, data_start) for name, spec in header.items()}
    _check_tiling(path, list(entries.values()), data_start, file_size)
    return entries, metadata
