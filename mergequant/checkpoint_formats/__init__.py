"""On-disk formats of quantized checkpoints, apart from the algorithms that fill them.

``base.CheckpointFormat`` is the interface (naming and packing, config, reading back, clients) and
the registry; one module per format: ``gptq`` (GPTQ v1/v2, written by gptq and rtn), ``awq`` (AWQ
GEMM), ``bnb_int8`` (bitsandbytes LLM.int8), ``compressed_tensors`` (W8A8 ``int-quantized``),
``gguf`` (llama.cpp files). A quantization method holds its format as ``method.format``.
"""

from mergequant.checkpoint_formats.base import (
    FORMATS,
    CheckpointFormat,
    available_formats,
    format_for_config,
    get_format,
)

__all__ = ["FORMATS", "CheckpointFormat", "available_formats", "format_for_config", "get_format"]
