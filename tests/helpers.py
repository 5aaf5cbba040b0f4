"""Helpers for the tests (import them from here, not from conftest: ``from helpers import run_cli``).

- :func:`run_cli`: the real ``mergequant`` in a subprocess, as a user runs it. Use it where the test is
  about the command line itself (exit status, the one ``error:`` line with nothing else on stderr,
  signals, a fresh interpreter); every interpreter start-up costs a few seconds of CPU (torch +
  transformers imports).
- :func:`cli`: the same command line in this process (typer's ``CliRunner``), with the same result
  shape (``returncode``, ``stdout``, ``stderr``). Same option parsing, same error line, same exit status,
  without the start-up; use it where the CLI is only the way to drive the code under test.
- :func:`tiny_family`: a tiny float32 Llama base and two fine-tunes (what the session fixtures build).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file

from mergequant.demo import build_tiny_llama, finetune_of

# the loopback Hub (tests/hub_server.py, fixture `hub`): a token it accepts, one it rejects, a repo id
TOKEN = "hf_TESTtokenDoNotLeak0123456789abcdef"
BAD_TOKEN = "hf_REVOKEDtoken9876543210zyxwvuts"
REPO = "me/tiny-merge"

# the tiny Llama most tests use: 2 layers (4 for the f32_models/bf16_models fixtures), hidden 64, vocab 2048
TINY = dict(hidden=64, intermediate=160, vocab=2048)


def run_cli(*args, cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run the real `mergequant` CLI in a subprocess (as a user would).

    One OpenMP thread unless OMP_NUM_THREADS is set (as in the test process, see conftest's
    ``one_torch_thread``): the models here are tiny, and on shared cores a second spinning thread made
    the subprocess's forwards several times slower."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, "-m", "mergequant", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"mergequant {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@contextlib.contextmanager
def _chdir(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


class _CurrentStderr:
    """A stream that writes to whatever ``sys.stderr`` is at the time (inside ``CliRunner``: its capture)."""

    name = "<stderr>"

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _LastResort(logging.Handler):
    """Python's last-resort handler as a real process has it: a WARNING record from a logger chain with no
    handler of its own goes to stderr (under pytest the root logger has pytest's handlers instead)."""

    def __init__(self):
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        logger = logging.getLogger(record.name)
        while logger is not None and logger is not logging.root:
            if logger.handlers or not logger.propagate:
                return
            logger = logger.parent
        sys.stderr.write(self.format(record) + "\n")


@contextlib.contextmanager
def _logging_to_captured_stderr() -> Iterator[None]:
    """Log records reach the in-process CLI's stderr as they reach a real process's stderr: the libraries'
    stderr handlers (transformers, huggingface_hub, torch) write to the capture, and the last resort too."""
    loggers = [logging.root, *(lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    swapped = []
    for lg in loggers:
        for h in lg.handlers:
            if type(h) is logging.StreamHandler and getattr(h.stream, "name", None) == "<stderr>":
                swapped.append((h, h.stream))
                h.stream = _CurrentStderr()
    last = _LastResort()
    logging.root.addHandler(last)
    try:
        yield
    finally:
        logging.root.removeHandler(last)
        for h, stream in swapped:
            h.stream = stream


class CliTimeout(BaseException):
    """Raised in the main thread when an in-process CLI call runs past its ``timeout`` (a BaseException, so
    that no ``except Exception`` in the command turns it into an error line)."""


@contextlib.contextmanager
def _deadline(seconds: float | None) -> Iterator[None]:
    if not seconds:
        yield
        return

    def expire(signum, frame):
        raise CliTimeout(f"did not finish within {seconds} s")

    before = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def cli(*args, cwd: Path | None = None, check: bool = False, env: dict | None = None,
        timeout: float | None = None) -> subprocess.CompletedProcess:
    """The `mergequant` CLI in this process: what :func:`run_cli` returns, without an interpreter start-up.

    Same option parsing, commands, error line and exit status (typer's ``CliRunner`` on the app that
    ``mergequant.cli.main`` runs, with main's logging setup); log records go to the captured stderr as
    they would in a real process. An exception that escapes the command (a crash: the real CLI would
    print a traceback and exit 1) comes back as exit status 1 with the traceback on stderr, so tests
    that check for one error line fail on it. ``timeout``: the test fails if the command runs longer
    (a hang in Python code is interrupted; a subprocess can be killed in any case). What only a real
    process shows (output of an import, C-level writes to fd 2, signals) needs :func:`run_cli`.
    """
    import pytest

    from typer.testing import CliRunner

    from mergequant.cli import app, quiet_import_noise

    argv = [str(a) for a in args]
    quiet_import_noise()
    try:
        with _chdir(cwd), _logging_to_captured_stderr(), _deadline(timeout):
            res = CliRunner().invoke(app, argv, env=env)
    except CliTimeout as e:
        pytest.fail(f"mergequant {' '.join(argv)} (in-process) {e}")
    stderr = res.stderr
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        stderr += "".join(traceback.format_exception(type(res.exception), res.exception, res.exception.__traceback__))
    proc = subprocess.CompletedProcess(["mergequant", *argv], res.exit_code, res.stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"mergequant {' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def is_first_case(item) -> bool:
    """Whether a test item (``request.node``) is its function's first parametrized case (or the function
    has no parameters)."""
    callspec = getattr(item, "callspec", None)
    return callspec is None or not any(callspec.indices.values())


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in a folder."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def tiny_family(root: Path, dtype: torch.dtype = torch.float32, *, layers: int = 2, **cfg) -> dict[str, Path]:
    """base (seed 0) + two fine-tunes (seeds 1 and 2) of a tiny Llama under ``root``."""
    base = build_tiny_llama(root / "base", seed=0, dtype=dtype, layers=layers, **{**TINY, **cfg})
    return {"base": base, "a": finetune_of(base, root / "a", seed=1), "b": finetune_of(base, root / "b", seed=2)}


def random_lora(base: Path, out: Path, *, seed: int) -> Path:
    """A random LoRA adapter (r=4 on q_proj, v_proj and down_proj) of ``base`` saved with peft's
    ``save_pretrained`` at ``out``: every factor randomised (peft initialises B to zero, so the adapter
    would be a no-op)."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        pm.save_pretrained(out)
    return out
