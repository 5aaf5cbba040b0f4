"""The shapes of the model the quantizations will read, known before that model exists.

Quantization options are checked against the layers they will meet (a ``group_size`` that does not
divide a layer, a method that does not support the architecture, MoE options) before the first step
runs, so a release fails in a second instead of after a long merge. The source is the merge output
when it is finished and unchanged, the ``merge: {model:}`` folder (with a LoRA adapter, the adapted view
:func:`mergequant.peft.adapted.open_model` gives, as quantize reads it), or else the merge plan (which
knows every output tensor's name, shape and dtype without computing one). The dry run uses the same
checked options for its size and memory estimates (:meth:`mergequant.release.steps.QuantizeStep.estimate`).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING

from mergequant.errors import MergeQuantError
from mergequant.release.hashing import sha256_file
from mergequant.release.layout import ReleaseError
from mergequant.release.spec import Release

if TYPE_CHECKING:
    from mergequant.release.runner import _Runner


def merge_plan(rel: Release):
    """The merge plan of ``rel``'s recipe (opens the parents' headers, reads no weights)."""
    from mergequant.merge.plan import build_plan, open_models
    from mergequant.recipe import load_recipe

    recipe = load_recipe(rel.merge.recipe)
    o = rel.merge.options
    return build_plan(recipe, open_models(recipe), out_dtype=o.get("out_dtype"),
                      allow_vocab_mismatch=o.get("allow_vocab_mismatch", False),
                      mergekit_dtype=o.get("mergekit_dtype", False))


def source_shapes(ctx: _Runner):
    """(config, {name: info with .shape/.dtype}) of the model the quantizations read, without running the merge."""
    from mergequant.io.checkpoint import Checkpoint

    src = ctx.source_dir()
    rec = ctx.records.get("merge")
    if ctx.rel.merge.model is not None:
        # with a LoRA adapter: the adapted view quantize reads (same tensors, shapes and dtypes as the base)
        ck = ctx.source_checkpoint() if ctx.rel.merge.adapted else Checkpoint.open(src)
        return ck.config, ck.tensors
    if (rec is not None and (src / "config.json").is_file() and ctx.decide(ctx.steps[0], verify=False)[0] is False
            and rec.get("files", {}).get("config.json", {}).get("sha256") == sha256_file(src / "config.json")):
        try:
            ck = Checkpoint.open(src)
            return ck.config, ck.tensors
        except MergeQuantError:
            pass  # a damaged merge output: the merge step finds it (verify) and redoes it; plan from the recipe
    plan = ctx.merge_plan()
    config = dict(plan.checkpoints[plan.ref_model].config)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            config[key] = plan.num_layers_out
    return config, {t.name: SimpleNamespace(shape=tuple(t.shape), dtype=t.out_dtype) for t in plan.tensors}


def check_quantizations(ctx: _Runner) -> dict:
    """Check every quantization's settings against the source shapes before any step runs;
    returns {name: (QuantizeOptions, method, linears, stand-in checkpoint)}."""
    rel = ctx.rel
    if not rel.quantize:
        return {}
    from mergequant.quant.quantize import (QuantizeOptions, check_moe_options, find_linears,
                                           quantizable_architecture, validate)

    config, tensors = source_shapes(ctx)
    stand_in = SimpleNamespace(tensors=tensors, path=ctx.source_dir(), architecture=(config.get("architectures") or ["?"])[0],
                               config=config)
    out = {}
    for q in rel.quantize:
        opts = QuantizeOptions(out=ctx.wd / q.name, **q.settings)
        if q.settings.get("method") == "gguf":  # llama.cpp files: {file type: estimated bytes} instead of linears
            from mergequant.release.gguf import check_gguf

            try:
                if rel.merge.adapted:
                    raise MergeQuantError("method gguf reads a model folder; a model with a LoRA adapter (merge.model "
                                          "BASE+ADAPTER) is not converted to GGUF yet (merge the adapter first)")
                out[q.name] = (opts, "gguf", check_gguf(stand_in, opts), stand_in)
            except MergeQuantError as e:
                raise ReleaseError(f"{rel.path}: quantize {q.name}: {e}") from None
            continue
        try:
            arch = quantizable_architecture(stand_in, opts.method)
            check_moe_options(opts, arch)
            linears = find_linears(stand_in, arch, opts.moe_names)  # MoE: output names follow moe_names
            method = validate(opts, linears)
        except MergeQuantError as e:
            raise ReleaseError(f"{rel.path}: quantize {q.name}: {e}") from None
        out[q.name] = (opts, method, linears, stand_in)
    return out
