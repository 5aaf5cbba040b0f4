"""Drive a merge: recipe -> plan -> tensors streamed through the methods into sharded output, plus config,
tokenizer and model card, all inside a temporary directory renamed into place at the end."""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from mergequant.card import merge_card
from mergequant.errors import MergeQuantError
from mergequant.io.model_files import copy_tokenizer_files, pick_device
from mergequant.io.output_dir import atomic_output_dir, check_output_location
from mergequant.io.writer import PlannedTensor, ShardedWriter, plan_shards, write_json
from mergequant.merge.engine import CHUNK, merge_tensor
from mergequant.merge.moe_layout import FusedOutput, check_layout_name, fused_output, moe_architecture
from mergequant.merge.plan import DTYPE_TO_NAME, MergePlan, build_plan, open_models
from mergequant.peft.adapted import adapter_inputs, adapter_notes, tokenizer_dir
from mergequant.merge.tokenizer import remap_token_ids, resolve_chat_template, write_chat_template, write_tokenizer
from mergequant.recipe import load_recipe
from mergequant.units import format_bytes

RECIPE_COPY = "mergequant_recipe.yaml"


@dataclass
class MergeOptions:
    out: Path
    device: str = "auto"
    shard_size: int = 5 * 10**9
    out_dtype: str | None = None
    dry_run: bool = False
    force: bool = False
    seed: int = 0
    quiet: bool = False
    workers: int = 2
    allow_vocab_mismatch: bool = False
    mergekit_dtype: bool = False
    moe_layout: str = "per-expert"  # mixture-of-experts output: per-expert (the architecture's own) or fused
    fsync: bool = True


@dataclass
class MergeResult:
    out: Path | None
    tensors: int
    bytes_read: int
    bytes_written: int
    shards: list[str]
    warnings: list[str] = field(default_factory=list)


def estimate_peak_bytes(plan: MergePlan, workers: int) -> int:
    """Working memory beyond the memory-mapped inputs and the interpreter: per worker a few float32
    chunks per input, plus TIES's candidate buffer (fused kernel: ~6% of the largest tensor, 12 bytes
    each) or, on the torch path, one float32 |delta| buffer and the selection's copy of it."""
    from mergequant.merge import kernels

    n_in = max(len(t.inputs) for t in plan.tensors)
    per_worker = (plan.spec.buffers_per_input * n_in + 4) * CHUNK * 4
    largest = max(t.numel for t in plan.tensors)
    big = 0
    if plan.spec.sparsify == "magnitude":
        big = int(largest * 0.06 * 12) * workers if kernels.AVAILABLE else largest * 4 * 2
    return workers * per_worker + big


def describe_plan(plan: MergePlan, shards, workers: int) -> str:
    r = plan.recipe
    lines = [
        f"recipe:        {r.path} ({r.merge_method})",
        "models:        " + ", ".join(f"{ref} ({c.path})" if str(c.path) != ref else ref for ref, c in plan.checkpoints.items()),
        f"architecture:  {plan.checkpoints[plan.ref_model].architecture}, {plan.num_layers_out} output layers",
        f"tensors:       {len(plan.tensors)}",
        f"read:          {format_bytes(plan.bytes_to_read)}",
        f"write:         {format_bytes(plan.bytes_to_write)} in {len(shards)} shard(s)",
        f"peak memory:   ~{format_bytes(estimate_peak_bytes(plan, workers))} working set + ~0.2 GiB for Python and torch "
        "(inputs are memory-mapped, not loaded)",
    ]
    if plan.vocab is not None:
        tok = r.tokenizer
        aligned = sum(1 for t in plan.tensors if t.vocab is not None)
        lines.append(f"tokenizer:     {tok.source}: {len(plan.vocab.tokens)} tokens, {plan.vocab.rows} rows, "
                     + (f"{aligned} tensor(s) re-indexed by token" if aligned else "same ids in every input (rows by index)"))
    for s in shards:
        lines.append(f"  {s.file}: {len(s.tensors)} tensors, {format_bytes(s.data_bytes)}")
    return "\n".join(lines)


MAX_WORKERS = 256  # tensors in flight; each holds a few chunk buffers, so more only costs memory


