"""Model cards (README.md with Hub front matter) for every artifact mergequant writes, from one place.

A card written next to the weights is valid on its own: ``base_model`` only ever holds Hub ids.
Parents that were local directories are listed in the body and recorded in a machine-readable
comment (``<!-- mergequant-parents: {...} -->``) so that ``mergequant push`` can turn them into
Hub ids when the user says where they were published (``--base-model-map LOCAL=NS/NAME``, or the
``mapping`` argument of :func:`rewrite_card`); the comment is dropped from the pushed card.

Rules (checked by :func:`validate_card` before a push):

- ``base_model`` entries are Hub ids (``ns/name``), never local paths, never the repo itself;
- a merge (``base_model_relation: merge``) lists every parent that is on the Hub;
- a quantization (``quantized``) points at exactly ONE base: the model that was quantized;
- ``base_model_relation`` is only present together with ``base_model``;
- ``license`` is carried from the parents when they agree; when they disagree it is ``other`` and
  the body lists each parent's license.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

from mergequant import __version__
from mergequant.errors import MergeQuantError
from mergequant.io.resolve import looks_like_hub_id

RELATIONS = ("adapter", "merge", "quantized", "finetune")
# What the "Loading" snippet of a quant card says until the card is pushed (then: the repo id).
MODEL_PATH_PLACEHOLDER = "path/to/this/model"
_MARK = "mergequant-parents"
_MARK_RE = re.compile(r"<!-- " + _MARK + r": (\{.*?\}) -->\n?\n?")
_LOCAL_HEADING = "## Parents not on the Hub"


class CardError(MergeQuantError):
    """A model card's front matter is invalid or inconsistent."""


# ---- front matter ----------------------------------------------------------------------------------
def front_matter(meta: dict) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def split_card(text: str, where: str = "README.md") -> tuple[dict, str]:
    """(front matter as a dict, body). A card without front matter gives ``{}``; YAML that does not
    parse, or is not a mapping, raises :class:`CardError` naming ``where``."""
    if not text.startswith("---"):
        return {}, text
    m = re.match(r"^---[ \t]*\r?\n(.*?)(?:^|\n)---[ \t]*(?:\r?\n|$)", text, re.S)
    if not m:
        raise CardError(f"{where}: front matter starts with '---' but is never closed by a '---' line")
    from mergequant.yaml_file import parse_yaml

    meta = parse_yaml(m.group(1), where, "model card front matter", CardError) or {}  # bounded, no duplicate keys
    if not isinstance(meta, dict):
        raise CardError(f"{where}: front matter must be a YAML mapping, found {type(meta).__name__}")
    return meta, text[m.end():]


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ---- parents -----------------------------------------------------------------------------------------
def hub_parents(refs: list[str], base_dir: Path | None = None) -> list[str]:
    """The references that are Hub ids (not local directories): only these may go in ``base_model``.

    ``base_dir`` is the recipe's folder: references are also resolved relative to it (as the merge does)."""
    return [r.split("@")[0] for r in refs if looks_like_hub_id(r) and not Path(r).exists()
            and not (base_dir is not None and (base_dir / r).exists())]


def parent_refs(models: list[str], adapters: Iterable = ()) -> list[str]:
    """The models behind each reference: ``BASE+ADAPTER`` and an adapter-only reference stand for two parents,
    the base and the adapter (``adapters``: the merge's :class:`mergequant.peft.adapted.AdapterInput` records,
    which know the base an adapter-only reference resolved to); other references for themselves."""
    by_ref = {a.reference: a for a in adapters}
    out: list[str] = []
    for m in models:
        a = by_ref.get(m)
        if a is not None:
            out += [a.base, a.adapter]
        elif "+" in m and not Path(m).exists():
            out += [side for side in m.split("+", 1) if side]
        else:
            out.append(m)
    return list(dict.fromkeys(out))


