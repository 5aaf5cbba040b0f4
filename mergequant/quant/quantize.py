"""Drive a quantization: checkpoint + calibration data -> GPTQ checkpoint on disk.

Data flow: the layer runner materializes one decoder layer at a time; for each group of Linear
modules in true-sequential order (k,v,q | o | up,gate | down) the layer is run over the calibration
activations with hooks that accumulate each module's input Hessian, the modules are quantized
(GPTQ, or round-to-nearest for ``--method rtn``), their dequantized weights are put back so later
groups and the next layer see the quantized model, and the packed tensors are written straight to
their pre-planned place in the output shards. Everything else (embeddings, norms, lm_head) is copied
as float16. CPU RAM stays around one layer plus activations.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from mergequant.errors import MergeQuantError
from mergequant.io.checkpoint import Checkpoint, split_layer_name
from mergequant.io.writer import PlannedTensor, ShardedWriter, atomic_output_dir, check_output_location, plan_shards, write_json
from mergequant.io.model_files import copy_tokenizer_files, pick_device
from mergequant.merge.plan import natural_key
from mergequant.quant import formats
from mergequant.quant.gptq import SUPPORTED_BITS, HessianAccumulator, gptq_quantize, quantize_rtn

# True-sequential order inside a decoder layer: each group is quantized after the previous ones, on
# inputs computed with the previous groups already quantized.
SEQUENTIAL_GROUPS = [
    ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"],
    ["self_attn.o_proj"],
    ["mlp.up_proj", "mlp.gate_proj"],
    ["mlp.down_proj"],
]
QUANTIZED_SUFFIXES = [s for g in SEQUENTIAL_GROUPS for s in g]


@dataclass
class QuantizeOptions:
    out: Path
    method: str = "gptq"
    bits: int = 4
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
    batch_size: int = 8
    fsync: bool = True
    eval_data: str | None = None  # measure perplexity before and after, and put both in the card


@dataclass
class QuantizeResult:
    out: Path
    modules: int
    fallbacks: list[str] = field(default_factory=list)
    calib_tokens: int = 0
    proxy_error: float = 0.0
    perplexity: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Linear:
    prefix: str  # e.g. model.layers.3.self_attn.q_proj
    layer: int
    suffix: str  # e.g. self_attn.q_proj
    out_features: int
    in_features: int
    has_bias: bool


def find_linears(ck: Checkpoint) -> list[_Linear]:
    """The decoder Linear weights that get quantized, from the checkpoint's tensor names and shapes."""
    found = []
    for name, info in ck.tensors.items():
        parts = split_layer_name(name)
        if not parts or not name.endswith(".weight") or len(info.shape) != 2:
            continue
        suffix = parts[2][: -len(".weight")]
        if suffix in QUANTIZED_SUFFIXES:
            prefix = name[: -len(".weight")]
            found.append(_Linear(prefix, parts[1], suffix, info.shape[0], info.shape[1], f"{prefix}.bias" in ck.tensors))
    if not found:
        raise MergeQuantError(f"{ck.path}: no decoder Linear weights found ({ck.architecture} is not supported: "
                              f"expected names like model.layers.N.self_attn.q_proj.weight)")
    return sorted(found, key=lambda lin: (lin.layer, QUANTIZED_SUFFIXES.index(lin.suffix)))


def validate(opts: QuantizeOptions, linears: list[_Linear]) -> None:
    if opts.method not in ("gptq", "rtn"):
        raise MergeQuantError(f"--method {opts.method}: supported here are gptq and rtn")
    if opts.bits not in SUPPORTED_BITS:
        raise MergeQuantError(f"--bits {opts.bits}: supported are {', '.join(map(str, SUPPORTED_BITS))}")
    for lin in linears:
        if opts.group_size != -1 and (opts.group_size <= 0 or lin.in_features % opts.group_size):
            raise MergeQuantError(f"--group-size {opts.group_size} does not divide in_features {lin.in_features} of "
                                  f"{lin.prefix}; use a divisor or -1 (one group per row)")
        if opts.bits == 3 and (lin.in_features % 32 or lin.out_features % 32):
            raise MergeQuantError(f"3-bit packing needs in/out features divisible by 32; {lin.prefix} is "
                                  f"{lin.out_features}x{lin.in_features}")
    if not 0 < opts.damp < 1:
        raise MergeQuantError(f"--damp must be in (0, 1), got {opts.damp}")
    if opts.method == "gptq" and not opts.calib:
        raise MergeQuantError("--calib is required for --method gptq (or use --method rtn, which needs no data)")


