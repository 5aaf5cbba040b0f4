"""The small non-weight files of a model directory that every command's output carries over."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from mergequant.errors import MergeQuantError

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "vocab.txt",
                   "generation_config.json"]


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer files and generation_config.json that ``src`` has into ``dst``."""
    for fname in TOKENIZER_FILES:
        if (src / fname).exists():
            shutil.copyfile(src / fname, dst / fname)


def pick_device(name: str) -> torch.device:
    """``--device`` for every command: cpu, cuda, or auto (cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MergeQuantError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise MergeQuantError(f"--device must be cpu, cuda or auto, not {name!r}")
    return torch.device(name)