def adapter_lines(adapters: Iterable) -> list[str]:
    """The card section listing each adapter input with its base (empty without adapters)."""
    adapters = list(adapters)
    if not adapters:
        return []
    return ["## Adapters\n",
            "LoRA adapters applied to their base tensor by tensor as the weights were read (no merged copy was made):\n",
            *[f"- `{a.reference}`: {a.description} adapter `{a.adapter}` on base `{a.base}`"
              + (" (the base named by the adapter's `base_model_name_or_path`)" if a.base_from_config else "")
              for a in adapters], ""]


def _local_path(ref: str, base_dir: Path | None) -> str:
    p = Path(ref).expanduser()
    if not p.is_absolute() and base_dir is not None and (base_dir / p).exists():
        p = base_dir / p
    try:
        return str(p.resolve())
    except OSError:
        return str(p.absolute())


def _parents_mark(relation: str, local: list[dict]) -> str:
    """The machine-readable record of local parents that ``push`` rewrites (one HTML comment line)."""
    record = json.dumps({"relation": relation, "local": local}, sort_keys=True)
    # a path holding "-->" would end the HTML comment early and show the rest in every Markdown viewer;
    # JSON's \u escapes keep the record intact and invisible (json.loads reads them back unchanged)
    record = record.replace("<", "\\u003c").replace(">", "\\u003e")
    return f"<!-- {_MARK}: " + record + " -->"


# ---- licenses ----------------------------------------------------------------------------------------
def license_from_dir(path: str | Path) -> str | None:
    """A model directory's license: its README front matter ``license``, else config.json ``license``."""
    path = Path(path)
    readme = path / "README.md"
    if readme.is_file():
        try:
            meta, _ = split_card(readme.read_text(errors="replace"), str(readme))
        except CardError:
            meta = {}
        lic = meta.get("license")
        if isinstance(lic, str) and lic.strip():
            return lic.strip()
        if isinstance(lic, list) and lic and all(isinstance(x, str) for x in lic):
            return ",".join(lic)
    cfg = path / "config.json"
    if cfg.is_file():
        try:
            lic = json.loads(cfg.read_text()).get("license")
        except (ValueError, AttributeError, UnicodeDecodeError):
            lic = None
        if isinstance(lic, str) and lic.strip():
            return lic.strip()
    return None


def parent_licenses(paths: Iterable[str | Path] | Mapping[str, str | Path]) -> dict[str, str | None]:
    """name -> license (None: unknown) for each parent. ``paths`` is a list of directories, or a
    mapping from the name to show (the recipe reference) to the directory."""
    items = paths.items() if isinstance(paths, Mapping) else ((str(p), p) for p in paths)
    return {str(name): license_from_dir(p) for name, p in items}


def combine_licenses(licenses: Mapping[str, str | None]) -> str | None:
    """One license for a derived model: the parents' when they all declare the same one; None when
    none declares any; ``other`` when they disagree (or only some declare one)."""
    found = set(licenses.values())
    if not found or found == {None}:
        return None
    if len(found) == 1:
        return found.pop()
    return "other"


def license_of(paths: Iterable[str | Path] | Mapping[str, str | Path]) -> str | None:
    """The license a model derived from ``paths`` (parent directories) carries: see :func:`combine_licenses`."""
    return combine_licenses(parent_licenses(paths))


def _license_note(licenses: Mapping[str, str | None]) -> list[str]:
    if combine_licenses(licenses) != "other":
        return []
    return ["## License\n",
            "The parents' licenses differ (so the card says `other`); check that their terms allow this model:\n",
            *[f"- `{name}`: {lic or 'not declared'}" for name, lic in licenses.items()], ""]


