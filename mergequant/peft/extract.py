"""``mergequant extract-lora``: a LoRA adapter from a fine-tune and its base, one module at a time.

For every module the float32 delta ``D = finetune - base`` is read (memory-mapped inputs, one tensor in
memory at a time), factored by :func:`mergequant.peft.factor.factor_delta`, and its factors appended to
the adapter (``write.py``). Peak memory is about one delta and its SVD workspace, whatever the model size.

What becomes what:

- 2-D ``*.weight`` of a Linear module -> LoRA (``lora_A``/``lora_B``), rank from ``--rank``/``--energy``;
- input embeddings and ``lm_head`` -> LoRA (``lora_embedding_A/B`` for embeddings) with ``--embeddings
  lora`` (default), or whole in ``modules_to_save`` with ``--embeddings save``, and always whole when
  the vocabulary sizes differ (a low-rank delta cannot add rows);
- a Linear bias that changed -> ``lora_bias`` (``lora_B.bias`` = the bias delta; zeros for the others);
- a 1-D weight that changed (RMSNorm/LayerNorm) -> the whole module in ``modules_to_save``: it is tiny
  and a rank-1 "delta" of a vector means nothing to peft (decided; the log and the card say which);
- a module equal to the base -> left out (rank 0);
- anything else that changed (3-D fused experts, buffers) -> refused in one line naming the tensor.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from mergequant.errors import MergeQuantError
from mergequant.io.checkpoint import Checkpoint
from mergequant.io.output_dir import atomic_output_dir, check_output_location, output_path
from mergequant.peft.factor import check_method, check_rank_energy, factor_delta
from mergequant.peft.write import (PREFIX, AdapterContents, AdapterTensorWriter, ModuleRecord, adapter_bytes,
                                   adapter_card, adapter_config, is_adapter_folder, is_embedding,
                                   write_adapter_files)
from mergequant.units import format_bytes

EMBEDDINGS = ("lora", "save")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_RANK = 64


@dataclass
class ExtractOptions:
    out: Path
    rank: int | None = None  # None with no energy: DEFAULT_RANK
    energy: float | None = None
    embeddings: str = "lora"  # lora | save
    dtype: str | None = None  # adapter dtype; default: the fine-tune's
    svd: str = "auto"  # auto | exact | randomized
    dry_run: bool = False
    force: bool = False
    quiet: bool = False
    seed: int = 0
    fsync: bool = True


@dataclass
class ModuleJob:
    """One module of the plan: ``kind`` lora | embedding | save | bias-only; its tensors."""

    module: str
    kind: str
    weight: str | None
    bias: str | None
    shape: tuple[int, ...]


@dataclass
class ExtractPlan:
    finetune: Checkpoint
    base: Checkpoint
    finetune_ref: str
    base_ref: str
    jobs: list[ModuleJob]
    linear_modules: list[str]  # every 2-D module of the base (for compact target_modules)
    dtype: torch.dtype
    rank: int | None
    energy: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def bytes_to_read(self) -> int:
        n = 0
        for j in self.jobs:
            for t in (j.weight, j.bias):
                if t is not None:
                    n += self.finetune.tensors[t].nbytes + self.base.tensors[t].nbytes
        return n


@dataclass
class ExtractResult:
    out: Path | None
    contents: AdapterContents
    bytes_written: int
    unchanged: list[str]


def _resolve_options(opts: ExtractOptions) -> tuple[int | None, float | None]:
    rank = opts.rank if (opts.rank is not None or opts.energy is not None) else DEFAULT_RANK
    check_rank_energy(rank, opts.energy, "extract-lora")
    if opts.embeddings not in EMBEDDINGS:
        raise MergeQuantError(f"--embeddings must be one of {', '.join(EMBEDDINGS)}, got {opts.embeddings!r}")
    if opts.dtype is not None and opts.dtype not in DTYPES:
        raise MergeQuantError(f"--dtype must be one of {', '.join(DTYPES)}, got {opts.dtype!r}")
    check_method(opts.svd)
    return rank, opts.energy


def _module_of(tensor: str) -> tuple[str, str]:
    module, _, leaf = tensor.rpartition(".")
    return module, leaf


def _vocab_rows(name: str, ft: Checkpoint, base: Checkpoint) -> bool:
    """A tensor whose first dimension is the vocabulary (embeddings, lm_head) and differs between the two."""
    a, b = ft.tensors[name].shape, base.tensors[name].shape
    return len(a) == 2 and a[1:] == b[1:] and a[0] != b[0] and a[0] in (ft.vocab_size, base.vocab_size)


def plan_modules(ft: Checkpoint, base: Checkpoint, embeddings: str) -> tuple[list[ModuleJob], list[str], list[str]]:
    """Classify every tensor of the fine-tune into module jobs; refuse mismatches naming the tensor.

    Returns (jobs, every 2-D module of the base, notes)."""
    from mergequant.io.checkpoint import natural_key

    missing = sorted(set(base.tensors) - set(ft.tensors))
    extra = sorted(set(ft.tensors) - set(base.tensors))
    if extra:
        raise MergeQuantError(f"{ft.path}: tensor {extra[0]} is not in the base {base.path}"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "") + ": not a fine-tune of this base?")
    if missing:
        raise MergeQuantError(f"{base.path}: tensor {missing[0]} is missing from the fine-tune {ft.path}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    notes: list[str] = []
    vocab_differs = False
    for name in ft.tensors:
        a, b = ft.tensors[name].shape, base.tensors[name].shape
        if a != b:
            if _vocab_rows(name, ft, base):
                vocab_differs = True
                continue
            raise MergeQuantError(f"{name}: shape {tuple(a)} in the fine-tune {ft.path} but {tuple(b)} in the base "
                                  f"{base.path}: module {_module_of(name)[0]} does not fit this base")
        if not ft.tensors[name].dtype.is_floating_point:
            raise MergeQuantError(f"{name}: {ft.tensors[name].dtype} tensor; LoRA extraction needs float weights")
    if vocab_differs and embeddings == "lora":
        embeddings = "save"
        notes.append("the vocabulary sizes differ: embeddings and lm_head are kept whole (modules_to_save); "
                     "resize the base's token embeddings to the fine-tune's vocabulary before loading the adapter")
    by_module: dict[str, dict[str, str]] = {}
    for name in sorted(ft.tensors, key=natural_key):
        module, leaf = _module_of(name)
        by_module.setdefault(module, {})[leaf] = name
    jobs, linear = [], []
    for module, leaves in by_module.items():
        w, b = leaves.get("weight"), leaves.get("bias")
        others = [n for k, n in leaves.items() if k not in ("weight", "bias")]
        shape = tuple(ft.tensors[w].shape) if w else ()
        if w and len(shape) == 2:
            linear.append(module)
            vocab = module == "lm_head" or is_embedding(module) or _vocab_rows(w, ft, base)
            if vocab and embeddings == "save":
                kind = "save"
            else:
                kind = "embedding" if is_embedding(module) else "lora"
            jobs.append(ModuleJob(module, kind, w, b if kind != "embedding" else None, shape))
            if kind == "embedding" and b:
                others.append(b)
        elif w and len(shape) == 1:
            jobs.append(ModuleJob(module, "save", w, b, shape))
        else:
            others += [n for n in (w, b) if n]
        for n in others:  # buffers, 3-D fused experts, ...: fine while equal to the base
            jobs.append(ModuleJob(module, "other", n, None, tuple(ft.tensors[n].shape)))
    return jobs, linear, notes


def _open(ref: str, where: str) -> Checkpoint:
    """A folder, a Hub id, or (once mergequant.peft.adapted is there) ``BASE+ADAPTER`` / an adapter folder."""
    try:
        from mergequant.peft.adapted import open_model
    except ImportError:  # pragma: no cover - adapter inputs not installed
        from mergequant.io.resolve import resolve_model

        return Checkpoint.open(resolve_model(ref, where=where))
    return open_model(ref, where=where)


def _input_dirs(*cks: Checkpoint) -> list[Path]:
    try:
        from mergequant.peft.adapted import model_dirs
    except ImportError:  # pragma: no cover
        return [c.path for c in cks]
    return [d for c in cks for d in model_dirs(c)]


def plan_extraction(finetune: str, base: str, opts: ExtractOptions) -> ExtractPlan:
    rank, energy = _resolve_options(opts)
    ft_ck = _open(finetune, "the fine-tune")
    base_ck = _open(base, "--base")
    if {p.resolve() for p in _input_dirs(ft_ck)} == {p.resolve() for p in _input_dirs(base_ck)}:
        raise MergeQuantError(f"{finetune} and --base {base} are the same model: the delta is zero")
    jobs, linear, notes = plan_modules(ft_ck, base_ck, opts.embeddings)
    if opts.dtype is not None:
        dtype = DTYPES[opts.dtype]
    else:
        dts = [ft_ck.tensors[j.weight].dtype for j in jobs if j.kind in ("lora", "embedding")]
        dtype = max(set(dts), key=dts.count) if dts else torch.float32
        if dtype not in DTYPES.values():
            dtype = torch.float32
    return ExtractPlan(ft_ck, base_ck, finetune, base, jobs, linear, dtype, rank, energy, notes)


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.equal(a.to(torch.float64) if a.dtype != b.dtype else a, b.to(torch.float64) if a.dtype != b.dtype else b)


def changed_small(plan: ExtractPlan) -> list[str]:
    """The 1-D modules (norms) that differ from the base: read now (they are tiny), so the dry run can say."""
    return [j.module for j in plan.jobs if j.kind == "save" and len(j.shape) == 1
            and any(_differs(plan.finetune.get(t), plan.base.get(t)) for t in (j.weight, j.bias) if t)]


def describe_extraction(plan: ExtractPlan) -> str:
    dt = str(plan.dtype).removeprefix("torch.")
    lora = [j for j in plan.jobs if j.kind in ("lora", "embedding")]
    whole = [j for j in plan.jobs if j.kind == "save" and len(j.shape) == 2]
    norms = changed_small(plan)
    cap = plan.rank
    est = sum(adapter_bytes(min(cap or min(j.shape), min(j.shape)), j.shape, plan.dtype) for j in lora)
    est += sum(_numel(j.shape) * torch.empty((), dtype=plan.dtype).element_size() for j in whole)
    est += sum(_numel(plan.finetune.tensors[t].shape) * 4 for j in plan.jobs if j.module in norms
               for t in (j.weight, j.bias) if t)
    rule = " and ".join(x for x in (f"rank <= {cap}" if cap else "", f"energy {plan.energy}" if plan.energy else "") if x)
    lines = [f"fine-tune:     {plan.finetune_ref} ({plan.finetune.path})",
             f"base:          {plan.base_ref} ({plan.base.path})",
             f"rank rule:     {rule}; per-module ranks in rank_pattern, lora_alpha = r (scale 1); adapter dtype {dt}",
             f"LoRA modules:  {len(lora)} (" + ", ".join(sorted({m.module.rsplit('.', 1)[-1] for m in lora})) + ")",
             f"kept whole:    {len(whole)} 2-D module(s)" + (f" ({', '.join(j.module for j in whole)})" if whole else "")
             + f", {len(norms)} changed 1-D module(s) (norms)",
             f"read:          {format_bytes(plan.bytes_to_read)}",
             f"adapter size:  at most ~{format_bytes(est)}" + (" (smaller where the energy rule or a module's numerical "
                                                                "rank stops first)"),
             f"peak memory:   ~{format_bytes(2 * 4 * max((_numel(j.shape) for j in lora), default=0))} (one float32 "
             "delta of the largest module, twice) + ~0.3 GiB for Python and torch (inputs are memory-mapped)",
             *[f"note:          {n}" for n in plan.notes]]
    by_type: dict[str, dict[tuple, int]] = {}
    for j in lora + whole:
        shapes = by_type.setdefault(j.module.rsplit(".", 1)[-1] + (" (whole)" if j.kind == "save" else ""), {})
        shapes[tuple(j.shape)] = shapes.get(tuple(j.shape), 0) + 1
    lines.append("modules:")
    for t, shapes in by_type.items():
        lines.append(f"  {t}: " + ", ".join(f"{n} x {list(sh)}" for sh, n in shapes.items()))
    return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_extract_output(out: Path, inputs: list[Path], force: bool, files=()) -> None:
    """The output must be new, or (with --force) an earlier adapter: never a folder that is not ours."""
    check_output_location(out, inputs, force=force, files=files)
    target = output_path(out)
    if force and target.is_dir() and any(target.iterdir()) and not is_adapter_folder(target):
        raise MergeQuantError(f"refusing to replace {out}: it is not a PEFT adapter folder (no adapter_config.json); "
                              "--force only replaces an earlier adapter")


def delta_of(ft: Checkpoint, base: Checkpoint, name: str) -> torch.Tensor:
    """float32 (float64 for float64 inputs) ``finetune - base`` of one tensor, one temporary."""
    a, b = ft.get(name), base.get(name)
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return a.to(dtype).sub_(b)  # in place, the other operand cast element by element: one temporary, not two


def extract_into(plan: ExtractPlan, writer: AdapterTensorWriter, *, opts: ExtractOptions,
                 log: Callable[[str], None]) -> tuple[AdapterContents, list[str]]:
    """Factor every module into ``writer``; returns what was written and the unchanged modules."""
    contents = AdapterContents(notes=list(plan.notes))
    unchanged: list[str] = []
    bias_deltas: dict[str, torch.Tensor] = {}
    ft, base = plan.finetune, plan.base
    bar = tqdm(total=plan.bytes_to_read, unit="B", unit_scale=True, unit_divisor=1024, desc="extracting",
               disable=opts.quiet or None, file=sys.stderr, dynamic_ncols=True)
    try:
        for i, job in enumerate(plan.jobs):
            names = [t for t in (job.weight, job.bias) if t]
            if job.kind == "other":
                if _differs(ft.get(job.weight), base.get(job.weight)):
                    raise MergeQuantError(f"{job.weight}: a {len(job.shape)}-D tensor {job.shape} that differs from the "
                                          "base; LoRA extraction handles 2-D weights (Linear, Embedding) and 1-D norms")
            elif job.kind == "save":
                if len(job.shape) == 2 or any(_differs(ft.get(t), base.get(t)) for t in names):
                    for t in names:
                        writer.add(PREFIX + t, ft.get(t), torch.float32 if len(job.shape) == 1 else plan.dtype)
                    contents.saved.append(job.module)
                else:
                    unchanged.append(job.module)
            else:
                d = delta_of(ft, base, job.weight)
                if job.kind == "embedding":
                    d = d.T  # peft: E' = E + (B A)^T, B [dim, r], A [r, vocab]
                if job.bias is not None:
                    bd = delta_of(ft, base, job.bias)
                    if bool(bd.any()):
                        bias_deltas[job.module] = bd
                if not bool(d.any()):
                    if job.module in bias_deltas:
                        raise MergeQuantError(f"{job.bias}: only the bias of {job.module} changed; a LoRA needs a "
                                              "changed weight to carry it (lora_bias)")
                    unchanged.append(job.module)
                else:
                    f = factor_delta(d, rank=plan.rank, energy=plan.energy, method=opts.svd, seed=opts.seed + i)
                    norm_sq = f.norm_sq
                    del d
                    emb = job.kind == "embedding"
                    a_name, b_name = (("lora_embedding_A", "lora_embedding_B") if emb
                                      else ("lora_A.weight", "lora_B.weight"))
                    writer.add(f"{PREFIX}{job.module}.{a_name}", f.A, plan.dtype)
                    writer.add(f"{PREFIX}{job.module}.{b_name}", f.B, plan.dtype)
                    contents.lora.append(ModuleRecord(job.module, f.rank, f.error, norm_sq, tuple(job.shape), emb))
            bar.update(sum(ft.tensors[t].nbytes + base.tensors[t].nbytes for t in names))
    finally:
        bar.close()
    if bias_deltas:  # peft's lora_bias is adapter-wide: every LoRA Linear gets a lora_B.bias (zeros if unchanged)
        contents.lora_bias = True
        for rec in contents.lora:
            if not rec.embedding:
                bd = bias_deltas.get(rec.module, torch.zeros(rec.shape[0]))
                writer.add(f"{PREFIX}{rec.module}.lora_B.bias", bd, plan.dtype)
        contents.notes.append(f"{len(bias_deltas)} Linear bias(es) changed: written as lora_B.bias (lora_bias: true)")
    norms = [m for m in contents.saved if len(plan.finetune.tensors.get(m + ".weight", _NoShape).shape) == 1]
    if norms:
        contents.notes.append(f"{len(norms)} 1-D module(s) (norms) differ from the base and are kept whole in "
                              "modules_to_save")
        log(f"note: {len(norms)} norm(s) differ from the base: kept whole in modules_to_save")
    return contents, unchanged


class _NoShape:
    shape = ()


def _task_type(ck: Checkpoint) -> str | None:
    return "CAUSAL_LM" if ck.architecture.endswith("ForCausalLM") else None


def run_extract(finetune: str, base: str, opts: ExtractOptions, log: Callable[[str], None] = print) -> ExtractResult:
    plan = plan_extraction(finetune, base, opts)
    check_extract_output(opts.out, _input_dirs(plan.finetune, plan.base), opts.force)
    if opts.dry_run:
        log(describe_extraction(plan))
        return ExtractResult(None, AdapterContents(), 0, [])
    with atomic_output_dir(opts.out, log=log, replace=opts.force) as tmp:
        writer = AdapterTensorWriter(tmp)
        try:
            contents, unchanged = extract_into(plan, writer, opts=opts, log=log)
            if not contents.lora and not contents.saved:
                raise MergeQuantError(f"{finetune} equals the base {base}: nothing to extract")
            writer.finish(fsync=opts.fsync)
        finally:
            writer.close()
        config = adapter_config(contents, base_ref=base, all_modules=plan.linear_modules,
                                task_type=_task_type(plan.base))
        settings = [("rank (max)", str(plan.rank) if plan.rank else "none"),
                    ("energy", str(plan.energy) if plan.energy else "none"),
                    ("embeddings", opts.embeddings), ("adapter dtype", str(plan.dtype).removeprefix("torch.")),
                    ("SVD", opts.svd)]
        card = adapter_card(contents, base_ref=base, base_dir=None, title="LoRA adapter extracted from a fine-tune",
                            source_lines=[f"Extracted from the fine-tune `{finetune}` by `mergequant extract-lora` "
                                          "(per-module SVD of the float32 delta fine-tune - base)."],
                            settings=settings, extra_tags=["extract-lora"])
        write_adapter_files(tmp, contents, config, card)
        size = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
    return ExtractResult(opts.out, contents, size, unchanged)


def summary(res: ExtractResult) -> str:
    ranks = [r.rank for r in res.contents.lora]
    span = f"ranks {min(ranks)}-{max(ranks)}" if ranks else "no LoRA modules"
    worst = max((r.error for r in res.contents.lora), default=0.0)
    return (f"wrote {res.out}: {len(ranks)} LoRA modules ({span}, worst relative error {worst:.2e}), "
            f"{len(res.contents.saved)} kept whole, {len(res.unchanged)} unchanged; {format_bytes(res.bytes_written)}")


# ---------------------------------------------------------------------------------------------------
# merges written as an adapter (recipe ``output: adapter``)
# ---------------------------------------------------------------------------------------------------
class MergedView:
    """The merge's output seen as a checkpoint: ``get(name)`` runs the merge engine for that one tensor
    (float32, into memory) so the extraction driver can take ``merged - base`` module by module."""

    def __init__(self, plan, device: torch.device, seed: int):
        from mergequant.io.checkpoint import TensorInfo

        self.plan, self.device, self.seed = plan, device, seed
        self.by_name = {t.name: t for t in plan.tensors}
        self.tensors = {t.name: TensorInfo(t.name, t.out_dtype, tuple(t.shape), "") for t in plan.tensors}
        ref = plan.checkpoints[plan.ref_model]
        self.path = plan.recipe.path
        self.config = ref.config
        self.vocab_size = ref.vocab_size
        self.architecture = ref.architecture

    def get(self, name: str) -> torch.Tensor:
        from mergequant.merge.engine import merge_tensor

        tp = self.by_name[name]
        buf = torch.empty(tp.numel, dtype=tp.out_dtype)

        def write(chunk: torch.Tensor, off: int) -> None:
            buf[off:off + chunk.numel()] = chunk.reshape(-1)

        if not merge_tensor(self.plan, tp, write, seed=self.seed, device=self.device):
            raise MergeQuantError(f"merged tensor {name} contains NaN or inf: no adapter can hold it")
        return buf.reshape(tp.shape)


def run_merge_to_adapter(plan, opts, log: Callable[[str], None]):
    """The hook of ``merge/run.py`` for ``output: adapter``: the merged delta (merged - base_model), tensor
    by tensor, factored by SVD like extract-lora. Returns the merge's result type."""
    from mergequant.io.model_files import pick_device
    from mergequant.merge.run import RECIPE_COPY, MergeResult

    recipe, spec = plan.recipe, plan.recipe.adapter
    if plan.vocab is not None:
        raise MergeQuantError(f"{recipe.path}: output: adapter: tokenizer merging changes the vocabulary; an adapter "
                              "cannot (use tokenizer_source: base or leave it out)")
    base = plan.checkpoints[recipe.base_model]
    view = MergedView(plan, pick_device(opts.device), opts.seed)
    xopts = ExtractOptions(out=opts.out, rank=spec.rank, energy=spec.energy, embeddings=spec.embeddings,
                           dtype=spec.dtype, svd=spec.svd, dry_run=opts.dry_run, force=opts.force, quiet=opts.quiet,
                           seed=opts.seed, fsync=opts.fsync)
    rank, energy = _resolve_options(xopts)
    jobs, linear, notes = plan_modules(view, base, spec.embeddings)
    dts = [base.tensors[j.weight].dtype for j in jobs if j.kind in ("lora", "embedding")]
    dtype = DTYPES[spec.dtype] if spec.dtype else (max(set(dts), key=dts.count) if dts else torch.float32)
    if dtype not in DTYPES.values():
        dtype = torch.float32
    xplan = ExtractPlan(view, base, str(recipe.path), recipe.base_model, jobs, linear, dtype, rank, energy, notes)
    check_extract_output(opts.out, plan.input_dirs, opts.force, files=[("recipe", recipe.path)])
    if opts.dry_run:
        log(describe_extraction(xplan))
        return MergeResult(None, len(plan.tensors), plan.bytes_to_read, 0, [ADAPTER_WEIGHTS_NAME], plan.warnings)
    with atomic_output_dir(opts.out, log=log, replace=opts.force) as tmp:
        writer = AdapterTensorWriter(tmp)
        try:
            contents, _ = extract_into(xplan, writer, opts=xopts, log=log)
            if not contents.lora and not contents.saved:
                raise MergeQuantError(f"{recipe.path}: the merge equals the base model: nothing to write as an adapter")
            writer.finish(fsync=opts.fsync)
        finally:
            writer.close()
        config = adapter_config(contents, base_ref=recipe.base_model, all_modules=linear, task_type=_task_type(base))
        models = [r for r in recipe.model_refs() if r != recipe.base_model]
        settings = [("merge method", f"{plan.spec.pretty_name} (`{plan.spec.name}`)"),
                    ("rank (max)", str(rank) if rank else "none"), ("energy", str(energy) if energy else "none"),
                    ("embeddings", spec.embeddings), ("adapter dtype", str(dtype).removeprefix("torch.")),
                    ("SVD", spec.svd)]
        source = [f"The merged delta (merge - base) of {len(models)} model(s), re-factored per module by SVD:", "",
                  *[f"- `{m}`" for m in models], "", "Recipe (mergekit-compatible YAML, with mergequant's "
                  "`output: adapter`):", "", "```yaml", recipe.text.rstrip("\n"), "```"]
        card = adapter_card(contents, base_ref=recipe.base_model, base_dir=recipe.path.parent, source_lines=source,
                            settings=settings, title="Merged LoRA adapter", extra_tags=["merge", plan.spec.name])
        write_adapter_files(tmp, contents, config, card)
        (tmp / RECIPE_COPY).write_text(recipe.text)
        size = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
    return MergeResult(opts.out, len(contents.lora) + len(contents.saved), plan.bytes_to_read, size,
                       [ADAPTER_WEIGHTS_NAME], plan.warnings)


ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
