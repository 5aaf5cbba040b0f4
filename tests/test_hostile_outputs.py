"""Hostile output locations and hostile environments for `merge` and `quantize`.

Every case ends in exactly one `error: ...` line naming the path, exit status 2 (143/130 for
SIGTERM/SIGINT), no output folder, no `.OUT.partial-*` / `.OUT.old-*` sibling, and every input
byte-identical. Signals are real signals sent to a real `mergequant` subprocess; the disk-full case
runs once on a real 512 KiB tmpfs (skipped where mounting is not allowed) and once with a writer
that raises ENOSPC (runs everywhere).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mergequant.io.writer as writer_mod
from mergequant.cli import app
from mergequant.demo import build_tiny_llama
from mergequant.io import output_dir
from mergequant.io.output_dir import PARTIAL_MARKER, atomic_output_dir, stale_partials

from helpers import run_cli


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def linear_recipe(path: Path, *models) -> Path:
    lines = ["merge_method: linear", "models:"]
    for m in models:
        lines += [f"  - model: {m}", "    parameters: {weight: 0.5}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def snapshot(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or folders): inputs must come out byte-identical."""
    files = [p for root in paths for p in ([root] if root.is_file() else sorted(root.rglob("*"))) if p.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def leftovers(out: Path) -> list[Path]:
    """Partial or moved-aside siblings of ``out``."""
    return sorted(out.parent.glob(f".{out.name}.*"))


def error_line(code: int, exit_code: int, stderr: str, *needles) -> str:
    """The one stderr line of a failed run, after checking the status and that it names ``needles``."""
    assert exit_code == code, f"exit {exit_code}\n{stderr}"
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{stderr}"
    assert lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    for n in needles:
        assert str(n) in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def assert_refused(res, *needles) -> str:
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    return error_line(2, res.exit_code, res.stderr, *needles)


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    assert leftovers(out) == [], leftovers(out)


@pytest.fixture
def recipe(f32_models, tmp_path) -> Path:
    return linear_recipe(tmp_path / "r.yaml", f32_models["a"], f32_models["b"])


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> Path:
    """A 160 MB float32 model: merging it with itself takes a couple of seconds, long enough to signal."""
    return build_tiny_llama(tmp_path_factory.mktemp("slow") / "m", seed=0, dtype=torch.float32, hidden=512,
                            intermediate=1536, layers=8, vocab=16000, shards=1)


def mount_tmpfs(where: Path, *options: str) -> None:
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=512k",) + options), "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")


def umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], check=True)


# ---------------------------------------------------------------------------------------------------
# --force never deletes an input
# ---------------------------------------------------------------------------------------------------
def test_force_refuses_to_delete_folder_holding_the_recipe(f32_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    recipe = linear_recipe(out / "r.yaml", f32_models["a"], f32_models["b"])
    before = snapshot(out, f32_models["a"], f32_models["b"])
    line = assert_refused(invoke("merge", recipe, "-o", out, "--force"), "refusing", out, "recipe", recipe)
    assert "--force" not in line  # not a hint that --force would help
    assert snapshot(out, f32_models["a"], f32_models["b"]) == before and leftovers(out) == []


def test_force_refuses_to_delete_folder_holding_the_input_model(f32_models, tmp_path):
    zoo = tmp_path / "zoo"
    model = build_tiny_llama(zoo / "m", seed=3, dtype=torch.float32, hidden=64, intermediate=160, layers=2, vocab=512)
    before = snapshot(zoo)
    assert_refused(invoke("quantize", model, "-o", zoo, "--method", "rtn", "--group-size", 32, "--force"), "refusing", zoo, "input model", model)
    assert snapshot(zoo) == before and leftovers(zoo) == []


@pytest.mark.parametrize("option, label, method", [("--calib", "calibration data", "gptq"), ("--eval", "eval data", "rtn")])
def test_force_refuses_to_delete_folder_holding_data(f32_models, tmp_path, option, label, method):
    out = tmp_path / "out"
    out.mkdir()
    data = out / "data.txt"
    data.write_text("some text to calibrate or evaluate on\n" * 50)
    before = snapshot(out, f32_models["base"])
    res = invoke("quantize", f32_models["base"], "-o", out, "--method", method, "--group-size", 32, option, data, "--force")
    assert_refused(res, "refusing", out, label, data)
    assert snapshot(out, f32_models["base"]) == before and leftovers(out) == []


# ---------------------------------------------------------------------------------------------------
# outputs that would remove the current directory, an ancestor of it, or the home directory
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [".", "..", "/"])
def test_output_containing_the_current_directory_refused(recipe, f32_models, tmp_path, monkeypatch, target):
    here = tmp_path / "work" / "here"
    here.mkdir(parents=True)
    (here / "notes.txt").write_text("mine")
    monkeypatch.chdir(here)
    before = {p: sorted(os.listdir(p)) for p in (here, here.parent, tmp_path)}
    inputs = snapshot(recipe, f32_models["a"], f32_models["b"])
    assert_refused(invoke("merge", recipe, "-o", target, "--force"), "refusing", "current directory", here)
    assert {p: sorted(os.listdir(p)) for p in before} == before  # no `..partial-*`, nothing moved
    assert snapshot(recipe, f32_models["a"], f32_models["b"]) == inputs


