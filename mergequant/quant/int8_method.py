"""``--method int8``: bitsandbytes LLM.int8 checkpoints (what transformers writes for ``load_in_8bit``).

No calibration: each decoder Linear weight is quantized row-wise (absmax per output row, see
``int8.llm_int8_quantize``). Per Linear the checkpoint holds exactly what bitsandbytes 0.50 +
transformers 5 serialize for a ``Linear8bitLt`` (checked by saving a ``load_in_8bit`` model):

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

from mergequant.io.writer import PlannedTensor
from mergequant.quant.int8 import llm_int8_dequantize, llm_int8_quantize
from mergequant.quant.method import QuantContext, QuantLinear, QuantMethod

LLM_INT8_THRESHOLD = 6.0


class Int8Method(QuantMethod):
    name = "int8"
    calibrated = False
    client_modules = ("bitsandbytes",)  # `mergequant eval` (backend auto) loads it with transformers + this
    bits_allowed = (8,)
    uses_group_size = False  # one scale per output row

    def planned(self, lin: QuantLinear, opts) -> list[PlannedTensor]:
        return [PlannedTensor("weight", torch.int8, (lin.out_features, lin.in_features)),
                PlannedTensor("SCB", torch.float32, (lin.out_features,)),
                PlannedTensor("weight_format", torch.uint8, ())]

    def float_dtype(self, opts) -> torch.dtype:
        return torch.float16

    def quantize_weight(self, ctx: QuantContext, lin: QuantLinear, W: torch.Tensor) -> None:
        codes, scb = llm_int8_quantize(W)
        ctx.write(lin, {"weight": codes, "SCB": scb, "weight_format": torch.zeros((), dtype=torch.uint8)})

    def quantization_config(self, opts) -> dict:
        # BitsAndBytesConfig(load_in_8bit=True).to_dict() of transformers 5.23 (key order as it writes it)
        return {
            "_load_in_4bit": False,
            "_load_in_8bit": True,
            "bnb_4bit_compute_dtype": "float32",
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": "fp4",
            "bnb_4bit_use_double_quant": False,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": None,
            "llm_int8_threshold": LLM_INT8_THRESHOLD,
            "load_in_4bit": False,
            "load_in_8bit": True,
            "quant_method": "bitsandbytes",
        }

    def card_settings(self, opts) -> list[tuple[str, str]]:
        return [("bits", "8 (weights int8, one absmax scale per output row)"),
                ("format", "bitsandbytes LLM.int8 (`load_in_8bit`)"),
                ("outlier threshold", f"{LLM_INT8_THRESHOLD} (activation columns above it run in float16)")]

    def card_tags(self, opts) -> list[str]:
        return [self.name, "8bit", "bitsandbytes"]

    def loading_requirements(self) -> str:
        return "bitsandbytes"

    # ---- reading back ----------------------------------------------------------------------------------
    @classmethod
    def handles(cls, qcfg: dict) -> bool:
        return qcfg.get("quant_method") == "bitsandbytes" and bool(qcfg.get("load_in_8bit") or qcfg.get("_load_in_8bit"))

    @classmethod
    def quantized_prefixes(cls, names, qcfg) -> list[str]:
        return [n[: -len(".SCB")] for n in names if n.endswith(".SCB")]

    @classmethod
    def dequantize(cls, get, prefix: str, qcfg: dict) -> torch.Tensor:
        return llm_int8_dequantize(get(f"{prefix}.weight"), get(f"{prefix}.SCB"))

    @classmethod
    def storage_suffixes(cls) -> tuple[str, ...]:
        return (".weight", ".SCB", ".weight_format")
