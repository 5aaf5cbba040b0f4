"""Shared fixtures: tiny Llama checkpoints generated in code (float32 for exact comparisons, bf16 like real ones)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergequant.demo import build_tiny_llama, finetune_of

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel refuses to start on 2 cores without it


def _family(root: Path, dtype: torch.dtype, **cfg) -> dict[str, Path]:
    base = build_tiny_llama(root / "base", seed=0, dtype=dtype, **cfg)
    return {"base": base, "a": finetune_of(base, root / "a", seed=1), "b": finetune_of(base, root / "b", seed=2)}


@pytest.fixture(scope="session")
def f32_models(tmp_path_factory) -> dict[str, Path]:
    """base + two fine-tunes, float32, 4 layers, hidden 64 (fast), 2 shards each."""
    return _family(tmp_path_factory.mktemp("f32"), torch.float32, hidden=64, intermediate=160, layers=4, vocab=2048)


@pytest.fixture(scope="session")
def bf16_models(tmp_path_factory) -> dict[str, Path]:
    """base + two fine-tunes in bfloat16 (the usual on-disk dtype)."""
    return _family(tmp_path_factory.mktemp("bf16"), torch.bfloat16, hidden=64, intermediate=160, layers=4, vocab=2048)


def run_cli(*args: str, cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run the real `mergequant` CLI in a subprocess (as a user would)."""
    proc = subprocess.run([sys.executable, "-m", "mergequant", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if check and proc.returncode != 0:
        raise AssertionError(f"mergequant {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def cli():
    return run_cli
