"""Evaluate mergekit-style parameter settings for one tensor.

A setting is a scalar, a gradient (list of numbers interpolated over the layer position
``t`` in [0, 1]), or a filter list ``[{filter: "mlp", value: ...}, {value: ...}]`` whose first
entry with no filter, ``"*"``, or a filter that is a substring of the tensor name wins.

``t = i / (L - 1)`` for layer ``i`` of the ``L`` layers of an output slice (``t = 1`` when
``L = 1``); embeddings, final norm and lm_head are evaluated at ``t = 0``, as mergekit does.
"""

from __future__ import annotations

import math
from typing import Any


def layer_position(i: int, num_layers: int) -> float:
    """The gradient position ``t`` of layer ``i`` in a slice of ``num_layers`` layers."""
    return i / (num_layers - 1) if num_layers > 1 else 1.0


def interpolate(values: list[float], t: float) -> float:
    """Piecewise-linear interpolation of a gradient list at ``t`` (mergekit's formula)."""
    s = t * (len(values) - 1)
    i0 = int(math.floor(s))
    i1 = min(len(values) - 1, i0 + 1)
    f = s - i0
    return (1 - f) * values[i0] + f * values[i1]


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of one setting for ``tensor_name`` at position ``t``; None when no filter matches."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
                return interpolate([float(e) for e in setting], t)
            return setting[int(t * (len(setting) - 1))]
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
                return evaluate_setting(cond.get("value"), tensor_name, t)
        return None
    raise TypeError(f"unexpected parameter setting {setting!r}")


def resolve(name: str, scopes: list[dict | None], tensor_name: str, t: float) -> Any:
    """First non-None value of parameter ``name`` over ``scopes`` in precedence order, else None."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate_setting(scope[name], tensor_name, t)
            if value is not None:
                return value
    return None