# ---- cards -------------------------------------------------------------------------------------------
def merge_card(*, method: str, pretty_name: str, paper: str, models: list[str], base_model: str | None,
               recipe_text: str, out_dtype: str | None, num_parameters: int, license: str | None = None,
               base_dir: Path | None = None, parent_dirs: Mapping[str, str | Path] | None = None,
               adapters: Iterable = ()) -> str:
    """A model card for a merge: every Hub parent in ``base_model`` with relation ``merge``, the method
    and its paper, and the recipe verbatim (so the merge can be reproduced).

    ``parent_dirs`` (recipe reference -> the directory it resolved to) lets the card carry the
    parents' license (:func:`license_of`) when ``license`` is not given."""
    adapters = list(adapters)  # BASE+ADAPTER inputs: both sides are parents (see parent_refs)
    parents = list(dict.fromkeys(hub_parents(parent_refs(models, adapters), base_dir)))
    licenses = parent_licenses(parent_dirs) if parent_dirs else {}
    if license is None and licenses:
        license = combine_licenses(licenses)
    meta: dict = {}
    if parents:
        meta["base_model"] = parents
        meta["base_model_relation"] = "merge"
    meta["library_name"] = "transformers"
    meta["tags"] = ["merge", "mergequant", method]
    if license:
        meta["license"] = license
    local = [m for m in parent_refs(models, adapters) if m.split("@")[0] not in parents]
    lines = [
        front_matter(meta),
        "# Merged model\n",
        f"This model is a merge of {len(models)} pre-trained language models, made with "
        f"[mergequant](https://github.com/mergequant/mergequant) {__version__}.\n",
        "## Merge method\n",
        f"Method: **{pretty_name}** (`{method}`), see [{paper}]({paper}).",
        f"{'The base model was `' + base_model + '`.' if base_model else ''}\n",
        "## Models merged\n",
        *[f"- `{m}`" + (" (base)" if m == base_model else "") + (" (local path)" if m in local else "") for m in models],
        "",
        *adapter_lines(adapters),
    ]
    if local:
        lines += [_parents_mark("merge", [{"ref": m, "path": _local_path(m, base_dir)} for m in dict.fromkeys(local)]), ""]
    lines += [
        f"Parameters: {num_parameters:,}" + (f"; weights stored as {out_dtype}." if out_dtype else "."),
        "",
        *(_license_note(licenses) if license == "other" else []),
        "## Recipe\n",
        "The exact recipe used (mergekit-compatible YAML):\n",
        "```yaml",
        recipe_text.rstrip("\n"),
        "```",
        "",
    ]
    return "\n".join(lines)


def _quantized_from(source: str, base_model: str | None, adapter, license: str | None):
    """(origin, parents, license) of a quantized checkpoint's card, for every format: ``base_model`` (a Hub id)
    or the source's Hub id is the one parent; an adapted source (BASE+ADAPTER, ``adapter``: its AdapterInput)
    was quantized from the adapter's model, so the adapter is the one parent (its own card names the base) and
    the body names both; ``license`` defaults to the origin's, then the adapter's base's."""
    if base_model is not None and not looks_like_hub_id(base_model):
        raise CardError(f"base_model {base_model!r} is not a Hub id (expected namespace/name)")
    origin = adapter.adapter if adapter is not None else source
    parents = [base_model.split("@")[0]] if base_model else hub_parents([origin])
    if license is None and Path(origin).is_dir():
        license = license_from_dir(origin)
    if license is None and adapter is not None:
        license = license_from_dir(adapter.base_path)
    return origin, parents, license


