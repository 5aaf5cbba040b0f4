"""Reading a PEFT adapter folder: ``adapter_config.json`` validated, its weights opened, per-module facts.

An adapter is applied by mergequant without peft installed, so every key that changes the arithmetic is
read and checked here, and every key that asks for arithmetic mergequant does not do is refused with one
line naming it (a silently ignored key would give a model that is not the one the adapter describes).

Facts (peft 0.21, checked against its ``merge_and_unload`` in tests/test_peft_inputs.py):

- module names are the transformers model's module paths (``model.layers.0.self_attn.q_proj``); the weight
  file prefixes them with ``base_model.model.``;
- ``target_modules``: a list matches a module whose name equals an entry or ends with ``.entry``; a string
  is a regular expression matched against the whole name; ``exclude_modules`` the same way, and wins;
  modules in ``modules_to_save`` are never LoRA targets; ``layers_to_transform`` keeps targets whose first
  numbered segment after ``layers_pattern`` (default: any) is one of the listed indices;
- ``rank_pattern`` / ``alpha_pattern``: the first key ``k`` (in file order) with ``re.match((.*\\.)?(k)$,
  name)`` gives that module's r / alpha;
- scale ``s = alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.

This reader is shared: anything that reads adapters (applying them here, or tools that write them) should
use :func:`read_adapter` so that they accept and refuse the same adapters.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from mergequant.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
SAVED_PREFIX = "base_model.model."

# peft types with other arithmetic than LoRA's (named in the refusal so the user knows what it was)
SUPPORTED_TYPES = ("LORA",)

# config keys whose non-default value asks for something mergequant does not compute: key -> why
UNSUPPORTED_OPTIONS = {
    "layer_replication": "layer_replication changes the model's layer structure",
    "trainable_token_indices": "trainable_token_indices (trainable token rows) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies only after its invocation tokens "
                               "and cannot be merged into the weights",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "megatron_config": "Megatron-parallel LoRA (megatron_config) is not supported",
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of ``adapter_config.json`` that decide the arithmetic, validated."""

    path: Path  # the adapter folder
    peft_type: str
    base_model: str | None  # base_model_name_or_path (with "@revision" when the config has one)
    r: int
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    lora_bias: bool = False
    layers_to_transform: list[int] | None = None
    layers_pattern: list[str] | None = None
    target_parameters: list[str] | None = None

    # ---- per module ----------------------------------------------------------------------------------
    def rank_alpha(self, module: str) -> tuple[int, float]:
        """(r, alpha) of ``module``: the first matching ``rank_pattern`` / ``alpha_pattern`` key, else the defaults."""
        r = next((v for k, v in self.rank_pattern.items() if _pattern_matches(k, module)), self.r)
        alpha = next((v for k, v in self.alpha_pattern.items() if _pattern_matches(k, module)), self.lora_alpha)
        return r, alpha

    def scale(self, module: str) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) for ``module``."""
        r, alpha = self.rank_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, module: str) -> bool:
        """Whether peft would put a LoRA layer on ``module`` (see the module docstring for the rules)."""
        if _listed(self.exclude_modules, module):
            return False
        if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in self.modules_to_save):
            return False
        if self.target_modules is None:
            return False
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module) is not None
        if module in self.target_modules:
            return True
        if not any(module.endswith(f".{t}") for t in self.target_modules):
            return False
        if self.layers_to_transform is None:
            return True
        return layer_index(module, self.layers_pattern) in self.layers_to_transform

    def describe(self) -> str:
        """A short description for logs and cards: ``LoRA r=16 alpha=32 (rsLoRA, DoRA)``."""
        extras = [x for x, on in (("rsLoRA", self.use_rslora), ("DoRA", self.use_dora),
                                  ("rank/alpha patterns", bool(self.rank_pattern or self.alpha_pattern))) if on]
        alpha = int(self.lora_alpha) if float(self.lora_alpha).is_integer() else self.lora_alpha
        return f"LoRA r={self.r} alpha={alpha}" + (f" ({', '.join(extras)})" if extras else "")


def _pattern_matches(key: str, module: str) -> bool:
    try:
        return re.match(rf"(.*\.)?({key})$", module) is not None
    except re.error:
        return False  # refused when the config is read; never reached


def _listed(spec: list[str] | str | None, module: str) -> bool:
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return module in spec or any(module.endswith(f".{k}") for k in spec)


def layer_index(module: str, layers_pattern: list[str] | None) -> int | None:
    """The first numbered segment of ``module`` (after one of ``layers_pattern`` when given), as peft finds it."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        m = None
        for p in layers_pattern:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
            if m:
                break
    return int(m.group("idx")) if m else None


