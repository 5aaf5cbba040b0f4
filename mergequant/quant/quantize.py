"""Drive a quantization: checkpoint + calibration data -> quantized checkpoint on disk.

Data flow: the decoder Linear modules are found by name, from the model family's description
(``mergequant.architectures``: a family without one, or a mixture-of-experts family, is refused
before anything is read or written); the chosen method's on-disk format (``method.format``, a
``mergequant.checkpoint_formats.CheckpointFormat``) says which tensors replace each weight, so the
output shards are planned before any work, and what config and card claims go with them. Uncalibrated
methods (rtn, int8) quantize weight by weight straight from the checkpoint. Calibrated methods
(gptq, awq, w8a8) run through the layer runner, which materializes one decoder layer at a time with
its calibration inputs; the method quantizes the layer's Linears (and may fold scales into its
norms), then every other parameter of the layer is written from the processed module, and the
runner recomputes the layer's outputs for the next one. Tensors outside the decoder layers are
copied in the method's float dtype. CPU RAM stays around one layer plus activations.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from mergequant.architectures import Architecture, architecture_for, model_name
from mergequant.errors import MergeQuantError
from mergequant.io.checkpoint import Checkpoint, natural_key
from mergequant.io.model_files import copy_tokenizer_files, pick_device
from mergequant.io.output_dir import atomic_output_dir, check_output_location, local_files
from mergequant.io.writer import PlannedTensor, ShardedWriter, plan_shards, write_json
from mergequant.memory import release_free_memory, steady_heap
from mergequant.merge.moe_layout import per_expert_view
from mergequant.peft.adapted import adapter_notes, adapter_of, model_dirs, open_model, source_name, tokenizer_dir
from mergequant.quant.method import QuantContext, QuantLinear, QuantMethod, get_method

# Calibration samples per forward chunk when --batch-size is not given: as many as fit in
# CHUNK_ACTIVATION_BYTES of transient activations inside one decoder layer (~3 MLP-wide and ~4
# hidden-wide float32 tensors per token), at most CHUNK_TOKENS tokens, at least one sample. Large
# chunks amortize per-op overhead on small models (32 x 256 was 4x faster than 8 x 256 on the tiny
# Llama); the byte bound keeps the peak low on big ones (8192 tokens of a 1B layer's MLP alone were
# ~0.55 GB of temporaries).
CHUNK_TOKENS = 8192
CHUNK_ACTIVATION_BYTES = 64 * 2**20


def auto_batch_size(config: dict, seqlen: int, samples: int) -> int:
    hidden = int(config.get("hidden_size") or 4096)
    inter = int(config.get("intermediate_size") or 4 * hidden)
    per_token = 4 * (3 * inter + 4 * hidden)
    tokens = min(CHUNK_TOKENS, CHUNK_ACTIVATION_BYTES // per_token)
    return max(1, min(samples, tokens // seqlen))


@dataclass
class QuantizeOptions:
    out: Path
    method: str = "gptq"
    bits: int | None = None  # None: the method's default (4; 8 for int8 and w8a8)
    group_size: int = 128
    desc_act: bool = False
    static_groups: bool = False
    sym: bool = True
    damp: float = 0.01
    calib: str | None = None
    samples: int = 128
    seqlen: int = 2048
    seed: int = 0
    device: str = "auto"
    force: bool = False
    quiet: bool = False
    shard_size: int = 5 * 10**9
    batch_size: int | None = None  # calibration samples per forward; None: about CHUNK_TOKENS tokens
    fsync: bool = True
    eval_data: str | None = None  # measure perplexity before and after, and put both in the card
    eval_backend: str = "auto"  # how --eval runs the quantized checkpoint (see evaluate.evaluate_model)
    zero_point: bool = True  # awq: asymmetric (zero point) or symmetric
    n_grid: int = 20  # awq: scale ratios tried per scaling group
    duo_scaling: bool = True  # awq: scales from activations and weights (else activations only)
    alpha: float = 0.5  # w8a8: SmoothQuant migration strength
    calib_dtype: str = "float32"  # gptq: precision of the calibration forward passes (see CALIB_DTYPES)
    moe_calibration: str = "all"  # mixture of experts: every expert sees all tokens, or only its routed ones
    moe_min_share: float = 0.05  # routed: fewer tokens than this share of a uniform share -> round-to-nearest
    moe_names: str = "original"  # mixture of experts: expert names in the output (see EXPERT_NAMES)
    gguf_types: list[str] = field(default_factory=list)  # --method gguf: file types (Q4_K_M, Q8_0, ...), one file each
    gguf_search: str = "imatrix"  # --method gguf --calib: k-quant rounding, imatrix or gptq (mergequant.gguf.gptq_grid)


@dataclass
class QuantizeResult:
    out: Path
    modules: int
    fallbacks: list[str] = field(default_factory=list)
    calib_tokens: int = 0
    proxy_error: float = 0.0
    perplexity: dict = field(default_factory=dict)
    expert_tokens: dict[int, list[int]] = field(default_factory=dict)  # MoE: layer -> routed tokens per expert
    expert_fallbacks: dict[int, list[int]] = field(default_factory=dict)  # MoE routed: layer -> starved experts
    expert_stats_dtype: str | None = None  # MoE GPTQ: dtype of the products the experts' down statistics come from
    files: list[Path] = field(default_factory=list)  # --method gguf: the .gguf files written


# How quantized experts are named in the output. ``original``: the architecture's own per-expert names
# (Mixtral ``block_sparse_moe.experts.E.w1|w2|w3``), what Hub checkpoints use and vLLM's loaders map.
# ``gptqmodel``: transformers 5's module names with the experts un-fused (Mixtral ``mlp.experts.E.
# gate_proj|up_proj|down_proj``, router ``mlp.gate``), the only names GPTQModel.load accepts for
# quantized Mixtral experts. Qwen MoE families use the same names either way.
EXPERT_NAMES = ("original", "gptqmodel")
MOE_METHODS = ("gptq", "rtn", "int8", "awq", "w8a8")  # methods that handle routed experts
ROUTED_METHODS = ("gptq",)  # --moe-calibration routed: the others calibrate experts on every token


def quantizable_architecture(ck: Checkpoint, method: str | None = None) -> Architecture:
    """The description of ``ck``'s family, refusing (one line) families without one, and
    mixture-of-experts families for methods that do not handle experts yet."""
    arch = architecture_for(ck.config, f"{ck.path}: ")
    if arch.is_moe and method is not None and method not in MOE_METHODS:
        raise MergeQuantError(f"{ck.path}: {model_name(ck.config)} (model_type {arch.model_type!r}) is a "
                              f"mixture-of-experts model; --method {method} does not handle experts yet "
                              f"(use one of {', '.join(MOE_METHODS)})")
    return arch


def output_name(arch: Architecture, name: str, naming: str = "original") -> str:
    """The output name of input tensor ``name`` (per-expert names) under ``--moe-names``."""
    if naming == "original" or not arch.is_moe:
        return name
    split = arch.split_name(name)
    return arch.layer_prefix(split[0]) + arch.to_memory(split[1]) if split else name


def find_linears(ck: Checkpoint, arch: Architecture | None = None, moe_names: str = "original") -> list[QuantLinear]:
    """The decoder Linear weights that get quantized (the description's, in true-sequential order per
    layer; a MoE layer's experts included), from the checkpoint's tensor names and shapes. A layer
    missing one of them is refused here, before any work, rather than half-quantized."""
    arch = arch or quantizable_architecture(ck)
    orders: dict[int, dict[str, int]] = {}

    def order(i: int) -> dict[str, int]:
        if i not in orders:
            orders[i] = {s: k for k, s in enumerate(s for g in arch.layer_groups(ck.config, i) for s in g)}
        return orders[i]

    found = []
    for name, info in ck.tensors.items():
        loc = arch.split_name(name)
        if not loc or not name.endswith(".weight") or len(info.shape) != 2:
            continue
        suffix = arch.to_memory(loc[1][: -len(".weight")])
        if suffix in order(loc[0]):
            source = name[: -len(".weight")]
            prefix = output_name(arch, source, moe_names)
            found.append(QuantLinear(prefix, loc[0], suffix, info.shape[0], info.shape[1],
                                     f"{source}.bias" in ck.tensors, source if prefix != source else ""))
    if not found:
        raise MergeQuantError(f"{ck.path}: no decoder Linear weights found ({ck.architecture} is not supported: "
                              f"expected names like {arch.layer_prefix(0)}{arch.quantized[0]}.weight)")
    found.sort(key=lambda lin: (lin.layer, order(lin.layer)[lin.suffix]))
    _check_complete_layers(ck, arch, found)
    return found


def _check_complete_layers(ck: Checkpoint, arch: Architecture, linears: list[QuantLinear]) -> None:
    """Every layer that has one of the description's Linears has all of them (every expert's too)."""
    by_layer: dict[int, set[str]] = {}
    for lin in linears:
        by_layer.setdefault(lin.layer, set()).add(lin.suffix)
    for i, have in sorted(by_layer.items()):
        want = [s for g in arch.layer_groups(ck.config, i) for s in g]
        missing = [s for s in want if s not in have]
        if missing:
            raise MergeQuantError(f"{ck.path}: tensor {arch.layer_prefix(i)}{arch.to_disk(missing[0])}.weight is "
                                  f"missing ({arch.model_type} decoder layer {i} has {len(want)} quantized Linears)")


# Options that only one family of methods reads: (CLI flag, methods that use it).
METHOD_OPTIONS = {
    "desc_act": ("--desc-act", ("gptq",)), "static_groups": ("--static-groups", ("gptq",)),
    "damp": ("--damp", ("gptq",)), "sym": ("--no-sym", ("gptq", "rtn")),
    "zero_point": ("--no-zero-point", ("awq",)), "n_grid": ("--n-grid", ("awq",)),
    "duo_scaling": ("--no-duo-scaling", ("awq",)), "alpha": ("--alpha", ("w8a8",)),
    "calib_dtype": ("--calib-dtype", ("gptq",)),
}

# --calib-dtype: the dtype the calibration forward passes compute in (layer outputs, the activations the
# Hessians are taken from; the Hessians themselves and the solve stay float32). float32, the default, is
# exact and gives the same codes on every machine. bfloat16 is the precision models run in (and GPTQModel
# calibrates in): on CPUs with AVX-512 BF16 or AMX, and on GPUs, its matrix products are 2-3.5x faster (the
# gain is in the forward passes: 13% less CPU on the tiny Mixtral, same held-out perplexity; see
# docs/quantize.md). Only GPTQ reads it: AWQ and SmoothQuant fold scales into float weights, which wants float32.
CALIB_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def ignored_options(opts: QuantizeOptions) -> list[str]:
    """The flags given (different from their default) that ``opts.method`` does not read: said, so that
    ``--method awq --alpha 0.8`` does not look as if it had an effect."""
    defaults = QuantizeOptions(out=opts.out)
    return [flag for name, (flag, methods) in METHOD_OPTIONS.items()
            if opts.method not in methods and getattr(opts, name) != getattr(defaults, name)]


def refuse_quantized_input(ck: Checkpoint) -> None:
    """Quantizing needs full-precision weights. An int8 or W8A8 checkpoint used to be "quantized" again
    (its int8 codes read as floats, its scale tensors copied along, its config replaced by GPTQ's: exit 0
    and an output nothing loads), or crashed; GPTQ/AWQ ones were refused as "no Linear weights found"."""
    qc = ck.config.get("quantization_config")
    if isinstance(qc, dict) and qc:
        kind = qc.get("quant_method") or qc.get("format") or "unknown method"
        raise MergeQuantError(f"{ck.path}: already quantized (config.json quantization_config: {kind}); quantize "
                              "needs the full-precision model it was made from")
    ints = [n for n, t in ck.tensors.items() if n.endswith(".weight") and not t.dtype.is_floating_point]
    if ints:
        raise MergeQuantError(f"{ck.path}: tensor {ints[0]} is stored as {str(ck.tensors[ints[0]].dtype).removeprefix('torch.')}, "
                              "not floating point: the checkpoint looks quantized; quantize needs full-precision weights")


def calib_dtype(opts: QuantizeOptions) -> torch.dtype:
    """The calibration forward's dtype for ``opts`` (float32 for methods that do not read --calib-dtype)."""
    if opts.calib_dtype not in CALIB_DTYPES:
        raise MergeQuantError(f"--calib-dtype must be one of {', '.join(CALIB_DTYPES)}, got {opts.calib_dtype!r}")
    return CALIB_DTYPES[opts.calib_dtype] if opts.method in METHOD_OPTIONS["calib_dtype"][1] else torch.float32