def quant_card(*, source: str, method: str, bits: int, settings: list[tuple[str, str]], tags: list[str],
               requirements: str, calib: str | None, calib_tokens: int, samples: int,
               fallbacks: list[str], perplexity: dict | None = None, eval_data: str | None = None,
               license: str | None = None, base_model: str | None = None, experts: dict | None = None,
               clients: list[str] | None = None, adapter=None) -> str:
    """A model card for a quantized checkpoint: ``base_model`` is the ONE source (when it is a Hub id,
    or ``base_model`` names where the local source was published) with relation ``quantized``; the
    body says how it was made (``settings`` rows from the method) and how to load it
    (``requirements``: what transformers needs installed for this format).

    ``license`` defaults to the source directory's (README front matter or config.json)."""
    origin, parents, license = _quantized_from(source, base_model, adapter, license)
    meta: dict = {}
    if parents:
        meta["base_model"] = parents[:1]
        meta["base_model_relation"] = "quantized"
    meta["library_name"] = "transformers"
    meta["tags"] = ["mergequant", *dict.fromkeys(tags)]
    if license:
        meta["license"] = license
    lines = [
        front_matter(meta),
        f"# {Path(source).name or source} ({method.upper()} {bits}-bit)\n",
        f"Quantized from `{source}` with [mergequant](https://github.com/mergequant/mergequant) {__version__}.\n",
    ]
    if not parents:
        lines += [_parents_mark("quantized", [{"ref": origin, "path": _local_path(origin, None)}]), ""]
    if adapter is not None:
        lines += adapter_lines([adapter])
    lines += [
        "| setting | value |", "|---|---|",
        f"| method | {method} |", *[f"| {k} | {v} |" for k, v in settings],
        f"| calibration | {calib + f' ({samples} samples, {calib_tokens:,} tokens)' if calib else 'none'} |",
        "",
    ]
    if fallbacks:
        lines += [f"Round-to-nearest was used for {len(fallbacks)} module(s) where GPTQ's Cholesky failed: "
                  + ", ".join(f"`{f}`" for f in fallbacks), ""]
    if experts:
        lines += _experts_section(experts)
    if perplexity:
        lines += ["## Perplexity\n", f"Held-out perplexity on `{eval_data}` (measured by `mergequant eval`):\n",
                  "| model | perplexity |", "|---|---|",
                  *[f"| {k} | {v:.4f} |" for k, v in perplexity.items()], ""]
    needs = f"  # needs {requirements}" if requirements else ""
    if clients:  # engines that loaded this exact setting in mergequant's serving matrix
        lines += ["## Verified clients\n", "These engines loaded a checkpoint with exactly these settings and matched "
                  "mergequant's own perplexity (its serving matrix: docs/quantize.md, \"What loads where\"):\n",
                  *[f"- {c}" for c in clients], ""]
    if experts and experts.get("loading"):
        lines += ["## Loading\n", *experts["loading"], ""]
        return "\n".join(lines)
    lines += ["## Loading\n", "```python", f"from transformers import AutoModelForCausalLM{needs}",
              f"model = AutoModelForCausalLM.from_pretrained(\"{MODEL_PATH_PLACEHOLDER}\", device_map=\"auto\")",
              "```", ""]
    return "\n".join(lines)


def gguf_card(*, source: str, files: list[tuple[str, str, int, dict[str, int]]], architecture: str,
              calib: str | None = None, calib_tokens: int = 0, samples: int = 0, license: str | None = None,
              base_model: str | None = None, adapter=None, expert_tokens: dict[int, list[int]] | None = None,
              search: str = "imatrix") -> str:
    """A model card for GGUF files (``--method gguf``): one row per file (type, name, size, the GGUF types
    its tensors got) and how to run them in llama.cpp. ``files``: (file type, file name, bytes, type counts).
    ``adapter``: an adapted source's AdapterInput (BASE+ADAPTER), named as :func:`quant_card` names it.
    ``expert_tokens``: a mixture-of-experts model's calibration tokens routed to each expert, per layer.
    ``search``: with ``calib``, how the k-quants were rounded (``--gguf-search``: imatrix or gptq)."""
    from mergequant.units import format_bytes

    origin, parents, license = _quantized_from(source, base_model, adapter, license)
    meta: dict = {}
    if parents:
        meta["base_model"] = parents[:1]
        meta["base_model_relation"] = "quantized"
    meta["library_name"] = "gguf"
    meta["tags"] = ["mergequant", "gguf", "llama.cpp"]
    if license:
        meta["license"] = license
    lines = [front_matter(meta), f"# {Path(source).name or source} (GGUF)\n",
             f"GGUF files for llama.cpp (architecture `{architecture}`), written from `{source}` by "
             f"[mergequant](https://github.com/mergequant/mergequant) {__version__} in one pass.\n"]
    if not parents:
        lines += [_parents_mark("quantized", [{"ref": origin, "path": _local_path(origin, None)}]), ""]
    if adapter is not None:
        lines += adapter_lines([adapter])
    lines += [GGUF_TABLE_HEADER, "|---|---|---|---|---|"]
    for ft, name, size, counts in files:
        mix = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
        lines.append(f"| `{name}` | {ft} | {format_bytes(size)} | {GGUF_NOT_MEASURED} | {mix} |")
    lines += ["", f"Perplexity: held-out, measured in llama.cpp by `mergequant run` when the release has an eval step and "
              f"llama-cpp-python is installed; \"{GGUF_NOT_MEASURED}\" otherwise (`mergequant eval` does not read GGUF)."]
    lines += ["", "Rounding: " + (f"importance-weighted k-quant search (importance matrix from `{calib}`, {samples} samples, "
                                  f"{calib_tokens:,} tokens)" + (GGUF_GPTQ_NOTE if search == "gptq" else "")
                                  if calib else
                                  "llama.cpp's reference quantizer (byte-identical to `llama-quantize` without an "
                                  "importance matrix)") + ".", ""]
    if expert_tokens:
        lines += _gguf_experts_section(expert_tokens)
    lines += ["## Loading\n", "```bash", f"llama-cli -m {files[0][1]} -p \"Hello\"", "```", "",
              "```python", "from llama_cpp import Llama",
              f"llm = Llama(model_path=\"{files[0][1]}\")", "```", ""]
    return "\n".join(lines)


