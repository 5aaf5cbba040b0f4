"""Lazy, read-only view of a model directory: config, tensor index over shards, get(name).

Nothing is loaded up front except headers. ``get`` returns a zero-copy tensor view over a
private memory map of the weight file, so slicing rows of a 1 GB embedding reads only those
rows from disk and the pages stay file-backed (they do not count as anonymous memory).
Legacy ``.bin`` checkpoints are opened with ``torch.load(weights_only=True, mmap=True)``:
no code execution, and the same lazy behaviour.
"""

from __future__ import annotations

import json
import mmap
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mergequant.errors import CheckpointError
from mergequant.io.safetensors_format import TensorEntry, read_header

CONFIG_FILE = "config.json"
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

# "model.layers.12.mlp.up_proj.weight" -> ("model.layers", 12, "mlp.up_proj.weight"); also GPT-2's "h.N",
# "blocks.N" and BERT's "layer.N".
LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer))\.(?P<index>\d+)\.(?P<rest>.+)$")


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """Split a per-layer tensor name into (prefix, layer index, suffix); None for other tensors."""
    m = LAYER_RE.match(name)
    if not m:
        return None
    return m.group("prefix"), int(m.group("index")), m.group("rest")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: str  # file name inside the model directory

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


class _SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        self.entries, self.metadata = read_header(path)
        self._mm: mmap.mmap | None = None

    def get(self, name: str) -> torch.Tensor:
        e: TensorEntry = self.entries[name]
        if e.numel == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        if self._mm is None:
            with open(self.path, "rb") as f:
                # ACCESS_COPY: a private mapping, writable for torch.frombuffer, never written back.
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        itemsize = torch.empty((), dtype=e.dtype).element_size()
        if e.start % itemsize:
            buf = bytearray(self._mm[e.start : e.end])  # misaligned: copy (rare, tiny)
            return torch.frombuffer(buf, dtype=e.dtype).reshape(e.shape)
        return torch.frombuffer(self._mm, dtype=e.dtype, count=e.numel, offset=e.start).reshape(e.shape)


class Checkpoint:
    """A model directory opened for lazy reading.

    >>> ckpt = Checkpoint.open("path/to/model")      # doctest: +SKIP
    >>> ckpt.tensors["model.embed_tokens.weight"].shape  # doctest: +SKIP
    """

    def __init__(self, path: Path, config: dict, tensors: dict[str, TensorInfo], files: dict):
        self.path = path
        self.config = config
        self.tensors = tensors
        self._files = files  # file name -> _SafetensorsFile | dict (torch.load result) | None (not yet loaded)

    # ---- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, require_config: bool = True) -> "Checkpoint":
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: model path does not exist")
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a model directory, found a file")
        config: dict = {}
        cfg_path = path / CONFIG_FILE
        if cfg_path.exists():
            try:
                config = json.loads(cfg_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
        elif require_config:
            raise CheckpointError(f"{path}: no config.json (is this a transformers model directory?)")

        tensors: dict[str, TensorInfo] = {}
        files: dict = {}
        names = _weight_files(path)
        for fname in names:
            fpath = path / fname
            if not fpath.exists():
                raise CheckpointError(f"{fpath}: listed in the index but missing")
            if fname.endswith(".safetensors"):
                sf = _SafetensorsFile(fpath)
                files[fname] = sf
                for e in sf.entries.values():
                    tensors[e.name] = TensorInfo(e.name, e.dtype, e.shape, fname)
            else:
                sd = _load_bin(fpath)
                files[fname] = sd
                for k, t in sd.items():
                    tensors[k] = TensorInfo(k, t.dtype, tuple(t.shape), fname)
        index = _read_index(path)
        if index is not None:
            for name, fname in index.items():
                if name not in tensors:
                    raise CheckpointError(f"{path / fname}: tensor {name} is listed in the index but missing from the file")
        if not tensors:
            raise CheckpointError(f"{path}: no tensors found")
        return cls(path, config, tensors, files)

    # ---- reading -------------------------------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        """A lazy (memory-mapped) tensor. Slice it to read part of it; ``.float()`` materializes."""
        try:
            info = self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name} not found") from None
        f = self._files[info.file]
        return f.get(name) if isinstance(f, _SafetensorsFile) else f[name]

    # ---- facts ---------------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else self.config.get("model_type", "unknown")

    @property
    def num_layers(self) -> int | None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(self.config.get(key), int):
                return self.config[key]
        idx = {s[1] for n in self.tensors if (s := split_layer_name(n))}
        return max(idx) + 1 if idx else None

    @property
    def vocab_size(self) -> int | None:
        v = self.config.get("vocab_size")
        return v if isinstance(v, int) else None

    @property
    def num_parameters(self) -> int:
        total = 0
        for t in self.tensors.values():
            n = 1
            for d in t.shape:
                n *= d
            total += n
        return total

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def weight_files(self) -> list[str]:
        return list(self._files)


def _read_index(path: Path) -> dict[str, str] | None:
    for idx_name in (SAFE_INDEX, BIN_INDEX):
        idx_path = path / idx_name
        if idx_path.exists():
            try:
                data = json.loads(idx_path.read_text())
                wm = data["weight_map"]
                if not isinstance(wm, dict):
                    raise TypeError
                return wm
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise CheckpointError(f"{idx_path}: invalid index (expected JSON with a weight_map object)") from None
    return None


def _weight_files(path: Path) -> list[str]:
    """Weight files in load order: the index if present, else model.safetensors, else any *.safetensors, else .bin."""
    index = _read_index(path)
    if index is not None:
        return sorted(set(index.values()))
    if (path / "model.safetensors").exists():
        return ["model.safetensors"]
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if found:
        return found
    if (path / "pytorch_model.bin").exists():
        return ["pytorch_model.bin"]
    found = sorted(p.name for p in path.glob("*.bin") if p.name != "training_args.bin")
    if found:
        return found
    raise CheckpointError(f"{path}: no weights found (expected *.safetensors or pytorch_model*.bin)")


def _load_bin(fpath: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            sd = torch.load(fpath, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            # legacy (pre-zip) torch.save format: no mmap, but still weights_only
            sd = torch.load(fpath, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zip, forbidden globals
        # torch's messages span several lines (and suggest weights_only=False); keep the line that says why.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "GLOBAL" in ln), lines[0] if lines else "")
        if "weights_only" in why and "False" in why:
            why = "unsafe pickle content"
        what = "refusing to unpickle code or non-tensor objects" if isinstance(e, pickle.UnpicklingError) else "cannot load"
        raise CheckpointError(f"{fpath}: {what} with torch.load(weights_only=True) ({type(e).__name__}: {why})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{fpath}: not a flat state dict of tensors")
    return sd
