"""Content identities: the hashes fingerprints and skip decisions are made of.

Three strengths, chosen by who owns the bytes. Our own outputs are hashed in full (:func:`output_files`,
:func:`verify_output`): a skip must be exact, and reading them costs about what writing them did.
Models that are not ours (merge parents, ``merge: {model:}``) get :func:`dir_fingerprint`: small files
hashed, weight files by size, mtime and safetensors header, because reading tens of GB of parents on
every rerun would cost more than the merge. Data files are hashed in full (:func:`data_fingerprint`),
``hf:`` sources by their reference. All pure functions of the file tree; nothing here writes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

SMALL_FILE = 16 * 2**20  # model files below this are hashed in full by dir_fingerprint
HASH_CHUNK = 8 * 2**20


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks (bounded memory for multi-GB weight files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no spaces): what every fingerprint is."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def files_under(folder: Path) -> list[Path]:
    """Every file under ``folder``, recursively, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file())


def dir_fingerprint(folder: Path) -> str:
    """Cheap identity of a model directory that is not ours (a merge parent, `merge: {model:}`):
    small files hashed in full, weight files by size, mtime and safetensors header (see module doc)."""
    entries = {}
    for p in files_under(folder):
        rel = p.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        st = p.stat()
        if st.st_size < SMALL_FILE:
            entries[rel] = sha256_file(p)
        else:
            header = b""
            if p.suffix == ".safetensors":
                with open(p, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    header = f.read(min(n, 100 * 2**20))
            entries[rel] = [st.st_size, st.st_mtime_ns, hashlib.sha256(header).hexdigest()]
    return sha256_json(entries)


def output_files(folder: Path) -> dict[str, dict]:
    """{relative path: {size, sha256}} of every file under an output directory (reads everything)."""
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in files_under(folder)}


def content_hash(files: dict[str, dict]) -> str:
    """The identity of an output folder: sha256 of its file hashes (what later steps fingerprint)."""
    return sha256_json({k: v["sha256"] for k, v in files.items()})


def verify_output(folder: Path, files: dict[str, dict]) -> str | None:
    """None when ``folder`` holds exactly ``files`` (sizes first, then sha256); else what differs."""
    if not folder.is_dir():
        return "output missing"
    present = {p.relative_to(folder).as_posix(): p for p in files_under(folder)}
    if set(present) != set(files):
        extra, missing = sorted(set(present) - set(files)), sorted(set(files) - set(present))
        return f"files differ ({'missing ' + ', '.join(missing) if missing else 'extra ' + ', '.join(extra)})"
    for rel, rec in files.items():
        if present[rel].stat().st_size != rec["size"]:
            return f"{rel} changed size"
    for rel, rec in files.items():
        if sha256_file(present[rel]) != rec["sha256"]:
            return f"{rel} changed content"
    return None


def verify_files(folder: Path, files: dict) -> str | None:
    """None when each of ``files`` (paths relative to ``folder``) is there with its size and sha256; other
    files in ``folder`` do not matter (the workdir's results files sit beside the outputs)."""
    for rel, rec in files.items():
        p = folder / rel
        if not p.is_file() or p.stat().st_size != rec["size"] or sha256_file(p) != rec["sha256"]:
            return f"{rel} missing or changed"
    return None


def data_fingerprint(source: str) -> str:
    """A data file's sha256 (its path does not matter); an ``hf:`` source's reference string."""
    return source if source.startswith("hf:") else sha256_file(Path(source))
