"""Merge recipes: mergekit-style YAML parsed into plain dataclasses, validated before any tensor is read.

mergekit silently ignores keys it does not know; we reject typos with the key, its location
and the file, and only warn about parameters that mergekit knows but the chosen method does
not use (so published recipes still run).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergequant.errors import RecipeError, suggestion
from mergequant.merge.methods import KNOWN_PARAMETERS, METHODS, REQUIRED, MethodSpec
from mergequant.yaml_file import parse_yaml, read_yaml_text

DTYPES = {"float32", "float16", "bfloat16", "float64"}
TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "name", "modules", "tokenizer", "chat_template", "output", "adapter"}
UNSUPPORTED_TOP = {
    "modules": "the 'modules:' form is not supported yet; use 'models:' or 'slices:'",
}
TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}
TOKEN_KEYS = {"source", "force"}
TOKEN_SOURCE_KEYS = {"kind", "model", "token", "token_id"}
MODEL_KEYS = {"model", "parameters"}
SLICE_KEYS = {"sources", "parameters", "base_model", "residual_weight"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
# Entries in one gradient or filter list. The merge evaluates a setting for every tensor of every
# model by walking its list, so the list's length multiplies the whole merge's parameter work;
# real recipes use a handful of entries.
MAX_SETTING_ENTRIES = 1000


@dataclass
class Source:
    """One input: a model reference as written, its layer range (slices form) and its parameters."""

    model: str
    parameters: dict | None = None
    layer_range: tuple[int, int] | None = None
    where: str = ""  # location in the recipe, for messages


@dataclass
class OutputSlice:
    sources: list[Source]
    parameters: dict | None = None
    base_model: str | None = None
    where: str = ""


@dataclass
class Recipe:
    path: Path
    text: str
    merge_method: str
    spec: MethodSpec
    base_model: str | None
    models: list[Source] | None
    slices: list[OutputSlice] | None
    parameters: dict | None
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None
    warnings: list[str] = field(default_factory=list)
    tokenizer: "TokenizerSpec | None" = None  # tokenizer merging (tokenizer_source or tokenizer:), see merge/tokenizer.py
    chat_template: str | None = None
    output: str = "model"  # "adapter": the merged delta written as a LoRA (see mergequant/peft/extract.py)
    adapter: "AdapterSpec | None" = None

    def model_refs(self) -> list[str]:
        """Every distinct model reference, base first."""
        refs: list[str] = []
        if self.base_model:
            refs.append(self.base_model)
        for s in self.all_sources():
            if s.model not in refs:
                refs.append(s.model)
        return refs

    def all_sources(self) -> list[Source]:
        if self.models is not None:
            return list(self.models)
        return [s for sl in self.slices or [] for s in sl.sources]


def _err(path: Path, where: str, msg: str) -> RecipeError:
    return RecipeError(f"{path}: {where}: {msg}" if where else f"{path}: {msg}")


def _unknown_key(path: Path, where: str, key: str, allowed: set[str]) -> RecipeError:
    return _err(path, where, f"unknown key '{key}'{suggestion(key, allowed)}")


def _check_keys(path: Path, where: str, obj: Any, allowed: set[str]) -> dict:
    if not isinstance(obj, dict):
        raise _err(path, where, f"expected a mapping, got {type(obj).__name__}")
    for k in obj:
        if k not in allowed:
            raise _unknown_key(path, f"{where}.{k}" if where else str(k), k, allowed)
    return obj


def _string_choice(path: Path, key: str, value: Any, allowed: set[str], why: str = "") -> str | None:
    """``value`` when it is None or one of ``allowed``; anything else (a list, a number, a typo) is
    refused naming the key, so it never reaches code that hashes or compares it."""
    if value is None or (isinstance(value, str) and value in allowed):
        return value
    shown = f"'{value}'" if isinstance(value, str) else f"{value!r} ({type(value).__name__})"
    raise _err(path, key, why.format(shown) if why else f"{shown} is not one of {', '.join(sorted(allowed))}")


def _model_ref(path: Path, where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _err(path, where, "expected a model path or Hub id")
    if "+" in value:  # BASE+ADAPTER (a LoRA applied on the fly, see mergequant/peft): both sides named
        from mergequant.errors import MergeQuantError
        from mergequant.peft.reference import parse_reference

        try:
            parse_reference(value, base_dir=path.parent)
        except MergeQuantError as e:
            raise _err(path, where, str(e)) from None
    return value


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file. Raises RecipeError naming the file and key on any problem."""
    path = Path(path)
    return parse_recipe(read_yaml_text(path, "recipe", RecipeError), path)


