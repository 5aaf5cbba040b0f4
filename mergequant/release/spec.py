"""The release file: parsed and validated up front, before anything runs (pure, no model is opened).

:func:`parse_release` turns YAML text into a :class:`Release`: unknown keys are rejected with a
suggestion, every message names the file and the key, paths are made absolute (relative to the
release file), sizes are parsed to bytes. The same rules as the single commands apply (merge options
via ``check_merge_options``, eval options via ``check_eval_options``, quantization keys are the fields
of ``QuantizeOptions``), so a release file never accepts what ``mergequant merge``/``quantize``/``eval``
would refuse. Checking quantization options against the model's shapes needs the model (or the merge
plan) and happens later, in the runner (:mod:`mergequant.release.shapes`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergequant.errors import MergeQuantError, suggestion
from mergequant.release.layout import MANIFEST, NAME_RE, RESULTS_JSON, RESULTS_MD, ReleaseError

TOP_KEYS = {"workdir", "merge", "quantize", "eval", "push"}
MERGE_KEYS = {"recipe", "model", "out", "shard_size", "out_dtype", "seed", "device", "workers",
              "allow_vocab_mismatch", "mergekit_dtype", "moe_layout"}
# QuantizeOptions fields a release does not set per quantization (the runner decides them).
QUANT_RESERVED = {"out", "force", "quiet", "fsync", "eval_data"}
EVAL_KEYS = {"data", "seqlen", "stride", "max_tokens", "device", "backend"}
PUSH_OPTION_KEYS = {"private", "revision", "create_pr", "commit_message", "endpoint", "base_model_map"}


@dataclass
class MergeSpec:
    recipe: Path | None  # absolute; None with `model:`
    # an existing model to quantize (no merge step): its folder (absolute), or for a model with a LoRA adapter
    # (BASE+ADAPTER, an adapter-only folder) the reference open_model reads, local sides made absolute (str)
    model: Path | str | None
    out: str  # output name (directory under workdir) of the merge
    options: dict  # MergeOptions keyword arguments (shard_size already in bytes)

    @property
    def adapted(self) -> bool:
        """Whether ``model`` is a model with a LoRA adapter (a reference, read through the adapted view)."""
        return isinstance(self.model, str)


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


def _gguf_types(path: Path, where: str, value: Any) -> list[str]:
    """``gguf_types``: a list (or one name) of GGUF file types, normalized as ``--gguf-type`` is (upper case, in
    order, deduplicated); an unknown type is one line naming the key."""
    from mergequant.gguf.mixes import FILE_TYPES

    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(t, str) for t in items):
        raise _err(path, where, f"expected a list of GGUF types like [Q4_K_M, Q8_0], got {value!r}")
    out: list[str] = []
    for t in items:
        u = t.strip().upper()
        if u not in FILE_TYPES:
            raise _err(path, where, f"unknown GGUF type '{t}'" + suggestion(u, set(FILE_TYPES)).replace(" (allowed:", " (supported:"))
        if u not in out:
            out.append(u)
    return out


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


def _model_source(path: Path, value: str) -> Path | str:
    """``merge.model``: a model folder (absolute Path, as before), or a model with a LoRA adapter as the reference
    :func:`mergequant.peft.adapted.open_model` reads (str): ``BASE+ADAPTER`` with each local side made absolute
    (relative to the release file; a side that is not a local path is a Hub id), or an adapter-only folder
    (its base from ``base_model_name_or_path``). Checks the syntax and that local sides exist; the adapter
    itself is opened (and refused in one line if it does not fit) by the runner before anything is written."""
    from mergequant.peft.config import ADAPTER_CONFIG
    from mergequant.peft.reference import parse_reference
    from mergequant.io.resolve import looks_like_hub_id

    where = "merge.model"
    local = _local(path.parent, value)
    ref = None
    if not local.exists() and "+" in value:  # an existing path is that path, even with a '+' in its name
        try:
            ref = parse_reference(value, base_dir=path.parent)
        except MergeQuantError as e:  # BASE+ / +ADAPTER / A+B+C: the recipe's wording
            raise _err(path, where, str(e)) from None
    if ref is None or ref.adapter is None:
        if (local / "config.json").is_file():
            return local.resolve()
        if (local / ADAPTER_CONFIG).is_file():  # an adapter-only folder
            return str(local.resolve())
        raise _err(path, where, f"not a model directory (no config.json): {local}"
                   + (f" (nor a LoRA adapter: no {ADAPTER_CONFIG})" if local.is_dir() else ""))
    sides = []
    for role, side in (("base", ref.base), ("adapter", ref.adapter)):
        p = _local(path.parent, side)
        if p.exists():
            sides.append(str(p.resolve()))
        elif looks_like_hub_id(side):
            sides.append(side)
        else:
            raise _err(path, where, f"{value}: the {role} {p} does not exist (nor is {side!r} a Hub id namespace/name)")
    return "+".join(sides)


def load_release(path: str | Path) -> Release:
    """Read (bounded, see :mod:`mergequant.yaml_file`) and validate the release file at ``path``."""
    from mergequant.yaml_file import read_yaml_text

    path = Path(path)
    return parse_release(read_yaml_text(path, "release", ReleaseError), path)


def parse_release(text: str, path: Path = Path("<release>")) -> Release:
    """Validate a release file. Paths in it are relative to the file's folder. Checks that the files
    it names exist, nothing else (no model is opened)."""
    from mergequant.hub import repo_id_problem
    from mergequant.quant.method import METHODS
    from mergequant.io.resolve import looks_like_hub_id
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
        model = _model_source(path, _typed(path, "merge.model", m["model"], str, "a model directory"))
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
        if method not in METHODS and method != "gguf":  # gguf: llama.cpp files, its own driver (mergequant.gguf)
            raise _err(path, f"{where}.method", f"unknown method '{method}'"
                       + suggestion(method, set(METHODS) | {"gguf"}).replace(" (allowed:", " (supported:"))
        settings: dict = {}
        for k, v in q.items():
            if k == "name":
                continue
            w = f"{where}.{k}"
            if k == "shard_size":
                settings[k] = _size(path, w, v)
            elif k == "gguf_types":
                settings[k] = _gguf_types(path, w, v)
            elif k == "calib":
                settings[k] = _data_source(path, w, v)
            else:
                kind, what, nullable = _field_kind(fields[k])
                settings[k] = _typed(path, w, v, kind, what, nullable=nullable)
        if method == "gguf" and not settings.get("gguf_types"):
            raise _err(path, f"{where}.gguf_types", "missing: method gguf needs the GGUF file types, "
                       "e.g. gguf_types: [Q4_K_M, Q8_0]")
        if method != "gguf" and "gguf_types" in settings:
            raise _err(path, f"{where}.gguf_types", f"only applies to method gguf (this quantization is {method})")
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