def _planned(ck: Checkpoint, linears: list[_Linear], bits: int, group_size: int) -> list[PlannedTensor]:
    quantized = {f"{lin.prefix}.weight" for lin in linears}
    out = []
    for lin in linears:
        K, N = lin.in_features, lin.out_features
        G = 1 if group_size == -1 else K // group_size
        out += [PlannedTensor(f"{lin.prefix}.qweight", torch.int32, (K * bits // 32, N)),
                PlannedTensor(f"{lin.prefix}.qzeros", torch.int32, (G, N * bits // 32)),
                PlannedTensor(f"{lin.prefix}.scales", torch.float16, (G, N)),
                PlannedTensor(f"{lin.prefix}.g_idx", torch.int32, (K,))]
    for name, info in ck.tensors.items():
        if name in quantized:
            continue
        dtype = torch.float16 if info.dtype.is_floating_point else info.dtype
        out.append(PlannedTensor(name, dtype, info.shape))
    return sorted(out, key=lambda t: natural_key(t.name))


def _write_packed(writer: ShardedWriter, lin: _Linear, q_nk, scales, zeros, g_idx, bits: int, fmt: str) -> None:
    packed = formats.gptq_pack(q_nk.T.contiguous(), zeros, scales, g_idx, bits, fmt)
    for key, tensor in packed.items():
        writer.write(f"{lin.prefix}.{key}", tensor.contiguous())


def run_quantize(model_dir: str | Path, opts: QuantizeOptions, log=print) -> QuantizeResult:
    model_dir = Path(model_dir)
    ck = Checkpoint.open(model_dir)
    linears = find_linears(ck)
    validate(opts, linears)
    check_output_location(opts.out, [model_dir], force=opts.force)
    fmt = "gptq" if opts.sym else "gptq_v2"
    device = pick_device(opts.device)
    calib_ids = None
    if opts.method == "gptq":
        from transformers import AutoTokenizer

        from mergequant.quant.calib import calibration_batch

        tok = AutoTokenizer.from_pretrained(model_dir)
        limit = ck.config.get("max_position_embeddings")
        seqlen = min(opts.seqlen, limit) if isinstance(limit, int) else opts.seqlen
        calib_ids = calibration_batch(opts.calib, tok, samples=opts.samples, seqlen=seqlen, seed=opts.seed)

    result = QuantizeResult(opts.out, len(linears), calib_tokens=0 if calib_ids is None else calib_ids.numel())
    shards = plan_shards(_planned(ck, linears, opts.bits, opts.group_size), opts.shard_size)
    with atomic_output_dir(opts.out) as tmp:
        writer = ShardedWriter(tmp, shards, writeback_every=256 * 2**20 if opts.fsync else None)
        try:
            quantized = {f"{lin.prefix}.weight" for lin in linears}
            for name, info in ck.tensors.items():  # everything that is not a quantized weight, as float16
                if name not in quantized:
                    t = ck.get(name)
                    writer.write(name, t.to(torch.float16) if info.dtype.is_floating_point else t)
            if opts.method == "rtn":
                _rtn(ck, linears, writer, opts, fmt)
            else:
                _gptq(model_dir, linears, writer, opts, fmt, calib_ids, device, result, log)
            writer.finish(fsync=opts.fsync)
        finally:
            writer.close()
        _write_metadata(ck, tmp, opts, fmt, result)
        if opts.eval_data:  # measured on the finished files, before they are moved into place
            from mergequant.evaluate import evaluate_model

            kw = dict(seqlen=opts.seqlen, device=opts.device, progress=not opts.quiet)
            result.perplexity = {
                "full precision": evaluate_model(str(model_dir), opts.eval_data, **kw).perplexity,
                f"{opts.method} {opts.bits}-bit": evaluate_model(str(tmp), opts.eval_data, **kw).perplexity,
            }
            log("perplexity: " + ", ".join(f"{k} {v:.4f}" for k, v in result.perplexity.items()))
            _write_metadata(ck, tmp, opts, fmt, result)  # again, now with the numbers in the card
    return result


def _rtn(ck, linears, writer, opts, fmt):
    for lin in tqdm(linears, desc="rtn", disable=opts.quiet or None, file=sys.stderr):
        W = ck.get(f"{lin.prefix}.weight").float()
        q, scales, zeros = quantize_rtn(W, opts.bits, opts.group_size, opts.sym)
        _write_packed(writer, lin, q, scales, zeros, formats.g_idx_for(lin.in_features, opts.group_size), opts.bits, fmt)


def _gptq(model_dir, linears, writer, opts, fmt, calib_ids, device, result, log):
    from mergequant.quant.runner import LayerRunner, linear_modules, run_layer

    by_layer: dict[int, dict[str, _Linear]] = {}
    for lin in linears:
        by_layer.setdefault(lin.layer, {})[lin.suffix] = lin
    runner = LayerRunner(model_dir, calib_ids, device, batch_size=opts.batch_size)
    bar = tqdm(total=runner.num_layers, desc="gptq", unit="layer", disable=opts.quiet or None, file=sys.stderr)

    def process(i, layer, inputs):
        modules = linear_modules(layer)
        todo = by_layer.get(i, {})
        for group in SEQUENTIAL_GROUPS:
            names = [s for s in group if s in todo and s in modules]
            if not names:
                continue
            acc = {s: HessianAccumulator(todo[s].in_features) for s in names}
            hooks = [modules[s].register_forward_hook(lambda m, args, out, s=s: acc[s].add(args[0].detach()))
                     for s in names]
            try:
                run_layer(layer, inputs)
            finally:
                for h in hooks:
                    h.remove()
            for s in names:
                mod, lin = modules[s], todo[s]
                res = gptq_quantize(mod.weight.data.float(), acc[s].hessian, bits=opts.bits, group_size=opts.group_size,
                                    desc_act=opts.desc_act, static_groups=opts.static_groups, sym=opts.sym,
                                    damp=opts.damp)
                if res.fallback_rtn:
                    result.fallbacks.append(lin.prefix)
                    log(f"warning: {lin.prefix}: Cholesky failed at every damping; used round-to-nearest")
                result.proxy_error += res.error
                mod.weight.data.copy_(res.W_hat.to(mod.weight.dtype))
                _write_packed(writer, lin, res.qweight, res.scales, res.zeros, res.g_idx, opts.bits, fmt)
        bar.update(1)

    try:
        runner.run(process)
    finally:
        bar.close()


def _write_metadata(ck: Checkpoint, out: Path, opts: QuantizeOptions, fmt: str, result: QuantizeResult) -> None:
    from mergequant.card import quant_card

    qcfg = formats.gptq_quantize_config(bits=opts.bits, group_size=opts.group_size, desc_act=opts.desc_act,
                                        sym=opts.sym, damp_percent=opts.damp, static_groups=opts.static_groups,
                                        checkpoint_format=fmt)
    config = dict(ck.config)
    config["quantization_config"] = qcfg
    config["torch_dtype"] = "float16"
    if "dtype" in config:
        config["dtype"] = "float16"
    write_json(out / "config.json", config)
    write_json(out / "quantize_config.json", qcfg)
    copy_tokenizer_files(ck.path, out)
    (out / "README.md").write_text(quant_card(
        source=str(ck.path), method=opts.method, bits=opts.bits, group_size=opts.group_size, desc_act=opts.desc_act,
        sym=opts.sym, checkpoint_format=fmt, calib=opts.calib, calib_tokens=result.calib_tokens,
        samples=opts.samples if opts.method == "gptq" else 0, fallbacks=result.fallbacks,
        perplexity=result.perplexity or None, eval_data=opts.eval_data))
