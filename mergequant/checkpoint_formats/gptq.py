"""The GPTQ on-disk format (``quant_method: gptq``; ``checkpoint_format`` ``gptq`` or ``gptq_v2``).

Written by ``--method gptq`` and ``--method rtn`` (the same files: only how the codes were chosen
differs), read by transformers + gptqmodel/optimum and vLLM. Per quantized Linear ``[N, K]``:

* ``qweight`` int32 ``[K * bits / 32, N]``: codes packed along K;
* ``qzeros``  int32 ``[G, N * bits / 32]``: zero points packed along N (v1 stores ``zero - 1``);
* ``scales``  float16 ``[G, N]``;
* ``g_idx``   int32 ``[K]``: the group of each input channel (act order permutes it).

Symmetric runs are written as ``gptq`` (v1, what every loader reads), asymmetric ones as ``gptq_v2``
(v1's ``zero - 1`` cannot store a zero point of 0). The bit layouts are
``mergequant.quant.formats.gptq_pack`` / ``gptq_dequantize``.
"""

from __future__ import annotations

import torch

from mergequant.checkpoint_formats.base import CheckpointFormat
from mergequant.errors import MergeQuantError
from mergequant.io.writer import PlannedTensor
from mergequant.quant import formats


class GPTQFormat(CheckpointFormat):
    name = "gptq"
    methods = ("gptq", "rtn")
    client_modules = ("gptqmodel", "optimum")
    marker = ".qweight"

    @staticmethod
    def checkpoint_format(opts) -> str:
        """``gptq`` (v1) for symmetric codes, ``gptq_v2`` for asymmetric ones."""
        return "gptq" if opts.sym else "gptq_v2"

    # ---- naming and packing ------------------------------------------------------------------------
    def validate(self, opts, linears) -> None:
        for lin in linears:
            if opts.bits == 3 and (lin.in_features % 32 or lin.out_features % 32):
                raise MergeQuantError(f"3-bit packing needs in/out features divisible by 32; {lin.prefix} is "
                                      f"{lin.out_features}x{lin.in_features}")

    def planned(self, lin, opts) -> list[PlannedTensor]:
        K, N, bits = lin.in_features, lin.out_features, opts.bits
        G = 1 if opts.group_size == -1 else K // opts.group_size
        return [PlannedTensor("qweight", torch.int32, (K * bits // 32, N)),
                PlannedTensor("qzeros", torch.int32, (G, N * bits // 32)),
                PlannedTensor("scales", torch.float16, (G, N)),
                PlannedTensor("g_idx", torch.int32, (K,))]

    def pack(self, q_kn: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
             opts) -> dict[str, torch.Tensor]:
        """One Linear's tensors from codes in checkpoint orientation ``[K, N]``, ``scales``/``zeros``
        ``[G, N]`` and ``g_idx`` ``[K]`` (what ``gptq.gptq_quantize`` / ``quantize_rtn`` return)."""
        return formats.gptq_pack(q_kn, zeros, scales, g_idx, opts.bits, self.checkpoint_format(opts))

    # ---- config ------------------------------------------------------------------------------------
    def quantization_config(self, opts) -> dict:
        return formats.gptq_quantize_config(bits=opts.bits, group_size=opts.group_size, desc_act=opts.desc_act,
                                            sym=opts.sym, damp_percent=opts.damp, static_groups=opts.static_groups,
                                            checkpoint_format=self.checkpoint_format(opts))

    def declare_float(self, qcfg: dict, pattern: str) -> dict:
        # GPTQModel's (and vLLM's) per-module overrides: a "-:" rule excludes matching modules
        return {**qcfg, "dynamic": {f"-:{pattern}": {}}}

    def extra_files(self, opts) -> dict[str, dict]:
        return {"quantize_config.json": self.quantization_config(opts)}

    def loading_requirements(self) -> str:
        return "gptqmodel (and optimum)"

    # ---- reading back ------------------------------------------------------------------------------
    def handles(self, qcfg: dict) -> bool:
        return qcfg.get("quant_method") == "gptq"

    def dequantize(self, get, prefix: str, qcfg: dict) -> torch.Tensor:
        return formats.gptq_dequantize(get(f"{prefix}.qweight"), get(f"{prefix}.qzeros"), get(f"{prefix}.scales"),
                                       get(f"{prefix}.g_idx"), qcfg["bits"], qcfg.get("checkpoint_format", "gptq"))

    def storage_suffixes(self) -> tuple[str, ...]:
        return (".qweight", ".qzeros", ".scales", ".g_idx")