# ---- reading ---------------------------------------------------------------------------------------------
def is_adapter_dir(path: Path) -> bool:
    """A folder holding a PEFT adapter (``adapter_config.json``) and no full model (``config.json``)."""
    path = Path(path)
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").exists()


def read_adapter_config(folder: Path) -> AdapterConfig:
    """``folder``'s adapter_config.json, validated: unsupported types and options refused (one line naming the key)."""
    folder = Path(folder)
    where = folder / ADAPTER_CONFIG
    if not where.is_file():
        why = "is a full model (config.json), not an adapter" if (folder / "config.json").is_file() else "is not a PEFT adapter"
        raise CheckpointError(f"{folder}: no {ADAPTER_CONFIG} ({folder.name or folder} {why})")
    from mergequant.io.model_files import load_json_file

    raw = load_json_file(where, "JSON file")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: expected a JSON object")

    def bad(key: str, want: str) -> CheckpointError:
        return CheckpointError(f"{where}: {key} must be {want}, found {json.dumps(raw.get(key))[:60]}")

    ptype = raw.get("peft_type")
    if not isinstance(ptype, str):
        raise bad("peft_type", "a string such as \"LORA\"")
    if ptype.upper() not in SUPPORTED_TYPES:
        raise CheckpointError(f"{where}: peft_type {ptype} is not supported (mergequant applies LoRA adapters only: "
                              "IA3, LoHa, LoKr, AdaLoRA, ... need their own arithmetic)")
    for key, why in UNSUPPORTED_OPTIONS.items():
        if raw.get(key) not in (None, False, [], {}):
            raise CheckpointError(f"{where}: {why}")
    bias = raw.get("bias", "none")
    if bias not in ("none", None):
        raise CheckpointError(f"{where}: bias {bias!r} (trained base biases) is not supported; only \"none\"")

    r = raw.get("r", 8)
    if not _is_int(r) or r < 1:
        raise bad("r", "a positive integer")
    alpha = raw.get("lora_alpha", 8)
    if not _is_number(alpha):
        raise bad("lora_alpha", "a finite number")
    flags = {}
    for key in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"):
        v = raw.get(key, False)
        if v is None:
            v = False
        if not isinstance(v, bool):
            raise bad(key, "true or false")
        flags[key] = v

    def names(key: str, allow_str: bool) -> list[str] | str | None:
        v = raw.get(key)
        if v is None:
            return None
        if isinstance(v, str) and allow_str:
            try:
                re.compile(v)
            except re.error as e:
                raise CheckpointError(f"{where}: {key} is not a valid regular expression ({e})") from None
            return v
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return list(v)
        raise bad(key, "a list of module names" + (" or a regular expression" if allow_str else ""))

    def pattern(key: str, check, want: str) -> dict:
        v = raw.get(key) or {}
        if not isinstance(v, dict):
            raise bad(key, "an object (module pattern -> value)")
        for k, val in v.items():
            if not check(val):
                raise CheckpointError(f"{where}: {key}[{k!r}] must be {want}, found {json.dumps(val)[:40]}")
            try:
                re.compile(k)
            except re.error as e:
                raise CheckpointError(f"{where}: {key} key {k!r} is not a valid regular expression ({e})") from None
        return dict(v)

    layers = raw.get("layers_to_transform")
    if _is_int(layers):
        layers = [layers]
    if layers is not None and not (isinstance(layers, list) and all(_is_int(x) for x in layers)):
        raise bad("layers_to_transform", "a layer index or a list of them")
    lpat = raw.get("layers_pattern")
    if isinstance(lpat, str):
        lpat = [lpat]
    if lpat is not None and not (isinstance(lpat, list) and all(isinstance(x, str) for x in lpat)):
        raise bad("layers_pattern", "a string or a list of strings")
    base = raw.get("base_model_name_or_path")
    if base is not None and (not isinstance(base, str) or not base.strip()):
        raise bad("base_model_name_or_path", "a model path or Hub id")
    rev = raw.get("revision")
    if base and isinstance(rev, str) and rev.strip() and "@" not in base:
        base = f"{base}@{rev.strip()}"
    return AdapterConfig(
        path=folder, peft_type=ptype.upper(), base_model=base, r=r, lora_alpha=alpha,
        target_modules=names("target_modules", True), exclude_modules=names("exclude_modules", True),
        rank_pattern=pattern("rank_pattern", lambda v: _is_int(v) and v > 0, "a positive integer"),
        alpha_pattern=pattern("alpha_pattern", _is_number, "a finite number"),
        modules_to_save=names("modules_to_save", False) or [],
        layers_to_transform=layers, layers_pattern=lpat or None,
        target_parameters=names("target_parameters", False), **flags)


