"""The GGUF format (llama.cpp): one self-describing file per file type, no config.json.

Written by ``--method gguf`` (``mergequant.gguf.driver``), read by llama.cpp and its bindings, not by
``mergequant eval`` (measure GGUF files with llama-perplexity). What the format says:

* **naming**: llama.cpp's tensor names (``blk.3.attn_q.weight``; mixture-of-experts experts stacked into
  ``blk.N.ffn_{gate,up,down}_exps.weight``, Qwen2-MoE's shared expert ``ffn_*_shexp``, Phi-3's fused
  ``attn_qkv``; per family: ``mergequant.gguf.writer.FAMILIES``) and, per requested file type (``Q4_K_M``...), each
  tensor's GGML type from llama.cpp's mixes (``mergequant.gguf.mixes``): :meth:`GGUFFormat.plan`;
* **packing**: rows of float32 into GGML blocks (``mergequant.gguf.blocks`` / ``kquants``, byte-identical
  to llama.cpp's reference quantizers), importance-weighted for the types that use an importance
  matrix: :meth:`GGUFFormat.pack`; a quantized tensor is uint8 ``[rows, row_bytes]``;
* **config**: the file's key-values (architecture hyper-parameters, tokenizer, ``general.file_type``),
  written by ``mergequant.gguf.writer`` into each file's header;
* **reading back**: a tensor's float values from its blocks (gguf-py's dequantizers, llama.cpp's
  layout: Llama-family q/k rows are permuted from transformers' rotary layout, Gemma norms hold
  ``1 + w``): :meth:`GGUFFormat.dequantize`
  with a per-tensor ``qcfg`` (:meth:`GGUFFormat.read` builds one from a file). No config.json
  ``quantization_config`` describes GGUF files, so :meth:`handles` is always False.
"""

from __future__ import annotations

import numpy as np
import torch

from mergequant.checkpoint_formats.base import CheckpointFormat
from mergequant.io.writer import PlannedTensor

FLOAT_TYPES = ("F32", "F16", "BF16")
# the GGML types whose quantizers take an importance matrix here (the others: Q8_0, floats)
IMATRIX_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1")


class GGUFFormat(CheckpointFormat):
    name = "gguf"
    methods = ("gguf",)
    client_modules = ()  # transformers does not run GGUF blocks; llama.cpp does

    # ---- naming and packing ------------------------------------------------------------------------
    def plan(self, ck, arch_name: str, permute: bool, file_types: list[str], has_imatrix: bool = False) -> list:
        """Every tensor of the files (``mergequant.gguf.writer.Planned``: GGUF name, shape, row reader),
        in llama.cpp's order, each with its GGML type per file type in ``Planned.types``."""
        from mergequant.gguf import mixes
        from mergequant.gguf.writer import model_shape, plan_tensors

        planned = plan_tensors(ck, arch_name, permute)
        shape = model_shape(ck, arch_name, has_imatrix=has_imatrix)
        for p in planned:
            for ft in file_types:
                p.types[ft] = mixes.tensor_type(ft, p.name, p.shape, shape)
        return planned

    def planned_tensor(self, name: str, shape: tuple[int, ...], qtype: str) -> PlannedTensor:
        """Tensor ``name`` of numpy ``shape`` (rows first) stored as GGML type ``qtype``: uint8 rows of blocks."""
        from mergequant.gguf.blocks import row_bytes

        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        return PlannedTensor(name, torch.uint8, (rows, row_bytes(qtype, shape[-1])))

    def pack(self, x: np.ndarray, qtype: str, imatrix: np.ndarray | None = None) -> np.ndarray:
        """Rows ``x`` (float32 ``[rows, cols]``) as GGML ``qtype`` blocks (uint8 ``[rows, row_bytes]``);
        ``imatrix`` (per-column importance) is used by the k-quants and the classic 4/5-bit types."""
        from mergequant.gguf.blocks import quantize_blocks

        return quantize_blocks(x, qtype, imatrix if qtype.endswith("_K") or qtype in IMATRIX_TYPES else None)

    def loading_requirements(self) -> str:
        return "llama.cpp (or a binding: llama-cpp-python, ollama, LM Studio)"

    # ---- reading back ------------------------------------------------------------------------------
    def read(self, path) -> tuple:
        """(``get(name)`` -> the tensor's stored data, ``qcfg``) for a GGUF file, where ``qcfg`` is
        ``{"quant_method": "gguf", "tensors": {name: (GGML type, numpy shape)}}``."""
        import gguf

        reader = gguf.GGUFReader(path)
        tensors = {t.name: t for t in reader.tensors}
        qcfg = {"quant_method": "gguf",
                "tensors": {n: (t.tensor_type.name, tuple(int(d) for d in reversed(t.shape))) for n, t in tensors.items()}}
        return (lambda name: torch.from_numpy(np.asarray(tensors[name].data))), qcfg

    def quantized_prefixes(self, names: list[str], qcfg: dict) -> list[str]:
        types = qcfg.get("tensors", {})
        return [n[: -len(".weight")] for n in names
                if n.endswith(".weight") and n in types and types[n][0] not in FLOAT_TYPES]

    def dequantize(self, get, prefix: str, qcfg: dict) -> torch.Tensor:
        """The float32 values of ``prefix.weight`` in llama.cpp's layout (numpy shape, rows first)."""
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        name = f"{prefix}.weight"
        qtype, shape = qcfg["tensors"][name]
        data = get(name)
        data = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
        y = dequantize(data, GGMLQuantizationType[qtype])
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32).reshape(shape))

    def storage_suffixes(self) -> tuple[str, ...]:
        return (".weight",)
