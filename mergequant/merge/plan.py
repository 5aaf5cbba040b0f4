"""Which inputs and which resolved parameters feed each output tensor.

The plan is built from the recipe and the checkpoints' headers only: every check that can
fail (missing tensor, shape or architecture mismatch, vocabulary size, missing parameter)
fails here, before any tensor data is read and before any output is created.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergequant.errors import CheckpointError, RecipeError
from mergequant.io.checkpoint import Checkpoint, natural_key, split_layer_name
from mergequant.peft.adapted import model_dirs, open_model
from mergequant.merge.methods import REQUIRED, MethodSpec
from mergequant.merge.moe_layout import check_same_experts, filter_name, moe_architecture, per_expert_view
from mergequant.merge.params import layer_position, resolve
from mergequant.merge.tokenizer import VocabAlignment, build_alignment, is_vocab_tensor, model_rows
from mergequant.recipe import Recipe, Source

DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DTYPE_TO_NAME = {v: k for k, v in DTYPE_NAMES.items()}


@dataclass
class TensorPlan:
    """One output tensor: where its inputs come from and the parameters to merge them with."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    inputs: list[tuple[str, str]]  # (model reference, input tensor name), recipe order
    base_index: int | None
    shared: dict
    per_model: list[dict]  # resolved per-input parameters ({} for the base in task methods)
    copy_index: int | None = None  # non-float tensors are copied from this input
    merge_rows: int | None = None  # vocabulary mismatch: only the first rows are merged, the rest come from the base
    compute_dtype: torch.dtype | None = None  # --mergekit-dtype: inputs rounded to this and computed in it; None: float32
    vocab: VocabAlignment | None = None  # tokenizer merging: rows gathered by token string (merge/tokenizer.py)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def out_bytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.out_dtype).element_size()


@dataclass
class MergePlan:
    recipe: Recipe
    spec: MethodSpec
    checkpoints: dict[str, Checkpoint]
    ref_model: str  # the model whose config and tokenizer the output takes (base, else first)
    tensors: list[TensorPlan]
    num_layers_out: int
    layer_sources: list[tuple[str, int]]  # output layer -> (model, input layer), for per-layer config lists
    compute_dtype: torch.dtype | None  # recipe dtype under --mergekit-dtype, else None; per tensor: TensorPlan.compute_dtype
    warnings: list[str] = field(default_factory=list)
    vocab: VocabAlignment | None = None  # the output tokenizer and row alignment (None: the reference's, by index)

    @property
    def bytes_to_read(self) -> int:
        total = 0
        for t in self.tensors:
            for ref, name in t.inputs if t.copy_index is None else [t.inputs[t.copy_index]]:
                total += self.checkpoints[ref].tensors[name].nbytes
        return total

    @property
    def bytes_to_write(self) -> int:
        return sum(t.out_bytes for t in self.tensors)

    @property
    def input_dirs(self) -> list[Path]:
        return [d for c in self.checkpoints.values() for d in model_dirs(c)]  # an adapted model: base and adapter


def _is_pre_layer(name: str) -> bool:
    """Embeddings come before the layers; final norm and lm_head after (matters for the slices form)."""
    return any(k in name for k in ("embed", "wte", "wpe", "word_embeddings"))


def open_models(recipe: Recipe) -> dict[str, Checkpoint]:
    where = {s.model: s.where + ".model" for s in recipe.all_sources()}
    where.setdefault(recipe.base_model, "base_model")
    out = {}
    for ref in recipe.model_refs():
        # a folder, a Hub id, BASE+ADAPTER or an adapter-only folder (a LoRA applied on read: mergequant/peft)
        out[ref] = open_model(ref, base_dir=recipe.path.parent, where=f"{where.get(ref, '')} in {recipe.path}")
    return out