def _gguf_experts_section(expert_tokens: dict[int, list[int]]) -> list[str]:
    """How a mixture-of-experts model's importance matrix covers its experts: each expert's importance
    comes from the tokens the router sent it (llama-imatrix's semantics), so the counts say how much
    data each expert's rounding rests on; an expert with none is named, with what was done for it."""
    empty = {layer: [e for e, c in enumerate(counts) if c == 0] for layer, counts in expert_tokens.items()}
    lines = ["## Mixture of experts\n",
             "Each expert's importance comes only from the calibration tokens the router sent it (top-k routing, "
             "as llama.cpp's `llama-imatrix` collects it); routers stay in full precision.", "",
             "| layer | calibration tokens routed to each expert | experts without tokens |", "|---|---|---|"]
    lines += [f"| {layer} | {' '.join(map(str, counts))} | {', '.join(map(str, empty[layer])) or '-'} |"
              for layer, counts in sorted(expert_tokens.items())]
    lines.append("")
    if any(empty.values()):
        lines += ["Experts without tokens get importance 1 for every column (llama.cpp's rule for an expert "
                  "without data): their weights are rounded with uniform weighting.", ""]
    return lines


GGUF_TABLE_HEADER = "| file | type | size | held-out perplexity | tensor types |"
GGUF_GPTQ_NOTE = (" with GPTQ error feedback (`--gguf-search gptq`): each decoder Linear's k-quant grids searched "
                  "super-block by super-block on weights updated by the rounding errors of the columns before, "
                  "through the inverse Hessian of its calibration inputs")
GGUF_NOT_MEASURED = "not measured"


def gguf_card_perplexity(text: str, perplexity: Mapping[str, float]) -> str:
    """The GGUF card ``text`` with each file's held-out perplexity (``{file name: perplexity}``) in its table row;
    files not in ``perplexity`` keep "not measured"."""
    out, in_table = [], False
    for line in text.split("\n"):
        if line == GGUF_TABLE_HEADER:
            in_table = True
        elif in_table and not line.startswith("|"):
            in_table = False
        elif in_table and line.startswith("| `"):
            cells = line.split(" | ")
            name = cells[0][len("| `"):].rstrip("`")
            if name in perplexity and len(cells) >= 5:
                cells[3] = f"{perplexity[name]:.4f}"
                line = " | ".join(cells)
        out.append(line)
    return "\n".join(out)


