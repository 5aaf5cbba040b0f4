"""What a merge method is: its parameters, its input contract and its two hooks.

A method lives in one file of this package and is one :class:`MergeMethod` subclass instance. The recipe
checker (``recipe.py``) and the planner (``plan.py``) read only its declarations (parameters with type,
range, default and scope; how many inputs; whether a base is required), so adding a method touches no
other module. The streaming engine (``engine.py``) builds a :class:`~mergequant.merge.engine.TensorJob`
for every output tensor and calls :meth:`MergeMethod.merge`, whose default drives the two hooks:

- :meth:`MergeMethod.statistics`: passes over the whole tensor, chunk by chunk, for the few quantities
  that need all of it (a top-k threshold, norms and angles, variances, quantiles); returns small objects;
- :meth:`MergeMethod.combine`: the output of one chunk from the inputs' chunks and those statistics.

Methods whose statistics are per row (``row_aligned``) get chunks made of whole rows, so a row's
statistics come from its own chunk and need no separate pass. A method may override ``merge`` to use a
fused kernel (the task-arithmetic family and linear do, see ``kernels.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from mergequant.merge.engine import TensorJob

REQUIRED = object()  # marker: the parameter has no default
GLOBAL, PER_MODEL = "global", "per_model"


@dataclass(frozen=True)
class Param:
    """One parameter of a method.

    ``scope``: ``global`` parameters are read from the slice's and the top-level ``parameters``;
    ``per_model`` ones also from each model's (and are resolved for every input but the base, unless the
    method weighs the base like any input). ``default``: a value, ``REQUIRED``, or None (optional, absent).
    ``low``/``high`` bound numeric values (``*_open``: the bound itself is excluded)."""

    name: str
    kind: type  # float, int or bool
    default: Any = REQUIRED
    scope: str = GLOBAL
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    doc: str = ""

    @property
    def range_text(self) -> str:
        """``in (0, 1]``, ``>= 0``, ... for messages and docs ("" when unbounded)."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return ""

    def type_error(self, leaves: list) -> str | None:
        """Why the leaf values of a setting do not fit this parameter's type (None if they do)."""
        if self.kind is bool:
            return None if all(isinstance(v, bool) for v in leaves) else f"'{self.name}' must be true or false"
        if self.kind is int:
            return None if all(isinstance(v, int) and not isinstance(v, bool) for v in leaves) \
                else f"'{self.name}' must be an integer"
        return None if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in leaves) \
            else f"'{self.name}' must be numeric"

    def in_range(self, v: float) -> bool:
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return False
        if self.high is not None and (v > self.high or (self.high_open and v == self.high)):
            return False
        return True


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


class MergeMethod:
    """A merge method: declarations (class attributes) and the two hooks. Instances are stateless."""

    name: str = ""
    pretty_name: str = ""
    paper: str = ""  # URL shown on the model card
    params: tuple[Param, ...] = ()
    base: str = "required"  # "required" | "optional" (used when given) | "ignored" (an input like any other)
    min_models: int = 1  # inputs of a tensor, base included
    max_models: int | None = None
    min_others: int = 0  # inputs that are not the base
    max_others: int | None = None
    sparsify: str | None = None  # task-arithmetic family: None | "magnitude" | "random" | "outliers" | "della"
    consensus: bool = False  # TIES sign election
    weighted_sum: bool = False  # output is sum_i w_i X_i: all-zero weights give zeros (plan.zero_weight_tensors)
    row_aligned: bool = False  # chunks hold whole rows (last dimension); see TensorJob.ranges
    buffers_per_input: int = 2  # float32 chunk-sized buffers per input while combining (dry-run memory estimate)

    # ---- declarations read by recipe.py and plan.py ----------------------------------------------
    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    @property
    def per_model_applies_to_base(self) -> bool:
        """Whether the base input is weighed like any other (its per-model parameters are resolved)."""
        return self.base == "ignored"

    @property
    def shared(self) -> dict[str, Any]:
        """Global parameters -> default (or REQUIRED / None)."""
        return {p.name: p.default for p in self.params if p.scope == GLOBAL}

    @property
    def per_model(self) -> dict[str, Any]:
        """Per-model parameters -> default (or REQUIRED / None)."""
        return {p.name: p.default for p in self.params if p.scope == PER_MODEL}

    @property
    def param(self) -> dict[str, Param]:
        return {p.name: p for p in self.params}

    def check_tensor(self, shared: dict, per_model: list[dict], others: list[int], models: list[str]) -> str | None:
        """Checks across parameters once they are resolved for one tensor (``others``: the non-base
        inputs' indices; ``models``: every input's model reference). Returns why they cannot work, or None."""
        return None

    # ---- hooks --------------------------------------------------------------------------------------
    def statistics(self, job: "TensorJob") -> Any:
        """Whole-tensor statistics, computed chunk by chunk (default: none)."""
        return None

    def combine(self, job: "TensorJob", stats: Any, c: int, a: int, b: int) -> torch.Tensor:
        """The output elements ``[a, b)`` (chunk number ``c``) of the flattened tensor."""
        raise NotImplementedError

    def merge(self, job: "TensorJob") -> None:
        """Statistics once, then every chunk in order through ``combine`` to the writer."""
        stats = self.statistics(job)
        for c, a, b in job.ranges(rows=self.row_aligned):
            job.emit(self.combine(job, stats, c, a, b), a)

    def __repr__(self) -> str:
        return f"<merge method {self.name}>"


def describe_params(method: MergeMethod) -> str:
    """One line per parameter (docs, ``--help`` style)."""
    lines = []
    for p in method.params:
        d = "required" if p.default is REQUIRED else ("none" if p.default is None else repr(p.default))
        lines.append(f"{p.name} ({p.kind.__name__}, {p.scope}, default {d}{', ' + p.range_text if p.range_text else ''})")
    return "; ".join(lines)