def _check_counts(opts: QuantizeOptions) -> None:
    """Sample and window counts must be real counts: --seqlen 1 made `--eval` loop forever (a 1-token
    window predicts nothing), and 0 silently meant "the default" for --batch-size."""
    from mergequant.io.model_files import check_device_name
    from mergequant.quant.calib import check_count, check_seed
    from mergequant.units import parse_size

    check_count(opts.samples, "--samples", 1)
    check_count(opts.seqlen, "--seqlen", 2, "tokens per window")
    check_count(opts.batch_size, "--batch-size", 1, "or leave it out for automatic", optional=True)
    parse_size(opts.shard_size)  # positive (a release file gives a number of bytes)
    check_seed(opts.seed)
    check_device_name(opts.device)


def _check_inputs(opts: QuantizeOptions, method: QuantMethod, model_dir: Path | None) -> None:
    """The data files and the tokenizer the run will need, checked now (a stat each) rather than after
    the checkpoint scan or, for --eval, after the whole quantization."""
    from mergequant.quant.calib import CALIBRATION, local_data_file, require_tokenizer

    if method.calibrated and opts.calib:
        local_data_file(opts.calib, CALIBRATION)
    if opts.eval_data:
        local_data_file(opts.eval_data, "eval data (--eval)")
    if model_dir is not None and (method.calibrated or opts.eval_data):
        require_tokenizer(model_dir, f"--method {opts.method}" if method.calibrated else "--eval")


