"""Compute one output tensor from lazy inputs, chunk by chunk, writing each chunk straight to disk.

Inputs are memory-mapped views, so a chunk reads only its slice of each input file. The engine owns
what every method shares (reading and casting chunks, chunk boundaries, the vocabulary-mismatch tail,
non-finite checks, writing) and hands the arithmetic to the recipe's method through a ``TensorJob``
(see ``methods/base.py``: a statistics hook over the whole tensor, a combine hook per chunk). For the
task-arithmetic family and linear, two paths compute the same formulas: fused numba kernels (CPU,
float32 compute; see ``kernels.py``) and plain torch operations (CUDA, float64 inputs,
``--mergekit-dtype``, or no numba).

Inputs of one tensor may come in any mix of floating dtypes (a bf16 base with an fp16 or fp32
fine-tune is common). Each path casts every input chunk once to its compute dtype (float32, float64
when an input is float64, or the ``--mergekit-dtype`` dtype) and rounds once to the output dtype, so
a mixed merge gives the same bytes as the same merge over float32 copies of its inputs. Peak memory per
tensor is a few chunks per input; only the torch path's TIES threshold needs one float32 copy of
|delta| for a whole tensor. Nothing here depends on how many layers the model has.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

from mergequant.merge import kernels as K
from mergequant.merge.plan import MergePlan, TensorPlan

CHUNK = 1 << 20  # elements per chunk (4 MiB in float32, cache-friendly); fixed, because DARE's random masks are drawn per chunk

# Only one whole-tensor |delta| buffer (TIES) at a time, so two workers on the two largest tensors
# (embeddings and lm_head) cannot double the peak.
_BIG_BUFFER = threading.Lock()


def _ranges(n: int):
    for c, a in enumerate(range(0, n, CHUNK)):
        yield c, a, min(n, a + CHUNK)


def _row_ranges(n: int, cols: int):
    """Chunks of whole rows of ``cols`` elements (about CHUNK elements each, at least one row)."""
    step = max(1, CHUNK // cols) * cols
    for c, a in enumerate(range(0, n, step)):
        yield c, a, min(n, a + step)


class TensorJob:
    """One output tensor being merged: its plan, its flat (memory-mapped) inputs, and the services a
    method needs (load a chunk in the compute dtype, chunk boundaries, emit output chunks).

    ``dtype`` is the compute dtype of the task-arithmetic family and of the newer methods: float32
    (float64 when an input is float64), or mergekit's dtype under ``--mergekit-dtype``. ``acc`` is the
    accumulation dtype of linear and slerp, which mergekit never computes in bf16."""

    def __init__(self, plan: MergePlan, tp: TensorPlan, flat: list[torch.Tensor], write: Callable[[torch.Tensor, int], None],
                 seed: int, device: torch.device):
        self.plan, self.tp, self.flat, self.write, self.seed, self.device = plan, tp, flat, write, seed, device
        self.name = tp.name
        any64 = any(x.dtype == torch.float64 for x in flat)
        self.acc = torch.float64 if any64 else torch.float32  # accumulation dtype of linear/slerp (and of our task methods)
        self.rounding = tp.compute_dtype  # --mergekit-dtype: inputs rounded to mergekit's compute dtype first (see plan.py)
        self.dtype = self.rounding if self.rounding is not None else self.acc
        self.n = tp.numel if tp.merge_rows is None else tp.merge_rows * (tp.numel // tp.shape[0])
        self.base_index = tp.base_index
        self.others = [i for i in range(len(flat)) if i != tp.base_index]
        self.finite = True

    big_buffer = _BIG_BUFFER  # held while a whole-tensor float32 buffer exists (torch-path TIES top-k)

    # ---- reading ------------------------------------------------------------------------------------
    def load(self, i: int, a: int, b: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Elements [a, b) of input ``i`` (flat), rounded like mergekit first under --mergekit-dtype."""
        x = self.flat[i][a:b]
        if self.rounding is not None:
            x = x.to(self.rounding)
        return x.to(device=self.device, dtype=dtype or self.dtype)

    def delta(self, i: int, a: int, b: int) -> torch.Tensor:
        """X_i - B over [a, b) in the compute dtype."""
        return self.load(i, a, b) - self.load(self.base_index, a, b)

    @property
    def fused(self) -> bool:
        """Whether the numba kernels can compute this tensor (CPU, float32 compute)."""
        return K.AVAILABLE and self.device.type == "cpu" and self.rounding is None and self.acc == torch.float32

    @property
    def chunk(self) -> int:
        return CHUNK

    @property
    def cols(self) -> int:
        """Row length for row-wise statistics: the last dimension (a 1-D tensor is one row)."""
        return self.tp.shape[-1] if len(self.tp.shape) >= 2 else self.n

    def ranges(self, rows: bool = False, cols: int | None = None):
        """(chunk index, start, end) over the merged elements; ``rows``: chunks of whole rows of ``cols``
        elements (default: the last dimension)."""
        return _row_ranges(self.n, cols or self.cols) if rows and self.n else _ranges(self.n)

    # ---- parameters -----------------------------------------------------------------------------------
    @property
    def shared(self) -> dict:
        return self.tp.shared

    def weights(self, indices: list[int] | None = None) -> list[float]:
        return [float(self.tp.per_model[i]["weight"]) for i in (self.others if indices is None else indices)]

    def per_model(self, i: int, name: str):
        return self.tp.per_model[i].get(name)

    # ---- writing --------------------------------------------------------------------------------------
    def emit(self, out: torch.Tensor, a: int, checked_finite: bool | None = None) -> None:
        """Write output elements starting at ``a`` (rounded once to the output dtype)."""
        if checked_finite is False or (checked_finite is None and self.finite and not bool(torch.isfinite(out).all())):
            self.finite = False
        self.write(out.to(device="cpu", dtype=self.tp.out_dtype), a)


def merge_tensor(plan: MergePlan, tp: TensorPlan, write: Callable[[torch.Tensor, int], None], *, seed: int = 0,
                 device: torch.device = torch.device("cpu")) -> bool:
    """Merge ``tp`` and hand each output chunk to ``write(chunk, element_offset)``.

    Returns False when the merged tensor contains NaN or inf (the caller warns), else True.
    """
    flat = [plan.checkpoints[ref].get(name).reshape(-1) for ref, name in tp.inputs]
    if tp.copy_index is not None:
        src = flat[tp.copy_index]
        for _, a, b in _ranges(src.numel()):
            write(src[a:b].to(tp.out_dtype), a)
        return True

    if tp.vocab is not None:  # tokenizer merging: each input's rows re-indexed into the output vocabulary, per chunk
        from mergequant.merge.tokenizer import aligned_inputs
        cols = tp.numel // tp.shape[0]
        flat = aligned_inputs(tp.vocab, [ref for ref, _ in tp.inputs], flat, cols)
    job = TensorJob(plan, tp, flat, write, seed, device)
    if tp.merge_rows is not None:  # vocabulary mismatch: merge the shared rows, copy the rest from the reference
        n = job.n
        tail = flat[tp.base_index if tp.base_index is not None else 0]
        for _, a, b in _ranges(tp.numel - n):
            write(tail[n + a:n + b].to(tp.out_dtype), n + a)
    plan.spec.merge(job)
    return job.finite
