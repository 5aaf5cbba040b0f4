"""Importance matrices of mixture-of-experts models (``--method gguf --calib`` on Mixtral, Qwen2-MoE,
Qwen3-MoE) with llama.cpp's semantics for its stacked expert tensors ``blk.N.ffn_{gate,up,down}_exps``
([E, rows, cols]).

What llama.cpp does (tools/imatrix/imatrix.cpp, tools/quantize/quantize.cpp, src/llama-quant.cpp of the
vendored llama.cpp):

- ``llama-imatrix`` sees an expert tensor through its ``MUL_MAT_ID`` (the routed matmul): for every
  token and every one of its top-k slots it adds the input's squares to the row of the expert the
  router chose and counts one token for that expert. So each expert has its own sums and its own
  count: the tokens routed to it (top-k routing of the real router), nothing else. Its file stores
  ``NAME.in_sum2`` [E, cols] and ``NAME.counts`` [E].
- The quantizer's loader turns that into ``sums[e] / counts[e]`` per expert, and for an expert with
  count 0 (never chosen on the calibration text) a row of **ones**: every column equally important.
- ``llama_model_quantize`` takes, per tensor, one float vector of E x cols values, expert-major
  (row e = expert e's importance), and quantizes each expert's rows with its own row; a chunk of rows
  never crosses two experts.

Our runner calls each un-fused expert Linear on exactly its routed tokens (``MoECalibration("routed")``,
``mergequant.quant.moe``), so a forward pre-hook sees what llama.cpp's ``MUL_MAT_ID`` sees. The
functions here turn those per-expert sums and counts into the importance rows, the log line, and the
GGUF-keyed vectors llama.cpp's quantizer takes.
"""

from __future__ import annotations

import numpy as np

ROW_WITHOUT_DATA = 1.0  # llama.cpp's importance for every column of an expert that got no token


def mean_square(sums: np.ndarray, count: int) -> np.ndarray:
    """One importance row: the mean over ``count`` tokens of each input column's square, or llama.cpp's
    row of ones when no token reached the Linear (an expert the router never chose): an all-zero row
    would make the weighted search ignore every weight, ones make it the plain (uniform) search."""
    sums = np.asarray(sums, dtype=np.float32)
    if count <= 0:
        return np.full(sums.shape, ROW_WITHOUT_DATA, dtype=np.float32)
    return (sums / np.float32(count)).astype(np.float32)


def empty_experts(counts: list[int]) -> list[int]:
    """The experts of a layer that no calibration token was routed to."""
    return [e for e, c in enumerate(counts) if c == 0]


def routing_line(layer: int, counts: list[int], tokens: int, top_k: int) -> str:
    """The log line of one MoE layer: tokens routed to each expert, and what was done for experts without
    any (the coverage a user needs to trust an importance-weighted MoE quantization)."""
    share = ", ".join(f"{e}:{c}" for e, c in enumerate(counts))
    line = f"layer {layer}: routed tokens per expert ({tokens} tokens, top-{top_k}): {share}"
    empty = empty_experts(counts)
    if empty:
        line += (f"; expert(s) {', '.join(map(str, empty))} got no tokens: importance 1 for every column "
                 "(llama.cpp's rule for an expert without data: its weights are rounded with uniform weighting)")
    return line


def expert_key(pattern: str, e: int) -> str:
    """The importance-matrix key of expert ``e`` from the writer's per-tensor pattern
    (``model.layers.0.block_sparse_moe.experts.*.w1``)."""
    return pattern.replace("*", str(e))


def expert_row(imatrix: dict, pattern: str, e: int, n_experts: int) -> np.ndarray | None:
    """Expert ``e``'s importance row for the stacked tensor keyed by ``pattern``: its own row; a row of
    ones when the matrix has rows for other experts of that tensor but none for this one (llama.cpp's
    loader gives an expert without data ones); None when the matrix has nothing for the tensor (llama.cpp
    then quantizes the whole tensor without importance)."""
    row = imatrix.get(expert_key(pattern, e))
    if row is not None:
        return row
    for other in range(n_experts):
        have = imatrix.get(expert_key(pattern, other))
        if have is not None:
            return np.full(np.shape(have), ROW_WITHOUT_DATA, dtype=np.float32)
    return None


def gguf_vectors(imatrix: dict, planned) -> dict[str, np.ndarray]:
    """The matrix as llama.cpp's ``llama_model_quantize`` takes it: GGUF tensor name -> float32 vector;
    a stacked expert tensor's vector is E x cols, expert-major (row e = expert e's importance). Tensors
    the matrix has nothing for are left out (llama.cpp quantizes them without importance)."""
    out = {}
    for p in planned:
        if p.imatrix_key is None:
            continue
        if p.experts:
            rows = [expert_row(imatrix, p.imatrix_key, e, p.experts) for e in range(p.experts)]
            if rows[0] is not None:
                out[p.name] = np.concatenate([np.asarray(r, dtype=np.float32).reshape(-1) for r in rows])
        elif p.imatrix_key in imatrix:
            out[p.name] = np.asarray(imatrix[p.imatrix_key], dtype=np.float32).reshape(-1)
    return out