def validate(opts: QuantizeOptions, linears: list[QuantLinear], method: QuantMethod | None = None,
             model_dir: Path | None = None) -> QuantMethod:
    """Check options shared by every method, then the method's own, then (with ``model_dir``) the
    inputs they name; returns the method. Nothing here loads a model."""
    _check_counts(opts)
    method = method or get_method(opts.method)
    if opts.bits is None:
        opts.bits = method.default_bits
    if opts.bits not in method.bits_allowed:
        if len(method.bits_allowed) == 1:
            raise MergeQuantError(f"--bits {opts.bits}: --method {opts.method} is {method.bits_allowed[0]}-bit only "
                                  f"(leave --bits out or pass --bits {method.bits_allowed[0]})")
        raise MergeQuantError(f"--bits {opts.bits}: --method {opts.method} supports "
                              f"{', '.join(map(str, method.bits_allowed))}")
    for lin in linears if method.uses_group_size else []:
        if opts.group_size != -1 and (opts.group_size <= 0 or lin.in_features % opts.group_size):
            raise MergeQuantError(f"--group-size {opts.group_size} does not divide in_features {lin.in_features} of "
                                  f"{lin.prefix}; use a divisor or -1 (one group per row)")
    method.validate(opts, linears)
    if method.calibrated and not opts.calib:
        raise MergeQuantError(f"--calib is required for --method {opts.method} (or use --method rtn, which needs no data)")
    _check_inputs(opts, method, model_dir)
    return method