def parse_recipe(text: str, path: Path = Path("<recipe>")) -> Recipe:
    """Validate recipe text. The YAML is size-bounded and free of duplicate keys (``yaml_file``); every
    value is type-checked here, so later code can rely on the shapes the dataclasses declare."""
    data = parse_yaml(text, path, "recipe", RecipeError)
    if data is None:
        raise _err(path, "", "the recipe is empty")
    data = _check_keys(path, "", data, TOP_KEYS)
    for key, why in UNSUPPORTED_TOP.items():
        if key in data:
            raise _err(path, key, why)

    method = data.get("merge_method")
    if method is None:
        raise _err(path, "merge_method", f"missing (one of: {', '.join(METHODS)})")
    if not isinstance(method, str):
        raise _err(path, "merge_method", f"expected a method name, got {method!r}; supported: {', '.join(METHODS)}")
    if method not in METHODS:
        hint = difflib.get_close_matches(str(method), list(METHODS), n=1)
        raise _err(path, "merge_method", f"unknown method '{method}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                   + f"; supported: {', '.join(METHODS)}")
    spec = METHODS[method]
    warnings: list[str] = []

    base = _model_ref(path, "base_model", data["base_model"]) if data.get("base_model") is not None else None
    for key in ("dtype", "out_dtype"):
        _string_choice(path, key, data.get(key), DTYPES)
    tok = data.get("tokenizer_source")
    if tok is not None and (not isinstance(tok, str) or not tok.strip()):
        raise _err(path, "tokenizer_source", f"expected union, base or a model of the recipe, got {tok!r}")
    chat_template = data.get("chat_template")
    if chat_template is not None and (not isinstance(chat_template, str) or not chat_template.strip()):
        raise _err(path, "chat_template", f"expected auto, a template name or Jinja text, got {chat_template!r}")
    if chat_template is not None and chat_template != "auto":
        from mergequant.merge.tokenizer import resolve_chat_template
        resolve_chat_template(chat_template, [], f"{path}: chat_template")
    if data.get("name") is not None and not isinstance(data["name"], str):
        raise _err(path, "name", f"expected a string, got {data['name']!r}")

    has_models, has_slices = data.get("models") is not None, data.get("slices") is not None
    if has_models == has_slices:
        raise _err(path, "", "exactly one of 'models' or 'slices' must be given")

    models = slices = None
    if has_models:
        if not isinstance(data["models"], list) or not data["models"]:
            raise _err(path, "models", "expected a non-empty list")
        models = []
        for i, m in enumerate(data["models"]):
            where = f"models[{i}]"
            m = _check_keys(path, where, m, MODEL_KEYS)
            if "model" not in m:
                raise _err(path, where, "missing 'model'")
            models.append(Source(_model_ref(path, f"{where}.model", m["model"]), m.get("parameters"), None, where))
    else:
        if not isinstance(data["slices"], list) or not data["slices"]:
            raise _err(path, "slices", "expected a non-empty list")
        slices = []
        for i, sl in enumerate(data["slices"]):
            where = f"slices[{i}]"
            sl = _check_keys(path, where, sl, SLICE_KEYS)
            if sl.get("residual_weight") is not None:
                raise _err(path, f"{where}.residual_weight", "not supported")
            srcs = sl.get("sources")
            if not isinstance(srcs, list) or not srcs:
                raise _err(path, f"{where}.sources", "expected a non-empty list")
            sources = []
            for j, s in enumerate(srcs):
                w = f"{where}.sources[{j}]"
                s = _check_keys(path, w, s, SOURCE_KEYS)
                if "model" not in s:
                    raise _err(path, w, "missing 'model'")
                lr = s.get("layer_range")
                if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in lr)
                        and 0 <= lr[0] < lr[1]):
                    raise _err(path, f"{w}.layer_range", f"expected [start, end) with 0 <= start < end, got {lr!r}")
                sources.append(Source(_model_ref(path, f"{w}.model", s["model"]), s.get("parameters"), (lr[0], lr[1]), w))
            lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
            if len(lengths) > 1:
                raise _err(path, f"{where}.sources", f"all sources of a slice must span the same number of layers, got {sorted(lengths)}")
            sbase = _model_ref(path, f"{where}.base_model", sl["base_model"]) if sl.get("base_model") else None
            slices.append(OutputSlice(sources, sl.get("parameters"), sbase, where))

    recipe = Recipe(path, text, method, spec, base, models, slices, data.get("parameters"), data.get("dtype"),
                    data.get("out_dtype"), tok, warnings, chat_template=chat_template)
    _validate_parameters(recipe)
    _validate_structure(recipe)
    recipe.tokenizer = _parse_tokenizer(recipe, data)
    recipe.output, recipe.adapter = _parse_output(recipe, data)
    return recipe


