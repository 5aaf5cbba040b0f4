"""Streaming sharded safetensors writer.

Every output tensor's name, dtype and shape are known before any data is computed, so the
whole shard layout (which file, which byte range) and every header are fixed up front. Data
is then written with ``pwrite`` straight to its final offset, chunk by chunk, from any
thread and in any order: no shard is ever buffered in memory. An OSError (disk full, read-only
filesystem) names the shard file it happened on. Output folders are in ``output_dir.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from mergequant.io.safetensors_format import CODE_FROM_DTYPE, dtype_itemsize

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = dtype_itemsize(self.dtype)
        for d in self.shape:
            n *= d
        return n


@dataclass
class Shard:
    file: str
    tensors: list[PlannedTensor] = field(default_factory=list)
    header: bytes = b""
    offsets: dict[str, int] = field(default_factory=dict)  # absolute file offset of each tensor's data

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def file_size(self) -> int:
        return len(self.header) + self.data_bytes


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[Shard]:
    """Assign tensors, in the given order, to shards of at most ``max_shard_bytes`` of data.

    A tensor larger than the limit gets a shard of its own (as transformers does).
    Names follow the transformers convention: ``model.safetensors`` for one shard, else
    ``model-0000i-of-0000N.safetensors``.
    """
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    shards = []
    for i, group in enumerate(groups):
        fname = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        shards.append(_with_header(Shard(fname, group)))
    return shards


def _with_header(shard: Shard) -> Shard:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard.tensors:
        header[t.name] = {"dtype": CODE_FROM_DTYPE[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned
    shard.header = len(raw).to_bytes(8, "little") + raw
    start = len(shard.header)
    for t in shard.tensors:
        shard.offsets[t.name] = start
        start += t.nbytes
    return shard


class ShardedWriter:
    """Writes planned shards into ``directory``; thread-safe ``write`` of chunks at element offsets.

    With ``writeback_every`` set, a background thread ``fdatasync``s a shard each time that many
    bytes have been written to it since its last sync, so the disk works while tensors are still
    being computed and the final ``fsync`` has little left to flush (the kernel would otherwise
    keep gigabytes dirty until the end).
    """

    def __init__(self, directory: Path, shards: list[Shard], *, writeback_every: int | None = None):
        self.directory = directory
        self.shards = shards
        self._where: dict[str, tuple[int, PlannedTensor, int]] = {}
        self._written: dict[str, int] = {}
        self._lock = threading.Lock()
        self._fds: list[int] = []
        self._writeback_every = writeback_every
        self._unsynced = [0] * len(shards)
        self._sync_pending = [False] * len(shards)
        self._sync_queue: queue.SimpleQueue = queue.SimpleQueue()
        self._syncer: threading.Thread | None = None
        try:
            for i, shard in enumerate(shards):
                self._fds.append(os.open(directory / shard.file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644))
                with self._naming_errors(i):
                    pwrite_all(self._fds[i], shard.header, 0)
                    os.ftruncate(self._fds[i], shard.file_size)
                for t in shard.tensors:
                    self._where[t.name] = (i, t, shard.offsets[t.name])
                    self._written[t.name] = 0
        except BaseException:
            self.close()  # callers only close a writer they got
            raise

    def write(self, name: str, chunk: torch.Tensor, element_offset: int = 0) -> None:
        """Write ``chunk`` (already in the planned dtype) at ``element_offset`` elements into tensor ``name``."""
        i, planned, start = self._where[name]
        if chunk.dtype != planned.dtype:
            raise TypeError(f"{name}: chunk dtype {chunk.dtype} != planned {planned.dtype}")
        data = chunk.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()  # GPU results too
        pos = start + element_offset * dtype_itemsize(planned.dtype)
        if pos + data.nbytes > start + planned.nbytes:
            raise ValueError(f"{name}: write past the end of the tensor")
        with self._naming_errors(i):
            pwrite_all(self._fds[i], data, pos)
        with self._lock:
            self._written[name] += data.nbytes
            self._unsynced[i] += data.nbytes
            if self._writeback_every and self._unsynced[i] >= self._writeback_every and not self._sync_pending[i]:
                self._unsynced[i] = 0
                self._sync_pending[i] = True
                if self._syncer is None:
                    self._syncer = threading.Thread(target=self._sync_loop, name="mergequant-writeback", daemon=True)
                    self._syncer.start()
                self._sync_queue.put(i)

    @contextlib.contextmanager
    def _naming_errors(self, i: int) -> Iterator[None]:
        """Give an OSError from a bare file descriptor the shard's path, so the user learns where it happened."""
        try:
            yield
        except OSError as e:
            if e.filename is None:
                e.filename = str(self.directory / self.shards[i].file)
            raise

    def _sync_loop(self) -> None:
        while (i := self._sync_queue.get()) is not None:
            try:
                os.fdatasync(self._fds[i])
            except OSError:
                pass  # the final fsync in finish() reports real errors
            with self._lock:
                self._sync_pending[i] = False

    def _stop_syncer(self) -> None:
        if self._syncer is not None:
            self._sync_queue.put(None)
            self._syncer.join()
            self._syncer = None

    def finish(self, fsync: bool = True) -> dict:
        """Check every tensor was fully written, sync and close; write the index if sharded. Returns the index."""
        missing = [n for n, (_, t, _) in self._where.items() if self._written[n] != t.nbytes]
        if missing:
            raise RuntimeError(f"internal error: tensors not fully written: {missing[:5]}")
        self._stop_syncer()
        for i, fd in enumerate(self._fds):
            if fsync:
                with self._naming_errors(i):
                    os.fsync(fd)  # a full disk can surface only here (delayed allocation)
        self.close()
        index = {
            "metadata": {"total_size": sum(s.data_bytes for s in self.shards)},
            "weight_map": {t.name: s.file for s in self.shards for t in s.tensors},
        }
        if len(self.shards) > 1:
            write_json(self.directory / INDEX_FILE, index)
        return index

    def close(self) -> None:
        self._stop_syncer()
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def pwrite_all(fd: int, data, pos: int) -> None:
    """``os.pwrite`` until all of ``data`` is written (one call may write less)."""
    view = memoryview(data)
    while view.nbytes:
        n = os.pwrite(fd, view, pos)
        view = view[n:]
        pos += n


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