def planned_tensors(ck: Checkpoint, linears: list[QuantLinear], method: QuantMethod, opts) -> list[PlannedTensor]:
    """Every tensor of the output checkpoint (name, dtype, shape), in file order: the format's tensors
    for each quantized Linear, everything else in the format's float dtype."""
    quantized = {f"{lin.source_prefix}.weight" for lin in linears}
    fdtype = method.format.float_dtype(opts)
    arch = architecture_for(ck.config)
    out = []
    for lin in linears:
        for t in method.format.planned(lin, opts):
            out.append(PlannedTensor(f"{lin.prefix}.{t.name}", t.dtype, t.shape))
    for name, info in ck.tensors.items():
        if name in quantized:
            continue
        out.append(PlannedTensor(output_name(arch, name, getattr(opts, "moe_names", "original")),
                                 fdtype if info.dtype.is_floating_point else info.dtype, info.shape))
    return sorted(out, key=lambda t: natural_key(t.name))


def _as_stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.dtype.is_floating_point else t


def run_quantize(model_dir: str | Path, opts: QuantizeOptions, log=print) -> QuantizeResult:
    model_dir = Path(model_dir)
    if opts.method == "gguf":  # llama.cpp files: its own driver (mergequant.gguf)
        from mergequant.gguf.driver import run_gguf

        return run_gguf(model_dir, opts, log)
    ck, arch, linears, method = _prepare(model_dir, opts)
    for note in adapter_notes([ck]):
        log(note)
    if opts.calib and not method.calibrated:
        log(f"note: --method {opts.method} needs no calibration data; --calib is ignored")
    for note in _notes(opts, arch, method):
        log(note)
    device = pick_device(opts.device)
    calib_ids = _calibration_ids(model_dir, ck, opts) if method.calibrated else None
    release_free_memory()  # the tokenizer's
    steady_heap()  # from here on, pass after pass frees and reallocates the same blocks

    result = QuantizeResult(opts.out, len(linears), calib_tokens=0 if calib_ids is None else calib_ids.numel())
    shards = plan_shards(planned_tensors(ck, linears, method, opts), opts.shard_size)
    fdtype = method.float_dtype(opts)
    quantized = {f"{lin.source_prefix}.weight" for lin in linears}
    with atomic_output_dir(opts.out, log=log, replace=opts.force) as tmp:
        writer = ShardedWriter(tmp, shards, writeback_every=256 * 2**20 if opts.fsync else None)
        ctx = QuantContext(opts, writer, result, log, source=ck, arch=arch)
        try:
            for name in ck.tensors:  # outside the decoder layers (all of them when uncalibrated): as stored
                if name not in quantized and (not method.calibrated or not arch.split_name(name)):
                    writer.write(output_name(arch, name, opts.moe_names), _as_stored(ck.get(name), fdtype))
            if method.calibrated:
                _calibrated(model_dir, ck, linears, quantized, method, ctx, calib_ids, device, fdtype)
            else:
                for lin in tqdm(linears, desc=opts.method, disable=opts.quiet or None, file=sys.stderr):
                    method.quantize_weight(ctx, lin, ctx.source_weight(lin).float())
            writer.finish(fsync=opts.fsync)
        finally:
            writer.close()
        _write_metadata(ck, tmp, opts, method, result)
        if opts.eval_data:  # measured on the finished files, before they are moved into place
            from mergequant.evaluate import evaluate_model

            kw = dict(seqlen=opts.seqlen, device=opts.device, progress=not opts.quiet)
            result.perplexity = {
                "full precision": evaluate_model(str(model_dir), opts.eval_data, **kw).perplexity,
                f"{opts.method} {opts.bits}-bit": evaluate_model(str(tmp), opts.eval_data, backend=opts.eval_backend,
                                                                 log=log, **kw).perplexity,
            }
            log("perplexity: " + ", ".join(f"{k} {v:.4f}" for k, v in result.perplexity.items()))
            _write_metadata(ck, tmp, opts, method, result)  # again, now with the numbers in the card
    return result


