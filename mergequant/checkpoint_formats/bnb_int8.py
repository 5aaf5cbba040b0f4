"""The bitsandbytes LLM.int8 on-disk format (what transformers writes for ``load_in_8bit``).

Written by ``--method int8``, read by transformers + bitsandbytes and vLLM (vllm-bnb-plugin). Per
quantized Linear ``[N, K]`` exactly what bitsandbytes 0.50 + transformers 5 serialize for a
``Linear8bitLt`` (checked by saving a ``load_in_8bit`` model):

* ``weight``        int8 ``[N, K]``: row-wise absmax codes;
* ``SCB``           float32 ``[N]``: the row absmax;
* ``weight_format`` uint8 scalar 0 (row-major layout).

The quantization config records the outlier threshold bitsandbytes runs the activations with
(:data:`LLM_INT8_THRESHOLD`). The row math is ``mergequant.quant.int8``.
"""

from __future__ import annotations

import torch

from mergequant.checkpoint_formats.base import CheckpointFormat
from mergequant.io.writer import PlannedTensor
from mergequant.quant.int8 import llm_int8_dequantize

# input columns with |x| above this run in floating point at inference (mixed-precision decomposition)
LLM_INT8_THRESHOLD = 6.0


class BnbInt8Format(CheckpointFormat):
    name = "bnb_int8"
    methods = ("int8",)
    client_modules = ("bitsandbytes",)  # `mergequant eval` (backend auto) loads it with transformers + this
    marker = ".SCB"

    # ---- naming and packing ------------------------------------------------------------------------
    def planned(self, lin, opts) -> list[PlannedTensor]:
        return [PlannedTensor("weight", torch.int8, (lin.out_features, lin.in_features)),
                PlannedTensor("SCB", torch.float32, (lin.out_features,)),
                PlannedTensor("weight_format", torch.uint8, ())]

    def pack(self, codes: torch.Tensor, scb: torch.Tensor) -> dict[str, torch.Tensor]:
        """One Linear's tensors from ``int8.llm_int8_quantize``'s int8 codes ``[N, K]`` and row absmax ``[N]``."""
        return {"weight": codes, "SCB": scb, "weight_format": torch.zeros((), dtype=torch.uint8)}

    # ---- config ------------------------------------------------------------------------------------
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

    def loading_requirements(self) -> str:
        return "bitsandbytes"

    # ---- reading back ------------------------------------------------------------------------------
    def handles(self, qcfg: dict) -> bool:
        return qcfg.get("quant_method") == "bitsandbytes" and bool(qcfg.get("load_in_8bit") or qcfg.get("_load_in_8bit"))

    def dequantize(self, get, prefix: str, qcfg: dict) -> torch.Tensor:
        return llm_int8_dequantize(get(f"{prefix}.weight"), get(f"{prefix}.SCB"))

    def storage_suffixes(self) -> tuple[str, ...]:
        return (".weight", ".SCB", ".weight_format")
