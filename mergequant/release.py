"""`mergequant run RELEASE.yaml`: merge -> quantize(s) -> eval -> push from one file, resumable.

A release file names the merge recipe (or an existing model), the quantizations to produce, the
held-out text and the Hub repos. It is parsed and validated up front (:func:`parse_release`, pure:
unknown keys are rejected with a suggestion, every message names the file and the key).

Steps run in order: ``merge``, ``quantize/NAME`` (file order), ``eval``, ``push/NAME``. Each
finished step is recorded in ``WORKDIR/manifest.json`` (written atomically: temporary file, fsync,
rename) with its settings, the fingerprint of its inputs, the size and sha256 of every output file
and its timings. A step is skipped when its recorded fingerprint equals the current one AND its
outputs are still on disk with the recorded sizes and hashes. Fingerprints:

- merge: sha256 of the recipe text, the merge options, and a fingerprint of every parent that is a
  local directory: the sha256 of every small file (config, tokenizer, index: < 16 MiB) and, for
  weight files, name + size + mtime (ns) + the sha256 of the safetensors header. Weight data is not
  read (an 8B parent would cost a minute per run); a weight file rewritten in place with the same
  size, header and mtime is not detected (use ``--force-step merge``). Hub ids are fingerprinted by the
  reference string: pin a revision (``org/model@REV``) for exact resumption.
- quantize/NAME: the content hash of its source (the merge output's file hashes, or the directory
  fingerprint above for ``merge: {model: ...}``), its settings, the sha256 of the calibration file
  and, with ``eval:``, of the held-out file (the card carries the perplexities).
- eval: the content hashes of every model evaluated + the data's sha256 + its settings.
- push/NAME: the content hash of the folder, the repo, the push options, the base-model map, and
  whether it was a dry run (a dry-run push never counts as a real one).

Crash/kill safety: merge and quantize write into ``.OUT.partial-XXXX`` and rename at the end
(:func:`mergequant.io.output_dir.atomic_output_dir`); the manifest is updated only after that rename and
an fsync. Before a step writes, the manifest records that it is writing OUT (``pending``). A run
killed at any point leaves either the old state or a finished, claimed output without its record
(redone, identical bytes). Leftover ``.OUT.partial-*``/``.OUT.old-*`` directories of an interrupted
run are removed before the step runs again, when verifiably ours (:func:`leftover_refusal`). One run
at a time per workdir (an flock on ``WORKDIR/.lock``, released by the kernel when a run dies).

Never deleting what it did not make (checked before the workdir, its lock or anything else is
created, and listed by ``--dry-run``): the workdir may not be an input model folder or lie inside
one; no output may be, contain or lie inside an input; an existing ``WORKDIR/NAME`` (or results
file) the manifest does not record (nor claim) is refused, or with ``--force-step`` renamed aside,
never deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any


from mergequant.errors import MergeQuantError, suggestion
from mergequant.io.output_dir import within

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "mergequant-release/1"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
RESULTS_PNG = "results.png"  # written by the eval step when matplotlib is installed; attached to every push
LOCK = ".lock"
PENDING = "pending"  # manifest key: {output name: {step, since_ns}} of outputs a run started writing and has not recorded
CLAIM_SLACK_NS = 10**9  # file timestamps come from a coarser clock than time.time_ns(): a leftover may look slightly older
SMALL_FILE = 16 * 2**20  # model files below this are hashed in full by dir_fingerprint
HASH_CHUNK = 8 * 2**20

TOP_KEYS = {"workdir", "merge", "quantize", "eval", "push"}
MERGE_KEYS = {"recipe", "model", "out", "shard_size", "out_dtype", "seed", "device", "workers",
              "allow_vocab_mismatch", "mergekit_dtype", "moe_layout"}
# QuantizeOptions fields a release does not set per quantization (the runner decides them).
QUANT_RESERVED = {"out", "force", "quiet", "fsync", "eval_data"}
EVAL_KEYS = {"data", "seqlen", "stride", "max_tokens", "device", "backend"}
PUSH_OPTION_KEYS = {"private", "revision", "create_pr", "commit_message", "endpoint", "base_model_map"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Settings that do not change what a step writes (left out of its fingerprint).
NOT_FINGERPRINTED = {"workers"}


class ReleaseError(MergeQuantError):
    """The release file is invalid, or the workdir cannot be used."""


# ---------------------------------------------------------------------------------------------------
# the release file
# ---------------------------------------------------------------------------------------------------
@dataclass
class MergeSpec:
    recipe: Path | None  # absolute; None with `model:`
    model: Path | None  # an existing model to quantize (no merge step)
    out: str  # output name (directory under workdir) of the merge
    options: dict  # MergeOptions keyword arguments (shard_size already in bytes)


@dataclass
class QuantSpec:
    name: str
    settings: dict  # QuantizeOptions keyword arguments (calib absolute, shard_size in bytes)


@dataclass
class EvalSpec:
    data: str  # absolute path or hf:...
    seqlen: int = 2048
    stride: int | None = None
    max_tokens: int | None = None
    device: str = "auto"
    backend: str = "auto"  # quantized checkpoints: auto | transformers (client kernels) | dequant (ours)


@dataclass
class PushSpec:
    repos: dict[str, str]  # output name -> repo id
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None
    endpoint: str | None = None
    base_model_map: dict[str, str] = field(default_factory=dict)


@dataclass
class Release:
    path: Path
    text: str
    workdir: Path
    merge: MergeSpec
    quantize: list[QuantSpec]
    eval: EvalSpec | None
    push: PushSpec | None

    @property
    def source_name(self) -> str | None:
        """The output name of the merge (None when quantizing an existing model)."""
        return self.merge.out if self.merge.recipe is not None else None


def _err(path: Path, where: str, msg: str) -> ReleaseError:
    return ReleaseError(f"{path}: {where}: {msg}" if where else f"{path}: {msg}")


def _mapping(path: Path, where: str, obj: Any, allowed: set[str]) -> dict:
    if not isinstance(obj, dict):
        raise _err(path, where, f"expected a mapping, got {type(obj).__name__}")
    for k in obj:
        if k not in allowed:
            raise _err(path, f"{where}.{k}" if where else str(k), f"unknown key '{k}'" + suggestion(k, allowed))
    return obj


def _typed(path: Path, where: str, value: Any, kind: type | tuple, what: str, *, nullable: bool = False):
    if value is None and nullable:
        return None
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float, (int, float)))
    if not ok:
        raise _err(path, where, f"expected {what}, got {value!r}")
    return value


def _local(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _data_source(path: Path, where: str, value: Any, *, must_exist: bool = True) -> str:
    _typed(path, where, value, str, "a file path or hf:NAME[:CONFIG]:SPLIT[:COLUMN]")
    if value.startswith("hf:"):
        return value
    p = _local(path.parent, value)
    if must_exist and not p.is_file():
        raise _err(path, where, f"file not found: {p}")
    return str(p.resolve())


def _size(path: Path, where: str, value: Any) -> int:
    from mergequant.units import parse_size

    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _err(path, where, f"expected a size like 5GB, got {value!r}")
    try:
        return parse_size(value)
    except MergeQuantError as e:
        raise _err(path, where, str(e)) from None


def quantize_fields() -> dict[str, dataclasses.Field]:
    from mergequant.quant.quantize import QuantizeOptions

    return {f.name: f for f in dataclasses.fields(QuantizeOptions) if f.name not in QUANT_RESERVED}


def _field_kind(f: dataclasses.Field) -> tuple[type | tuple, str, bool]:
    t = str(f.type).replace(" ", "")
    nullable = "None" in t
    base = t.replace("|None", "").replace("None|", "")
    kinds = {"bool": (bool, "true or false"), "int": (int, "an integer"), "float": ((int, float), "a number"),
             "str": (str, "a string"), "Path": (str, "a path")}
    kind, what = kinds.get(base, (object, "a value"))
    return kind, what, nullable


def load_release(path: str | Path) -> Release:
    from mergequant.yaml_file import read_yaml_text

    path = Path(path)
    return parse_release(read_yaml_text(path, "release", ReleaseError), path)


def parse_release(text: str, path: Path = Path("<release>")) -> Release:
    """Validate a release file. Paths in it are relative to the file's folder. Checks that the files
    it names exist, nothing else (no model is opened)."""
    from mergequant.hub import repo_id_problem
    from mergequant.quant.method import METHODS
    from mergequant.recipe import looks_like_hub_id
    from mergequant.yaml_file import parse_yaml

    path = Path(path).absolute()
    base = path.parent
    data = parse_yaml(text, path, "release", ReleaseError)  # bounded (alias bombs), duplicate keys refused
    if data is None:
        raise _err(path, "", "empty release file")
    data = _mapping(path, "", data, TOP_KEYS)
    for key in ("workdir", "merge"):
        if data.get(key) is None:
            raise _err(path, key, "missing")
    workdir = _local(base, _typed(path, "workdir", data["workdir"], str, "a directory path"))

    # merge
    m = _mapping(path, "merge", data["merge"], MERGE_KEYS)
    if ("recipe" in m) == ("model" in m):
        raise _err(path, "merge", "give exactly one of 'recipe' (merge it) or 'model' (quantize an existing model)")
    options: dict = {}
    recipe = model = None
    if "recipe" in m:
        recipe = _local(base, _typed(path, "merge.recipe", m["recipe"], str, "a recipe path"))
        if not recipe.is_file():
            raise _err(path, "merge.recipe", f"recipe not found: {recipe}")
        recipe = recipe.resolve()
        out = _typed(path, "merge.out", m.get("out", "merged"), str, "an output name")
        if not NAME_RE.match(out):
            raise _err(path, "merge.out", f"'{out}' is not a plain directory name (letters, digits, . _ -)")
        if out in PUSH_OPTION_KEYS or out in (MANIFEST, RESULTS_JSON, RESULTS_MD):
            raise _err(path, "merge.out", f"'{out}' is reserved (the workdir's own files and push options use it)")
        checks = {"out_dtype": (str, "a dtype name", True), "seed": (int, "an integer", False),
                  "device": (str, "cpu, cuda or auto", False), "workers": (int, "an integer", False),
                  "allow_vocab_mismatch": (bool, "true or false", False), "mergekit_dtype": (bool, "true or false", False),
                  "moe_layout": (str, "per-expert or fused", False)}
        for k, (kind, what, nullable) in checks.items():
            if k in m:
                options[k] = _typed(path, f"merge.{k}", m[k], kind, what, nullable=nullable)
        if options.get("out_dtype") is not None and options["out_dtype"] not in ("float32", "float16", "bfloat16"):
            raise _err(path, "merge.out_dtype", f"'{options['out_dtype']}' is not one of bfloat16, float16, float32")
        if "shard_size" in m:
            options["shard_size"] = _size(path, "merge.shard_size", m["shard_size"])
    else:
        for k in MERGE_KEYS - {"model"}:
            if k in m:
                raise _err(path, f"merge.{k}", "only applies to a merge ('recipe'); with 'model' nothing is merged")
        model = _local(base, _typed(path, "merge.model", m["model"], str, "a model directory"))
        if not (model / "config.json").is_file():
            raise _err(path, "merge.model", f"not a model directory (no config.json): {model}")
        model = model.resolve()
        out = None
    if recipe is not None:
        from mergequant.merge.run import MergeOptions, check_merge_options

        try:  # the same rules as `mergequant merge` (workers, device, seed, shard size), before any step runs
            check_merge_options(MergeOptions(out=Path(out), **options))
        except MergeQuantError as e:
            raise _err(path, "merge", str(e)) from None
    merge = MergeSpec(recipe, model, out or "", options)

    # quantize
    qlist = data.get("quantize") or []
    if not isinstance(qlist, list):
        raise _err(path, "quantize", "expected a list of quantizations")
    fields = quantize_fields()
    allowed_q = set(fields) | {"name"}
    quants: list[QuantSpec] = []
    seen = {merge.out} if merge.out else set()
    for i, q in enumerate(qlist):
        where = f"quantize[{i}]"
        q = _mapping(path, where, q, allowed_q)
        for req in ("name", "method"):
            if q.get(req) is None:
                raise _err(path, where, f"missing '{req}'")
        name = _typed(path, f"{where}.name", q["name"], str, "a name")
        if not NAME_RE.match(name):
            raise _err(path, f"{where}.name", f"'{name}' is not a plain directory name (letters, digits, . _ -)")
        if name in seen or name in PUSH_OPTION_KEYS or name in (MANIFEST, RESULTS_JSON, RESULTS_MD):
            raise _err(path, f"{where}.name", f"'{name}' is already used" if name in seen else f"'{name}' is reserved")
        seen.add(name)
        method = q["method"]
        if method not in METHODS:
            raise _err(path, f"{where}.method", f"unknown method '{method}'"
                       + suggestion(method, METHODS).replace(" (allowed:", " (supported:"))
        settings: dict = {}
        for k, v in q.items():
            if k == "name":
                continue
            w = f"{where}.{k}"
            if k == "shard_size":
                settings[k] = _size(path, w, v)
            elif k == "calib":
                settings[k] = _data_source(path, w, v)
            else:
                kind, what, nullable = _field_kind(fields[k])
                settings[k] = _typed(path, w, v, kind, what, nullable=nullable)
        quants.append(QuantSpec(name, settings))

    # eval
    ev = None
    if data.get("eval") is not None:
        e = _mapping(path, "eval", data["eval"], EVAL_KEYS)
        if e.get("data") is None:
            raise _err(path, "eval", "missing 'data'")
        ev = EvalSpec(_data_source(path, "eval.data", e["data"]))
        for k, (kind, what, nullable) in {"seqlen": (int, "an integer", False), "stride": (int, "an integer", True),
                                           "max_tokens": (int, "an integer", True), "device": (str, "cpu, cuda or auto", False),
                                           "backend": (str, "auto, transformers or dequant", False)}.items():
            if k in e:
                setattr(ev, k, _typed(path, f"eval.{k}", e[k], kind, what, nullable=nullable))
        from mergequant.evaluate import check_eval_options

        try:  # the same rules as `mergequant eval`, checked before any step runs
            check_eval_options(ev.seqlen, ev.stride, ev.max_tokens)
        except MergeQuantError as err:
            raise ReleaseError(f"{path}: eval: {err}") from None
        from mergequant.evaluate import BACKENDS

        if ev.backend not in BACKENDS:
            raise _err(path, "eval.backend", f"'{ev.backend}' is not one of {', '.join(BACKENDS)}"
                       + suggestion(ev.backend, set(BACKENDS)).split(" (allowed")[0])
        for q in quants:  # the card's perplexities are measured with the quantization's seqlen: default to eval's
            q.settings.setdefault("seqlen", ev.seqlen)

    # push
    push = None
    if data.get("push") is not None:
        outputs = ([merge.out] if merge.out else []) + [q.name for q in quants]
        p = _mapping(path, "push", data["push"], PUSH_OPTION_KEYS | set(outputs))
        repos = {}
        for name in outputs:  # in step order
            if name in p:
                repo = _typed(path, f"push.{name}", p[name], str, "a Hub repo id namespace/name")
                problem = repo_id_problem(repo)
                if problem:
                    raise _err(path, f"push.{name}", f"'{repo}' is not a Hub repo id (namespace/name): {problem}")
                repos[name] = repo
        if len({r.lower() for r in repos.values()}) != len(repos):
            raise _err(path, "push", "two outputs are pushed to the same repo")
        push = PushSpec(repos)
        for k, (kind, what, nullable) in {"private": (bool, "true or false", False), "revision": (str, "a branch name", True),
                                           "create_pr": (bool, "true or false", False),
                                           "commit_message": (str, "a string", True), "endpoint": (str, "a URL", True)}.items():
            if k in p:
                setattr(push, k, _typed(path, f"push.{k}", p[k], kind, what, nullable=nullable))
        bmm = p.get("base_model_map") or {}
        if not isinstance(bmm, dict):
            raise _err(path, "push.base_model_map", "expected a mapping LOCAL: namespace/name")
        for local, hub_id in bmm.items():
            if not isinstance(hub_id, str) or not looks_like_hub_id(hub_id) or "@" in hub_id:
                raise _err(path, f"push.base_model_map.{local}", f"{hub_id!r} is not a Hub id (namespace/name)")
            push.base_model_map[str(local)] = hub_id
            # the key as written (matches the reference in a card) and resolved against the release file
            push.base_model_map[str(_local(base, str(local)).resolve())] = hub_id
    return Release(path, text, workdir, merge, quants, ev, push)


# ---------------------------------------------------------------------------------------------------
# hashing
# ---------------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def dir_fingerprint(folder: Path) -> str:
    """Cheap identity of a model directory that is not ours (a merge parent, `merge: {model:}`):
    small files hashed in full, weight files by size, mtime and safetensors header (see module doc)."""
    entries = {}
    for p in _files(folder):
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
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in _files(folder)}


def content_hash(files: dict[str, dict]) -> str:
    return sha256_json({k: v["sha256"] for k, v in files.items()})


def verify_output(folder: Path, files: dict[str, dict]) -> str | None:
    """None when ``folder`` holds exactly ``files`` (sizes first, then sha256); else what differs."""
    if not folder.is_dir():
        return "output missing"
    present = {p.relative_to(folder).as_posix(): p for p in _files(folder)}
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


def data_fingerprint(source: str) -> str:
    return source if source.startswith("hf:") else sha256_file(Path(source))


# ---------------------------------------------------------------------------------------------------
# manifest
# ---------------------------------------------------------------------------------------------------
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def read_manifest(workdir: Path) -> dict:
    p = workdir / MANIFEST
    if not p.exists():
        return {"format": MANIFEST_FORMAT, "steps": {}}
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


MAX_MANIFEST_BYTES = 64 * 2**20  # a manifest lists files by name and hash: a few KB per step


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


# ---------------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------------
@dataclass
class Step:
    id: str  # merge, quantize/NAME, eval, push/NAME
    kind: str
    name: str  # the output name (merge/quantize/push) or "eval"
    settings: dict  # recorded in the manifest (JSON)


@dataclass
class StepOutcome:
    id: str
    status: str  # "ran", "skipped"
    reason: str
    seconds: float = 0.0
    detail: dict = field(default_factory=dict)


@dataclass
class RunOptions:
    dry_run: bool = False
    force_steps: list[str] = field(default_factory=list)
    quiet: bool = False
    push_dry_run: bool = False
    fsync: bool = True


@dataclass
class ReleaseResult:
    workdir: Path
    outcomes: list[StepOutcome]
    results: dict | None = None  # eval results {output name: perplexity}
    plan_text: str | None = None  # dry run
    refusals: list[str] = field(default_factory=list)  # dry run: why the run would not start


def build_steps(rel: Release) -> list[Step]:
    steps = []
    if rel.merge.recipe is not None:
        steps.append(Step("merge", "merge", rel.merge.out, {"recipe": str(rel.merge.recipe), "out": rel.merge.out,
                                                           **rel.merge.options}))
    for q in rel.quantize:
        steps.append(Step(f"quantize/{q.name}", "quantize", q.name, dict(q.settings)))
    if rel.eval is not None:
        steps.append(Step("eval", "eval", "eval", dataclasses.asdict(rel.eval)))
    if rel.push is not None:
        for name, repo in rel.push.repos.items():
            opts = {k: v for k, v in dataclasses.asdict(rel.push).items() if k != "repos"}
            steps.append(Step(f"push/{name}", "push", name, {"repo": repo, **opts}))
    return steps


def resolve_force(steps: list[Step], names: list[str]) -> set[str]:
    ids = {s.id for s in steps}
    out = set()
    for n in names:
        if n in ids:
            out.add(n)
            continue
        producers = [s.id for s in steps if s.kind in ("merge", "quantize") and s.name == n]
        if producers:
            out.update(producers)
            continue
        raise ReleaseError(f"--force-step {n}: no such step" + suggestion(n, ids | {s.name for s in steps if s.kind != "eval"}))
    return out


class _Lock:
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
    :meth:`_Runner.claim`): only such a run can have left one, and created (or renamed: ctime) no
    earlier than that claim, so a look-alike folder that was there before is not taken for it.
    (``atomic_output_dir`` also marks its folders and removes stale marked ones of the same output
    itself; this check adds the workdir's own evidence and covers ``.old-*`` folders, which carry
    no marker.)"""
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