# peft wraps a module's targeted parameters in the order the module registers them, the first innermost (its
# factors are saved under ``<module>.base_layer.lora_*``); transformers 5's fused experts register these two so
PARAMETER_ORDER = ("gate_up_proj", "down_proj")


def parameters_of(cfg: AdapterConfig, module: str) -> list[str]:
    """The parameter names of ``module`` that ``target_parameters`` selects (an entry matches ``module.param``
    whole or as a dotted suffix, as peft matches it), innermost wrapper first (see :data:`PARAMETER_ORDER`)."""
    out = []
    for p in cfg.target_parameters or []:
        mod, _, param = p.rpartition(".")
        if param and (module == mod or module.endswith(f".{mod}") or not mod) and param not in out:
            out.append(param)
    known = [p for p in PARAMETER_ORDER if p in out]
    return known + [p for p in out if p not in known]


def adapter_weights_file(folder: Path) -> Path:
    """The adapter's weight file: safetensors first, else ``adapter_model.bin`` (loaded with weights_only)."""
    for name in (ADAPTER_SAFETENSORS, ADAPTER_BIN):
        p = Path(folder) / name
        if p.exists() or p.is_symlink():
            return p
    raise CheckpointError(f"{folder}: no adapter weights ({ADAPTER_SAFETENSORS} or {ADAPTER_BIN})")


def load_adapter_tensors(folder: Path) -> dict:
    """name -> tensor of the adapter's weight file (small: read whole). Safetensors through mergequant's
    header-checked reader; ``.bin`` only through ``torch.load(weights_only=True)`` (no code runs)."""
    from mergequant.io.checkpoint import _load_bin, _SafetensorsFile
    from mergequant.io.resolve import containment_root

    fpath = adapter_weights_file(folder)
    try:
        real = fpath.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{fpath}: cannot resolve: {e}") from None
    if not real.is_relative_to(containment_root(Path(folder))):
        raise CheckpointError(f"{fpath}: a symlink to {real}, outside the adapter folder; refusing to read it")
    if not real.is_file():
        raise CheckpointError(f"{fpath}: not a regular file")
    if fpath.name.endswith(".safetensors"):
        f = _SafetensorsFile(fpath)
        return {name: f.get(name) for name in f.entries}
    return dict(_load_bin(fpath))


@dataclass
class ModuleLora:
    """One adapted module's saved tensors (None when absent)."""

    module: str
    A: object = None  # lora_A.weight [r, in] or lora_embedding_A [r, vocab]
    B: object = None  # lora_B.weight [out, r] or lora_embedding_B [dim, r]
    bias: object = None  # lora_B.bias [out] (lora_bias)
    magnitude: object = None  # lora_magnitude_vector [out] (DoRA)
    embedding: bool = False
    parameter: str | None = None  # target_parameters: the module's parameter (``gate_up_proj``); factors for all experts


LORA_PARTS = {
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias", ".lora_embedding_A": "A",
    ".lora_embedding_B": "B", ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude",
}