def _prepare(model_dir: Path, opts: QuantizeOptions) -> tuple[Checkpoint, Architecture, list[QuantLinear], QuantMethod]:
    """Every check made before any work (options, architecture, inputs, output location), in the order
    that costs least: the same for a run and its --dry-run."""
    _check_counts(opts)  # before any file is opened
    calib_dtype(opts)
    # a folder, BASE+ADAPTER or an adapter-only folder (LoRA applied as tensors are read: mergequant/peft);
    # fused MoE inputs are read under per-expert names
    ck = per_expert_view(open_model(model_dir))  # local folders as before; Hub ids (adapter-only repos too) downloaded
    refuse_quantized_input(ck)
    arch = quantizable_architecture(ck, opts.method)
    check_moe_options(opts, arch)
    linears = find_linears(ck, arch, opts.moe_names)
    method = validate(opts, linears, model_dir=tokenizer_dir(ck))
    check_output_location(opts.out, model_dirs(ck), force=opts.force,
                          files=local_files({"calibration data": opts.calib, "eval data": opts.eval_data}))
    return ck, arch, linears, method


def _notes(opts: QuantizeOptions, arch: Architecture, method: QuantMethod) -> list[str]:
    from mergequant.quant.clients import settings_of

    # engines that will not load this setting (serving matrix; MoE expert naming: moe_client_notes)
    return ([f"note: {f} does not apply to --method {opts.method}; it is ignored" for f in ignored_options(opts)]
            + calib_dtype_notes(opts)
            + moe_client_notes(arch, opts, method)
            + ([] if arch.is_moe else method.format.client_warnings(settings_of(opts), opts.method)))


def _calibration_ids(model_dir: Path, ck: Checkpoint, opts: QuantizeOptions) -> torch.Tensor:
    """Token windows [samples, seqlen] from --calib (the tokenizer is released on return: a large
    vocabulary's tokenizer holds tens of MB that the layer loop does not need)."""
    from mergequant.quant.calib import calibration_batch, check_token_ids, load_tokenizer

    tok = load_tokenizer(tokenizer_dir(ck), f"--method {opts.method}", fast=True)
    limit = ck.config.get("max_position_embeddings")
    seqlen = min(opts.seqlen, limit) if isinstance(limit, int) else opts.seqlen
    ids = calibration_batch(opts.calib, tok, samples=opts.samples, seqlen=seqlen, seed=opts.seed)
    return check_token_ids(ids, ck.config.get("vocab_size"), model_dir, opts.calib)


def _calibrated(model_dir, ck, linears, quantized, method, ctx, calib_ids, device, fdtype):
    from mergequant.quant.moe import MoECalibration
    from mergequant.quant.runner import LayerRunner, linear_modules

    by_layer: dict[int, dict[str, QuantLinear]] = {}
    for lin in linears:
        by_layer.setdefault(lin.layer, {})[lin.suffix] = lin
    layer_tensors: dict[int, list[str]] = {}
    for name in ck.tensors:
        loc = ctx.arch.split_name(name)
        if loc and name not in quantized:
            layer_tensors.setdefault(loc[0], []).append(name)
    batch = ctx.opts.batch_size or auto_batch_size(ck.config, calib_ids.shape[1], calib_ids.shape[0])
    moe = MoECalibration(ctx.opts.moe_calibration, ctx.opts.moe_min_share)
    ctx.extra["moe"] = moe
    dtype = calib_dtype(ctx.opts)
    runner = LayerRunner(ck, calib_ids, device, dtype=dtype, batch_size=batch, arch=ctx.arch, moe=moe)
    bar = tqdm(total=runner.num_layers, desc=ctx.opts.method, unit="layer", disable=ctx.opts.quiet or None,
               file=sys.stderr)

    def process(i, layer, inputs):
        method.process_layer(ctx, i, layer, inputs, by_layer.get(i, {}), linear_modules(layer))
        prefix = ctx.arch.layer_prefix(i)
        params = {prefix + ctx.arch.to_disk(n): p for n, p in layer.named_parameters()}
        for name in layer_tensors.get(i, []):  # norms, biases, routers... as the method left them (AWQ folds
            # scales into norms); a 16-bit calibration forward holds rounded copies: those come from the checkpoint
            t = params[name].data.cpu() if name in params and dtype == torch.float32 else ck.get(name)
            ctx.writer.write(output_name(ctx.arch, name, ctx.opts.moe_names), _as_stored(t, fdtype))
        _report_routing(ctx, i, moe, calib_ids.numel())
        release_free_memory()
        bar.update(1)

    deferred = None
    if method.defers_weights:
        def deferred(i):
            return list(by_layer.get(i, {}))

    try:
        runner.run(process, deferred=deferred)
    finally:
        bar.close()
    ctx.result.expert_tokens = dict(moe.tokens)