def build_plan(recipe: Recipe, checkpoints: dict[str, Checkpoint], *, out_dtype: str | None = None,
               allow_vocab_mismatch: bool = False, mergekit_dtype: bool = False) -> MergePlan:
    spec = recipe.spec
    ref = recipe.base_model or recipe.all_sources()[0].model
    # Mixture-of-experts inputs in the fused layout are seen under per-expert names, so every input, in
    # either layout, merges expert by expert under the architecture's original names (moe_layout.py).
    checkpoints = {r: per_expert_view(c) for r, c in checkpoints.items()}
    ref_ckpt = checkpoints[ref]
    vocab = build_alignment(recipe, checkpoints, ref)
    _check_compatible(recipe, checkpoints, ref, allow_vocab_mismatch or vocab is not None)

    out_name = out_dtype or recipe.out_dtype or recipe.dtype
    if out_name is not None and out_name not in DTYPE_NAMES:
        raise RecipeError(f"out dtype '{out_name}' is not one of {', '.join(DTYPE_NAMES)}")
    fixed_out = DTYPE_NAMES[out_name] if out_name else None
    compute = DTYPE_NAMES[recipe.dtype] if (mergekit_dtype and recipe.dtype) else None

    builder = _Builder(recipe, spec, checkpoints, fixed_out, allow_vocab_mismatch, mergekit_dtype, compute)
    builder.vocab = vocab if vocab is not None and not vocab.identity else None
    layer_sources: list[tuple[str, int]] = []
    if recipe.models is not None:
        sources = list(recipe.models)
        if recipe.base_model and recipe.base_model not in [s.model for s in sources]:
            sources.append(Source(recipe.base_model, None, None, "base_model"))
        check_nothing_dropped(ref, checkpoints, [s.model for s in sources])
        n_layers = ref_ckpt.num_layers or 0
        for name in sorted(ref_ckpt.tensors, key=natural_key):
            parts = split_layer_name(name)
            t = layer_position(parts[1], n_layers) if parts else 0.0
            builder.add(name, [(s, name) for s in sources], None, recipe.base_model, t)
        layer_sources = [(ref, i) for i in range(n_layers)]
    else:
        first, last = recipe.slices[0], recipe.slices[-1]
        non_layer = [n for n in sorted(ref_ckpt.tensors, key=natural_key) if not split_layer_name(n)]
        for name in [n for n in non_layer if _is_pre_layer(n)]:
            builder.add(name, [(s, name) for s in first.sources], first.parameters, first.base_model or recipe.base_model, 0.0)
        out_layer = 0
        for sl in recipe.slices:
            base = sl.base_model or recipe.base_model
            lead = sl.sources[0]
            n = lead.layer_range[1] - lead.layer_range[0]
            for s in sl.sources:
                have = checkpoints[s.model].num_layers or 0
                if s.layer_range[1] > have:
                    raise RecipeError(f"{recipe.path}: {s.where}.layer_range: {list(s.layer_range)} exceeds the {have} layers of {s.model}")
            for off in range(n):
                t = layer_position(off, n)
                lead_layer = lead.layer_range[0] + off
                suffixes = sorted(
                    {(p[0], p[2]) for nm in checkpoints[lead.model].tensors if (p := split_layer_name(nm)) and p[1] == lead_layer},
                    key=lambda ps: natural_key(ps[1]))
                for prefix, rest in suffixes:
                    inputs = [(s, f"{prefix}.{s.layer_range[0] + off}.{rest}") for s in sl.sources]
                    builder.add(f"{prefix}.{out_layer}.{rest}", inputs, sl.parameters, base, t)
                layer_sources.append((lead.model, lead_layer))
                out_layer += 1
        for name in [n for n in non_layer if not _is_pre_layer(n)]:
            builder.add(name, [(s, name) for s in last.sources], last.parameters, last.base_model or recipe.base_model, 0.0)
    warnings = list(recipe.warnings)
    zeroed = zero_weight_tensors(builder.tensors, spec)
    if zeroed and len(zeroed) == sum(1 for tp in builder.tensors if tp.copy_index is None):
        raise RecipeError(f"{recipe.path}: every model has weight 0 for every tensor (normalize is off), so the "
                          "merge would be all zeros; give at least one model a non-zero weight")
    if zeroed:
        warnings.append(f"{len(zeroed)} tensor(s) have weight 0 for every model and are written as zeros "
                        f"(first: {zeroed[0]}); check the recipe's weights and filters")
    plan = MergePlan(recipe, spec, checkpoints, ref, builder.tensors, len(layer_sources), layer_sources, compute,
                     warnings, vocab)
    return plan