def split_adapter_tensors(cfg: AdapterConfig, tensors: dict) -> tuple[dict[str, ModuleLora], dict]:
    """(module -> its LoRA tensors, base tensor name -> replacement tensor).

    Replacements are every other saved tensor (``modules_to_save`` copies, an embedding's saved
    ``base_layer``): peft loads them into the base model in place of its own, so they replace the base
    tensor of the same name (``.base_layer`` removed)."""
    where = cfg.path / adapter_weights_file(cfg.path).name
    modules: dict[str, ModuleLora] = {}
    replace: dict = {}
    nested: dict[tuple[str, int], ModuleLora] = {}  # (module, base_layer depth) -> factors, for target_parameters
    for key, t in tensors.items():
        if not key.startswith(SAVED_PREFIX):
            raise CheckpointError(f"{where}: tensor {key} does not start with {SAVED_PREFIX!r}; not a peft LoRA adapter")
        name = key[len(SAVED_PREFIX):]
        part = next((p for p in LORA_PARTS if name.endswith(p)), None)
        if part is None:
            if ".lora_" in name:
                raise CheckpointError(f"{where}: tensor {key}: unknown LoRA part (expected lora_A/lora_B weights, "
                                      "lora_embedding_A/B or lora_magnitude_vector)")
            replace[name.replace(".base_layer.", ".")] = t
            continue
        module, depth = name[: -len(part)], 0
        while module.endswith(".base_layer"):  # peft nests one wrapper per targeted parameter of a module
            module, depth = module[: -len(".base_layer")], depth + 1
        if cfg.target_parameters and parameters_of(cfg, module):
            m = nested.setdefault((module, depth), ModuleLora(module))
        elif depth:
            raise CheckpointError(f"{where}: tensor {key}: nested LoRA layers on {module} that target_parameters "
                                  "does not explain")
        else:
            m = modules.setdefault(module, ModuleLora(module))
        setattr(m, LORA_PARTS[part], t)
        if "embedding" in part:
            m.embedding = True
    for (module, depth), m in sorted(nested.items()):
        params = parameters_of(cfg, module)  # in target_parameters order: the first is the innermost wrapper
        if depth >= len(params):
            raise CheckpointError(f"{where}: module {module} has {depth + 1} nested LoRA layers but target_parameters "
                                  f"selects {len(params)} of its parameters")
        m.parameter = params[len(params) - 1 - depth]
        m.module = f"{module}.{m.parameter}"
        modules[m.module] = m
    for m in modules.values():
        if m.A is None or m.B is None:
            raise CheckpointError(f"{where}: module {m.module} has {'lora_B' if m.A is None else 'lora_A'} but no "
                                  f"{'lora_A' if m.A is None else 'lora_B'}")
        if m.parameter is None and not cfg.targets(m.module):
            raise CheckpointError(f"{where}: module {m.module} has LoRA weights but adapter_config.json's "
                                  "target_modules / exclude_modules / layers_to_transform do not select it "
                                  "(peft would drop them); the adapter's config and weights disagree")
        if m.magnitude is not None and not cfg.use_dora:
            raise CheckpointError(f"{where}: module {m.module} has a DoRA magnitude but use_dora is false")
        if cfg.use_dora and m.magnitude is None:
            raise CheckpointError(f"{where}: use_dora is true but module {m.module} has no lora_magnitude_vector")
        if m.bias is not None and not cfg.lora_bias:
            raise CheckpointError(f"{where}: module {m.module} has lora_B.bias but lora_bias is false")
        if m.parameter is not None:
            if m.magnitude is not None or m.bias is not None:
                raise CheckpointError(f"{where}: module {m.module}: DoRA and lora_bias do not apply to target_parameters")
            continue  # rank r per expert: checked against the base's expert count when the view is opened
        r, _ = cfg.rank_alpha(m.module)
        if m.A.dim() != 2 or m.B.dim() != 2 or m.A.shape[0] != r or m.B.shape[1] != r:
            raise CheckpointError(f"{where}: module {m.module}: lora_A {list(m.A.shape)} and lora_B {list(m.B.shape)} "
                                  f"do not have rank r={r} (adapter_config.json r / rank_pattern)")
    return modules, replace
