"""Model cards (README.md with Hub front matter) for the artifacts mergequant writes."""

from __future__ import annotations

from pathlib import Path

import yaml

from mergequant import __version__
from mergequant.recipe import looks_like_hub_id


def hub_parents(refs: list[str], base_dir: Path | None = None) -> list[str]:
    """The references that are Hub ids (not local directories): only these may go in ``base_model``.

    ``base_dir`` is the recipe's folder: references are also resolved relative to it (as the merge does)."""
    return [r.split("@")[0] for r in refs if looks_like_hub_id(r) and not Path(r).exists()
            and not (base_dir is not None and (base_dir / r).exists())]


def front_matter(meta: dict) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def merge_card(*, method: str, pretty_name: str, paper: str, models: list[str], base_model: str | None,
               recipe_text: str, out_dtype: str | None, num_parameters: int, license: str | None = None,
               base_dir: Path | None = None) -> str:
    """A model card for a merge: every Hub parent in ``base_model`` with relation ``merge``, the method
    and its paper, and the recipe verbatim (so the merge can be reproduced)."""
    parents = hub_parents(models, base_dir)
    meta: dict = {}
    if parents:
        meta["base_model"] = parents
        meta["base_model_relation"] = "merge"
    meta["library_name"] = "transformers"
    meta["tags"] = ["merge", "mergequant", method]
    if license:
        meta["license"] = license
    local = [m for m in models if m.split("@")[0] not in parents]
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
        f"Parameters: {num_parameters:,}" + (f"; weights stored as {out_dtype}." if out_dtype else "."),
        "",
        "## Recipe\n",
        "The exact recipe used (mergekit-compatible YAML):\n",
        "```yaml",
        recipe_text.rstrip("\n"),
        "```",
        "",
    ]
    return "\n".join(lines)


def quant_card(*, source: str, method: str, bits: int, settings: list[tuple[str, str]], tags: list[str],
               requirements: str, calib: str | None, calib_tokens: int, samples: int,
               fallbacks: list[str], perplexity: dict | None = None, eval_data: str | None = None) -> str:
    """A model card for a quantized checkpoint: ``base_model`` is the one source (when it is a Hub id)
    with relation ``quantized``; the body says how it was made (``settings`` rows from the method)
    and how to load it (``requirements``: what transformers needs installed for this format)."""
    parents = hub_parents([source])
    meta: dict = {}
    if parents:
        meta["base_model"] = parents
        meta["base_model_relation"] = "quantized"
    meta["library_name"] = "transformers"
    meta["tags"] = ["mergequant", *dict.fromkeys(tags)]
    lines = [
        front_matter(meta),
        f"# {Path(source).name or source} ({method.upper()} {bits}-bit)\n",
        f"Quantized from `{source}` with [mergequant](https://github.com/mergequant/mergequant) {__version__}.\n",
        "| setting | value |", "|---|---|",
        f"| method | {method} |", *[f"| {k} | {v} |" for k, v in settings],
        f"| calibration | {calib + f' ({samples} samples, {calib_tokens:,} tokens)' if calib else 'none'} |",
        "",
    ]
    if fallbacks:
        lines += [f"Round-to-nearest was used for {len(fallbacks)} module(s) where GPTQ's Cholesky failed: "
                  + ", ".join(f"`{f}`" for f in fallbacks), ""]
    if perplexity:
        lines += ["## Perplexity\n", f"Held-out perplexity on `{eval_data}` (measured by `mergequant eval`):\n",
                  "| model | perplexity |", "|---|---|",
                  *[f"| {k} | {v:.4f} |" for k, v in perplexity.items()], ""]
    needs = f"  # needs {requirements}" if requirements else ""
    lines += ["## Loading\n", "```python", f"from transformers import AutoModelForCausalLM{needs}",
              f"model = AutoModelForCausalLM.from_pretrained(\"{parents[0] if parents else 'PATH'}\", device_map=\"auto\")",
              "```", ""]
    return "\n".join(lines)