IGNORABLE_EXTRA = ("rotary_emb.inv_freq",)  # buffers that old checkpoints store and every loader recomputes


def check_nothing_dropped(ref: str, checkpoints: dict[str, Checkpoint], models: list[str]) -> None:
    """Refuse a merge that would silently drop another model's tensor.

    The output takes its tensor list from the reference model (base, else first). A tensor that another
    input has and the reference lacks would vanish without a word: a fine-tune's ``lm_head.weight``
    under a base with ``tie_word_embeddings: true`` (or a base saved without its head), which a loader
    then fills with the embeddings or with random values."""
    r = checkpoints[ref]
    for model in models:
        c = checkpoints[model]
        extra = sorted((n for n in c.tensors if n not in r.tensors and not n.endswith(IGNORABLE_EXTRA)), key=natural_key)
        if extra:
            tied = " (it ties lm_head to the embeddings: tie_word_embeddings is true)" if r.config.get("tie_word_embeddings") else ""
            raise CheckpointError(f"{c.path}: tensor {extra[0]}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else "")
                                  + f" is not in the reference model {r.path}{tied}; the merge would drop it. "
                                  "Merge models with the same tensors (make the model that has it the base_model, "
                                  "or untie the base first)")


def zero_weight_tensors(tensors: list[TensorPlan], spec) -> list[str]:
    """Output tensors of a pure weighted sum (no base to fall back to) whose every weight is 0: they
    come out as zeros, which a user never means (a whole model of them is refused)."""
    if not spec.weighted_sum:
        return []
    out = []
    for tp in tensors:
        if tp.copy_index is not None or (tp.base_index is not None and not spec.per_model_applies_to_base):
            continue  # copied, or a task method: the base is the output where every delta weighs 0
        weights = [p.get("weight") for p in tp.per_model]
        if weights and all(w == 0 for w in weights) and not tp.shared.get("normalize"):
            out.append(tp.name)
    return out


def dtype_name(dtype: torch.dtype) -> str:
    """``bfloat16`` rather than ``torch.bfloat16``, for messages."""
    return str(dtype).removeprefix("torch.")


def mergekit_compute_dtype(recipe_dtype: torch.dtype | None, input_dtypes) -> torch.dtype:
    """The dtype mergekit computes one output tensor in, which ``--mergekit-dtype`` reproduces.

    With a recipe ``dtype`` mergekit casts every input to it as it loads it, so that is the answer.
    Without one, mergekit 0.1.5 (the version the differential tests run) leaves each input in its
    stored dtype and, before calling the merge method, aligns the inputs of a tensor to their promoted
    dtype (``torch.promote_types`` over all inputs): all-bf16 computes in bf16, while bf16 + fp16 and
    bf16 + fp32 compute in float32. So mergekit does *not* use the base model's dtype here; older
    releases did, inside the task-arithmetic methods only (``x.to(base.dtype)``), which rounds an fp32
    fine-tune's weights to bf16 before taking the delta. Promotion never rounds an input down before the
    arithmetic, which is the safer rule to copy. (linear and slerp accumulate in float32, float64 for
    float64 inputs, in every mergekit version; the engine does the same.)

    Only the compute dtype follows mergekit: the written dtype still follows ``--out-dtype``, the recipe's
    ``out_dtype``/``dtype``, else the reference input's dtype, whereas mergekit without a ``dtype`` writes
    the promoted dtype (pass ``--out-dtype float32`` to get its bytes for a bf16 + fp32 mix).
    """
    if recipe_dtype is not None:
        return recipe_dtype
    return functools.reduce(torch.promote_types, input_dtypes)