def _report_routing(ctx, i: int, moe, total_tokens: int) -> None:
    """Log how many calibration tokens the router sent to each expert of layer ``i`` (and which
    experts fell back to round-to-nearest): the coverage a user needs to trust a MoE quantization."""
    counts = moe.tokens.get(i)
    if not counts:
        return
    fell = ctx.result.expert_fallbacks.get(i, [])
    share = ", ".join(f"{e}:{c}" for e, c in enumerate(counts))
    ctx.log(f"layer {i}: routed tokens per expert ({total_tokens} tokens, {moe.mode} calibration): {share}"
            + (f"; round-to-nearest for starved expert(s) {', '.join(map(str, fell))}" if fell else ""))


def calib_dtype_notes(opts: QuantizeOptions) -> list[str]:
    """A warning when ``--calib-dtype bfloat16`` was asked for on a device that computes bfloat16 slowly:
    the option exists for speed, and there it costs many times the float32 run."""
    from mergequant.hardware import fast_bfloat16, slow_bfloat16_note

    if calib_dtype(opts) != torch.bfloat16:
        return []
    device = pick_device(opts.device)
    if fast_bfloat16(device):
        return []
    return [f"warning: --calib-dtype bfloat16: {slow_bfloat16_note(device)}; the calibration forward passes will be "
            "many times slower than in float32 (the default, which is also exact)"]


def moe_client_notes(arch: Architecture, opts: QuantizeOptions, method: QuantMethod) -> list[str]:
    """One line per client that will not load the experts as they are about to be named."""
    if not arch.is_moe:
        return []
    notes = []
    if opts.moe_calibration != "all" and not method.calibrated:
        notes.append(f"note: --moe-calibration does not apply to --method {opts.method} (no calibration); it is ignored")
    ex = arch.experts
    renamed = ex.disk_block != ex.memory_block or ex.expert_linears != ex.memory_linears
    if opts.method in ("gptq", "rtn") and renamed:
        notes.append("note: experts keep their original names (vLLM's loader maps them); GPTQModel.load refuses them: "
                     "use --moe-names gptqmodel for GPTQModel" if opts.moe_names == "original" else
                     "note: experts get GPTQModel's names (mlp.experts.E.gate_proj); vLLM's loader expects the original "
                     "ones (--moe-names original)")
    return notes


def check_moe_options(opts: QuantizeOptions, arch: Architecture | None = None) -> None:
    """The mixture-of-experts options are known values (and meaningful only for MoE models)."""
    from mergequant.quant.moe import MoECalibration

    MoECalibration(opts.moe_calibration, opts.moe_min_share)  # checks both
    if opts.moe_calibration == "routed" and opts.method not in ROUTED_METHODS and opts.method in ("awq", "w8a8"):
        raise MergeQuantError(f"--moe-calibration routed: --method {opts.method} calibrates experts on every token "
                              "(its shared scale is judged on the whole block); routed calibration is for --method gptq")
    if opts.moe_names not in EXPERT_NAMES:
        raise MergeQuantError(f"--moe-names must be one of {', '.join(EXPERT_NAMES)}, got {opts.moe_names!r}")


def _write_metadata(ck: Checkpoint, out: Path, opts: QuantizeOptions, method: QuantMethod, result: QuantizeResult) -> None:
    from mergequant.card import quant_card

    fmt = method.format
    config = dict(ck.config)
    config["quantization_config"] = fmt.quantization_config(opts)
    arch = architecture_for(ck.config)
    if arch.is_moe:  # routers (and shared_expert_gate) stay in float: said where the format can say it
        config["quantization_config"] = fmt.declare_float(config["quantization_config"], float_modules_pattern(arch, opts))
    fname = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}[fmt.float_dtype(opts)]
    config["torch_dtype"] = fname
    if "dtype" in config:
        config["dtype"] = fname
    write_json(out / "config.json", config)
    for fname_, obj in fmt.extra_files(opts).items():
        if fname_ == "quantize_config.json":
            obj = config["quantization_config"]
        write_json(out / fname_, obj)
    copy_tokenizer_files(tokenizer_dir(ck), out)
    (out / "README.md").write_text(quant_card(
        source=source_name(ck), adapter=adapter_of(ck), method=opts.method, bits=opts.bits, settings=method.card_settings(opts),
        tags=method.card_tags(opts), requirements=fmt.loading_requirements(), calib=opts.calib if method.calibrated else None,
        calib_tokens=result.calib_tokens, samples=opts.samples if method.calibrated else 0, fallbacks=result.fallbacks,
        perplexity=result.perplexity or None, eval_data=opts.eval_data,
        experts=moe_card_info(ck, opts, method, result), clients=_verified_clients(opts, arch, method)))