def _experts_section(experts: dict) -> list[str]:
    """How a mixture-of-experts model's experts were calibrated: the mode, the tokens the router sent
    each expert per layer, and which experts fell back to round-to-nearest (routed calibration)."""
    mode = experts.get("calibration")
    how = {"all": "every expert's statistics come from every calibration token (the layer outputs passed on "
                  "use the real routing)",
           "routed": "each expert's statistics come only from the tokens the router sent it; experts with too "
                     "few are rounded to nearest"}.get(mode, "")
    lines = ["## Mixture of experts\n",
             f"{experts.get('experts', '?')} experts per layer, {experts.get('top_k', '?')} active per token; "
             f"{experts.get('active', 0):,} of {experts.get('total', 0):,} parameters active per token. "
             f"Routers stay in full precision. Calibration: `{mode}`" + (f" ({how})." if how else ".")
             + (f" The experts' down-projection statistics come from {experts['stats_dtype']} products "
                "(accumulated in float32)." if experts.get("stats_dtype") else ""), ""]
    tokens, fell = experts.get("tokens") or {}, experts.get("fallbacks") or {}
    if tokens:
        lines += ["| layer | calibration tokens routed to each expert | round-to-nearest experts |", "|---|---|---|"]
        lines += [f"| {layer} | {' '.join(map(str, counts))} | {', '.join(map(str, fell.get(layer, []))) or '-'} |"
                  for layer, counts in sorted(tokens.items())]
        lines.append("")
    return lines


# ---- the release's plot --------------------------------------------------------------------------------
PLOT_FILE = "results.png"


def embed_plot(text: str, image: str = PLOT_FILE) -> str:
    """The card with an "Evaluation" section showing ``image`` (a file uploaded beside it: the release's
    plot of held-out perplexity and size per model), before "Loading" when the card has it, else at
    the end. A card that already shows ``image`` is returned unchanged."""
    if f"]({image})" in text:
        return text
    section = ("## Evaluation\n\n"
               f"![held-out perplexity and size of each model of this release]({image})\n\n"
               "Held-out perplexity of the models made together with this one (and their size on disk), "
               "measured by `mergequant run`.\n\n")
    at = text.find("\n## Loading\n")
    if at < 0:
        return text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    return text[:at + 1] + section + text[at + 1:]


# ---- validation and push-time rewriting ----------------------------------------------------------------
def validate_meta(meta: dict, *, repo: str | None = None, where: str = "README.md") -> None:
    """Check the Hub rules on a card's front matter (see the module docstring); CardError if broken."""
    bases = meta.get("base_model")
    if bases is not None and not (isinstance(bases, str) or (isinstance(bases, list) and all(isinstance(b, str) for b in bases))):
        raise CardError(f"{where}: base_model must be a Hub id or a list of Hub ids")
    bases = _as_list(bases)
    for b in bases:
        if not looks_like_hub_id(b) or "@" in b:
            raise CardError(f"{where}: base_model entry {b!r} is not a Hub id (namespace/name); a local parent must "
                            "be mapped to the repo it was published to (--base-model-map LOCAL=NS/NAME) or left out")
        if repo is not None and b.lower() == repo.lower():
            raise CardError(f"{where}: base_model {b!r} is the repo being pushed to")
    if len(set(b.lower() for b in bases)) != len(bases):
        raise CardError(f"{where}: base_model lists the same model twice: {bases}")
    rel = meta.get("base_model_relation")
    if rel is not None:
        if rel not in RELATIONS:
            raise CardError(f"{where}: base_model_relation {rel!r} is not one of {', '.join(RELATIONS)}")
        if not bases:
            raise CardError(f"{where}: base_model_relation {rel!r} without a base_model")
        if rel == "quantized" and len(bases) != 1:
            raise CardError(f"{where}: a quantized model has exactly one base_model (the model it was quantized from), "
                            f"found {len(bases)}: {bases}")
    lic = meta.get("license")
    if lic is not None and not isinstance(lic, str):
        raise CardError(f"{where}: license must be a string (an SPDX-like id such as apache-2.0, or 'other')")
    tags = meta.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        raise CardError(f"{where}: tags must be a list of strings")


def validate_card(text: str, *, repo: str | None = None, where: str = "README.md") -> dict:
    """Parse and check a card; returns its front matter."""
    meta, _ = split_card(text, where)
    validate_meta(meta, repo=repo, where=where)
    return meta


def _norm(ref: str) -> str:
    ref = ref.strip().rstrip("/")
    return ref[2:] if ref.startswith("./") else ref