def check_input_dtypes(out_name: str, inputs: list[tuple[Path, object]]) -> None:
    """Refuse a tensor whose inputs mix floating-point and non-floating (integer, bool) dtypes.

    Why: float inputs are cast to one compute dtype, whatever their mix. An integer tensor has no such
    meaning next to a float one (a quantized weight, an index buffer, or a broken export): averaging it
    would convert its integers to floats, and copying one side would silently drop the other model's
    values. Checked from the headers, so nothing is read and no output is created.
    ``inputs`` is [(model path, TensorInfo)] in recipe order."""
    floats = [(path, info) for path, info in inputs if info.dtype.is_floating_point]
    others = [(path, info) for path, info in inputs if not info.dtype.is_floating_point]
    if floats and others:
        (fp, fi), (op, oi) = floats[0], others[0]
        raise CheckpointError(
            f"tensor {out_name}: {op} stores {oi.name} as {dtype_name(oi.dtype)} but {fp} stores {fi.name} as "
            f"{dtype_name(fi.dtype)}; an integer tensor cannot be merged with floating-point ones "
            "(convert it, or merge models that store this tensor in the same kind of dtype)")


def _check_compatible(recipe: Recipe, ckpts: dict[str, Checkpoint], ref: str, allow_vocab: bool) -> None:
    r = ckpts[ref]
    for name, c in ckpts.items():
        if c.architecture != r.architecture:
            raise CheckpointError(f"{c.path}: architecture {c.architecture} differs from {r.architecture} of {r.path}")
        if recipe.models is not None and c.num_layers != r.num_layers:
            raise CheckpointError(f"{c.path}: {c.num_layers} layers but {r.path} has {r.num_layers}; "
                                  "use the slices form with layer_range to merge different depths")
        check_same_experts([(r.path, r.config), (c.path, c.config)])
        if c.vocab_size != r.vocab_size and not allow_vocab:
            raise CheckpointError(f"{c.path}: vocabulary size {c.vocab_size} differs from {r.vocab_size} of {r.path}; "
                                  "set tokenizer_source: union (or base) to align rows by token, or pass --allow-vocab-mismatch to "
                                  "merge the shared rows and keep the reference model's extra rows")


