"""GPTQ error feedback inside the GGUF k-quant grids (``--calib ... --gguf-search gptq``).

The importance-weighted search of ``--calib`` (``mergequant.gguf.imatrix``, llama.cpp's) weighs each weight's
error by its input column's mean square activation: a *diagonal* model of the layer's output error. GPTQ
uses the whole Hessian H = sum_t x_t x_t^T of the Linear's inputs: once a column is rounded, its error is
pushed onto the columns not rounded yet (through the upper Cholesky factor of H^-1), where correlated inputs
can cancel it. Here the rounding grid is not GPTQ's min/max one but the k-quant's own, chosen the way
``--calib`` chooses it, so the file format and the decoder are untouched:

1. per decoder layer, from the full-precision forward (layer i's inputs are the float outputs of the layers
   before it, as for the importance matrix: several GGUF types come out of one pass, so the forward cannot
   depend on one type's rounding), H of each distinct Linear input (q/k/v share one, gate/up share one);
2. per Linear and k-quant type the plan gives it (Q2_K .. Q6_K), GPTQ's column loop: when the loop reaches a
   256-column super-block, that super-block's grid (half-precision d / dmin, quantized sub-block scales and
   mins) is searched on the *current*, error-updated weights by the importance-weighted search with
   importance = diag(H) / tokens; each column is then rounded to nearest on that fixed grid and its error
   spread over the later columns (eagerly inside the super-block, lazily, one matrix product, beyond it)
   through the factor of (H + SHRINK diag(H) + damping)^-1 (``inverse_factor`` says why the shrinkage);
3. the codes go into the blocks the search produced (``kquants.put_codes``) and the finished bytes of each
   (tensor, type) are spilled to a file in the output's temporary folder, which the one-pass writer copies
   instead of quantizing that tensor itself (``mergequant.gguf.writer.write_gguf(finished=...)``).

With a diagonal H the feedback moves nothing and the bytes are the importance-weighted search's
(``tests/test_gguf_gptq.py``). Tensors this does not cover keep the ``--calib`` path: the 32-weight types
(Q4_0 .. Q8_0, e.g. fallbacks for rows a super-block does not divide), ``output.weight`` and the token
embedding (reference rounding), mixture-of-experts models (refused).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mergequant.errors import MergeQuantError

if TYPE_CHECKING:
    import torch

SEARCHES = ("imatrix", "gptq")
DEFAULT_SEARCH = "imatrix"
# the k-quants (kquants.K_LAYOUT): their final codes are round-to-nearest on the stored grid
GPTQ_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SUPER = 256  # weights per k-quant super-block


def _shrink_from_env(default: float = 0.1) -> float:
    """H + SHRINK * diag(H) (see ``inverse_factor``): 0.1, chosen on a validation text (docs/benchmarks.md);
    ``MERGEQUANT_GGUF_GPTQ_SHRINK`` overrides it, for sweeps."""
    raw = os.environ.get("MERGEQUANT_GGUF_GPTQ_SHRINK")
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise MergeQuantError(f"MERGEQUANT_GGUF_GPTQ_SHRINK={raw!r}: a number >= 0")
    return value


SHRINK = _shrink_from_env()


def check_search(search: str, method: str, calib: str | None, is_moe: bool = False) -> str:
    """The k-quant search ``search`` after checking it fits the other options; one line when it does not."""
    if search not in SEARCHES:
        raise MergeQuantError(f"--gguf-search {search!r}: one of {', '.join(SEARCHES)}")
    if search == DEFAULT_SEARCH:
        return search
    if method != "gguf":
        raise MergeQuantError(f"--gguf-search {search}: only for --method gguf (it chooses how GGUF k-quants are "
                              f"rounded; --method {method} has its own quantizer)")
    if not calib:
        raise MergeQuantError(f"--gguf-search {search} needs --calib (the Hessians of the decoder Linears come from "
                              "calibration data)")
    if is_moe:
        raise MergeQuantError(f"--gguf-search {search}: mixture-of-experts models are not supported yet (use "
                              "--gguf-search imatrix)")
    return search


def search_of(opts) -> str:
    """The ``--gguf-search`` of a quantize options object (``QuantizeOptions.gguf_search``; ``imatrix`` for an
    options object without one)."""
    return getattr(opts, "gguf_search", None) or DEFAULT_SEARCH


def importance_of(H: torch.Tensor, tokens: int | None = None) -> np.ndarray:
    """llama.cpp's importance vector (mean over tokens of each input column's square) from a Hessian:
    ``HessianAccumulator`` keeps H = (2/n) sum x x^T, so it is diag(H) / 2; a plain sum needs ``tokens``."""
    import torch

    d = torch.diagonal(H).to(torch.float64)
    return (d / tokens if tokens else d / 2).cpu().numpy().astype(np.float32)


def inverse_factor(H: torch.Tensor, damp: float = 0.01, shrink: float | None = None,
                   max_retries: int = 4) -> torch.Tensor | None:
    """The lower-triangular V whose reversal J V J is the upper Cholesky factor of (H' + damp * mean(diag H') I)^-1,
    H' = H + shrink * diag(H), as GPTQ's column loop reads it (``mergequant.quant.gptq``'s in-place helpers), or
    None if no damping up to 10^max_retries x made H' positive definite.

    ``shrink`` (default :data:`SHRINK`) pulls H towards its diagonal -- the importance matrix's own model, where
    the feedback does nothing (shrink -> infinity gives the importance-weighted search's bytes). Why: H is
    measured on the full-precision model's inputs, but in the quantized model every layer's inputs carry the
    earlier layers' errors; the less the solution leans on the exact correlations of the calibration inputs,
    the less it is thrown off by that. Inputs never active in calibration (zero diagonal) get a unit diagonal,
    as in GPTQ, so H is invertible; their weights are left as they are. ``H`` is not modified."""
    import torch

    from mergequant.quant.gptq import _inverse_cholesky_upper_

    shrink = SHRINK if shrink is None else float(shrink)
    V = H.detach().to(device="cpu", dtype=torch.float32).clone()
    if shrink:
        V.diagonal().mul_(1 + shrink)
    dead = torch.diagonal(V) == 0
    if bool(dead.any()):
        V.diagonal()[dead] = 1
    ok, _ = _inverse_cholesky_upper_(V, damp, max_retries)
    return V if ok else None


def _u_block(V: torch.Tensor, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    from mergequant.quant.gptq import _u_block as u

    return u(V, r0, r1, c0, c1)


def round_on_grid(W1: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, codes0: torch.Tensor,
                  U1: torch.Tensor, zero: int, cmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column loop over one super-block with its grid fixed: ``W1`` [n, R] (columns first; updated in
    place), per weight ``step``/``offset``/search codes ``codes0`` [n, R], ``U1`` [n, n] the super-block's
    diagonal block of the upper Cholesky factor of H^-1. Column i is rounded to nearest on its grid as the
    k-quant decoder reads it (code = clamp(round((w + offset) / step) + zero, 0, cmax), value = step * (code -
    zero) - offset, in float32 as the search rounds), then its scaled error err = (w - value) / U_ii moves the
    later columns by -U_i,j * err. A sub-block whose step is 0 decodes to -offset whatever the code: it keeps
    the search's code. Returns (codes [n, R] int64, errors [n, R]) for the lazy update beyond the block."""
    import torch

    n = W1.shape[0]
    err_all = torch.zeros_like(W1)
    codes = torch.empty_like(W1)
    live = step != 0
    for i in range(n):
        w = W1[i]
        q = torch.clamp(torch.round((w + offset[i]) / step[i]) + zero, 0, cmax)
        q = torch.where(live[i], q, codes0[i])
        err = (w - (step[i] * (q - zero) - offset[i])) / U1[i, i]
        W1[i:].addmm_(U1[i, i:, None], err[None, :], alpha=-1)  # rank-1 update as a GEMM: faster than addr_ on CPU
        err_all[i] = err
        codes[i] = q
    return codes.to(torch.int64), err_all


def gptq_kquant(W: np.ndarray, V: torch.Tensor, qtype: str, importance: np.ndarray) -> np.ndarray:
    """``W`` (float32 [rows, cols], the rows as the file stores them, cols a multiple of 256) as k-quant
    ``qtype`` blocks (uint8 [rows, row_bytes]) by GPTQ with the grids of the importance-weighted search
    (module docstring); ``V`` from :func:`inverse_factor` of the columns' Hessian, ``importance`` [cols]."""
    import torch

    from mergequant.gguf.blocks import quantize_blocks, row_bytes
    from mergequant.gguf.kquants import K_LAYOUT, block_grid, put_codes

    if qtype not in K_LAYOUT:
        raise ValueError(f"{qtype}: not a k-quant type ({', '.join(K_LAYOUT)})")
    rows, cols = W.shape
    if cols % SUPER or tuple(V.shape) != (cols, cols) or importance.size != cols:
        raise ValueError(f"{qtype}: W {W.shape}, V {tuple(V.shape)}, importance {importance.size}: need cols a "
                         f"multiple of {SUPER} and matching shapes")
    _, bpb, zero, cmax, _ = K_LAYOUT[qtype]
    importance = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
    Wt = torch.from_numpy(np.ascontiguousarray(W, dtype=np.float32).T.copy())  # [cols, rows]: columns are rows
    out = np.empty((rows, row_bytes(qtype, cols)), dtype=np.uint8)
    for k, c0 in enumerate(range(0, cols, SUPER)):
        c1 = c0 + SUPER
        # the grid, searched on the weights as the feedback so far left them
        blocks = np.ascontiguousarray(quantize_blocks(Wt[c0:c1].T.numpy(), qtype, importance[c0:c1]))
        step, offset, codes0 = (torch.from_numpy(np.ascontiguousarray(a.T)) for a in block_grid(blocks, qtype))
        codes, err = round_on_grid(Wt[c0:c1].clone(), step, offset, codes0.to(torch.float32),
                                   _u_block(V, c0, c1, c0, c1).triu(), zero, cmax)
        if c1 < cols:  # lazy batch update: the block's errors onto every later column, one product
            Wt[c1:].addmm_(_u_block(V, c0, c1, c1, cols).T, err, alpha=-1)
        put_codes(blocks, qtype, codes.T.numpy())
        out[:, k * bpb:(k + 1) * bpb] = blocks
    return out


def row_blocks(rows: int, cols: int, nbytes: int | None = None) -> list[tuple[int, int]]:
    """Row ranges of at most ``nbytes`` of float32 weights (GPTQ's ``ROW_BLOCK_BYTES``, 24 MiB): GPTQ treats
    rows independently given H, so a large weight is solved a block of rows at a time and memory holds one
    block (plus its working copy and codes), not the whole matrix. (The same algorithm; a few roundings can
    differ from a whole-matrix solve, as the matrix products' summation order depends on their sizes.)"""
    from mergequant.quant.gptq import ROW_BLOCK_BYTES

    step = max(1, (nbytes or ROW_BLOCK_BYTES) // (4 * cols))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


@dataclass
class GPTQPass:
    """What the calibration pass of ``--gguf-search gptq`` hands the writer."""

    imatrix: dict[str, np.ndarray]  # source Linear -> importance (the tensors and types GPTQ does not cover)
    finished: dict[tuple[str, str], Path]  # (GGUF tensor name, GGUF type) -> file of its finished bytes
    tokens: int
    spill: Path  # the folder of those files (inside the output's temporary folder)
    fallbacks: list[str] = field(default_factory=list)  # Hessians no damping made invertible: the plain search

    def drop(self) -> None:
        """Delete the spilled bytes (once the writer has copied them: they must not end up in the output)."""
        import shutil

        shutil.rmtree(self.spill, ignore_errors=True)
        self.finished.clear()


SPILL = ".gguf-gptq"  # the spill folder's name inside the output's temporary folder


def gptq_pass(model_dir: Path, ck, opts, file_types: list[str], tmp: Path, log=print) -> GPTQPass:
    """Run the calibration data through the model layer by layer (one layer and its Hessians in memory) and write
    every planned (decoder Linear, k-quant type) GPTQ can round to ``tmp/.gguf-gptq/`` (``tmp``: the output's
    temporary folder; each file is one tensor's bytes in one type, rows end to end). The tensors are planned and
    read exactly as the writer plans and reads them (q/k rows already in llama.cpp's rotary order: a row
    permutation, which leaves the columns -- H's order -- as they are)."""
    import time

    import torch

    from mergequant.architectures import architecture_for
    from mergequant.checkpoint_formats import get_format
    from mergequant.gguf.writer import gguf_architecture
    from mergequant.io.model_files import pick_device
    from mergequant.quant.gptq import HessianAccumulator
    from mergequant.quant.quantize import _calibration_ids, auto_batch_size
    from mergequant.quant.runner import LayerRunner, capture_module_inputs, linear_modules

    arch = architecture_for(ck.config)
    check_search("gptq", "gguf", opts.calib, arch.is_moe)
    arch_name, permute = gguf_architecture(ck.config)
    planned = get_format("gguf").plan(ck, arch_name, permute, file_types, has_imatrix=True)
    spill = Path(tmp) / SPILL
    spill.mkdir()
    log(f"collecting Hessians on {opts.calib} ({opts.samples} x {opts.seqlen} tokens): GPTQ error feedback in the "
        "k-quant grids")
    ids = _calibration_ids(model_dir, ck, opts)
    batch = opts.batch_size or auto_batch_size(ck.config, ids.shape[1], ids.shape[0])
    runner = LayerRunner(ck, ids, pick_device(opts.device), batch_size=batch, arch=arch)
    by_key = {p.imatrix_key: p for p in planned if p.imatrix_key and not p.experts}
    damp = float(getattr(opts, "damp", 0.01))
    res = GPTQPass({}, {}, int(ids.numel()), spill)

    def process(i, layer, inputs):
        t0 = time.perf_counter()
        modules = {n: m for n, m in linear_modules(layer).items() if n in arch.quantized}
        accs: dict[tuple[str, ...], HessianAccumulator] = {}

        def sink(names, x):
            accs.setdefault(tuple(sorted(names)), HessianAccumulator()).add(x.float())

        capture_module_inputs(layer, inputs, modules, sink)
        prefix = arch.layer_prefix(i)
        done = 0
        for names, acc in accs.items():
            H = acc.take().cpu()
            imp = importance_of(H)
            jobs = []
            for n in names:
                key = prefix + arch.to_disk(n)  # the writer's key: the source module's name on disk
                res.imatrix[key] = imp
                p = by_key.get(key)
                types = sorted({p.types[ft] for ft in file_types} & set(GPTQ_TYPES)) if p is not None else []
                if types:
                    jobs.append((p, types))
            if not jobs:
                continue
            V = inverse_factor(H, damp)
            del H
            for p, types in jobs:
                if V is None:
                    res.fallbacks.append(p.name)
                    continue
                for t in types:
                    path = spill / f"{p.name}.{t}.bin"
                    with open(path, "wb") as f:
                        for r0, r1 in row_blocks(p.rows, p.cols):  # rows are independent given H
                            f.write(memoryview(gptq_kquant(p.read(r0, r1), V, t, imp)).cast("B"))
                    res.finished[(p.name, t)] = path
                    done += 1
            del V
        log(f"gguf gptq: layer {i}: {done} tensor x type in {time.perf_counter() - t0:.1f} s")

    with torch.no_grad():
        runner.run(process)
    if res.fallbacks:
        log(f"note: {len(res.fallbacks)} tensor(s) kept the importance-weighted search (their Hessian could not be "
            f"factored at any damping): {', '.join(res.fallbacks[:5])}")
    return res


def plan_note(planned: list, file_types: list[str]) -> str:
    """``--dry-run``'s line for ``--gguf-search gptq``: what it rounds, its extra memory and spill."""
    from mergequant.gguf.blocks import row_bytes

    pairs = {(p.name, p.types[ft]) for p in planned for ft in file_types
             if p.imatrix_key and not p.experts and p.types[ft] in GPTQ_TYPES}
    spill = sum(p.rows * row_bytes(t, p.cols) for p in planned for (n, t) in pairs if n == p.name)
    cols = max((p.cols for p in planned if any(n == p.name for n, _ in pairs)), default=0)
    return (f"k-quant search: gptq (GPTQ error feedback inside the importance-weighted grids) for {len(pairs)} "
            f"decoder tensor x type pairs; one layer's Hessians at a time (the largest {4 * cols * cols / 2**20:.1f} "
            f"MiB, twice while factored); their bytes spilled in OUT's temporary folder until written "
            f"(~{spill / 2**20:.1f} MiB)")