def _verified_clients(opts: QuantizeOptions, arch: Architecture, method: QuantMethod) -> list[str]:
    from mergequant.quant.clients import settings_of

    return method.format.verified_clients(settings_of(opts, arch.is_moe), opts.method)


def float_modules_pattern(arch: Architecture, opts: QuantizeOptions) -> str:
    """A regex matching the full names of a MoE family's never-quantized modules as written (routers,
    ``shared_expert_gate``), anchored so that ``mlp.gate`` never matches ``mlp.gate_proj``."""
    import re

    names = [output_name(arch, arch.layer_prefix(0) + arch.to_disk(n), opts.moe_names).split(".", 3)[3]
             for n in arch.never_quantized]
    # matched whether a loader names modules from the model root (model.layers.N...) or not (layers.N...)
    return rf"^(?:.*\.)?{re.escape(arch.layers.rsplit('.', 1)[-1])}\.\d+\.(?:{'|'.join(re.escape(n) for n in names)})$"


def moe_card_info(ck: Checkpoint, opts: QuantizeOptions, method: QuantMethod, result: QuantizeResult) -> dict | None:
    """What the card says about a mixture-of-experts model: sizes, active parameters, calibration
    coverage per expert, fallbacks, and which clients load the experts under the names written."""
    arch = architecture_for(ck.config)
    if not arch.is_moe:
        return None
    total, active = arch.parameter_counts(ck.config, {n: t.shape for n, t in ck.tensors.items()})
    info = {"experts": arch.experts.expert_count(ck.config),
            "top_k": ck.config.get("num_experts_per_tok"), "total": total, "active": active,
            "calibration": opts.moe_calibration if method.calibrated else "none (no calibration data)",
            "tokens": result.expert_tokens, "fallbacks": result.expert_fallbacks,
            "stats_dtype": result.expert_stats_dtype}
    info["loading"] = moe_loading_notes(arch, opts)
    return info


def moe_loading_notes(arch: Architecture, opts: QuantizeOptions) -> list[str]:
    """How to load quantized experts, for the card: transformers' standard loader fuses experts into 3-D
    parameters and leaves quantized per-expert tensors unused (random experts, only a warning)."""
    from mergequant.card import MODEL_PATH_PLACEHOLDER

    renamed = arch.experts.disk_block != arch.experts.memory_block or any(
        a != b for a, b in zip(arch.experts.expert_linears, arch.experts.memory_linears))
    lines = ["Do not load this checkpoint with `AutoModelForCausalLM.from_pretrained` alone: transformers fuses "
             "experts into 3-D parameters, leaves the quantized per-expert tensors unused and the experts "
             "randomly initialised (with only a warning).", ""]
    if opts.method in ("gptq", "rtn"):
        if renamed and opts.moe_names == "original":
            lines += ["Experts keep the architecture's original names, which vLLM's loader maps (serving 4-bit "
                      "MoE in vLLM needs a GPU). GPTQModel refuses these names for this family: quantize with "
                      "`--moe-names gptqmodel` for it.", ""]
        else:
            lines += ["```python", "from gptqmodel import GPTQModel",
                      f"model = GPTQModel.load(\"{MODEL_PATH_PLACEHOLDER}\")", "```", ""]
            if renamed:
                lines += ["Experts use transformers' un-fused module names (`--moe-names gptqmodel`), which GPTQModel "
                          "loads; vLLM's loader expects the original names.", ""]
    lines += ["`mergequant eval` loads it with its own dequantizing loader.", ""]
    return lines


# ---- planning (--dry-run) -------------------------------------------------------------------------------------

