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
from mergequant.gguf.gptq_grid import DEFAULT_SEARCH, check_search, search_of

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
    if search_of(opts) != DEFAULT_SEARCH:  # --gguf-search gptq: with --calib, dense models (gguf/gptq_grid.py)
        from mergequant.architectures import architecture_for

        check_search(search_of(opts), "gguf", opts.calib, architecture_for(ck.config).is_moe)
    if opts.calib:  # dense or mixture of experts (per-expert importance: collect_imatrix)
        from mergequant.quant.calib import CALIBRATION, local_data_file, require_tokenizer

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
    if search_of(opts) == "gptq":
        from mergequant.gguf.gptq_grid import plan_note

        notes.append(plan_note(planned, types))
    largest = max(p.rows * p.cols for p in planned)
    n_lin = sum(1 for p in planned if mixes.quantizable(p.name, tuple(p.shape)))
    calib_tokens = opts.samples * min(opts.seqlen, ck.config.get("max_position_embeddings") or opts.seqlen) if opts.calib else 0
    return QuantizePlan(Path(model_dir), ck.architecture, f"gguf ({', '.join(types)})", 0, n_lin, None,
                        sum(sizes.values()), len(types), calib_tokens, 4 * 4 * min(largest, 1 << 22), notes)


def collect_imatrix(model_dir: Path, ck, opts, log, routing: dict | None = None) -> tuple[dict[str, np.ndarray], int]:
    """llama.cpp's importance matrix from our own layer runner: for every decoder Linear, the mean over
    calibration tokens of each input column's square, keyed by the source module name on disk
    (``model.layers.3.mlp.down_proj``). Layer i's statistics are taken on the outputs of the
    full-precision layers before it (as llama-imatrix does with the fp model).

    Mixture of experts (``mergequant.gguf.moe_imatrix``): each expert's Linears
    (``model.layers.3.block_sparse_moe.experts.5.w1``) see only the tokens the router sends them, and
    each gets its own mean over its own token count, as llama-imatrix's routed matmul collects them; an
    expert no token reached gets llama.cpp's row of ones. Routers and ``shared_expert_gate`` are not
    quantized and get nothing; a shared expert (Qwen2-MoE) is a dense Linear like any other. Per layer
    the tokens routed to each expert are logged and, when ``routing`` is given, stored there
    (layer -> counts)."""
    import torch

    from mergequant.architectures import architecture_for
    from mergequant.gguf.moe_imatrix import mean_square, routing_line
    from mergequant.io.model_files import pick_device
    from mergequant.quant.moe import MoECalibration
    from mergequant.quant.quantize import _calibration_ids, auto_batch_size
    from mergequant.quant.runner import LayerRunner, capture_module_inputs, linear_modules

    arch = architecture_for(ck.config)
    ids = _calibration_ids(model_dir, ck, opts)
    batch = opts.batch_size or auto_batch_size(ck.config, ids.shape[1], ids.shape[0])
    # routed: every expert is called on its routed tokens only (llama.cpp's statistics), never on all of them
    moe = MoECalibration("routed") if arch.is_moe else None
    runner = LayerRunner(ck, ids, pick_device(opts.device), batch_size=batch, arch=arch, moe=moe)
    top_k = int(ck.config.get("num_experts_per_tok") or 1)
    out: dict[str, np.ndarray] = {}

    def wanted(name: str) -> bool:
        return name in arch.quantized or (arch.is_moe and arch.experts.parse_expert_module(name) is not None)

    def process(i, layer, inputs):
        modules = {n: m for n, m in linear_modules(layer).items() if wanted(n)}
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def sink(names, x):
            x = x.float().reshape(-1, x.shape[-1])
            sq = (x * x).sum(0).cpu()
            for n in names:
                sums[n] = sums[n] + sq if n in sums else sq
                counts[n] = counts.get(n, 0) + x.shape[0]

        capture_module_inputs(layer, inputs, modules, sink)
        for n, s in sums.items():
            out[f"{arch.layer_prefix(i)}{arch.to_disk(n)}"] = mean_square(s.numpy(), counts[n])
        experts = sorted((p[0], counts[n]) for n in counts
                         if arch.is_moe and (p := arch.experts.parse_expert_module(n)) is not None and p[1] == 0)
        if experts:
            per_expert = [c for _, c in experts]
            if routing is not None:
                routing[i] = per_expert
            log(routing_line(i, per_expert, int(ids.numel()), top_k))

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
    search = search_of(opts)
    for flag in ignored_options(opts):
        if not (flag == "--damp" and search == "gptq"):  # GPTQ's damping applies to --gguf-search gptq
            log(f"note: {flag} does not apply to --method gguf; it is ignored")
    imatrix, tokens, routing = (None, 0, {})
    if opts.calib and search == DEFAULT_SEARCH:  # gptq: its Hessian pass (below) gives the importance too
        if getattr(opts, "moe_calibration", "all") != "all":
            log("note: --moe-calibration does not apply to --method gguf (each expert's importance comes from the "
                "tokens routed to it, as llama-imatrix collects it); it is ignored")
        log(f"collecting the importance matrix on {opts.calib} ({opts.samples} x {opts.seqlen} tokens)")
        imatrix, tokens = collect_imatrix(model_dir, ck, opts, log, routing=routing)
    with atomic_output_dir(opts.out, log=log, replace=opts.force) as tmp:
        gp = None
        if search == "gptq":  # the decoder k-quants by GPTQ, spilled inside tmp; the writer copies them
            from mergequant.gguf.gptq_grid import gptq_pass

            gp = gptq_pass(model_dir, ck, opts, types, tmp, log)
            imatrix, tokens = gp.imatrix, gp.tokens
        res = write_gguf(model_dir, tmp, types, imatrix=imatrix, ck=ck, progress=not opts.quiet, fsync=opts.fsync,
                         finished=gp.finished if gp is not None else None)
        if gp is not None:
            gp.drop()  # the spilled bytes are in the files now; they must not end up in OUT
        files = [(ft, res.files[ft].name, res.sizes[ft], res.types[ft]) for ft in types]
        (tmp / "README.md").write_text(gguf_card(source=source_name(ck) if adapter_of(ck) else str(model_dir),
                                                 files=files, architecture=arch_name, calib=opts.calib,
                                                 calib_tokens=tokens, samples=opts.samples, adapter=adapter_of(ck),
                                                 expert_tokens=routing or None, search=search))
    result = QuantizeResult(opts.out, sum(n for t, n in res.types[types[0]].items() if t != "F32"), calib_tokens=tokens)
    result.expert_tokens = dict(routing)
    result.files = [opts.out / res.files[ft].name for ft in types]
    log(f"gguf: {len(types)} file(s) in {res.seconds:.1f} s: "
        + ", ".join(f"{ft} {res.sizes[ft] / 2**20:.1f} MiB" for ft in types))
    return result
