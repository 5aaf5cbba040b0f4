"""Never deleting what mergequant did not make: who owns what in a workdir, and the one-run lock.

A rerun replaces outputs and deletes leftovers, so every such act needs proof that the thing is ours.
The proofs, in one place because each one closes a way a user's data could be lost:

- :func:`location_refusals`: the workdir is not an input model folder (nor inside one), and no output
  overlaps any input (replacing the output would delete the input). Fixed by editing the release file.
- :func:`is_ours` / :func:`foreign_files`: a workdir entry is ours when the manifest records (or claims)
  it, it is not a link put in its place, and it holds nothing a run of ours did not write there.
  Anything else at an output's name is refused (:func:`unrecorded_refusal`), or with ``--force-step``
  renamed aside (:func:`aside`), never deleted.
- :func:`leftover_refusal`: a ``.NAME.partial-*``/``.NAME.old-*`` folder is removed only when it is
  exactly what the writer makes, owned by this user, and no older than the claim of the interrupted run
  that was writing NAME.
- :class:`WorkdirLock`: one run at a time per workdir (``flock``, released by the kernel when a run dies).

Functions here decide; the runner (:mod:`mergequant.release.runner`) acts (renames, deletes, logs).
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import time
from collections.abc import Iterable
from pathlib import Path

from mergequant.io.output_dir import within
from mergequant.release.hashing import files_under
from mergequant.release.layout import LOCK, MANIFEST, ReleaseError
from mergequant.release.manifest import recorded_outputs

CLAIM_SLACK_NS = 10**9  # file timestamps come from a coarser clock than time.time_ns(): a leftover may look slightly older


class WorkdirLock:
    """An exclusive ``flock`` on ``WORKDIR/.lock`` (creating the workdir); refused when another run holds it."""

    def __init__(self, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(workdir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ReleaseError(f"{workdir}: another `mergequant run` is using this workdir") from None

    def release(self):
        os.close(self.fd)


def leftovers(workdir: Path, name: str) -> list[Path]:
    """Candidates for the temporary directories an interrupted merge/quantize of output ``name`` left
    behind (names only: :func:`leftover_refusal` decides whether one is really ours to delete)."""
    if not workdir.is_dir():
        return []
    return sorted(p for pat in (f".{name}.partial-*", f".{name}.old-*") for p in workdir.glob(pat))


def leftover_refusal(path: Path, name: str, pending: dict) -> str | None:
    """None when ``path`` is verifiably a leftover of ours, else why it is kept.

    The glob alone would take a user's ``.merged.old-backup`` or a link to anywhere. Ours means:
    exactly the name :func:`mergequant.io.output_dir.atomic_output_dir` gives (``.NAME.partial-`` or
    ``.NAME.old-`` + 8 hex digits), a real directory (not a link) owned by this user, output
    ``name`` claimed in the manifest by a run that stopped before recording it (see
    :meth:`mergequant.release.runner._Runner.claim`): only such a run can have left one, and created
    (or renamed: ctime) no earlier than that claim, so a look-alike folder that was there before is
    not taken for it. (``atomic_output_dir`` also marks its folders and removes stale marked ones of
    the same output itself; this check adds the workdir's own evidence and covers ``.old-*`` folders,
    which carry no marker.)"""
    if not re.fullmatch(rf"\.{re.escape(name)}\.(partial|old)-[0-9a-f]{{8}}", path.name):
        return "not named like a mergequant temporary folder"
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        return "a link or a file, not a folder" if stat.S_ISLNK(st.st_mode) else "not a folder"
    if st.st_uid != os.geteuid():
        return "owned by another user"
    claim = pending.get(name)
    if not isinstance(claim, dict) or not isinstance(claim.get("since_ns"), int):
        return f"no interrupted run of this workdir was writing {name}"
    if st.st_ctime_ns < claim["since_ns"] - CLAIM_SLACK_NS:
        return f"older than the interrupted run that was writing {name}"
    return None


def overlap(a: Path, b: Path) -> bool:
    """Writing or replacing one of ``a``/``b`` (resolved) would change the other."""
    return within(a, b) or within(b, a)


def aside(path: Path) -> Path:
    """A free sibling name to keep an unrecorded ``path`` under when ``--force-step`` replaces it."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    candidates = (path.with_name(f"{path.name}.set-aside-{stamp}" + (f"-{i}" if i else "")) for i in range(1000))
    return next(c for c in candidates if not os.path.lexists(c))


