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
from mergequant.io.model_files import json_type_name, load_json_file, read_config
from mergequant.io.resolve import containment_root
from mergequant.io.safetensors_format import TensorEntry, read_header

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

# "model.layers.12.mlp.up_proj.weight" -> ("model.layers", 12, "mlp.up_proj.weight"); also GPT-2's "h.N",
# "blocks.N" and BERT's "layer.N".
LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer))\.(?P<index>\d+)\.(?P<rest>.+)$")


def natural_key(name: str):
    """Sort key for tensor names with numbers compared as numbers: ``layers.2`` before ``layers.10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


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
        """Read config.json and every weight file's header; which file holds which tensor is decided here.

        With an index, the index decides (a tensor that also appears in another shard is read from the
        shard the index names); without one, a tensor found in two files is refused, since nothing says
        which copy is the model's."""
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: model path does not exist")
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a model directory, found a file")
        config = read_config(path, required=require_config)
        index = read_index(path)
        names = sorted(set(index.weight_map.values())) if index else _weight_files(path)
        root = containment_root(path)
        files = {fname: _open_weight_file(_weight_path(path, fname, root, index)) for fname in names}
        contents = {fname: _file_tensors(fname, f) for fname, f in files.items()}
        if index is not None:
            tensors = _tensors_by_index(path, index, contents)
        else:
            tensors = _tensors_without_index(path, contents)
        if not tensors:
            raise CheckpointError(f"{path}: no tensors found")
        check_config_matches_tensors(path, config, {n: t.shape for n, t in tensors.items()})
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


@dataclass(frozen=True)
class WeightIndex:
    """A parsed ``*.index.json``: the file it came from and its tensor name -> weight file map."""

    path: Path
    weight_map: dict[str, str]


def _check_index(data: object, idx_path: Path) -> WeightIndex:
    """``data`` (a parsed index file) as a WeightIndex, or a CheckpointError naming the bad key."""
    if not isinstance(data, dict) or "weight_map" not in data:
        raise CheckpointError(f"{idx_path}: invalid index (expected JSON with a weight_map object)")
    wm = data["weight_map"]
    if not isinstance(wm, dict):
        raise CheckpointError(f"{idx_path}: invalid index: weight_map must be an object (tensor name -> file), "
                              f"found {json_type_name(wm)}")
    if not wm:
        raise CheckpointError(f"{idx_path}: invalid index: weight_map is empty")
    for name, fname in wm.items():
        if not isinstance(fname, str) or not fname.strip():
            raise CheckpointError(f"{idx_path}: invalid index: weight_map entry {name} must be a file name, "
                                  f"found {json_type_name(fname)} {json.dumps(fname)[:40]}")
        if _outside_by_name(fname):
            raise CheckpointError(f"{idx_path}: weight_map entry {name} -> {fname!r} is outside the model folder "
                                  "(entries must be file names inside it)")
    return WeightIndex(idx_path, wm)


def read_index(path: Path) -> WeightIndex | None:
    """The model folder's weight index (safetensors first, else the .bin one), validated; None without one."""
    for idx_name in (SAFE_INDEX, BIN_INDEX):
        idx_path = path / idx_name
        if idx_path.exists() or idx_path.is_symlink():
            return _check_index(load_json_file(idx_path, "JSON index file"), idx_path)
    return None


def _outside_by_name(fname: str) -> bool:
    """Whether a weight file name leaves the folder on its face: absolute, or climbing out with ``..``."""
    return Path(fname).is_absolute() or ".." in Path(fname).parts


def _weight_path(path: Path, fname: str, root: Path, index: WeightIndex | None) -> Path:
    """``path / fname``, once it is certain to be a regular file inside the model folder.

    A weight file that is a symlink resolving outside the folder (``root``: see :func:`containment_root`)
    would make a merge silently read some other file on the machine as this model's weights."""
    fpath = path / fname
    if index is not None:
        example = next(n for n, f in index.weight_map.items() if f == fname)
        named = f"{index.path}: weight_map entry {example} -> {fname!r} is "
    else:
        named = f"{fpath}: "
    try:
        real = fpath.resolve(strict=True)
    except FileNotFoundError:
        raise CheckpointError(f"{fpath}: listed in the index but missing" if index else f"{fpath}: missing") from None
    except (OSError, RuntimeError, ValueError) as e:  # symlink loop, NUL in the name
        raise CheckpointError(f"{fpath}: cannot resolve: {e}") from None
    if not real.is_relative_to(root):
        raise CheckpointError(f"{named}a symlink to {real}, outside the model folder; refusing to read weights from "
                              "elsewhere (copy the file into the folder)")
    if not real.is_file():
        raise CheckpointError(f"{fpath}: not a regular file")
    return fpath


