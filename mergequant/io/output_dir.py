"""Output folders of merge and quantize: where they may go, and how one is replaced without ever being half-written.

A run writes into a sibling ``.OUT.partial-XXXXXXXX`` and renames it to ``OUT`` as its last step, so
``OUT`` is either the previous output or the complete new one. With ``--force`` the old ``OUT`` is
moved aside to ``.OUT.old-XXXXXXXX`` and deleted only once the new one is in place.

Because ``--force`` deletes a folder, the checks here refuse any output whose replacement would take
something with it that the run did not make: an input model, the recipe, calibration or eval data,
the current directory (``-o .``, ``-o ..``, ``-o /``) or the home directory. A symlinked output is
refused too: replacing it would either swap the link for a folder (the data would land beside the
link instead of where it points) or delete the target's contents through the link; the user names
the target instead.

Each partial folder carries a marker (``.mergequant-partial``: pid, host, pid namespace, start time)
so that a later run can tell a folder left by a killed run (marker, dead pid, this host) from one a
concurrent run is still writing (live pid) and from anything that is not ours (no marker).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

from mergequant.errors import MergeQuantError

PARTIAL_MARKER = ".mergequant-partial"
NAME_MAX = 255  # bytes in one path component on Linux/macOS filesystems
_PARTIAL_RE = re.compile(r"/\.(?P<name>[^/]+)\.partial-[0-9a-f]{8}(?=/|$)")

Protected = tuple[str, Path]  # (what it is, for the message: "recipe", "input model", ...; its path)


# ---------------------------------------------------------------------------------------------------
# where an output may go
# ---------------------------------------------------------------------------------------------------
def output_path(out: Path) -> Path:
    """``out`` made absolute with its parent resolved but its last component kept as given.

    Keeping the last component unresolved lets a symlinked output be recognised as a link; ``.``,
    ``..`` and ``/`` have no usable last component (``.OUT.partial`` would be ``..partial``), so they
    are resolved whole and then meet the current-directory rule like any other path.
    """
    out = Path(out)
    if out.name in ("", ".."):
        return out.resolve()
    return out.parent.resolve() / out.name


def local_files(specs: dict[str, str | os.PathLike | None]) -> list[Protected]:
    """The data sources given as local paths (``hf:`` datasets and unset options are skipped), labelled."""
    return [(label, Path(s)) for label, s in specs.items() if s and not str(s).startswith("hf:")]


def _standing_protections() -> list[Protected]:
    """Folders no output may replace whatever the inputs: the current directory (a rename would pull it
    from under the shell) and the home directory (``-o ~ --force``)."""
    found = [("current directory", Path.cwd())]
    with contextlib.suppress(RuntimeError, KeyError):  # no HOME and no passwd entry
        found.append(("home directory", Path.home()))
    return found


def within(child: Path, parent: Path) -> bool:
    """``child`` is ``parent`` or lies inside it (both already resolved)."""
    return child == parent or parent in child.parents


def replacement_refusal(target: Path, protected: Iterable[Protected]) -> str | None:
    """Why replacing the (resolved) ``target`` would delete something the run does not own, else None."""
    for label, path in protected:
        for p in (output_path(path), path.resolve()):  # a symlinked input: the link and what it points to
            if within(p, target):
                return f"it {'is' if p == target else 'holds'} the {label} {path}"
    return None


def nesting_refusal(target: Path, inputs: Iterable[Path]) -> str | None:
    """Why writing at the (resolved) ``target`` would write into an input model folder, else None."""
    for inp in inputs:
        if inp.resolve() in target.parents:
            return f"it is inside the input model {inp}"
    return None


def _first_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_output_location(out: Path, inputs: list[Path], *, force: bool, files: Iterable[Protected] = ()) -> None:
    """Refuse, before any work, an output that cannot be written or whose replacement would destroy something.

    ``inputs`` are the input model folders; ``files`` are other inputs (recipe, calibration data...)
    as (label, path). Checks that no ``--force`` can lift come first, so the user is never told to
    pass ``--force`` only to be refused again.
    """
    target = output_path(out)
    if target.is_symlink():
        raise MergeQuantError(f"refusing to write {out}: it is a symbolic link (to {os.readlink(target)}); "
                              f"pass the folder it points to as -o, or remove the link")
    resolved = target.resolve()
    protected = _standing_protections() + [("input model", p) for p in inputs] + list(files)
    why = nesting_refusal(resolved, inputs) or replacement_refusal(resolved, protected)
    if why:
        raise MergeQuantError(f"refusing to write {out}: {why}")
    size = len(os.fsencode(target.name))  # bytes on disk (a non-UTF-8 name round-trips through fsencode)
    room = NAME_MAX - len(os.fsencode(f".{target.name}.partial-00000000")) + size
    if size > room:
        raise MergeQuantError(f"refusing to write {out}: its name is {size} bytes; at most {room} "
                              "fit, since the output is first written to a hidden sibling '.NAME.partial-XXXXXXXX'")
    ancestor = _first_existing(target.parent)
    if not ancestor.is_dir():
        raise MergeQuantError(f"cannot create {out}: {ancestor} is not a directory")
    if target.exists() and not target.is_dir():
        raise MergeQuantError(f"{out} exists and is not a directory")
    if target.exists() and not force:
        raise MergeQuantError(f"{out} already exists: pass --force to replace it")


# ---------------------------------------------------------------------------------------------------
# partial folders: ours, stale, or someone else's
# ---------------------------------------------------------------------------------------------------
def _pid_namespace() -> str | None:
    """Identifies the pid space: a pid from another container on a shared volume says nothing about ours."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _marker() -> dict:
    return {"tool": "mergequant", "pid": os.getpid(), "host": socket.gethostname(),
            "pid_namespace": _pid_namespace(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def read_marker(partial: Path) -> dict | None:
    """The marker of a partial folder, or None when it has none (or an unreadable one): then it is not ours."""
    try:
        info = json.loads((partial / PARTIAL_MARKER).read_text())
    except (OSError, ValueError):
        return None
    pid = info.get("pid") if isinstance(info, dict) else None
    ok = (info.get("tool") == "mergequant" and isinstance(pid, int) and not isinstance(pid, bool)
          and 0 < pid < 2**22) if isinstance(info, dict) else False  # Linux pids stay below 2**22
    return info if ok else None


def is_our_partial(path: Path) -> bool:
    """True for a folder a merge/quantize created as its partial output (it carries our marker)."""
    return path.is_dir() and not path.is_symlink() and read_marker(path) is not None


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs here; a zombie (killed, not yet reaped) counts as dead, an unknown answer as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def is_stale(info: dict) -> bool:
    """A marker's run is over: written on this host, in this pid namespace, by a process no longer alive.

    Anything else (another host on a shared disk, another container, a live pid) may be a run in
    progress, so it is left alone: a stale folder costs disk, deleting a live one costs a run.
    """
    here = info.get("host") == socket.gethostname() and info.get("pid_namespace") == _pid_namespace()
    return here and not _pid_alive(info["pid"])


def partials_of(out: Path) -> list[Path]:
    """Every ``.OUT.partial-*`` sibling of ``out``, ours or not."""
    target = output_path(out)
    return sorted(target.parent.glob(f".{glob.escape(target.name)}.partial-*"))


def stale_partials(out: Path) -> list[Path]:
    """Partial folders of ``out`` left by runs that died (SIGKILL, power loss): ours, and their process is gone."""
    found = []
    for p in partials_of(out):
        info = read_marker(p) if is_our_partial(p) else None
        if info is not None and is_stale(info):
            found.append(p)
    return found


def remove_partial(partial: Path) -> None:
    """Delete a partial folder, its marker last: if this is itself interrupted, what is left is still
    marked, so the next run can recognise and remove it."""
    with os.scandir(partial) as it:
        entries = [e for e in it if e.name != PARTIAL_MARKER]
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(e.path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(partial / PARTIAL_MARKER)
    os.rmdir(partial)


def _remove_quietly(path: Path) -> None:
    """Cleanup on the error path: never let a cleanup failure hide the error that caused it."""
    with contextlib.suppress(OSError):
        remove_partial(path)


def public_path(path: str | os.PathLike) -> str:
    """``path`` as the user knows it: a file inside ``.OUT.partial-XXXX/`` is shown under ``OUT/`` (the
    partial folder is an implementation detail and is gone by the time the message is read)."""
    return _PARTIAL_RE.sub(lambda m: "/" + m["name"], os.fspath(path))


# ---------------------------------------------------------------------------------------------------
# the atomic output folder
# ---------------------------------------------------------------------------------------------------
def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p ``folder``; returns the folders it created, deepest last, so a failed run can remove them."""
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:  # a concurrent run made it: not ours to remove
            continue
        created.append(d)
    return created


def _new_partial(target: Path) -> Path:
    tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _delete(path: Path) -> None:
    """Delete a moved-aside old output; a symlink is unlinked, never followed."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` goes aside first and comes back if the rename fails."""
    old = None
    if os.path.lexists(target):
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        _delete(old)


class OutputAppeared(MergeQuantError):
    """The output did not exist when the run started but does now (another run or program made it)."""


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` only if ``dst`` does not exist, atomically where the kernel can
    (``renameat2(RENAME_NOREPLACE)``); a plain ``os.rename`` would silently replace an empty folder
    and, after an existence check, still race with whoever creates ``dst`` in between."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):  # not supported here: fall back below
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _place_new(tmp: Path, target: Path, out: Path) -> None:
    """Without --force: move the finished ``tmp`` to ``target`` unless something appeared there during
    the run; then nothing is replaced, and the finished output is kept beside it under a new name."""
    import errno

    try:
        _rename_noreplace(tmp, target)
        return
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    kept = target.parent / f"{target.name}.new-{uuid.uuid4().hex[:8]}"
    os.rename(tmp, kept)
    raise OutputAppeared(f"{out} appeared while this run was writing it (another run or program?); it was left "
                         f"untouched and the new output was kept at {kept}")


def _remove_stale(target: Path, log: Callable[[str], None] | None) -> None:
    for p in stale_partials(target):
        pid = read_marker(p)["pid"]
        _remove_quietly(p)
        if log is not None and not p.exists():
            log(f"removed {p}: partial output of an earlier run (process {pid}) that did not finish")


@contextlib.contextmanager
def atomic_output_dir(out: Path, log: Callable[[str], None] | None = None, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary marked sibling folder; on success rename it to ``out`` (replacing an old one
    only with ``replace``, i.e. ``--force``), else delete it.

    An interrupted or failed run (exception, Ctrl-C, SIGTERM via the CLI, disk full) leaves nothing:
    not the partial folder, not the parent folders it created; a SIGKILLed one leaves a marked
    partial folder that the next run to the same output removes. The rename is the last step, so
    ``out`` never looks complete before it is. An OSError without a path is attributed to ``out``.
    """
    target = output_path(out)
    created = _make_parents(target.parent)
    tmp = None
    try:
        _remove_stale(target, log)
        tmp = _new_partial(target)
        (tmp / PARTIAL_MARKER).write_text(json.dumps(_marker()) + "\n")
        yield tmp
        os.unlink(tmp / PARTIAL_MARKER)  # the output must not carry it (push would upload it)
        if replace:
            _swap_into_place(tmp, target)
        else:
            _place_new(tmp, target, out)
    except OutputAppeared:
        raise  # the finished output was kept under a new name and the message says where
    except BaseException as e:
        if tmp is not None and os.path.lexists(tmp):
            _remove_quietly(tmp)
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(target)
        raise
