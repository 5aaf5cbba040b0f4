"""``--method int8``: bitsandbytes LLM.int8 checkpoints (what transformers writes for ``load_in_8bit``).

No calibration: each decoder Linear weight is quantized row-wise (absmax per output row, see
``int8.llm_int8_quantize``). The files are the bitsandbytes format (``mergequant.checkpoint_formats.bnb_int8``,
held as ``Int8Method.format``); per Linear exactly what bitsandbytes 0.50 + transformers 5 serialize for a
``Linear8bitLt`` (checked by saving a ``load_in_8bit`` model):

* ``weight``        int8 [out, in]
* ``SCB``           float32 [out] (row absmax)
* ``weight_format`` uint8 scalar 0 (row-major layout)

plus the bias (float) when the module has one. Every other tensor is float16. At inference bitsandbytes
quantizes the activations per token to int8 too, except the input columns holding an outlier
(|x| >= ``llm_int8_threshold`` = 6.0), which are multiplied in floating point with the dequantized
weight columns (mixed-precision decomposition).

``--bits``: this method is 8-bit only (the default for it); the driver refuses any other width.
"""

from __future__ import annotations

import torch

from mergequant.checkpoint_formats import get_format
from mergequant.checkpoint_formats.bnb_int8 import LLM_INT8_THRESHOLD
from mergequant.quant.int8 import llm_int8_quantize
from mergequant.quant.method import QuantContext, QuantLinear, QuantMethod


class Int8Method(QuantMethod):
    name = "int8"
    format = get_format("bnb_int8")
    calibrated = False
    bits_allowed = (8,)
    uses_group_size = False  # one scale per output row

    def quantize_weight(self, ctx: QuantContext, lin: QuantLinear, W: torch.Tensor) -> None:
        ctx.write(lin, self.format.pack(*llm_int8_quantize(W)))

    def card_settings(self, opts) -> list[tuple[str, str]]:
        return [("bits", "8 (weights int8, one absmax scale per output row)"),
                ("format", "bitsandbytes LLM.int8 (`load_in_8bit`)"),
                ("outlier threshold", f"{LLM_INT8_THRESHOLD} (activation columns above it run in float16)")]

    def card_tags(self, opts) -> list[str]:
        return [self.name, "8bit", "bitsandbytes"]
