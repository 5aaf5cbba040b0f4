"""The compressed-tensors ``int-quantized`` format: int8 weights per output channel, int8 activations
per token at run time (W8A8).

Written by ``--method w8a8``, read by vLLM (int8 GEMMs) and transformers + compressed-tensors. Per
quantized Linear ``[N, K]``:

* ``weight``       int8 ``[N, K]``: symmetric codes against the *stored* scale;
* ``weight_scale`` ``[N, 1]`` in the checkpoint's float dtype.

The quantization config is compressed-tensors 0.20's ``W8A8`` preset on every Linear but ``lm_head``;
unquantized modules are added to its ``ignore`` list. The channel math is ``mergequant.quant.int8``.
"""

from __future__ import annotations

import torch

from mergequant.checkpoint_formats.base import CheckpointFormat
from mergequant.io.writer import PlannedTensor
from mergequant.quant.int8 import channel_int8_dequantize


class CompressedTensorsInt8Format(CheckpointFormat):
    name = "compressed_tensors"
    methods = ("w8a8",)
    client_modules = ("compressed_tensors",)  # `mergequant eval` (backend auto) loads it with transformers + this
    marker = ".weight_scale"

    # ---- naming and packing ------------------------------------------------------------------------
    def planned(self, lin, opts) -> list[PlannedTensor]:
        return [PlannedTensor("weight", torch.int8, (lin.out_features, lin.in_features)),
                PlannedTensor("weight_scale", self.float_dtype(opts), (lin.out_features, 1))]

    def pack(self, codes: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """One Linear's tensors from ``int8.channel_int8_quantize``'s codes ``[N, K]`` and scale ``[N, 1]``."""
        return {"weight": codes.cpu(), "weight_scale": scale.cpu()}

    # ---- config ------------------------------------------------------------------------------------
    def quantization_config(self, opts) -> dict:
        # QuantizationConfig(config_groups={"group_0": preset "W8A8" on ["Linear"]}, format="int-quantized",
        # quantization_status="compressed", ignore=["lm_head"]).model_dump() of compressed-tensors 0.20
        return {
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
                                "strategy": "channel", "dynamic": False},
                    "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
                                          "strategy": "token", "dynamic": True},
                    "output_activations": None,
                    "format": "int-quantized",
                },
            },
            "quant_method": "compressed-tensors",
            "kv_cache_scheme": None,
            "format": "int-quantized",
            "quantization_status": "compressed",
            "global_compression_ratio": None,
            "ignore": ["lm_head"],
        }

    def declare_float(self, qcfg: dict, pattern: str) -> dict:
        return {**qcfg, "ignore": [*qcfg.get("ignore", []), f"re:{pattern}"]}  # compressed-tensors' regex form

    def loading_requirements(self) -> str:
        return "compressed-tensors"

    # ---- reading back ------------------------------------------------------------------------------
    def handles(self, qcfg: dict) -> bool:
        if qcfg.get("quant_method") != "compressed-tensors":
            return False
        groups = (qcfg.get("config_groups") or {}).values()
        fmt = {qcfg.get("format")} | {g.get("format") for g in groups if isinstance(g, dict)}
        weights = [g.get("weights") or {} for g in groups if isinstance(g, dict)]
        return ("int-quantized" in fmt or "naive-quantized" in fmt) and all(
            w.get("type") == "int" and w.get("num_bits") == 8 and w.get("symmetric", True) for w in weights)

    def dequantize(self, get, prefix: str, qcfg: dict) -> torch.Tensor:
        return channel_int8_dequantize(get(f"{prefix}.weight"), get(f"{prefix}.weight_scale"))

    def storage_suffixes(self) -> tuple[str, ...]:
        return (".weight", ".weight_scale")
