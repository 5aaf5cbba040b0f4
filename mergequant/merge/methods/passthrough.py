"""passthrough: copy one model's tensors, optionally scaled; with ``slices:`` it assembles a model from
layer ranges, the depth up-scaling of SOLAR 10.7B (https://arxiv.org/abs/2312.15166: Mistral-7B layers
0-24 and 8-32 stacked, then trained further).

Exactly one input per tensor (one model, or one source per slice). ``scale`` (per model, optional;
filters and gradients apply as to any parameter) multiplies the tensor, e.g. 0 on the o_proj/down_proj
of duplicated layers. Layers may repeat and come in any order; the output's ``num_hidden_layers`` and
per-layer config lists (``layer_types``, ...) follow the slices.
"""

from __future__ import annotations

from mergequant.merge.methods.base import PER_MODEL, MergeMethod, Param


class Passthrough(MergeMethod):
    name = "passthrough"
    pretty_name = "Passthrough"
    paper = "https://arxiv.org/abs/2312.15166"
    base = "ignored"
    min_models = max_models = 1
    params = (Param("scale", float, None, PER_MODEL, doc="factor on the tensor (none: copied as is)"),)

    def combine(self, job, stats, c, a, b):
        x = job.load(0, a, b)
        scale = job.per_model(0, "scale")
        return x if scale is None else x * float(scale)


METHOD = Passthrough()