def _in_range(spec, pname: str, v) -> bool:
    """Whether a resolved value fits the parameter's declared range (non-numeric values are the
    recipe checker's business)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return True
    return spec.param[pname].in_range(v)


class _Builder:
    def __init__(self, recipe, spec, ckpts, fixed_out, allow_vocab, mergekit_dtype=False, recipe_compute=None):
        self.recipe, self.spec, self.ckpts, self.fixed_out, self.allow_vocab = recipe, spec, ckpts, fixed_out, allow_vocab
        self.mergekit_dtype, self.recipe_compute = mergekit_dtype, recipe_compute
        self.tensors: list[TensorPlan] = []
        self.vocab: VocabAlignment | None = None
        # filters also match a mixture-of-experts weight's fused-layout name (mergekit's), see moe_layout.FilterName
        self.moe_arch = moe_architecture(ckpts[recipe.base_model or recipe.all_sources()[0].model].config)

    def add(self, out_name: str, inputs: list[tuple[Source, str]], slice_params: dict | None, base: str | None, t: float):
        recipe, spec = self.recipe, self.spec
        infos = []
        for src, in_name in inputs:
            ck = self.ckpts[src.model]
            info = ck.tensors.get(in_name)
            if info is None:
                raise CheckpointError(f"{ck.path}: tensor {in_name} is missing (needed for output {out_name})")
            infos.append(info)
        check_input_dtypes(out_name, [(self.ckpts[src.model].path, info) for (src, _), info in zip(inputs, infos)])
        first, first_src = infos[0], inputs[0][0]
        base_index = next((i for i, (s, _) in enumerate(inputs) if s.model == base), None) if base else None
        merge_rows = None
        vocab = None
        if self.vocab is not None and all(is_vocab_tensor(n, i.shape, model_rows(self.ckpts[s.model]))
                                          for (s, n), i in zip(inputs, infos)):
            rest = {i.shape[1:] for i in infos}
            if len(rest) > 1 or not all(i.dtype.is_floating_point for i in infos):
                raise CheckpointError(f"tensor {out_name}: inputs of shapes {sorted(list(i.shape) for i in infos)} cannot be "
                                      "aligned by token (they must differ in rows only)")
            vocab = self.vocab
            infos = [_Shaped(i, (vocab.rows, *i.shape[1:])) for i in infos]
            first = infos[0]
        for info, (src, _) in zip(infos[1:], inputs[1:]):
            if info.shape != first.shape:
                vocab_like = (self.allow_vocab and len(info.shape) >= 1 and info.shape[1:] == first.shape[1:])
                if not vocab_like:
                    raise CheckpointError(
                        f"{self.ckpts[src.model].path}: tensor {info.name} has shape {list(info.shape)} but "
                        f"{self.ckpts[first_src.model].path} has {list(first.shape)}")
        shape_ref = infos[base_index] if base_index is not None else first
        if any(i.shape != shape_ref.shape for i in infos):
            merge_rows = min(i.shape[0] for i in infos)
        out_dtype = self.fixed_out or shape_ref.dtype
        if not shape_ref.dtype.is_floating_point:
            idx = base_index if base_index is not None else 0
            self.tensors.append(TensorPlan(out_name, shape_ref.shape, shape_ref.dtype, [(s.model, n) for s, n in inputs],
                                           base_index, {}, [{} for _ in inputs], copy_index=idx))
            return
        shared = {}
        for pname, default in spec.shared.items():
            v = resolve(pname, [slice_params, recipe.parameters], filter_name(self.moe_arch, out_name), t)
            if v is None:
                if default is REQUIRED:
                    raise RecipeError(f"{recipe.path}: missing required parameter '{pname}' for tensor {out_name}")
                v = default
            elif not _in_range(spec, pname, v):
                raise RecipeError(f"{recipe.path}: parameter {pname} {v} for tensor {out_name} is not "
                                  f"{spec.param[pname].range_text}")
            shared[pname] = v
        per_model = []
        for i, (src, in_name) in enumerate(inputs):
            if i == base_index and not spec.per_model_applies_to_base:
                per_model.append({})
                continue
            vals = {}
            for pname, default in spec.per_model.items():
                v = resolve(pname, [src.parameters, slice_params, recipe.parameters], filter_name(self.moe_arch, in_name), t)
                if v is None:
                    if default is REQUIRED:
                        raise RecipeError(f"{recipe.path}: missing required parameter '{pname}' for model '{src.model}' "
                                          f"tensor {in_name} (no filter matched)")
                    v = default
                if not _in_range(spec, pname, v):
                    raise RecipeError(f"{recipe.path}: {src.where}: {pname} {v} for tensor {in_name} is not "
                                      f"{spec.param[pname].range_text}")
                vals[pname] = v
            per_model.append(vals)
        weights = [p["weight"] for p in per_model if "weight" in p]
        if shared.get("normalize") and not spec.consensus and weights and abs(sum(weights)) < 1e-8:
            raise RecipeError(f"{recipe.path}: weights {weights} for tensor {out_name} sum to 0 with normalize: true")
        why = spec.check_tensor(shared, per_model, [i for i in range(len(inputs)) if i != base_index
                                                    or spec.per_model_applies_to_base], [s.model for s, _ in inputs])
        if why:
            raise RecipeError(f"{recipe.path}: tensor {out_name}: {why}")
        compute = mergekit_compute_dtype(self.recipe_compute, [i.dtype for i in infos]) if self.mergekit_dtype else None
        self.tensors.append(TensorPlan(out_name, shape_ref.shape, out_dtype, [(s.model, n) for s, n in inputs],
                                       base_index, shared, per_model, merge_rows=merge_rows, compute_dtype=compute,
                                       vocab=vocab))


@dataclass
class _Shaped:
    """A tensor header seen with the output's row count (vocabulary-aligned tensors)."""

    info: object
    shape: tuple

    def __getattr__(self, name):
        return getattr(self.info, name)