@dataclass
class QuantizePlan:
    """What ``quantize`` would do, from headers and options only (nothing is read or written)."""

    model: Path
    architecture: str
    method: str
    bits: int
    modules: int
    experts: dict | None  # MoE: experts per layer, top-k, total/active parameters, calibration mode
    out_bytes: int
    shards: int
    calib_tokens: int
    peak_bytes: int
    notes: list[str]
    calib_dtype: str = "float32"  # the calibration forward's precision (--calib-dtype), when the method reads it


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def estimate_peak_bytes(config: dict, tensors: dict, linears: list[QuantLinear], opts: QuantizeOptions,
                        method: QuantMethod, arch: Architecture) -> int:
    """Rough working set of a quantization (anonymous memory; inputs are memory-mapped).

    Uncalibrated: a few float32 copies of the largest weight. Calibrated: the hidden states of every
    calibration token twice (a layer's inputs and outputs, in the model's 16-bit dtype when it has one)
    and one chunk's intermediates; one decoder layer in float32, except the weights GPTQ reads straight
    from the file (it holds their codes instead); the largest Hessians held at once (GPTQ: one shared
    [H, H] for every expert's gate/up, then down Hessians batched under ``EXPERT_HESSIAN_BYTES``; AWQ:
    ``X^T X`` at every capture point of a layer, one per expert's down)."""
    largest = max((_numel(lin_shape) for lin_shape in ((lin.out_features, lin.in_features) for lin in linears)),
                  default=0)
    if not method.calibrated:
        return 3 * largest * 4
    hidden = int(config.get("hidden_size") or 0)
    seqlen = min(opts.seqlen, config.get("max_position_embeddings") or opts.seqlen)
    chunk = min(opts.batch_size or auto_batch_size(config, seqlen, opts.samples), opts.samples)
    heads = int(config.get("num_attention_heads") or 1)
    act_bytes = 2 if any(t.dtype in (torch.bfloat16, torch.float16) for t in tensors.values()) else 4
    layer0 = [lin for lin in linears if lin.layer == 0]
    quantized0 = {f"{lin.source_prefix}.weight" for lin in layer0}
    prefix0 = arch.layer_prefix(0)
    other0 = sum(_numel(t.shape) for n, t in tensors.items() if n.startswith(prefix0) and n not in quantized0)
    q_numel = sum(lin.out_features * lin.in_features for lin in layer0)
    inter = max((lin.in_features for lin in layer0), default=hidden)
    if method.defers_weights:  # GPTQ: codes (about a byte per weight at most) instead of float weights
        layer_bytes = other0 * 4 + q_numel
        from mergequant.quant.gptq_method import EXPERT_HESSIAN_BYTES

        downs = [lin for lin in layer0 if arch.is_moe and arch.experts.parse_expert_module(lin.suffix)
                 and lin.suffix.endswith("down_proj")]
        hess = hidden * hidden * 4 + (min(EXPERT_HESSIAN_BYTES, len(downs) * inter * inter * 4) if downs
                                      else inter * inter * 4)
    else:
        layer_bytes = 2 * (other0 + q_numel) * 4
        points = {lin.in_features for lin in layer0}
        n_down = sum(1 for lin in layer0 if lin.suffix.endswith("down_proj"))
        hess = sum(k * k * 4 for k in points) + max(0, n_down - 1) * inter * inter * 4
    tokens = opts.samples * seqlen
    return (layer_bytes + hess + 2 * tokens * hidden * act_bytes
            + chunk * seqlen * (3 * inter + 4 * hidden) * 4 + chunk * heads * seqlen * seqlen * 4)


def plan_quantize(model_dir: str | Path, opts: QuantizeOptions) -> QuantizePlan:
    """The checks ``run_quantize`` makes before work (``_prepare``), then the plan: modules, output size and shards, calibration tokens, peak memory."""
    from mergequant.units import parse_size

    model_dir = Path(model_dir)
    if opts.method == "gguf":
        from mergequant.gguf.driver import plan_gguf

        return plan_gguf(model_dir, opts)
    ck, arch, linears, method = _prepare(model_dir, opts)
    planned = planned_tensors(ck, linears, method, opts)
    shards = plan_shards(planned, parse_size(opts.shard_size))
    experts = None
    if arch.is_moe:
        total, active = arch.parameter_counts(ck.config, {n: t.shape for n, t in ck.tensors.items()})
        experts = {"experts": arch.experts.expert_count(ck.config),
                   "top_k": ck.config.get("num_experts_per_tok"), "total": total, "active": active,
                   "calibration": opts.moe_calibration if method.calibrated else "none", "names": opts.moe_names}
    seqlen = min(opts.seqlen, ck.config.get("max_position_embeddings") or opts.seqlen)
    notes = _notes(opts, arch, method)
    return QuantizePlan(model_dir, ck.architecture, opts.method, opts.bits, len(linears), experts,
                        sum(t.nbytes for t in planned), len(shards),
                        opts.samples * seqlen if method.calibrated else 0,
                        estimate_peak_bytes(ck.config, ck.tensors, linears, opts, method, arch), notes,
                        str(calib_dtype(opts)).removeprefix("torch."))


def describe_quantize_plan(plan: QuantizePlan) -> str:
    from mergequant.units import format_bytes

    lines = [f"quantize {plan.model} ({plan.architecture}) with {plan.method}{f' {plan.bits}-bit' if plan.bits else ''}: "
             f"{plan.modules} Linear modules"]
    if plan.experts:
        e = plan.experts
        lines.append(f"  mixture of experts: {e['experts']} experts per layer, {e['top_k']} active per token; "
                     f"{e['active']:,} of {e['total']:,} parameters active; calibration {e['calibration']}; "
                     f"expert names {e['names']}")
    if plan.calib_tokens:
        lines.append(f"  calibration: {plan.calib_tokens:,} tokens"
                     + (f", forward passes in {plan.calib_dtype}" if plan.calib_dtype != "float32" else ""))
    lines.append(f"  writes ~{format_bytes(plan.out_bytes)} in {plan.shards} shard(s); peak memory "
                 f"~{format_bytes(plan.peak_bytes)} + the interpreter (inputs memory-mapped)")
    lines += [f"  {n}" for n in plan.notes]
    return "\n".join(lines)
