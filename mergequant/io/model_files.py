"""The small non-weight files of a model directory: config.json (read and type-checked once, here,
for every command) and the tokenizer files that every command's output carries over."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from mergequant.errors import CheckpointError, MergeQuantError

CONFIG_FILE = "config.json"

# config.json keys that mergequant (or the loaders it hands the folder to) reads, and the JSON type each
# must have. A wrong type caught here is one line naming the key; caught later it is a traceback deep in
# a size estimate or in transformers. Keys not listed are passed through untouched.
_POSITIVE_INT = "a positive integer"
_OPTIONAL_POSITIVE_INT = "a positive integer or null"
CONFIG_KEY_TYPES: dict[str, str] = {
    "architectures": "a list of strings or null",
    "model_type": "a string",
    "num_hidden_layers": _POSITIVE_INT,
    "n_layer": _POSITIVE_INT,
    "num_layers": _POSITIVE_INT,
    "hidden_size": _POSITIVE_INT,
    "intermediate_size": _POSITIVE_INT,
    "num_attention_heads": _POSITIVE_INT,
    "vocab_size": _POSITIVE_INT,
    "num_key_value_heads": _OPTIONAL_POSITIVE_INT,
    "head_dim": _OPTIONAL_POSITIVE_INT,
    "max_position_embeddings": _OPTIONAL_POSITIVE_INT,
    "tie_word_embeddings": "true or false",
    "quantization_config": "an object or null",
    "torch_dtype": "a string or null",
    "dtype": "a string or null",
    "rms_norm_eps": "a number",
    "layer_norm_eps": "a number",
    "rope_theta": "a number",
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true/false are Python ints too


def _has_type(value, kind: str) -> bool:
    """Whether a JSON ``value`` is of the ``kind`` named in :data:`CONFIG_KEY_TYPES`."""
    if kind == _POSITIVE_INT:
        return _is_int(value) and value > 0
    if kind == _OPTIONAL_POSITIVE_INT:
        return value is None or (_is_int(value) and value > 0)
    if kind == "a list of strings or null":  # transformers writes null when no class was recorded
        return value is None or (isinstance(value, list) and all(isinstance(x, str) and x for x in value))
    if kind == "a string":
        return isinstance(value, str)
    if kind == "a string or null":
        return value is None or isinstance(value, str)
    if kind == "true or false":
        return isinstance(value, bool)
    if kind == "an object or null":
        return value is None or isinstance(value, dict)
    if kind == "a number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    raise AssertionError(kind)


def json_type_name(value) -> str:
    """The JSON name of a parsed value's type, for messages ("a list", "a string", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    for py, name in ((dict, "an object"), (list, "a list"), (str, "a string"), (int, "an integer"), (float, "a number")):
        if isinstance(value, py):
            return name
    return type(value).__name__


def load_json_file(path: Path, what: str = "JSON file") -> object:
    """Parse one JSON file; every way it can fail (missing, a directory, unreadable, not UTF-8, invalid
    JSON) is one CheckpointError naming the file, so no caller has to list OSError subclasses."""
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a {what}")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: invalid JSON (not UTF-8 text)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: invalid JSON (nested too deeply)") from None


def check_config(config: object, where: Path) -> dict:
    """``config`` (parsed config.json) if it is an object whose known keys have the right JSON types;
    else a CheckpointError naming ``where`` and the first bad key."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: expected a JSON object, found {json_type_name(config)}")
    for key, kind in CONFIG_KEY_TYPES.items():
        if key in config and not _has_type(config[key], kind):
            raise CheckpointError(f"{where}: key '{key}' must be {kind}, found {json_type_name(config[key])} "
                                  f"{json.dumps(config[key])[:60]}")
    return config


def read_config(folder: Path, *, required: bool = True) -> dict:
    """The model folder's config.json, parsed and type-checked: the one reader every command uses.

    Absent: ``{}`` when not ``required`` (``inspect`` works on a bare weights folder), else an error."""
    path = Path(folder) / CONFIG_FILE
    if not path.exists() and not path.is_symlink():
        if required:
            raise CheckpointError(f"{folder}: no config.json (is this a transformers model directory?)")
        return {}
    return check_config(load_json_file(path, "JSON file"), path)


TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "vocab.txt",
                   "generation_config.json"]


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer files and generation_config.json that ``src`` has into ``dst``."""
    for fname in TOKENIZER_FILES:
        if (src / fname).exists():
            shutil.copyfile(src / fname, dst / fname)


DEVICE_NAMES = ("cpu", "cuda", "auto")


def check_device_name(name) -> None:
    """Refuse a ``--device`` that is not one of :data:`DEVICE_NAMES` (a pure check: release files run
    it when they are read, before any step, whether or not a GPU is present)."""
    if name not in DEVICE_NAMES:
        raise MergeQuantError(f"--device must be cpu, cuda or auto, not {name!r}")


def pick_device(name: str) -> torch.device:
    """``--device`` for every command: cpu, cuda, or auto (cuda when available)."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MergeQuantError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise MergeQuantError(f"--device must be cpu, cuda or auto, not {name!r}")
    return torch.device(name)