# ---------------------------------------------------------------------------------------------------
# output: model (default) | adapter (the merged delta re-factored as a LoRA, see docs/extract-lora.md)
# ---------------------------------------------------------------------------------------------------
ADAPTER_KEYS = {"rank", "energy", "embeddings", "dtype", "svd"}


@dataclass
class AdapterSpec:
    rank: int | None = None
    energy: float | None = None
    embeddings: str = "lora"
    dtype: str | None = None
    svd: str = "auto"


def _parse_output(recipe: Recipe, data: dict) -> tuple[str, AdapterSpec | None]:
    """``output: adapter`` + ``adapter: {rank, energy, embeddings, dtype, svd}``: checked here, before any
    tensor is read; the merged delta (merged - base_model) needs a base_model and no tokenizer merging."""
    path = recipe.path
    output = _string_choice(path, "output", data.get("output"), {"model", "adapter"}) or "model"
    section = data.get("adapter")
    if output != "adapter":
        if section is not None:
            raise _err(path, "adapter", "only with 'output: adapter'")
        return output, None
    section = _check_keys(path, "adapter", section if section is not None else {}, ADAPTER_KEYS)
    spec = AdapterSpec(section.get("rank"), section.get("energy"), section.get("embeddings", "lora"),
                       section.get("dtype"), section.get("svd", "auto"))
    if spec.rank is None and spec.energy is None:
        raise _err(path, "adapter", "give adapter.rank (the maximum LoRA rank), adapter.energy, or both")
    from mergequant.errors import MergeQuantError
    from mergequant.peft.factor import METHODS, check_rank_energy

    try:
        check_rank_energy(spec.rank, spec.energy)
    except MergeQuantError as e:
        raise _err(path, "adapter", str(e)) from None
    _string_choice(path, "adapter.embeddings", spec.embeddings, {"lora", "save"})
    _string_choice(path, "adapter.dtype", spec.dtype, {"float32", "bfloat16", "float16"})
    _string_choice(path, "adapter.svd", spec.svd, set(METHODS))
    if not recipe.base_model:
        raise _err(path, "output", "an adapter is the merged delta from base_model: the recipe needs a base_model")
    return output, spec