def _overlap(a: Path, b: Path) -> bool:
    """Writing or replacing one of ``a``/``b`` (resolved) would change the other."""
    return within(a, b) or within(b, a)


def _aside(path: Path) -> Path:
    """A free sibling name to keep an unrecorded ``path`` under when ``--force-step`` replaces it."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    candidates = (path.with_name(f"{path.name}.set-aside-{stamp}" + (f"-{i}" if i else "")) for i in range(1000))
    return next(c for c in candidates if not os.path.lexists(c))


def step_outputs(step: Step) -> list[str]:
    """What ``step`` writes in the workdir (names relative to it)."""
    if step.kind in ("merge", "quantize"):
        return [step.name]
    return [RESULTS_JSON, RESULTS_MD, RESULTS_PNG] if step.kind == "eval" else []


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


class _Runner:
    def __init__(self, rel: Release, opts: RunOptions, log: Callable[[str], None]):
        self.rel, self.opts, self.log = rel, opts, log
        self.wd = rel.workdir
        self.steps = build_steps(rel)
        self.force = resolve_force(self.steps, opts.force_steps)
        self._load_manifest()
        self.rebuilt: set[str] = set()  # dry run: outputs that would be rewritten (unknown new content)
        self._merge_plan = None

    # ---- inputs ------------------------------------------------------------------------------------
    def source_dir(self) -> Path:
        return self.rel.merge.model if self.rel.merge.model is not None else self.wd / self.rel.merge.out

    def source_identity(self) -> str | None:
        """Content hash of the model the quantizations read; None when it is not known yet (dry run)."""
        if self.rel.merge.model is not None:
            return dir_fingerprint(self.rel.merge.model)
        name = self.rel.merge.out
        rec = self.records.get("merge")
        if name in self.rebuilt or rec is None:
            return None
        return rec["content_hash"]

    def output_identity(self, name: str) -> str | None:
        if name == self.rel.merge.out and self.rel.merge.recipe is not None:
            return self.source_identity()
        step_id = f"quantize/{name}"
        rec = self.records.get(step_id)
        return None if rec is None or name in self.rebuilt else rec["content_hash"]

    def parent_dirs(self) -> dict[str, Path | None]:
        """{reference: local directory, or None for a Hub id} of every merge parent, resolved as the
        merge resolves them (as given, then relative to the recipe)."""
        from mergequant.recipe import load_recipe

        recipe = load_recipe(self.rel.merge.recipe)
        out = {}
        for ref in recipe.model_refs():
            p = Path(ref).expanduser()
            if not p.exists() and not p.is_absolute() and (recipe.path.parent / p).exists():
                p = recipe.path.parent / p
            out[ref] = p if p.is_dir() else None
        return out

    def parents(self) -> dict:
        return {ref: dir_fingerprint(p) if p is not None else f"hub:{ref}" for ref, p in self.parent_dirs().items()}

    def input_paths(self) -> list[tuple[str, Path, bool]]:
        """(what it is, path, is a model folder) for every local input of the release: nothing of
        these may be written to, replaced, or hold the workdir."""
        rel = self.rel
        out = [("the release file", rel.path, False)]
        if rel.merge.recipe is not None:
            out.append(("merge.recipe", rel.merge.recipe, False))
            out += [(f"merge parent {ref}", p, True) for ref, p in self.parent_dirs().items() if p is not None]
        else:
            out.append(("merge.model", rel.merge.model, True))
        out += [(f"quantize {q.name} calib", Path(q.settings["calib"]), False)
                for q in rel.quantize if q.settings.get("calib") and not q.settings["calib"].startswith("hf:")]
        if rel.eval is not None and not rel.eval.data.startswith("hf:"):
            out.append(("eval.data", Path(rel.eval.data), False))
        return out

    # ---- what the run may write -------------------------------------------------------------------
    def location_refusals(self) -> list[str]:
        """Why this release may not write where it would (empty when it may); fixed by editing the
        release file, never by --force-step. Checked before the workdir or its lock is created.

        Rule: the workdir is neither an input model folder nor inside one (its lock, manifest and
        outputs would be written into the model), and no step output is, contains or lies inside
        any input (file or folder): replacing the output would delete the input."""
        wd, inputs = self.wd.resolve(), [(what, p, p.resolve(), model) for what, p, model in self.input_paths()]
        if self.wd.exists() and not self.wd.is_dir():
            return [f"{self.rel.path}: workdir {self.wd} exists and is not a folder"]
        out = [f"{self.rel.path}: workdir {self.wd} is {'the' if wd == real else 'inside the'} input model folder {p} "
               f"({what}): nothing may be written there; choose a workdir outside every input"
               for what, p, real, model in inputs if model and within(wd, real)]
        if out:  # every output would be inside that input too: one refusal says it
            return out
        for step in self.steps:
            for name in step_outputs(step):
                target = (self.wd / name).resolve()
                out += [f"{self.rel.path}: {step.id} would write {self.wd / name}, which "
                        f"{'is' if target == real else 'overlaps'} the input {p} ({what}): rename the step or choose "
                        "another workdir" for what, p, real, _ in inputs if _overlap(target, real)]
        return out

    def _load_manifest(self) -> None:
        """Read the manifest, keeping a copy as it was: what earlier runs wrote stays ours for this whole
        run, even after a step's new record replaces the one that named it (merge.out renamed and a
        quantization given the old name)."""
        self.manifest = read_manifest(self.wd)
        self.records: dict = self.manifest["steps"]
        self.manifest_at_start = json.loads(json.dumps(self.manifest))

    def is_ours(self, name: str) -> bool:
        """Whether the workdir entry ``name`` was written by a run of this workdir (see
        :func:`recorded_outputs`) and is still a real folder or file, not a link put in its place,
        holding nothing but what that run recorded (see :meth:`foreign_files`)."""
        recorded = recorded_outputs(self.manifest) | recorded_outputs(self.manifest_at_start)
        return name in recorded and not (self.wd / name).is_symlink() and not self.foreign_files(name)

    def foreign_files(self, name: str) -> list[str]:
        """Files inside the recorded output folder ``name`` that no run of ours wrote there: a note a
        user added to a finished output, or a whole folder of theirs put at the name after the output
        was deleted. Redoing the step would delete them, so their presence makes the folder not ours.
        (An output claimed by an interrupted run has no file list yet: nothing to compare.)"""
        folder = self.wd / name
        recorded = next((rec.get("files") for rec in [*self.records.values(), *self.manifest_at_start["steps"].values()]
                         if isinstance(rec, dict) and rec.get("output") == name), None)
        if not isinstance(recorded, dict) or folder.is_symlink() or not folder.is_dir():
            return []
        return [p.relative_to(folder).as_posix() for p in _files(folder)
                if p.relative_to(folder).as_posix() not in recorded]

    def unrecorded(self) -> list[tuple[Step, Path]]:
        """(step, path) of every existing entry a step would replace that is not ours."""
        return [(step, self.wd / name) for step in self.steps for name in step_outputs(step)
                if os.path.lexists(self.wd / name) and not self.is_ours(name)]

    def unrecorded_refusal(self, step: Step, path: Path) -> str:
        extra = self.foreign_files(path.name)
        why = (f"holds {len(extra)} file(s) mergequant did not write there ({', '.join(extra[:3])}"
               f"{', ...' if len(extra) > 3 else ''})" if extra
               else f"exists but {self.wd / MANIFEST} has no record of mergequant writing it")
        return (f"{path} {why}: refusing to replace it (move it away, rename the step, or pass "
                f"--force-step {step.id} to keep it under another name)")

    def refusals(self) -> list[str]:
        """Everything that stops this run, before it writes anything (workdir and manifest as read now)."""
        # a misplaced output is fixed in the release file first; what it would replace matters after that
        return self.location_refusals() or [self.unrecorded_refusal(s, p) for s, p in self.unrecorded()
                                            if s.id not in self.force]

    def set_aside(self, step: Step) -> None:
        """--force-step on an output that is not ours: rename it out of the way (never delete it), and say so."""
        for s, path in self.unrecorded():
            if s is step:
                kept = _aside(path)
                os.rename(path, kept)
                self.log(f"[{step.id}] {path} was not written by mergequant: kept as {kept.name} (--force-step); "
                         "delete it yourself if it is not needed")

    def claim(self, step: Step) -> None:
        """Record in the manifest, before ``step`` writes anything, that it is writing its outputs.

        A run killed after an output is renamed into place but before its record is written leaves
        a finished output without a record; the claim is what lets the next run tell that folder
        (and the step's .partial/.old leftovers) from one a user put there."""
        names = step_outputs(step)
        if names:
            since = time.time_ns()
            self.manifest.setdefault(PENDING, {}).update({n: {"step": step.id, "since_ns": since} for n in names})
            write_manifest(self.wd, self.manifest)

    def clean_leftovers(self, step: Step) -> None:
        """Delete the temporary folders an interrupted run of ``step`` left, when verifiably ours; keep and report the rest."""
        for junk in leftovers(self.wd, step.name) if step.kind in ("merge", "quantize") else []:
            why = leftover_refusal(junk, step.name, self.manifest.get(PENDING, {}))
            if why is None:
                shutil.rmtree(junk)
                self.log(f"removed {junk.name} (left by an interrupted run)")
            else:
                self.log(f"kept {junk.name}: {why}; not verifiably left by mergequant, delete it yourself if it is")

    def inputs(self, step: Step) -> dict | None:
        """The input fingerprints of ``step``; None when an input is rebuilt first (dry run)."""
        rel = self.rel
        if step.kind == "merge":
            return {"recipe": sha256_file(rel.merge.recipe), "parents": self.parents()}
        if step.kind == "quantize":
            src = self.source_identity()
            if src is None:
                return None
            ins = {"source": src}
            if step.settings.get("calib"):
                ins["calib"] = data_fingerprint(step.settings["calib"])
            if rel.eval is not None:
                ins["eval_data"] = data_fingerprint(rel.eval.data)
                ins["eval_backend"] = rel.eval.backend
            return ins
        if step.kind == "eval":
            models = {}
            for name in self.eval_models():
                ident = self.output_identity(name) if name != "(model)" else self.source_identity()
                if ident is None:
                    return None
                models[name] = ident
            return {"models": models, "data": data_fingerprint(rel.eval.data)}
        if step.kind == "push":
            ident = self.output_identity(step.name)
            if ident is None:
                return None
            return {"folder": ident, "base_model_map": self.push_map(step.name), "dry_run": self.opts.push_dry_run}
        raise AssertionError(step.kind)

    def fingerprint(self, step: Step, inputs: dict) -> str:
        settings = {k: v for k, v in step.settings.items() if k not in NOT_FINGERPRINTED}
        if step.kind == "quantize":  # paths of data files do not matter, their content does
            settings.pop("calib", None)
        if step.kind in ("eval",):
            settings.pop("data", None)
        return sha256_json({"kind": step.kind, "settings": settings, "inputs": inputs})

    def eval_models(self) -> list[str]:
        first = self.rel.merge.out if self.rel.merge.recipe is not None else "(model)"
        return [first] + [q.name for q in self.rel.quantize]

    def model_dir(self, name: str) -> Path:
        return self.rel.merge.model if name == "(model)" else self.wd / name

    def push_map(self, name: str) -> dict[str, str]:
        mapping = dict(self.rel.push.base_model_map)
        src = self.rel.merge.out
        if name != src and self.rel.merge.recipe is not None and src in self.rel.push.repos:
            mapping[str(self.source_dir().resolve())] = self.rel.push.repos[src]  # the quant card points at the merge repo
        return dict(sorted(mapping.items()))

    # ---- decide ------------------------------------------------------------------------------------
    def decide(self, step: Step, *, verify: bool = True) -> tuple[bool, str, dict | None, str | None]:
        """(run?, reason, inputs, fingerprint)."""
        inputs = self.inputs(step)
        if inputs is None:
            why = "not done yet" if step.id not in self.records else "an input is rebuilt first; skipped then if it comes out identical"
            return True, why, None, None
        fp = self.fingerprint(step, inputs)
        rec = self.records.get(step.id)
        if step.id in self.force:
            return True, "forced (--force-step)", inputs, fp
        if rec is None:
            return True, "not done yet", inputs, fp
        if rec.get("fingerprint") != fp:
            return True, "inputs or settings changed: " + _changed(rec, step, inputs), inputs, fp
        if verify and step.kind in ("merge", "quantize"):
            bad = verify_output(self.wd / step.name, rec["files"])
            if bad:
                return True, f"output {step.name}: {bad}", inputs, fp
        if verify and step.kind == "eval":
            bad = _verify_files(self.wd, rec["files"])
            if bad:
                return True, bad, inputs, fp
        return False, "unchanged", inputs, fp

    # ---- execute -----------------------------------------------------------------------------------
    def run(self) -> ReleaseResult:
        _refuse(self.refusals())  # before the lock: a refused run creates nothing (not even the workdir)
        lock = _Lock(self.wd)
        try:
            self._load_manifest()  # again, now that no other run can be writing it
            _refuse(self.refusals())
            self.validate_quantizations()
            outcomes = []
            for step in self.steps:
                self.clean_leftovers(step)
                run, reason, inputs, fp = self.decide(step)
                if not run:
                    self.log(f"[{step.id}] skip ({reason})")
                    outcomes.append(StepOutcome(step.id, "skipped", reason, self.records[step.id].get("seconds", 0.0),
                                                self.records[step.id].get("result", {})))
                    continue
                if inputs is None:  # cannot happen in a real run: dependencies ran first
                    raise AssertionError(step.id)
                self.log(f"[{step.id}] run ({reason})")
                self.set_aside(step)
                self.claim(step)
                started, t0 = _now(), time.perf_counter()
                record = {"kind": step.kind, "settings": step.settings, "inputs": inputs, "fingerprint": fp,
                          "started": started}
                try:
                    record.update(getattr(self, f"_do_{step.kind}")(step))
                except BaseException:
                    self._drop_unused_claims(step)
                    raise
                record["finished"] = _now()
                record["seconds"] = round(time.perf_counter() - t0, 3)
                self.records[step.id] = record
                self.manifest["release"] = str(self.rel.path)
                self._unclaim(step)
                write_manifest(self.wd, self.manifest)
                self.log(f"[{step.id}] done in {record['seconds']:.1f} s")
                outcomes.append(StepOutcome(step.id, "ran", reason, record["seconds"], record.get("result", {})))
            results = self.records.get("eval", {}).get("result", {}).get("perplexity") if self.rel.eval else None
            return ReleaseResult(self.wd, outcomes, results)
        finally:
            lock.release()

    def _drop_unused_claims(self, step: Step) -> None:
        """After a step failed or was interrupted (exception, Ctrl-C, SIGTERM), drop its claims on outputs
        that do not exist: the writer cleaned up and renamed nothing into place, so nothing there is
        ours, and a folder a user puts at that name later must be refused, not replaced. A claim whose
        output exists stays (the rename happened, the record did not). Only a SIGKILL, which runs no
        code, can leave a claim on a missing output."""
        pending = self.manifest.get(PENDING, {})
        gone = [n for n in step_outputs(step) if n in pending and not os.path.lexists(self.wd / n)]
        if gone:
            self._release_claims(gone)
            with contextlib.suppress(OSError):  # already failing: keep the first error
                write_manifest(self.wd, self.manifest)

    def _unclaim(self, step: Step) -> None:
        self._release_claims(step_outputs(step))

    def _release_claims(self, names) -> None:
        """Remove ``names`` from the manifest's claims (in memory; the caller writes it)."""
        pending = self.manifest.get(PENDING, {})
        for name in names:
            pending.pop(name, None)
        if not pending:
            self.manifest.pop(PENDING, None)

    def _record_output(self, name: str) -> dict:
        files = output_files(self.wd / name)
        return {"output": name, "files": files, "content_hash": content_hash(files)}

    def _do_merge(self, step: Step) -> dict:
        from mergequant.merge.run import MergeOptions, run_merge

        opts = MergeOptions(out=self.wd / step.name, force=True, quiet=self.opts.quiet, fsync=self.opts.fsync,
                            **self.rel.merge.options)
        res = run_merge(self.rel.merge.recipe, opts, log=self.log)
        return {**self._record_output(step.name),
                "result": {"tensors": res.tensors, "bytes_written": res.bytes_written, "warnings": res.warnings}}

    def _do_quantize(self, step: Step) -> dict:
        from mergequant.quant.quantize import QuantizeOptions, run_quantize

        opts = QuantizeOptions(out=self.wd / step.name, force=True, quiet=self.opts.quiet, fsync=self.opts.fsync,
                               eval_data=self.rel.eval.data if self.rel.eval else None,
                               eval_backend=self.rel.eval.backend if self.rel.eval else "auto", **step.settings)
        res = run_quantize(self.source_dir().resolve(), opts, log=self.log)
        return {**self._record_output(step.name),
                "result": {"modules": res.modules, "fallbacks": res.fallbacks, "calib_tokens": res.calib_tokens,
                           "perplexity": res.perplexity}}

    def _do_eval(self, step: Step) -> dict:
        from mergequant.evaluate import evaluate_model

        ev = self.rel.eval
        table = {}
        for name in self.eval_models():
            res = evaluate_model(str(self.model_dir(name)), ev.data, seqlen=ev.seqlen, stride=ev.stride, device=ev.device,
                                 max_tokens=ev.max_tokens, progress=not self.opts.quiet, backend=ev.backend)
            table[name] = res.as_dict()
            self.log(f"  {name}: perplexity {res.perplexity:.4f} over {res.tokens} tokens")
        plotted = self._write_plot(ev, table)
        write_atomic(self.wd / RESULTS_JSON, json.dumps({"data": ev.data, "models": table}, indent=2) + "\n")
        write_atomic(self.wd / RESULTS_MD, results_markdown(ev, table, self.wd, self.model_dir)
                     + (f"\n![held-out perplexity and size per model]({RESULTS_PNG})\n" if plotted else ""))
        names = (RESULTS_JSON, RESULTS_MD) + ((RESULTS_PNG,) if plotted else ())
        files = {n: {"size": (self.wd / n).stat().st_size, "sha256": sha256_file(self.wd / n)} for n in names}
        return {"files": files, "result": {"perplexity": {k: v["perplexity"] for k, v in table.items()}}}

    def _write_plot(self, ev: EvalSpec, table: dict) -> bool:
        """results.png (perplexity and size per model) next to results.md; without matplotlib a one-line
        note, and a results.png of an earlier run of ours is removed (it would describe other results)."""
        from mergequant.evaluate import data_labels
        from mergequant.plot import PlotUnavailable, plot_results

        label = data_labels([ev.data])[0][0]
        try:
            plot_results({n: {"perplexity": {label: r["perplexity"]},
                              "bytes": sum(p.stat().st_size for p in _files(self.model_dir(n))) if self.model_dir(n).is_dir() else 0}
                          for n, r in table.items()}, self.wd / RESULTS_PNG, title=f"held-out perplexity on {Path(ev.data).name}")
            return True
        except PlotUnavailable as e:
            self.log(f"note: {e}; no {RESULTS_PNG} written")
            if (self.wd / RESULTS_PNG).is_file() and self.is_ours(RESULTS_PNG):
                os.unlink(self.wd / RESULTS_PNG)
            return False

    def plot_for_push(self) -> Path | None:
        """The eval step's results.png, attached to every push (uploaded beside the weights, shown in the card)."""
        rec = self.records.get("eval")
        return self.wd / RESULTS_PNG if isinstance(rec, dict) and RESULTS_PNG in rec.get("files", {}) else None

    def _do_push(self, step: Step) -> dict:
        from mergequant.hub import PushOptions, describe_plan, push, summary

        p = self.rel.push
        opts = PushOptions(repo=p.repos[step.name], private=p.private, revision=p.revision, create_pr=p.create_pr,
                           commit_message=p.commit_message, endpoint=p.endpoint, dry_run=self.opts.push_dry_run,
                           base_model_map=self.push_map(step.name), plot=self.plot_for_push())
        res = push(self.wd / step.name, opts, log=self.log)
        if self.opts.push_dry_run:
            lines = describe_plan(res).splitlines()
            self.log("\n".join("  " + ln for ln in (lines[:1] if self.opts.quiet else lines)))
            return {"result": {"dry_run": True, "repo": res.repo, "files": len(res.files), "bytes": res.total_bytes}}
        self.log("  " + summary(res))
        return {"result": {"dry_run": False, "repo": res.repo, "commit_url": res.commit_url, "pr_url": res.pr_url,
                           "changed": res.changed}}

    # ---- planning ----------------------------------------------------------------------------------
    def merge_plan(self):
        if self._merge_plan is None:
            from mergequant.merge.plan import build_plan, open_models
            from mergequant.recipe import load_recipe

            recipe = load_recipe(self.rel.merge.recipe)
            o = self.rel.merge.options
            self._merge_plan = build_plan(recipe, open_models(recipe), out_dtype=o.get("out_dtype"),
                                          allow_vocab_mismatch=o.get("allow_vocab_mismatch", False),
                                          mergekit_dtype=o.get("mergekit_dtype", False))
        return self._merge_plan

    def source_shapes(self):
        """(config, {name: info with .shape/.dtype}) of the model the quantizations read, without running the merge."""
        from mergequant.io.checkpoint import Checkpoint

        src = self.source_dir()
        rec = self.records.get("merge")
        if self.rel.merge.model is not None:
            ck = Checkpoint.open(src)
            return ck.config, ck.tensors
        if (rec is not None and (src / "config.json").is_file() and self.decide(self.steps[0], verify=False)[0] is False
                and rec.get("files", {}).get("config.json", {}).get("sha256") == sha256_file(src / "config.json")):
            try:
                ck = Checkpoint.open(src)
                return ck.config, ck.tensors
            except MergeQuantError:
                pass  # a damaged merge output: the merge step finds it (verify) and redoes it; plan from the recipe
        plan = self.merge_plan()
        config = dict(plan.checkpoints[plan.ref_model].config)
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(config.get(key), int):
                config[key] = plan.num_layers_out
        return config, {t.name: SimpleNamespace(shape=tuple(t.shape), dtype=t.out_dtype) for t in plan.tensors}

    def validate_quantizations(self) -> dict:
        """Check every quantization's settings against the source shapes before any step runs;
        returns {name: (QuantizeOptions, method, linears)}."""
        if not self.rel.quantize:
            return {}
        from mergequant.quant.quantize import (QuantizeOptions, check_moe_options, find_linears,
                                               quantizable_architecture, validate)

        config, tensors = self.source_shapes()
        stand_in = SimpleNamespace(tensors=tensors, path=self.source_dir(), architecture=(config.get("architectures") or ["?"])[0],
                                   config=config)
        out = {}
        for q in self.rel.quantize:
            opts = QuantizeOptions(out=self.wd / q.name, **q.settings)
            try:
                arch = quantizable_architecture(stand_in, opts.method)
                check_moe_options(opts, arch)
                linears = find_linears(stand_in, arch, opts.moe_names)  # MoE: output names follow moe_names
                method = validate(opts, linears)
            except MergeQuantError as e:
                raise ReleaseError(f"{self.rel.path}: quantize {q.name}: {e}") from None
            out[q.name] = (opts, method, linears, stand_in)
        return out




def _refuse(refusals: list[str], where: str = "see --dry-run") -> None:
    """Raise the first refusal as one line (the dry run lists them all)."""
    if refusals:
        more = f" (and {len(refusals) - 1} more refusal(s): {where})" if len(refusals) > 1 else ""
        raise ReleaseError(refusals[0] + more)


def _verify_files(folder: Path, files: dict) -> str | None:
    for rel, rec in files.items():
        p = folder / rel
        if not p.is_file() or p.stat().st_size != rec["size"] or sha256_file(p) != rec["sha256"]:
            return f"{rel} missing or changed"
    return None


def _changed(rec: dict, step: Step, inputs: dict) -> str:
    what = []
    old_s, old_i = rec.get("settings", {}), rec.get("inputs", {})
    for k in sorted(set(old_s) | set(step.settings)):
        if old_s.get(k) != step.settings.get(k):
            what.append(k)
    for k in sorted(set(old_i) | set(inputs)):
        if old_i.get(k) != inputs.get(k):
            what.append(k)
    return ", ".join(what) or "fingerprint"


def results_markdown(ev: EvalSpec, table: dict, wd: Path, model_dir) -> str:
    from mergequant.units import format_bytes

    lines = ["# Held-out perplexity\n", f"Data: `{ev.data}`, windows of {ev.seqlen} tokens"
             + (f", stride {ev.stride}" if ev.stride else "") + ".\n", "| model | perplexity | tokens | size |", "|---|--:|--:|--:|"]
    for name, r in table.items():
        d = model_dir(name)
        size = sum(p.stat().st_size for p in _files(d)) if d.is_dir() else 0
        lines.append(f"| {name} | {r['perplexity']:.4f} | {r['tokens']} | {format_bytes(size)} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# memory and disk estimates (dry run)
# ---------------------------------------------------------------------------------------------------
def _free_bytes(path: Path) -> int:
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def dry_run(rel: Release, opts: RunOptions) -> ReleaseResult:
    """Print what a run would do: each step with run/skip and why, disk needed vs free, peak memory,
    and what each push would upload. Writes nothing (no workdir, no manifest, no cleanup)."""
    from mergequant.io.writer import plan_shards
    from mergequant.merge.run import estimate_peak_bytes
    from mergequant.quant.quantize import planned_tensors
    from mergequant.units import format_bytes

    r = _Runner(rel, opts, log=lambda m: None)
    quants = r.validate_quantizations()
    lines = [f"release {rel.path}", f"workdir {rel.workdir}" + ("" if rel.workdir.exists() else " (created on the first run)")]
    refusals = r.refusals()
    lines += [f"REFUSED: {why}" for why in refusals]
    pending = r.manifest.get(PENDING, {})
    junk = [(p.name, leftover_refusal(p, s.name, pending)) for s in r.steps if s.kind in ("merge", "quantize")
            for p in leftovers(rel.workdir, s.name)]
    if any(why is None for _, why in junk):
        lines.append(f"leftovers of an interrupted run (removed by the next run): {', '.join(n for n, why in junk if why is None)}")
    lines += [f"kept by the next run (not verifiably left by mergequant): {n}: {why}" for n, why in junk if why is not None]
    refused_steps = {s.id for s, _ in r.unrecorded() if s.id not in r.force}
    forced_aside = {s.id: p for s, p in r.unrecorded() if s.id in r.force}
    need = 0
    outcomes = []
    sizes: dict[str, int] = {}
    for step in r.steps:
        run, reason, _, _ = r.decide(step)
        status = "run " if run else "skip"
        extra = ""
        if step.kind == "merge":
            if run:
                from mergequant.io.writer import PlannedTensor

                plan = r.merge_plan()
                o = rel.merge.options
                shards = plan_shards([PlannedTensor(t.name, t.out_dtype, t.shape) for t in plan.tensors], o.get("shard_size", 5 * 10**9))
                sizes[step.name] = sum(s.file_size for s in shards)
                extra = (f"; writes ~{format_bytes(sizes[step.name])}, reads {format_bytes(plan.bytes_to_read)}, peak memory "
                         f"~{format_bytes(estimate_peak_bytes(plan, o.get('workers', 2)))} + ~0.2 GiB (inputs memory-mapped)")
                r.rebuilt.add(step.name)
            else:
                sizes[step.name] = sum(f["size"] for f in r.records["merge"]["files"].values())
        elif step.kind == "quantize":
            qopts, method, linears, stand_in = quants[step.name]
            if run:
                shards = plan_shards(planned_tensors(stand_in, linears, method, qopts), qopts.shard_size)
                sizes[step.name] = sum(s.file_size for s in shards)
                from mergequant.architectures import architecture_for
                from mergequant.quant.quantize import estimate_peak_bytes

                peak = estimate_peak_bytes(stand_in.config, stand_in.tensors, linears, qopts, method,
                                           architecture_for(stand_in.config))
                extra = f"; writes ~{format_bytes(sizes[step.name])}, peak memory ~{format_bytes(peak)} + the interpreter"
                r.rebuilt.add(step.name)
            else:
                sizes[step.name] = sum(f["size"] for f in r.records[step.id]["files"].values())
        elif step.kind == "eval":
            extra = f"; {len(r.eval_models())} model(s) on {rel.eval.data}, windows of {rel.eval.seqlen}"
        elif step.kind == "push":
            repo = rel.push.repos[step.name]
            mode = "print the plan (--push-dry-run)" if opts.push_dry_run else "upload"
            if run and (rel.workdir / step.name).is_dir() and step.name not in r.rebuilt:
                from mergequant.hub import PushOptions, plan_push

                plan = plan_push(rel.workdir / step.name, PushOptions(repo=repo, dry_run=True, base_model_map=r.push_map(step.name),
                                                                      plot=r.plot_for_push()))
                extra = f"; {mode} {len(plan.files)} file(s), {format_bytes(plan.total_bytes)} to {repo}"
            else:
                extra = f"; {mode} ~{format_bytes(sizes.get(step.name, 0))} to {repo}"
        if run and step.kind in ("merge", "quantize"):
            need += sizes[step.name]
        if step.id in forced_aside:
            extra += f"; {forced_aside[step.id]} is not mergequant's: kept under another name first (--force-step)"
        if step.id in refused_steps:
            status, reason = "REFUSED", "an existing output is not mergequant's: see REFUSED above"
        lines.append(f"  {status} {step.id:<28} ({reason}){extra}")
        outcomes.append(StepOutcome(step.id, "would run" if run else "would skip", reason))
    free = _free_bytes(rel.workdir)
    lines.append(f"disk: ~{format_bytes(need)} to write, {format_bytes(free)} free under {rel.workdir}"
                 + ("" if need <= free else "  NOT ENOUGH SPACE"))
    text = "\n".join(lines)
    return ReleaseResult(rel.workdir, outcomes, plan_text=text, refusals=refusals)


def run_release(path: str | Path, opts: RunOptions | None = None, log: Callable[[str], None] = print) -> ReleaseResult:
    """Load, validate and run (or, with ``opts.dry_run``, plan) the release file at ``path``."""
    opts = opts or RunOptions()
    rel = load_release(path)
    if opts.dry_run:
        res = dry_run(rel, opts)
        log(res.plan_text)
        _refuse(res.refusals, "listed above")  # the plan says why; the exit status says that the run would not go ahead
        return res
    return _Runner(rel, opts, log).run()


def summary_table(res: ReleaseResult) -> str:
    """One line per step: status, seconds, and the perplexity when measured."""
    ppl = res.results or {}
    lines = [f"{'step':<28} {'status':<8} {'seconds':>8}  perplexity"]
    for o in res.outcomes:
        name = o.id.split("/", 1)[1] if "/" in o.id else None
        p = ppl.get(name) if o.id.startswith("quantize/") else (next(iter(ppl.values()), None) if o.id == "merge" else None)
        lines.append(f"{o.id:<28} {o.status:<8} {o.seconds:>8.1f}  {'' if p is None else f'{p:.4f}'}")
    return "\n".join(lines)