def test_output_is_the_home_directory_refused(recipe, tmp_path, monkeypatch):
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    (home / ".bashrc").write_text("precious")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(elsewhere)
    assert_refused(invoke("merge", recipe, "-o", home, "--force"), "refusing", home, "home directory")
    assert (home / ".bashrc").read_text() == "precious" and leftovers(home) == []


# ---------------------------------------------------------------------------------------------------
# outputs that cannot be written
# ---------------------------------------------------------------------------------------------------
def test_output_parent_is_a_file(recipe, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    out = blocker / "sub" / "out"
    assert_refused(invoke("merge", recipe, "-o", out), out, blocker, "not a directory")
    assert blocker.read_text() == "not a folder" and sorted(os.listdir(tmp_path)) == ["file.txt", "r.yaml"]


def test_force_over_a_symlinked_output_refused(recipe, tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (target / "keep.txt").write_text("old model")
    link = tmp_path / "out"
    link.symlink_to(target)
    assert_refused(invoke("merge", recipe, "-o", link, "--force"), "refusing", link, "symbolic link", target)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"] and (target / "keep.txt").read_text() == "old model"
    assert leftovers(link) == [] and leftovers(target) == []


@pytest.mark.slow
def test_disk_full_on_a_real_tmpfs(recipe, f32_models, tmp_path):
    mnt = tmp_path / "mnt"
    mount_tmpfs(mnt)
    try:
        inputs = snapshot(recipe, f32_models["a"], f32_models["b"])
        out = mnt / "out"
        proc = run_cli("merge", recipe, "-o", out, "--quiet")
        error_line(2, proc.returncode, proc.stderr, "merge", out, "No space left on device")
        assert os.listdir(mnt) == []  # nothing half-written: no out, no .out.partial-*
        assert snapshot(recipe, f32_models["a"], f32_models["b"]) == inputs
    finally:
        umount(mnt)


def test_disk_full_from_the_writer(recipe, f32_models, tmp_path, monkeypatch):
    real, calls = writer_mod.pwrite_all, {"n": 0}

    def fill_up(fd, data, pos):
        calls["n"] += 1
        if calls["n"] > 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, pos)

    monkeypatch.setattr(writer_mod, "pwrite_all", fill_up)
    inputs = snapshot(recipe, f32_models["a"], f32_models["b"])
    out = tmp_path / "new" / "deeper" / "out"  # parents made for the run go too
    res = invoke("merge", recipe, "-o", out, "--quiet")
    line = assert_refused(res, "merge", out, "No space left on device")
    assert ".partial-" not in line and calls["n"] > 4
    assert not (tmp_path / "new").exists()
    assert snapshot(recipe, f32_models["a"], f32_models["b"]) == inputs


@pytest.mark.slow
def test_read_only_filesystem(recipe, f32_models, tmp_path):
    mnt = tmp_path / "ro"
    mount_tmpfs(mnt, "ro")
    try:
        out = mnt / "out"
        proc = run_cli("quantize", f32_models["base"], "-o", out, "--method", "rtn", "--group-size", "32", "--quiet")
        error_line(2, proc.returncode, proc.stderr, "quantize", out, "Read-only file system")
        assert os.listdir(mnt) == []
    finally:
        umount(mnt)


def test_permission_denied(recipe, f32_models, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    out = locked / "out"
    if os.geteuid() != 0:
        locked.chmod(0o555)
    else:  # root writes anywhere: make mkdir under `locked` fail as it would for a user
        real_mkdir = os.mkdir

        def denied(path, *args, **kwargs):
            if Path(path).parent == locked:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", denied)
    try:
        assert_refused(invoke("merge", recipe, "-o", out, "--quiet"), "merge", out, "Permission denied")
    finally:
        locked.chmod(0o755)
    assert os.listdir(locked) == []


def test_failed_final_rename_restores_the_old_output(tmp_path, monkeypatch):
    """The swap itself can fail (EXDEV, EBUSY...): the previous output comes back, the partial goes."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".out.partial-"):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(output_dir.os, "rename", rename)
    with pytest.raises(OSError):
        with atomic_output_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["old.txt"] and leftovers(out) == []


# ---------------------------------------------------------------------------------------------------
# signals: real subprocesses, real signals
# ---------------------------------------------------------------------------------------------------
def start_slow_merge(slow_model: Path, tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    """Start merging ``slow_model`` with itself; returns once its partial folder exists."""
    recipe = linear_recipe(tmp_path / "slow.yaml", slow_model, slow_model.resolve())
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mergequant", "merge", str(recipe), "-o", str(out), "--quiet",
                             "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.monotonic() + 60
    while not leftovers(out):
        assert proc.poll() is None, f"the merge ended before it could be signalled: {proc.communicate()}"
        assert time.monotonic() < deadline, "no partial folder appeared"
        time.sleep(0.005)
    return proc, recipe, out


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                             (signal.SIGHUP, 129, "terminated (SIGHUP)"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_signal_cleans_up(slow_model, tmp_path, sig, code, word):
    inputs = snapshot(slow_model)
    proc, recipe, out = start_slow_merge(slow_model, tmp_path)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    error_line(code, proc.returncode, stderr, word, "no output was written")
    assert_nothing_written(out)
    assert snapshot(slow_model) == inputs


def _fake_partial(out: Path, suffix: str, marker: dict | None) -> Path:
    p = out.parent / f".{out.name}.partial-{suffix}"
    p.mkdir()
    (p / "model.safetensors").write_bytes(b"x" * 100)
    if marker is not None:
        (p / PARTIAL_MARKER).write_text(json.dumps(marker))
    return p


@pytest.mark.slow
def test_sigkill_leftover_removed_by_next_run_but_not_others(slow_model, recipe, tmp_path):
    proc, _, out = start_slow_merge(slow_model, tmp_path)
    time.sleep(0.3)
    proc.kill()
    proc.communicate(timeout=60)
    [killed] = leftovers(out)
    assert json.loads((killed / PARTIAL_MARKER).read_text())["pid"] == proc.pid
    assert stale_partials(out) == [killed]

    here = {"tool": "mergequant", "host": socket.gethostname(), "pid_namespace": output_dir._pid_namespace()}
    foreign = _fake_partial(out, "00000000", None)  # no marker: not ours, whatever it is
    live = _fake_partial(out, "11111111", {**here, "pid": os.getpid()})  # a concurrent run, still going
    remote = _fake_partial(out, "22222222", {**here, "host": "another-host", "pid": proc.pid})  # shared disk
    keep = snapshot(foreign, live, remote)

    res = run_cli("merge", recipe, "-o", out, "--quiet", check=True)
    assert "removed" in res.stderr and killed.name in res.stderr
    assert not killed.exists() and out.is_dir() and not (out / PARTIAL_MARKER).exists()
    assert leftovers(out) == [foreign, live, remote] and snapshot(foreign, live, remote) == keep


# ---------------------------------------------------------------------------------------------------
# demo --dir: the demo overwrites its folder's contents, so it only takes a new, empty or its own folder
# ---------------------------------------------------------------------------------------------------
def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    work = tmp_path / "project"
    (work / "merged").mkdir(parents=True)
    (work / "merged" / "notes.txt").write_text("mine")
    (work / "ties.yaml").write_text("mine too")
    before = snapshot(work)
    res = invoke("demo", "--dir", work)
    assert_refused(res, str(work), "not made by `mergequant demo`")
    assert snapshot(work) == before and sorted(p.name for p in work.iterdir()) == ["merged", "ties.yaml"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_refused(invoke("demo", "--dir", a_file), str(a_file), "not a directory")
    assert a_file.read_text() == "x"


def test_demo_folder_claim_is_kept_for_reruns(tmp_path):
    from mergequant.demo import DEMO_MARKER, claim_demo_dir

    work = tmp_path / "new" / "demo"
    claim_demo_dir(work)  # a new folder is created and marked
    (work / "models").mkdir()
    claim_demo_dir(work)  # its own folder, not empty: accepted again
    assert (work / DEMO_MARKER).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    claim_demo_dir(empty)  # an existing empty folder is fine
    assert (empty / DEMO_MARKER).is_file()


# ---------------------------------------------------------------------------------------------------
# an output that appears while the run writes it (another run, a colleague): never replaced without --force
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_output_appearing_during_the_run_is_not_replaced(slow_model, tmp_path):
    proc, recipe, out = start_slow_merge(slow_model, tmp_path)
    out.mkdir()  # what another program made while the merge ran
    (out / "precious.txt").write_text("mine")
    _, stderr = proc.communicate(timeout=120)
    line = error_line(2, proc.returncode, stderr, str(out), "appeared while this run was writing it", ".new-")
    assert [p.name for p in out.iterdir()] == ["precious.txt"] and (out / "precious.txt").read_text() == "mine"
    kept = Path(line.split("kept at ")[1].strip())
    assert kept.parent == out.parent and any(kept.glob("*.safetensors")) and (kept / "config.json").exists()
    assert not (kept / PARTIAL_MARKER).exists() and leftovers(out) == []


def test_empty_output_appearing_is_not_replaced_either(tmp_path):
    """os.rename silently replaces an empty folder; the no-replace rename must not."""
    out = tmp_path / "out"
    with pytest.raises(output_dir.OutputAppeared):
        with atomic_output_dir(out, replace=False) as tmp:
            (tmp / "new.txt").write_text("new")
            out.mkdir()
    assert list(out.iterdir()) == []
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.new-")]
    assert len(kept) == 1 and (kept[0] / "new.txt").read_text() == "new"


@pytest.mark.parametrize("pid", [2**70, 2**40, True, -1, "123"])
def test_crafted_marker_is_not_ours_and_not_a_crash(recipe, tmp_path, pid):
    """A look-alike partial whose marker claims an impossible pid is kept, and the merge goes on."""
    out = tmp_path / "out"
    fake = tmp_path / ".out.partial-0000abcd"
    fake.mkdir()
    (fake / PARTIAL_MARKER).write_text(json.dumps({"tool": "mergequant", "pid": pid, "host": socket.gethostname(),
                                                   "pid_namespace": output_dir._pid_namespace()}))
    res = invoke("merge", recipe, "-o", out, "-q")
    assert res.exit_code == 0, res.output
    assert fake.is_dir() and (fake / PARTIAL_MARKER).is_file() and out.is_dir()


@pytest.mark.slow
def test_non_utf8_path_is_one_line(f32_models, tmp_path):
    """Linux allows any bytes in a name; where one cannot be written as UTF-8 text (the card names the
    source model) the run ends in one line with nothing left behind."""
    model = Path(os.fsdecode(bytes(tmp_path) + b"/m\xffodel"))
    shutil.copytree(f32_models["a"], model)
    out = tmp_path / "q"
    proc = run_cli("quantize", model, "-o", out, "--method", "rtn", "--group-size", 32, "-q")
    line = error_line(2, proc.returncode, proc.stderr, "cannot be written as UTF-8", "no output was written")
    assert line and not out.exists() and leftovers(out) == []