def _open_weight_file(fpath: Path) -> "_SafetensorsFile | dict[str, torch.Tensor]":
    """Headers only for safetensors; ``.bin`` files go through ``torch.load(weights_only=True, mmap=True)``."""
    return _SafetensorsFile(fpath) if fpath.name.endswith(".safetensors") else _load_bin(fpath)


def _file_tensors(fname: str, f: "_SafetensorsFile | dict[str, torch.Tensor]") -> dict[str, TensorInfo]:
    """What one weight file holds: tensor name -> TensorInfo (with ``fname`` as its file)."""
    if isinstance(f, _SafetensorsFile):
        return {e.name: TensorInfo(e.name, e.dtype, e.shape, fname) for e in f.entries.values()}
    return {k: TensorInfo(k, t.dtype, tuple(t.shape), fname) for k, t in f.items()}


def _tensors_by_index(path: Path, index: WeightIndex, contents: dict[str, dict[str, TensorInfo]]) -> dict[str, TensorInfo]:
    """Each tensor from the file the index names for it. A tensor a file holds that the index lists nowhere
    means the index is stale; loaders disagree on what to do with it, so it is refused, not guessed."""
    tensors: dict[str, TensorInfo] = {}
    for name, fname in index.weight_map.items():
        info = contents[fname].get(name)
        if info is None:
            raise CheckpointError(f"{path / fname}: tensor {name} is listed in the index but missing from the file")
        tensors[name] = info
    for fname, held in contents.items():
        stray = next((n for n in held if n not in index.weight_map), None)
        if stray is not None:
            raise CheckpointError(f"{path / fname}: holds tensor {stray}, which {index.path.name} does not list "
                                  "(stale index?); fix the index or remove the tensor")
    return tensors


def _tensors_without_index(path: Path, contents: dict[str, dict[str, TensorInfo]]) -> dict[str, TensorInfo]:
    """All tensors of all files; with no index to say which copy counts, a tensor in two files is an error."""
    tensors: dict[str, TensorInfo] = {}
    for fname, held in contents.items():
        for name, info in held.items():
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {name} is in both {tensors[name].file} and {fname}, and there "
                                      f"is no {SAFE_INDEX} to say which one to use")
            tensors[name] = info
    return tensors


def _weight_files(path: Path) -> list[str]:
    """Weight files of a folder without an index: model.safetensors, else any *.safetensors, else .bin."""
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


def _looks_like_torch_save(fpath: Path) -> bool:
    """A zip archive (torch.save since 1.6) or a pickle stream (legacy format: protocol 2+ starts with
    0x80); anything else is a corrupt or foreign file, not a file holding code."""
    with open(fpath, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _load_bin(fpath: Path) -> dict[str, torch.Tensor]:
    if not _looks_like_torch_save(fpath):
        raise CheckpointError(f"{fpath}: not a PyTorch checkpoint (empty, truncated or another format)")
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


EMBEDDING = "model.embed_tokens.weight"
DECODER_LAYERS = "model.layers"  # a vision tower's or an MTP head's own "layers" are not the decoder's


def check_config_matches_tensors(path: Path, config: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a config.json that contradicts the weights it sits next to.

    Every loader builds the model from config.json and then fills it from the files: a wrong
    ``hidden_size`` or ``vocab_size`` fails deep inside transformers with a size-mismatch report, and a
    ``num_hidden_layers`` larger than the layers stored leaves layers randomly initialised (smaller:
    silently ignored). Checked for the tensors whose shape the config fixes in every decoder family:
    the token embedding and the decoder-layer indices."""
    where = Path(path) / "config.json"
    emb = shapes.get(EMBEDDING)
    if emb is not None and len(emb) == 2:
        for key, dim, axis in (("vocab_size", emb[0], "rows"), ("hidden_size", emb[1], "columns")):
            want = config.get(key)
            if isinstance(want, int) and want != dim:
                raise CheckpointError(f"{where}: {key} is {want} but {EMBEDDING} has {dim} {axis} "
                                      f"(shape {list(emb)}); the config does not describe these weights")
    layers = sorted({parts[1] for n in shapes if (parts := split_layer_name(n)) and parts[0] == DECODER_LAYERS})
    want = config.get("num_hidden_layers")
    if layers and isinstance(want, int) and layers != list(range(want)):
        missing = sorted(set(range(want)) - set(layers))
        extra = [i for i in layers if i >= want]
        detail = (f"layer {missing[0]} has no tensors" + (f" ({len(missing)} layers missing)" if len(missing) > 1 else "")
                  if missing else f"the weights have layer {extra[0]}")
        raise CheckpointError(f"{where}: num_hidden_layers is {want} but {detail}; the config does not describe "
                              "these weights")
