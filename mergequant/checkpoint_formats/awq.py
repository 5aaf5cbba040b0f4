"""The AWQ GEMM on-disk format (``quant_method: awq``, ``version: gemm``), 4-bit.

Written by ``--method awq``, read by transformers + gptqmodel and vLLM. Per quantized Linear ``[N, K]``,
everything packed along N (eight 4-bit values per int32, in AWQ's interleaved order
``formats.AWQ_ORDER``):

* ``qweight`` int32 ``[K, N / 8]``;
* ``qzeros``  int32 ``[G, N / 8]`` (symmetric runs store a zero point of 8);
* ``scales``  float16 ``[G, N]``.

The bit layouts are ``mergequant.quant.formats.awq_pack`` / ``awq_dequantize``.
"""

from __future__ import annotations

import torch

from mergequant.checkpoint_formats.base import CheckpointFormat
from mergequant.errors import MergeQuantError
from mergequant.io.writer import PlannedTensor
from mergequant.quant import formats


class AWQGemmFormat(CheckpointFormat):
    name = "awq_gemm"
    methods = ("awq",)
    client_modules = ("gptqmodel", "accelerate")  # transformers loads AWQ through these (`eval --backend auto`)
    marker = ".qweight"

    # ---- naming and packing ------------------------------------------------------------------------
    def validate(self, opts, linears) -> None:
        for lin in linears:
            if lin.out_features % 8:
                raise MergeQuantError(f"AWQ packs 8 output features per int32; {lin.prefix} has out_features "
                                      f"{lin.out_features}, not a multiple of 8 (use --method gptq)")

    def planned(self, lin, opts) -> list[PlannedTensor]:
        K, N = lin.in_features, lin.out_features
        G = 1 if opts.group_size == -1 else K // opts.group_size
        return [PlannedTensor("qweight", torch.int32, (K, N // 8)),
                PlannedTensor("qzeros", torch.int32, (G, N // 8)),
                PlannedTensor("scales", torch.float16, (G, N))]

    def pack(self, q_kn: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
        """One Linear's tensors from codes in checkpoint orientation ``[K, N]`` and ``zeros``/``scales``
        ``[G, N]`` (``awq.pseudo_quantize`` returns the codes as ``[N, K]``: pass ``q.T``)."""
        return {"qweight": formats.awq_pack(q_kn.contiguous().cpu()),
                "qzeros": formats.awq_pack_zeros(zeros.cpu()),
                "scales": scales.to(torch.float16).cpu()}

    # ---- config ------------------------------------------------------------------------------------
    def quantization_config(self, opts) -> dict:
        return formats.awq_quantize_config(bits=opts.bits, group_size=opts.group_size, zero_point=opts.zero_point)

    def loading_requirements(self) -> str:
        return "gptqmodel"

    # ---- reading back ------------------------------------------------------------------------------
    def handles(self, qcfg: dict) -> bool:
        return qcfg.get("quant_method") == "awq" and str(qcfg.get("version", qcfg.get("format", "gemm"))).lower() == "gemm"

    def dequantize(self, get, prefix: str, qcfg: dict) -> torch.Tensor:
        if qcfg.get("bits", 4) != 4:
            raise MergeQuantError(f"AWQ GEMM checkpoint with bits={qcfg.get('bits')}: only 4-bit is readable")
        return formats.awq_dequantize(get(f"{prefix}.qweight"), get(f"{prefix}.qzeros"), get(f"{prefix}.scales"),
                                      qcfg.get("group_size", 128))

    def storage_suffixes(self) -> tuple[str, ...]:
        return (".qweight", ".qzeros", ".scales")