def check_merge_options(opts: MergeOptions) -> None:
    """Options that cannot work, refused before the recipe is read (the CLI and release files share
    this): ``--workers 0`` or a negative count used to be accepted, and gave a negative peak-memory
    estimate in the dry run."""
    from mergequant.io.model_files import check_device_name
    from mergequant.quant.calib import check_count, check_seed
    from mergequant.units import parse_size

    check_count(opts.workers, "--workers", 1)
    if opts.workers > MAX_WORKERS:
        raise MergeQuantError(f"--workers must be at most {MAX_WORKERS}, got {opts.workers}")
    parse_size(opts.shard_size)  # positive
    check_device_name(opts.device)
    check_layout_name(opts.moe_layout)
    check_seed(opts.seed)


def run_merge(recipe_path: str | Path, opts: MergeOptions, log=print) -> MergeResult:
    check_merge_options(opts)
    recipe = load_recipe(recipe_path)
    device = pick_device(opts.device)
    checkpoints = open_models(recipe)
    for note in adapter_notes(checkpoints):  # BASE+ADAPTER inputs: which adapter, which base, from where
        log(note)
    adapter_out = recipe.output == "adapter"  # the merged delta as a LoRA: merged in float32, factored by SVD
    plan = build_plan(recipe, checkpoints, out_dtype="float32" if adapter_out else opts.out_dtype,
                      allow_vocab_mismatch=opts.allow_vocab_mismatch, mergekit_dtype=opts.mergekit_dtype)
    for w in plan.warnings:
        log(f"warning: {w}")
    if adapter_out:
        from mergequant.peft.extract import run_merge_to_adapter

        return run_merge_to_adapter(plan, opts, log)
    check_output_location(opts.out, plan.input_dirs, force=opts.force, files=[("recipe", recipe.path)])
    layout = output_layout(plan, opts.moe_layout)
    shards = plan_shards([PlannedTensor(*t) for t in layout.tensors], opts.shard_size)
    if opts.dry_run:
        log(describe_plan(plan, shards, opts.workers))
        return MergeResult(None, len(plan.tensors), plan.bytes_to_read, plan.bytes_to_write, [s.file for s in shards],
                           plan.warnings)

    warnings = list(plan.warnings)
    with atomic_output_dir(opts.out, log=log, replace=opts.force) as tmp:
        writer = ShardedWriter(tmp, shards, writeback_every=256 * 2**20 if opts.fsync else None)
        try:
            bad = _execute(plan, writer, device, opts, layout.placement)
            writer.finish(fsync=opts.fsync)
        finally:
            writer.close()
        for name in bad:
            msg = f"merged tensor {name} contains NaN or inf"
            warnings.append(msg)
            log(f"warning: {msg}")
        _write_metadata(plan, tmp, opts)
    return MergeResult(opts.out, len(plan.tensors), plan.bytes_to_read, plan.bytes_to_write, [s.file for s in shards], warnings)


def output_layout(plan: MergePlan, moe_layout: str) -> FusedOutput:
    """The tensors to write (name, dtype, shape) and where each planned tensor goes in them: the plan's
    own tensors, or with ``moe_layout`` "fused" its per-expert tensors grouped into fused ones."""
    tensors = [(t.name, t.out_dtype, t.shape) for t in plan.tensors]
    if moe_layout != "fused":
        return FusedOutput(tensors, {})
    ref = plan.checkpoints[plan.ref_model]
    arch = moe_architecture(ref.config)
    if arch is None:
        raise MergeQuantError(f"--moe-layout fused: {ref.path} ({ref.architecture}) is not a mixture-of-experts "
                              "model; nothing to fuse")
    return fused_output(arch, tensors)


