"""The manifest: ``WORKDIR/manifest.json``, the record of what finished and what a run was writing.

It is the only state that survives between runs, so it is read defensively and written atomically:
:func:`read_manifest` checks the shape of every field a run reads (:func:`manifest_problem`), so an
edited or foreign file is refused in one line instead of failing deep in a skip decision;
:func:`write_manifest` writes a temporary file, fsyncs it, renames it over the old one and fsyncs the
directory, so a kill leaves the old manifest or the new one, never half of one.

Besides the step records (``steps``), the manifest holds claims (``pending``: output name -> {step,
since_ns}) of outputs a step started writing and has not recorded yet: :func:`add_claims` and
:func:`drop_claims` edit them (pure, in memory; the caller writes). What the claims allow is decided in
:mod:`mergequant.release.workdir`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from mergequant.release.layout import MANIFEST, NAME_RE, ReleaseError

MANIFEST_FORMAT = "mergequant-release/1"
PENDING = "pending"  # manifest key: {output name: {step, since_ns}} of outputs a run started writing and has not recorded
MAX_MANIFEST_BYTES = 64 * 2**20  # a manifest lists files by name and hash: a few KB per step


def now() -> str:
    """The time a step started or finished, as recorded (UTC, milliseconds)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def empty_manifest() -> dict:
    return {"format": MANIFEST_FORMAT, "steps": {}}


def read_manifest(workdir: Path) -> dict:
    """The workdir's manifest (an empty one when there is none); a file that is not one of ours is refused in one line."""
    p = workdir / MANIFEST
    if not p.exists():
        return empty_manifest()
    if p.is_symlink() or not p.is_file():
        raise ReleaseError(f"{p}: not a regular file; delete it to redo every step")
    if p.stat().st_size > MAX_MANIFEST_BYTES:
        raise ReleaseError(f"{p}: {p.stat().st_size} bytes is not a manifest of ours; delete it to redo every step")
    try:
        data = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ReleaseError(f"{p}: unreadable manifest ({' '.join(str(e).split())[:200]}); delete it to redo every step") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("steps"), dict):
        raise ReleaseError(f"{p}: not a {MANIFEST_FORMAT} manifest; delete it to redo every step")
    problem = manifest_problem(data)
    if problem:
        raise ReleaseError(f"{p}: {problem}; it was not written by mergequant (or was edited): delete it to redo every step")
    return data


def manifest_problem(data: dict) -> str | None:
    """What in a manifest's records has the wrong shape, else None. Every field a run reads is checked
    here, once, so an edited manifest is one line instead of a KeyError deep in a step decision."""
    def files_problem(where: str, files) -> str | None:
        if not isinstance(files, dict):
            return f"{where}.files is not an object"
        for rel, rec in files.items():
            parts = Path(rel).parts
            if Path(rel).is_absolute() or ".." in parts or not parts:
                return f"{where}.files: {rel!r} is not a path inside the workdir"
            if not (isinstance(rec, dict) and isinstance(rec.get("size"), int) and isinstance(rec.get("sha256"), str)):
                return f"{where}.files[{rel!r}] is not {{size, sha256}}"
        return None

    for sid, rec in data["steps"].items():
        where = f"steps[{sid!r}]"
        if not isinstance(rec, dict):
            return f"{where} is not an object"
        for key, kind in (("kind", str), ("fingerprint", str), ("output", str), ("content_hash", str),
                          ("settings", dict), ("inputs", dict), ("result", dict), ("files", dict)):
            if key in rec and not isinstance(rec[key], kind):
                return f"{where}.{key} has the wrong type"
        if "output" in rec and not NAME_RE.match(rec["output"]):
            return f"{where}.output {rec['output']!r} is not a plain name"
        if "output" in rec and not ("files" in rec and "content_hash" in rec):
            return f"{where} records an output without its files and content_hash"
        if rec.get("kind") == "eval" and "files" not in rec:
            return f"{where} records an evaluation without its files"
        if "files" in rec and (bad := files_problem(where, rec["files"])):
            return bad
    pending = data.get(PENDING, {})
    if not isinstance(pending, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("since_ns"), int) and isinstance(v.get("step"), str)
            for v in pending.values()):
        return f"'{PENDING}' is not {{output name: {{step, since_ns}}}}"
    return None


def write_manifest(workdir: Path, manifest: dict) -> None:
    """Atomically: temporary file, fsync, rename over manifest.json, fsync the directory."""
    write_atomic(workdir / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a kill leaves the old file or the new one (also results.json/.md)."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recorded_outputs(manifest: dict) -> set[str]:
    """Workdir entries a run of ours wrote: recorded outputs and eval files, plus the outputs a run
    claimed before it stopped (written, maybe, but not recorded yet)."""
    names = set(manifest.get(PENDING, {}))
    for rec in manifest["steps"].values():
        if isinstance(rec, dict) and rec.get("output"):
            names.add(rec["output"])
        elif isinstance(rec, dict) and rec.get("kind") == "eval":
            names.update(rec.get("files", {}))
    return names


def add_claims(manifest: dict, step_id: str, names: list[str], since_ns: int) -> None:
    """Claim ``names`` for ``step_id`` in ``manifest`` (in memory): the step is about to write them."""
    manifest.setdefault(PENDING, {}).update({n: {"step": step_id, "since_ns": since_ns} for n in names})


def drop_claims(manifest: dict, names) -> None:
    """Remove ``names`` from the manifest's claims (in memory; the caller writes it)."""
    pending = manifest.get(PENDING, {})
    for name in names:
        pending.pop(name, None)
    if not pending:
        manifest.pop(PENDING, None)