def location_refusals(release_path: Path, wd: Path, inputs: list[tuple[str, Path, bool]],
                      outputs: list[tuple[str, str]]) -> list[str]:
    """Why a release may not write where it would (empty when it may); fixed by editing the release
    file, never by --force-step. Checked before the workdir or its lock is created.

    ``inputs``: (what it is, path, is a model folder) of every local input; ``outputs``: (step id,
    name in the workdir) of everything the steps write. Rule: the workdir is neither an input model
    folder nor inside one (its lock, manifest and outputs would be written into the model), and no
    step output is, contains or lies inside any input (file or folder): replacing the output would
    delete the input."""
    if wd.exists() and not wd.is_dir():
        return [f"{release_path}: workdir {wd} exists and is not a folder"]
    real_wd, resolved = wd.resolve(), [(what, p, p.resolve(), model) for what, p, model in inputs]
    out = [f"{release_path}: workdir {wd} is {'the' if real_wd == real else 'inside the'} input model folder {p} "
           f"({what}): nothing may be written there; choose a workdir outside every input"
           for what, p, real, model in resolved if model and within(real_wd, real)]
    if out:  # every output would be inside that input too: one refusal says it
        return out
    for step_id, name in outputs:
        target = (wd / name).resolve()
        out += [f"{release_path}: {step_id} would write {wd / name}, which "
                f"{'is' if target == real else 'overlaps'} the input {p} ({what}): rename the step or choose "
                "another workdir" for what, p, real, _ in resolved if overlap(target, real)]
    return out


def foreign_files(wd: Path, name: str, records: Iterable[dict]) -> list[str]:
    """Files inside the recorded output folder ``name`` that no run of ours wrote there: a note a
    user added to a finished output, or a whole folder of theirs put at the name after the output
    was deleted. Redoing the step would delete them, so their presence makes the folder not ours.
    (An output claimed by an interrupted run has no file list yet: nothing to compare.)
    ``records``: the step records to look the output up in (the manifest now, then as read at start)."""
    folder = wd / name
    recorded = next((rec.get("files") for rec in records if isinstance(rec, dict) and rec.get("output") == name), None)
    if not isinstance(recorded, dict) or folder.is_symlink() or not folder.is_dir():
        return []
    return [p.relative_to(folder).as_posix() for p in files_under(folder)
            if p.relative_to(folder).as_posix() not in recorded]


def is_ours(wd: Path, name: str, manifests: list[dict]) -> bool:
    """Whether the workdir entry ``name`` was written by a run of this workdir (recorded or claimed in
    one of ``manifests``: see :func:`mergequant.release.manifest.recorded_outputs`) and is still a real
    folder or file, not a link put in its place, holding nothing but what that run recorded."""
    recorded = set().union(*(recorded_outputs(m) for m in manifests))
    records = [rec for m in manifests for rec in m["steps"].values()]
    return name in recorded and not (wd / name).is_symlink() and not foreign_files(wd, name, records)


def unrecorded_refusal(wd: Path, step_id: str, path: Path, extra: list[str]) -> str:
    """The refusal for an existing ``path`` that ``step_id`` would replace and that is not ours
    (``extra``: the files in it no run of ours wrote, see :func:`foreign_files`)."""
    why = (f"holds {len(extra)} file(s) mergequant did not write there ({', '.join(extra[:3])}"
           f"{', ...' if len(extra) > 3 else ''})" if extra
           else f"exists but {wd / MANIFEST} has no record of mergequant writing it")
    return (f"{path} {why}: refusing to replace it (move it away, rename the step, or pass "
            f"--force-step {step_id} to keep it under another name)")
