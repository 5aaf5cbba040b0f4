"""GGUF outputs in a release: a quantize step with ``method: gguf`` writes WORKDIR/NAME/<source>-<TYPE>.gguf for
each type of ``gguf_types`` (one pass, :mod:`mergequant.gguf.driver`) plus its card.

Here: the checks made before any step runs (GGUF architecture, per-type sizes for ``--dry-run`` from the
tensor shapes, as ``mergequant quantize --method gguf --dry-run`` plans them), and the held-out perplexity
of each file measured in llama.cpp (``llama_cpp.Llama``, llama-cpp-python; ``mergequant eval`` cannot read
GGUF) on the eval data, with the same tokenizer, token ids and windows as :mod:`mergequant.evaluate`. Without
llama-cpp-python the card says "not measured".
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from mergequant.errors import MergeQuantError


def is_gguf(settings: dict) -> bool:
    return settings.get("method") == "gguf"


def file_name(source_dir: Path, file_type: str) -> str:
    """The name the GGUF driver gives the file of ``file_type`` (``<source folder name>-<TYPE>.gguf``)."""
    return f"{Path(source_dir).resolve().name}-{file_type}.gguf"


def check_gguf(stand_in, opts) -> dict[str, int]:
    """Check a gguf quantization against the source's config and shapes (architecture, types; calibration works
    for dense and mixture-of-experts models alike); {file type: estimated bytes} (tensor data, llama.cpp's
    per-tensor mix, as the driver plans it)."""
    from mergequant.gguf import mixes
    from mergequant.gguf.blocks import row_bytes
    from mergequant.checkpoint_formats import get_format
    from mergequant.gguf.writer import gguf_architecture

    types = mixes.check_file_types(opts.gguf_types)
    if opts.bits is not None:
        raise MergeQuantError(f"bits {opts.bits}: method gguf takes its bit widths from gguf_types (e.g. Q4_K_M)")
    arch_name, permute = gguf_architecture(stand_in.config, f"{stand_in.path}: ")
    planned = get_format("gguf").plan(stand_in, arch_name, permute, types, has_imatrix=bool(opts.calib))
    sizes = {}
    for ft in types:
        sizes[ft] = sum(p.rows * row_bytes(p.types[ft], p.cols) for p in planned)
    return sizes


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # not installed, or its shared library does not load
        return False
    return True


class _LlamaCppModel:
    """A llama.cpp model seen as a causal LM returning ``.logits`` (what :func:`mergequant.evaluate.perplexity` calls)."""

    def __init__(self, path: Path, n_ctx: int, threads: int):
        import llama_cpp

        # float32 KV cache: llama.cpp's float16 default alone moves logits by ~1e-2 (tests/test_gguf_llama_cpp.py)
        self.llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                   n_threads=threads, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                                   verbose=False)

    def __call__(self, window):
        import numpy as np
        import torch

        ids = [int(i) for i in window[0].tolist()]
        self.llm.reset()
        self.llm.eval(ids)
        scores = np.asarray(self.llm.scores[: len(ids)], dtype=np.float32)
        return SimpleNamespace(logits=torch.from_numpy(scores.copy()).unsqueeze(0))

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()


def measure_perplexity(source_dir: Path, files: dict[str, Path], ev, log=print) -> dict[str, dict]:
    """{file name: Perplexity.as_dict()} of each GGUF file on the eval data (``ev``: the release's eval spec), the
    token ids tokenized by ``source_dir``'s tokenizer and scored in the windows ``mergequant eval`` uses."""
    import os

    from mergequant.evaluate import EVAL_DATA, _capped_seqlen, _eval_ids, check_eval_options, perplexity
    from mergequant.io.model_files import read_config
    from mergequant.quant.calib import check_token_ids, load_documents, load_tokenizer, local_data_file

    check_eval_options(ev.seqlen, ev.stride, ev.max_tokens)
    local_data_file(ev.data, EVAL_DATA)
    config = read_config(source_dir)
    window = _capped_seqlen(config, ev.seqlen)
    tok = load_tokenizer(source_dir, "eval")
    ids = _eval_ids(tok, load_documents(ev.data, what=EVAL_DATA), ev.max_tokens, ev.data)
    check_token_ids(ids, config.get("vocab_size"), source_dir, ev.data)
    threads = max(1, min(4, int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)))
    out = {}
    for name, path in files.items():
        model = _LlamaCppModel(path, window, threads)
        try:
            res = perplexity(model, ids, seqlen=window, stride=ev.stride)
        finally:
            model.close()
        res.backend = "llama.cpp"
        out[name] = res.as_dict()
        log(f"  {name}: perplexity {res.perplexity:.4f} over {res.tokens} tokens (llama.cpp)")
    return out