# ---------------------------------------------------------------------------------------------------
# tokenizer section (mergekit's `tokenizer_source` and `tokenizer:`), see merge/tokenizer.py
# ---------------------------------------------------------------------------------------------------
@dataclass
class TokenSource:
    """Where one output token's embedding row comes from: ``kind`` "model" (that model's row of the same
    token), "model_token" (that model's row of ``token`` or ``token_id``) or "zero"."""

    kind: str
    model: str | None = None
    token: str | None = None
    token_id: int | None = None


@dataclass
class TokenizerSpec:
    source: str  # "union", "base", or a model reference of the recipe
    tokens: dict[str, tuple[TokenSource | None, bool]] = field(default_factory=dict)  # token -> (source, force)
    pad_to_multiple_of: int | None = None


def _recipe_model(recipe: Recipe, where: str, value: Any) -> str:
    ref = _model_ref(recipe.path, where, value)
    if ref not in recipe.model_refs():
        raise _err(recipe.path, where, f"'{ref}' is not a model of this recipe{suggestion(ref, set(recipe.model_refs()))}")
    return ref


def _tokenizer_source(recipe: Recipe, where: str, value: Any) -> str:
    if value in ("union", "base"):
        if value == "base" and not recipe.base_model:
            return "base"  # mergekit: the first model stands in for a missing base
        return value
    if not isinstance(value, str):
        raise _err(recipe.path, where, f"expected union, base or a model of the recipe, got {value!r}")
    return _recipe_model(recipe, where, value)


def _parse_tokenizer(recipe: Recipe, data: dict) -> TokenizerSpec | None:
    path = recipe.path
    section = data.get("tokenizer")
    if section is not None and data.get("tokenizer_source") is not None:
        raise _err(path, "tokenizer", "give either 'tokenizer_source' or a 'tokenizer:' section, not both (as mergekit)")
    if section is None:
        if recipe.tokenizer_source is None:
            return None
        return TokenizerSpec(_tokenizer_source(recipe, "tokenizer_source", recipe.tokenizer_source))
    section = _check_keys(path, "tokenizer", section, TOKENIZER_KEYS)
    spec = TokenizerSpec(_tokenizer_source(recipe, "tokenizer.source", section.get("source", "union")))
    pad = section.get("pad_to_multiple_of")
    if pad is not None:
        if not isinstance(pad, int) or isinstance(pad, bool) or not 1 <= pad <= 1 << 20:
            raise _err(path, "tokenizer.pad_to_multiple_of", f"expected an integer from 1 to {1 << 20}, got {pad!r}")
        spec.pad_to_multiple_of = pad
    tokens = section.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise _err(path, "tokenizer.tokens", "expected a mapping of token strings to {source, force}")
    for token, cfg in tokens.items():
        w = f"tokenizer.tokens.{token}"
        if not isinstance(token, str) or not token:
            raise _err(path, "tokenizer.tokens", f"expected token strings as keys, got {token!r}")
        cfg = _check_keys(path, w, cfg if cfg is not None else {}, TOKEN_KEYS)
        force = cfg.get("force", False)
        if not isinstance(force, bool):
            raise _err(path, f"{w}.force", f"expected true or false, got {force!r}")
        src = cfg.get("source")
        if src is None:
            source = None
        elif isinstance(src, dict):
            src = _check_keys(path, f"{w}.source", src, TOKEN_SOURCE_KEYS)
            kind = src.get("kind")
            if kind == "zero":
                extra = set(src) - {"kind"}
                if extra:
                    raise _err(path, f"{w}.source", f"'kind: zero' takes no other key, got {sorted(extra)}")
                source = TokenSource("zero")
            elif kind == "model_token":
                model = _recipe_model(recipe, f"{w}.source.model", src.get("model"))
                tok, tid = src.get("token"), src.get("token_id")
                if (tok is None) == (tid is None):
                    raise _err(path, f"{w}.source", "give exactly one of 'token' or 'token_id'")
                if tok is not None and not isinstance(tok, str):
                    raise _err(path, f"{w}.source.token", f"expected a token string, got {tok!r}")
                if tid is not None and (not isinstance(tid, int) or isinstance(tid, bool) or tid < 0):
                    raise _err(path, f"{w}.source.token_id", f"expected a token id >= 0, got {tid!r}")
                source = TokenSource("model_token", model, tok, tid)
            else:
                raise _err(path, f"{w}.source.kind", f"expected model_token or zero, got {kind!r}")
        else:
            source = TokenSource("model", _recipe_model(recipe, f"{w}.source", src))
        if force and source is None:
            raise _err(path, f"{w}.force", "force needs a source")
        spec.tokens[token] = (source, force)
    return spec