def _execute(plan: MergePlan, writer: ShardedWriter, device: torch.device, opts: MergeOptions,
             placement: dict[str, tuple[str, int]] | None = None) -> list[str]:
    """Run every tensor through the engine on a small thread pool (torch releases the GIL, so reading,
    computing and writing of neighbouring tensors overlap). Returns names of non-finite tensors.
    ``placement`` sends a tensor's chunks into another written tensor at an element offset (an expert
    weight into its fused tensor; see moe_layout.fused_output)."""
    placement = placement or {}
    bad: list[str] = []
    lock = threading.Lock()
    bar = tqdm(total=plan.bytes_to_write, unit="B", unit_scale=True, unit_divisor=1024, desc="merging",
               disable=opts.quiet or None, file=sys.stderr, dynamic_ncols=True)
    done = 0

    def job(tp):
        target, start = placement.get(tp.name, (tp.name, 0))
        ok = merge_tensor(plan, tp, lambda chunk, off: writer.write(target, chunk, start + off), seed=opts.seed,
                          device=device)
        if not ok:
            with lock:
                bad.append(tp.name)
        return tp

    # Largest tensors first keeps the two workers busy to the end (no long tail on lm_head).
    order = sorted(plan.tensors, key=lambda t: -t.numel)
    # Parallelism comes from the workers; give each an equal share of torch's intra-op threads so
    # they do not oversubscribe the cores (OpenMP spin-waiting would then cost more than it gains).
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, opts.workers)))
    try:
        with ThreadPoolExecutor(max_workers=max(1, opts.workers)) as pool:
            pending = set()
            it = iter(order)
            for tp in it:
                pending.add(pool.submit(job, tp))
                if len(pending) >= 2 * opts.workers:
                    break
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        tp = f.result()
                        done += 1
                        bar.update(tp.out_bytes)
                        bar.set_postfix_str(f"tensors {done}/{len(plan.tensors)}", refresh=False)
                        nxt = next(it, None)
                        if nxt is not None:
                            pending.add(pool.submit(job, nxt))
            except BaseException:
                # A failure, Ctrl-C or SIGTERM: start no queued tensor, so cleanup waits only for the running ones.
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        bar.close()
        torch.set_num_threads(threads_before)
    return sorted(bad)


def _write_metadata(plan: MergePlan, out: Path, opts: MergeOptions) -> None:
    ref = plan.checkpoints[plan.ref_model]
    config = dict(ref.config)
    dtypes = {t.out_dtype for t in plan.tensors if t.out_dtype.is_floating_point}
    dtype_name = DTYPE_TO_NAME.get(next(iter(dtypes))) if len(dtypes) == 1 else None
    if dtype_name:
        config["torch_dtype"] = dtype_name
        if "dtype" in config:
            config["dtype"] = dtype_name
    n_in = ref.num_layers
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config and isinstance(config[key], int):
            config[key] = plan.num_layers_out
    # per-layer lists (layer_types, sliding-window flags, ...) follow the layer sources: on a change of
    # depth, and also when slices reorder or repeat layers at the same depth
    identity = plan.layer_sources == [(plan.ref_model, i) for i in range(n_in or 0)]
    for key, value in list(config.items()):
        if isinstance(value, list) and n_in and len(value) == n_in and not identity:
            per_model = {r: c.config.get(key) for r, c in plan.checkpoints.items()}
            config[key] = [per_model[m][i] if isinstance(per_model[m], list) else value[i] for m, i in plan.layer_sources]
    if plan.vocab is not None:  # tokenizer merging: rows follow the output tokenizer (padding kept)
        for key in ("vocab_size", "n_vocab", "padded_vocab_size"):
            if isinstance(config.get(key), int):
                config[key] = plan.vocab.rows
        config = remap_token_ids(config, plan.vocab.model_vocab[plan.ref_model], plan.vocab.tokens)
    write_json(out / "config.json", config)
    copy_tokenizer_files(tokenizer_dir(ref), out)  # BASE+ADAPTER: the adapter's tokenizer when it has one
    if plan.vocab is not None:
        write_tokenizer(plan.vocab, out)
        gen = out / "generation_config.json"
        if gen.exists():
            import json
            write_json(gen, remap_token_ids(json.loads(gen.read_text()), plan.vocab.model_vocab[plan.ref_model],
                                            plan.vocab.tokens))
    if plan.recipe.chat_template:
        template = resolve_chat_template(plan.recipe.chat_template, [tokenizer_dir(c) for c in plan.checkpoints.values()],
                                         f"{plan.recipe.path}: chat_template")
        if template is not None:
            write_chat_template(template, out)
    (out / RECIPE_COPY).write_text(plan.recipe.text)
    models = [r for r in plan.recipe.model_refs()]
    (out / "README.md").write_text(merge_card(
        method=plan.spec.name, pretty_name=plan.spec.pretty_name, paper=plan.spec.paper, models=models,
        base_model=plan.recipe.base_model, recipe_text=plan.recipe.text, out_dtype=dtype_name,
        num_parameters=sum(t.numel for t in plan.tensors),
        parent_dirs={r: c.path for r, c in plan.checkpoints.items()},
        base_dir=plan.recipe.path.parent, adapters=adapter_inputs(plan.checkpoints)))


def summary(result: MergeResult) -> str:
    return (f"wrote {result.out}: {result.tensors} tensors, {format_bytes(result.bytes_written)} in "
            f"{len(result.shards)} shard(s) (read {format_bytes(result.bytes_read)})")

