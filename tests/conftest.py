"""Shared fixtures: tiny Llama checkpoints generated in code (float32 for exact comparisons, bf16 like real ones).

Helpers (``run_cli``, ``cli``, ``load_dir``...) live in ``helpers.py``; ``run_cli`` is re-exported here for
the test files that still import it from conftest.

Session fixtures are shared by every test: treat their folders as read-only (copy before damaging).
Markers (registered in pyproject.toml): ``slow`` (> ~5 s on 2 idle cores, or starts the real CLI in a fresh
interpreter: 2-3 s of imports each), ``client`` (loads a checkpoint in a real third-party loader or engine:
gptqmodel, bitsandbytes, compressed-tensors, transformers' quantized loaders), ``gpu`` (needs CUDA; skipped
without it). Quick tier: ``pytest -m "not slow and not client"``; CI runs everything.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel refuses to start on 2 cores without it

import pytest
import torch

from helpers import cli as cli_in_process
from helpers import BAD_TOKEN, is_first_case, run_cli, tiny_family  # noqa: F401  (run_cli: re-exported for `from conftest import run_cli`)


# Test workers (pytest-xdist, ``-n auto`` in pyproject.toml): one per core this process may use, at most this
# many. The tests run one torch thread each (``one_torch_thread``) and many start the real CLI, whose
# interpreter start-up is one core's work: two workers on 2 cores took the full suite from 18 to ~10 minutes.
# More than four would mostly add memory (each worker holds its files' fixtures; the real-engine tests load
# whole models).
MAX_TEST_WORKERS = 4


def pytest_xdist_auto_num_workers(config):
    """How many workers ``-n auto`` starts (see MAX_TEST_WORKERS)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_TEST_WORKERS))


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One torch thread in the test process. The models here are tiny: a second OpenMP thread gains
    nothing on them, and on shared or oversubscribed cores its spinning made every forward several times
    slower (an eval of 3.7k tokens: 0.3 s with one thread, 1.2-4.5 s with two). Merges set their own
    thread count (--workers); ``run_cli`` gives its subprocesses OMP_NUM_THREADS=1 for the same reason."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config, items):
    """The first case of a test that uses ``case_cli`` starts the real CLI: marked ``slow``. ``gpu`` tests
    skip without CUDA (MERGEQUANT_GPU_TEST_DEVICE=cpu runs them on the CPU: see test_gpu.py)."""
    skip_gpu = not torch.cuda.is_available() and os.environ.get("MERGEQUANT_GPU_TEST_DEVICE", "cuda") == "cuda"
    for item in items:
        if "case_cli" in getattr(item, "fixturenames", ()) and is_first_case(item):
            item.add_marker(pytest.mark.slow)
        if skip_gpu and "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="session")
def f32_models(tmp_path_factory) -> dict[str, Path]:
    """base + two fine-tunes, float32, 4 layers, hidden 64 (fast), 2 shards each."""
    return tiny_family(tmp_path_factory.mktemp("f32"), torch.float32, layers=4)


@pytest.fixture(scope="session")
def bf16_models(tmp_path_factory) -> dict[str, Path]:
    """base + two fine-tunes in bfloat16 (the usual on-disk dtype)."""
    return tiny_family(tmp_path_factory.mktemp("bf16"), torch.bfloat16, layers=4)


@pytest.fixture(scope="session")
def dense_model(tmp_path_factory) -> Path:
    """For the GGUF tests: the shared tiny base when present, else a random Llama with k-quant friendly shapes
    (every row a multiple of 256)."""
    base = Path("/work/shared/models/base")
    if (base / "config.json").is_file():
        return base
    from mergequant.demo import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("gg") / "base", seed=0, dtype=torch.bfloat16, hidden=256,
                            intermediate=768, layers=4, heads=4, kv_heads=2)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """The one small float32 family for the quantization, push and release-refusal tests: base (seed 0) + fine-tunes
    "a" (seed 1) and "b" (seed 2); 2 layers, hidden 64, intermediate 160 (group size 32 divides both), vocab 2048."""
    return tiny_family(tmp_path_factory.mktemp("tiny"), torch.float32, layers=2)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """The environment a CLI subprocess gets for the loopback Hub: online, plain LFS, no telemetry, no proxy,
    private HF_HOME (in-process pushes need ``online`` too)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_ENDPOINT", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    return tmp_path


@pytest.fixture
def online(env, monkeypatch):
    """For in-process pushes: undo this file's offline default and Xet, which huggingface_hub read at import."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture
def hub():
    """A loopback Hub (tests/hub_server.py) that rejects ``BAD_TOKEN``."""
    from hub_server import HubServer

    with HubServer(reject_tokens=(BAD_TOKEN,)) as server:
        yield server


@pytest.fixture
def cli():
    """The real CLI in a subprocess (``helpers.run_cli``); for the in-process one import ``helpers.cli``."""
    return run_cli


@pytest.fixture
def case_cli(request):
    """How a test of CLI refusals runs the command line: the real CLI in a subprocess (``run_cli``) for the
    test's first parametrized case (or its only one), in-process (``helpers.cli``: same code, same error
    line and exit status, no interpreter start-up) for the other cases."""
    return run_cli if is_first_case(request.node) else cli_in_process
