"""``mergequant quantize MODEL -o OUT --method gguf --gguf-type T [...]``: checks, optional calibration
(importance matrix), the one-pass writer, the card. Called from ``mergequant.quant.quantize``.

The files' naming, per-tensor types and block packing are the GGUF format's
(``mergequant.checkpoint_formats.gguf``, :data:`FORMAT`); the math is llama.cpp's quantizers
(``mergequant.gguf.blocks``, ``kquants``, ``imatrix``) and the importance matrix collected here."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mergequant.checkpoint_formats import get_format
from mergequant.errors import MergeQuantError
from mergequant.gguf import mixes

FORMAT = get_format("gguf")


def _prepare(model_dir: Path, opts):
    from mergequant.gguf.tokenizer import tokenizer_metadata
    from mergequant.gguf.writer import check_llama_cpp_name, gguf_architecture, model_name, tokenizer_source
    from mergequant.io.output_dir import check_output_location, local_files
    from mergequant.merge.moe_layout import per_expert_view
    from mergequant.peft.adapted import adapter_of, model_dirs, open_model
    from mergequant.quant.quantize import _check_counts, refuse_quantized_input

    types = mixes.check_file_types(opts.gguf_types)  # before any file is opened
    _check_counts(opts)
    if opts.bits is not None:
        raise MergeQuantError(f"--bits {opts.bits}: --method gguf takes its bit widths from --gguf-type (e.g. Q4_K_M)")
    # a folder, BASE+ADAPTER or an adapter-only folder (LoRA applied as tensors are read: mergequant/peft)
    ck = per_expert_view(open_model(model_dir, hub=False))
    refuse_quantized_input(ck)
    arch_name, _ = gguf_architecture(ck.config, f"{model_dir}: ")
    tok_dir = tokenizer_source(model_dir, ck)  # an adapted model's: the adapter folder's when it has one
    tok = tokenizer_metadata(tok_dir, ck.config)  # unknown pre-tokenizer, missing tokenizer: refused now
    check_llama_cpp_name(model_name(model_dir, ck), tok.tokens, f"{model_dir}: ")
    if opts.calib:
        from mergequant.architectures import architecture_for
        from mergequant.quant.calib import CALIBRATION, local_data_file, require_tokenizer

        if architecture_for(ck.config).is_moe:
            raise MergeQuantError("--calib with --method gguf: importance matrices for mixture-of-experts models are not "
                                  "collected yet (leave --calib out for llama.cpp's reference rounding)")
        local_data_file(opts.calib, CALIBRATION)
        require_tokenizer(tok_dir, "--method gguf --calib")
    if opts.eval_data:
        raise MergeQuantError("--eval with --method gguf: measure GGUF files in llama.cpp (llama-perplexity); "
                              "mergequant eval does not read GGUF")
    inputs = model_dirs(ck) if adapter_of(ck) is not None else [model_dir]  # an adapted model: base and adapter
    check_output_location(opts.out, inputs, force=opts.force, files=local_files({"calibration data": opts.calib}))
    return ck, arch_name, types


def plan_gguf(model_dir: Path, opts):
    """--dry-run: the files, their sizes and per-type tensor counts, from headers only."""
    from mergequant.gguf.blocks import row_bytes
    from mergequant.gguf.writer import model_name
    from mergequant.peft.adapted import adapter_notes
    from mergequant.quant.quantize import QuantizePlan

    ck, arch_name, types = _prepare(Path(model_dir), opts)
    planned = FORMAT.plan(ck, arch_name, arch_name == "llama", types, has_imatrix=bool(opts.calib))
    sizes, notes = {}, adapter_notes([ck])
    name = model_name(model_dir, ck)
    for ft in types:
        counts: dict[str, int] = {}
        for p in planned:
            t = p.types[ft]
            counts[t] = counts.get(t, 0) + 1
            sizes[ft] = sizes.get(ft, 0) + p.rows * row_bytes(t, p.cols)
        notes.append(f"{name}-{ft}.gguf: ~{sizes[ft] / 2**20:.1f} MiB ("
                     + ", ".join(f"{n} {t}" for t, n in sorted(counts.items())) + ")")
    largest = max(p.rows * p.cols for p in planned)
    n_lin = sum(1 for p in planned if mixes.quantizable(p.name, tuple(p.shape)))
    calib_tokens = opts.samples * min(opts.seqlen, ck.config.get("max_position_embeddings") or opts.seqlen) if opts.calib else 0
    return QuantizePlan(Path(model_dir), ck.architecture, f"gguf ({', '.join(types)})", 0, n_lin, None,
                        sum(sizes.values()), len(types), calib_tokens, 4 * 4 * min(largest, 1 << 22), notes)


def collect_imatrix(model_dir: Path, ck, opts, log) -> tuple[dict[str, np.ndarray], int]:
    """llama.cpp's importance matrix from our own layer runner: for every decoder Linear, the mean over
    calibration tokens of each input column's square, keyed by the source module name
    (``model.layers.3.mlp.down_proj``). Layer i's statistics are taken on the outputs of the
    full-precision layers before it (as llama-imatrix does with the fp model)."""
    import torch

    from mergequant.architectures import architecture_for
    from mergequant.io.model_files import pick_device
    from mergequant.quant.quantize import _calibration_ids, auto_batch_size
    from mergequant.quant.runner import LayerRunner, capture_module_inputs, linear_modules

    arch = architecture_for(ck.config)
    ids = _calibration_ids(model_dir, ck, opts)
    batch = opts.batch_size or auto_batch_size(ck.config, ids.shape[1], ids.shape[0])
    runner = LayerRunner(ck, ids, pick_device(opts.device), batch_size=batch, arch=arch)
    out: dict[str, np.ndarray] = {}

    def process(i, layer, inputs):
        modules = {n: m for n, m in linear_modules(layer).items() if n in arch.quantized}
        sums: dict[str, torch.Tensor] = {}
        count = [0]

        def sink(names, x):
            x = x.float().reshape(-1, x.shape[-1])
            sq = (x * x).sum(0).cpu()
            for n in names:
                sums[n] = sums[n] + sq if n in sums else sq
            count[0] += x.shape[0] * len(names)

        capture_module_inputs(layer, inputs, modules, sink)
        per = count[0] // max(1, len(modules))
        for n, s in sums.items():
            out[f"{arch.layer_prefix(i)}{n}"] = (s / max(per, 1)).numpy().astype(np.float32)

    with torch.no_grad():
        runner.run(process)
    return out, int(ids.numel())


def run_gguf(model_dir: Path, opts, log=print):
    from mergequant.card import gguf_card
    from mergequant.gguf.writer import write_gguf
    from mergequant.io.output_dir import atomic_output_dir
    from mergequant.peft.adapted import adapter_notes, adapter_of, source_name
    from mergequant.quant.quantize import QuantizeResult, ignored_options

    model_dir = Path(model_dir)
    ck, arch_name, types = _prepare(model_dir, opts)
    for note in adapter_notes([ck]):
        log(note)
    for flag in ignored_options(opts):
        log(f"note: {flag} does not apply to --method gguf; it is ignored")
    imatrix, tokens = (None, 0)
    if opts.calib:
        log(f"collecting the importance matrix on {opts.calib} ({opts.samples} x {opts.seqlen} tokens)")
        imatrix, tokens = collect_imatrix(model_dir, ck, opts, log)
    with atomic_output_dir(opts.out, log=log, replace=opts.force) as tmp:
        res = write_gguf(model_dir, tmp, types, imatrix=imatrix, ck=ck, progress=not opts.quiet, fsync=opts.fsync)
        files = [(ft, res.files[ft].name, res.sizes[ft], res.types[ft]) for ft in types]
        (tmp / "README.md").write_text(gguf_card(source=source_name(ck) if adapter_of(ck) else str(model_dir),
                                                 files=files, architecture=arch_name, calib=opts.calib,
                                                 calib_tokens=tokens, samples=opts.samples, adapter=adapter_of(ck)))
    result = QuantizeResult(opts.out, sum(n for t, n in res.types[types[0]].items() if t != "F32"), calib_tokens=tokens)
    result.files = [opts.out / res.files[ft].name for ft in types]
    log(f"gguf: {len(types)} file(s) in {res.seconds:.1f} s: "
        + ", ".join(f"{ft} {res.sizes[ft] / 2**20:.1f} MiB" for ft in types))
    return result