# ---------------------------------------------------------------------------------------------------
# parameter validation
# ---------------------------------------------------------------------------------------------------
def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def _validate_setting(path: Path, where: str, value: Any) -> list[float | bool | str]:
    """Check a setting's shape (scalar, gradient list, filter entry or filter list: the shapes
    ``merge.params.evaluate_setting`` accepts); return every leaf value (for type and range checks)."""
    if _is_scalar(value):
        return [value]
    if isinstance(value, dict):
        return _validate_filter_entry(path, where, value)
    if isinstance(value, list) and value:
        if len(value) > MAX_SETTING_ENTRIES:
            raise _err(path, where, f"{len(value)} entries; at most {MAX_SETTING_ENTRIES} are allowed in one list")
        if all(_is_scalar(e) for e in value):
            return list(value)
        leaves = []
        for k, cond in enumerate(value):
            if not isinstance(cond, dict):
                raise _err(path, f"{where}[{k}]", "mix of values and filter entries; use a list of numbers or of {filter, value}")
            leaves += _validate_filter_entry(path, f"{where}[{k}]", cond)
        return leaves
    raise _err(path, where, f"expected a number, a list of numbers, or a filter list; got {value!r}")


def _finite(v: int | float) -> bool:
    """Whether a numeric leaf is usable as a float: YAML reads .nan and .inf as floats (a NaN weight
    produced an all-NaN model with exit 0), and an integer past float range overflows mid-merge."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _validate_filter_entry(path: Path, where: str, cond: dict) -> list[float | bool | str]:
    """One ``{filter: SUBSTRING, value: SETTING}`` entry; its value's leaves."""
    for ck in cond:
        if ck not in ("filter", "value"):
            raise _unknown_key(path, f"{where}.{ck}", ck, {"filter", "value"})
    if "value" not in cond:
        raise _err(path, where, f"filter entry without 'value' (got {cond!r}); write {{filter: NAME, value: NUMBER}}")
    if cond.get("filter") is not None and not isinstance(cond["filter"], str):
        raise _err(path, f"{where}.filter", "expected a string")
    return _validate_setting(path, f"{where}.value", cond["value"])


def _check_scope(recipe: Recipe, where: str, params: Any, *, per_model_scope: bool, shared_scope: bool) -> None:
    if params is None:
        return
    path, spec = recipe.path, recipe.spec
    if not isinstance(params, dict):
        raise _err(path, where, "expected a mapping of parameter names to values")
    used = (set(spec.per_model) if per_model_scope else set()) | (set(spec.shared) if shared_scope else set())
    for name, value in params.items():
        w = f"{where}.{name}"
        if name not in used:
            if name in KNOWN_PARAMETERS or name in spec.per_model or name in spec.shared:
                recipe.warnings.append(f"{path}: {w}: parameter '{name}' is not used by {spec.name} here; ignored")
                continue
            raise _unknown_key(path, w, name, used | KNOWN_PARAMETERS)
        leaves = _validate_setting(path, w, value)
        param = spec.param[name]
        why = param.type_error(leaves)
        if why:
            raise _err(path, w, why)
        numeric = [v for v in leaves if isinstance(v, (int, float)) and not isinstance(v, bool)]
        bad = [v for v in numeric if not _finite(v)]
        if bad:
            raise _err(path, w, f"'{name}' must be a finite number, got {str(bad[0])[:40]}")
        if any(not param.in_range(v) for v in numeric):
            raise _err(path, w, f"{name} must be {param.range_text}, got {value!r}")