def _resolve(ref: str) -> str | None:
    try:
        return str(Path(ref).expanduser().resolve())
    except (OSError, RuntimeError):
        return None


def _lookup(mapping: Mapping[str, str], ref: str, path: str | None = None) -> str | None:
    """The Hub id ``mapping`` gives for a local parent: the key equals the reference as written in the
    card, or names the same directory."""
    for key, hub_id in mapping.items():
        if _norm(key) == _norm(ref):
            return hub_id
    targets = {p for p in (path, _resolve(ref)) if p}
    for key, hub_id in mapping.items():
        if _resolve(key) in targets:
            return hub_id
    return None


def check_mapping(mapping: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for key, hub_id in mapping.items():
        if not looks_like_hub_id(hub_id) or "@" in hub_id:
            raise CardError(f"base-model map {key}={hub_id}: {hub_id!r} is not a Hub id (namespace/name)")
        out[str(key)] = hub_id
    return out


def rewrite_card(text: str, mapping: Mapping[str, str] | None = None, repo: str | None = None) -> str:
    """The card as it should be pushed to ``repo``.

    Local parents (from ``base_model`` entries that are not Hub ids, and from the card's
    ``mergequant-parents`` record) become the Hub ids ``mapping`` gives (keys: the path as written
    in the card, or any path naming the same directory); parents without a mapping are listed in
    the body under "Parents not on the Hub" and kept out of ``base_model``. The loading snippet
    points at ``repo``. The result is validated (:func:`validate_meta`)."""
    mapping = check_mapping(mapping or {})
    meta, body = split_card(text)
    mark = _MARK_RE.search(body)
    record: dict = {}
    if mark:
        try:
            record = json.loads(mark.group(1))
        except ValueError:
            record = {}
        body = body[:mark.start()] + body[mark.end():]

    bases: list[str] = []
    unmapped: list[str] = []
    renamed: dict[str, str] = {}
    for b in _as_list(meta.get("base_model")):
        b = str(b)
        hub_id = _lookup(mapping, b)
        if hub_id:
            bases.append(hub_id)
            renamed[b] = hub_id
        elif looks_like_hub_id(b):
            bases.append(b.split("@")[0])
        else:
            unmapped.append(b)
    for item in record.get("local", []) if isinstance(record.get("local"), list) else []:
        ref = str(item.get("ref", "")) if isinstance(item, dict) else ""
        if not ref:
            continue
        hub_id = _lookup(mapping, ref, item.get("path"))
        if hub_id:
            bases.append(hub_id)
            renamed[ref] = hub_id
        else:
            unmapped.append(ref)
    bases = list(dict.fromkeys(bases))
    unmapped = list(dict.fromkeys(unmapped))

    relation = meta.get("base_model_relation") or record.get("relation")
    new_meta: dict = {}
    for k, v in meta.items():  # keep the key order; base_model first when it is new
        if k in ("base_model", "base_model_relation"):
            continue
        new_meta[k] = v
    head: dict = {}
    if bases:
        head["base_model"] = bases
        if relation:
            head["base_model_relation"] = relation
    meta = {**head, **new_meta}

    for ref, hub_id in renamed.items():
        body = body.replace(f"- `{ref}` (base) (local path)", f"- [`{hub_id}`](https://huggingface.co/{hub_id}) (base)")
        body = body.replace(f"- `{ref}` (local path)", f"- [`{hub_id}`](https://huggingface.co/{hub_id})")
        body = body.replace(f"The base model was `{ref}`.", f"The base model was [`{hub_id}`](https://huggingface.co/{hub_id}).")
    if unmapped and _LOCAL_HEADING not in body:
        section = (f"{_LOCAL_HEADING}\n\nThese parents were local directories that are not published on the Hub "
                   "(so they are not in `base_model`):\n\n" + "\n".join(f"- `{u}`" for u in unmapped) + "\n")
        body = body.rstrip("\n") + "\n\n" + section
    if repo:
        body = body.replace(MODEL_PATH_PLACEHOLDER, repo)
    validate_meta(meta, repo=repo)
    return front_matter(meta) + body