def _validate_parameters(recipe: Recipe) -> None:
    _check_scope(recipe, "parameters", recipe.parameters, per_model_scope=True, shared_scope=True)
    for sl in recipe.slices or []:
        _check_scope(recipe, f"{sl.where}.parameters", sl.parameters, per_model_scope=True, shared_scope=True)
    for s in recipe.all_sources():
        _check_scope(recipe, f"{s.where}.parameters", s.parameters, per_model_scope=True, shared_scope=False)


def _is_base(recipe: Recipe, model: str, slice_base: str | None = None) -> bool:
    return model == (slice_base or recipe.base_model)


def _validate_structure(recipe: Recipe) -> None:
    path, spec = recipe.path, recipe.spec
    groups: list[tuple[str, list[Source], dict | None, str | None]]
    if recipe.models is not None:
        groups = [("models", recipe.models, None, recipe.base_model)]
    else:
        groups = [(sl.where, sl.sources, sl.parameters, sl.base_model or recipe.base_model) for sl in recipe.slices]
    for where, sources, slice_params, base in groups:
        if spec.needs_base and not base:
            raise _err(path, "base_model", f"{spec.name} needs a base_model")
        models = [s.model for s in sources]
        if recipe.models is not None and base and base not in models:
            models = models + [base]
        elif recipe.slices is not None and spec.needs_base and base not in models:
            raise _err(path, where, f"the base model '{base}' must be one of the slice's sources")
        if len(models) < spec.min_models or (spec.max_models and len(models) > spec.max_models):
            raise _err(path, where, f"{spec.name} needs {_count_text(spec.min_models, spec.max_models)} models "
                       f"(base included), got {len(models)}")
        others = [m for m in models if spec.per_model_applies_to_base or m != base]
        if len(others) < spec.min_others or (spec.max_others is not None and len(others) > spec.max_others):
            raise _err(path, where, f"{spec.name} needs {_count_text(spec.min_others, spec.max_others)} models besides "
                       f"the base, got {len(others)}")
        # required parameters must be reachable from some scope
        for pname, default in spec.shared.items():
            if default is REQUIRED and not any(sc and pname in sc for sc in (slice_params, recipe.parameters)):
                raise _err(path, "parameters", f"missing required parameter '{pname}' for {spec.name}")
        for s in sources:
            if not spec.per_model_applies_to_base and _is_base(recipe, s.model, base):
                continue
            for pname, default in spec.per_model.items():
                if default is REQUIRED and not any(sc and pname in sc for sc in (s.parameters, slice_params, recipe.parameters)):
                    raise _err(path, f"{s.where}.parameters", f"missing required parameter '{pname}' for model '{s.model}'")
        # weights summing to zero with normalize (checked statically when all weights are scalars)
        normalize = _static([slice_params, recipe.parameters], "normalize", spec.shared.get("normalize"))
        if normalize is True and "weight" in spec.per_model:
            ws = []
            for s in sources:
                if not spec.per_model_applies_to_base and _is_base(recipe, s.model, base):
                    continue
                w = _static([s.parameters, slice_params, recipe.parameters], "weight", None)
                ws.append(w)
            if ws and all(isinstance(w, (int, float)) for w in ws) and abs(sum(ws)) < 1e-8:
                raise _err(path, "weight", f"weights sum to 0 with normalize: true (weights {ws}); set normalize: false or change the weights")


def _count_text(low: int, high: int | None) -> str:
    if high == low:
        return f"exactly {low}"
    return f"at least {low}" + (f" and at most {high}" if high is not None else "")


def _static(scopes: list, name: str, default):
    """First scalar value of a parameter over scopes in precedence order; None when it is a
    gradient or filter list (not statically known); ``default`` when no scope sets it."""
    for sc in scopes:
        if sc and name in sc:
            v = sc[name]
            return v if isinstance(v, (bool, int, float)) else None
    return default


