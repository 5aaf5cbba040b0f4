"""What every on-disk quantized checkpoint format says, apart from how its numbers were chosen.

A quantization *method* (``mergequant.quant.*_method``: GPTQ, RTN, AWQ, LLM.int8, SmoothQuant W8A8,
the GGUF driver) is statistics -> quantized weights. A *format* is everything about the files those
weights end up in, which several methods may share (GPTQ and RTN write the same GPTQ files) and which
``mergequant eval`` needs without any method (reading a checkpoint back):

* **naming and packing**: the tensors that replace each quantized Linear's ``weight``
  (:meth:`CheckpointFormat.planned`, so the writer lays out every shard before any work) and how
  codes, scales and zeros become those tensors (``pack``: its arguments are the format's own, since
  GPTQ's codes, AWQ's and bitsandbytes' rows do not share a shape; each format documents them);
* **config**: the ``quantization_config`` loaders dispatch on, how it declares modules left in float
  (MoE routers), and other files beside config.json (GPTQ's ``quantize_config.json``);
* **reading back**: :meth:`handles` a ``quantization_config``, which modules are quantized, their
  float weight again (:meth:`dequantize`), and which tensor names belong to them;
* **clients**: which Python packages transformers needs to run it (``client_modules``) and which
  engines load which settings (:meth:`verified_clients`, :meth:`client_warnings`: the measured serving
  matrix of ``mergequant.quant.clients``, which stays the single table).

Formats are singletons found by name through :data:`FORMATS` (lazy imports, like the methods:
a format's dependencies load only when it is used); :func:`format_for_config` finds the one a
``quantization_config`` describes. The bit layouts themselves stay pure functions in
``mergequant.quant.formats`` (GPTQ/AWQ words) and ``mergequant.gguf.blocks`` (GGUF blocks), pinned
by hand-made words and byte-identity tests; a format class only composes them.

Adding a format: one module here with one subclass, one row in :data:`FORMATS`, one case in
``tests/test_checkpoint_formats.py`` (which fails until every registered format has one).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from mergequant.io.writer import PlannedTensor
    from mergequant.quant.method import QuantLinear


class CheckpointFormat:
    """Base class; subclasses set ``name``, ``methods``, ``marker`` and override what they need.

    ``opts`` everywhere is a ``QuantizeOptions`` (or anything with the attributes a format reads:
    ``bits``, ``group_size``, ``sym``...): the settings that change the files."""

    name: str = ""
    # ``--method`` names that write this format, first the one its table rows default to
    # (``mergequant.quant.clients`` keys its serving matrix by method: GPTQ and RTN rows differ)
    methods: tuple[str, ...] = ()
    # Python packages transformers needs to load this format with its own kernels (``eval --backend
    # auto``); empty: no maintained client runs it here, eval always dequantizes
    client_modules: tuple[str, ...] = ()
    # the tensor suffix that marks a quantized module in a checkpoint of this format
    marker: str = ""

    # ---- naming and packing ------------------------------------------------------------------------
    def validate(self, opts, linears: list["QuantLinear"]) -> None:
        """Raise MergeQuantError for shapes or settings the format cannot store (before anything is written)."""

    def planned(self, lin: "QuantLinear", opts) -> list["PlannedTensor"]:
        """The tensors (names relative to ``lin.prefix``) that replace ``lin.prefix.weight``.
        The bias, if any, is written by the driver as a normal float tensor."""
        raise NotImplementedError

    def float_dtype(self, opts) -> torch.dtype:
        """dtype of every tensor that is not quantized (embeddings, norms, biases, lm_head)."""
        return torch.float16

    # ---- config ------------------------------------------------------------------------------------
    def quantization_config(self, opts) -> dict:
        """The ``quantization_config`` entry of config.json that loaders dispatch on."""
        raise NotImplementedError

    def declare_float(self, qcfg: dict, pattern: str) -> dict:
        """``qcfg`` with the modules matching regex ``pattern`` (full module names: MoE routers,
        ``shared_expert_gate``) declared unquantized, where the format has a way to say it."""
        return qcfg

    def extra_files(self, opts) -> dict[str, dict]:
        """Other JSON files to write beside config.json (e.g. GPTQ's quantize_config.json)."""
        return {}

    def loading_requirements(self) -> str:
        """What a user must install to load the checkpoint with transformers (for the card)."""
        return ""

    # ---- reading back ------------------------------------------------------------------------------
    def handles(self, qcfg: dict) -> bool:
        """Whether a ``quantization_config`` describes this format."""
        return False

    def quantized_prefixes(self, names: list[str], qcfg: dict) -> list[str]:
        """Module prefixes in a checkpoint of this format whose weight must be dequantized: those
        holding the format's ``marker`` tensor."""
        return [n[: -len(self.marker)] for n in names if n.endswith(self.marker)]

    def dequantize(self, get: Callable[[str], torch.Tensor], prefix: str, qcfg: dict) -> torch.Tensor:
        """The float32 weight [out, in] of module ``prefix`` (``get(name)`` reads a tensor)."""
        raise NotImplementedError

    def storage_suffixes(self) -> tuple[str, ...]:
        """Tensor name suffixes that belong to a quantized module (skipped when loading floats)."""
        return ()

    # ---- clients -----------------------------------------------------------------------------------
    def _table_method(self, method: str | None) -> str:
        if method is None:
            return self.methods[0] if self.methods else self.name
        if method not in self.methods:
            raise ValueError(f"--method {method} does not write the {self.name} format (written by: "
                             f"{', '.join(self.methods)})")
        return method

    def verified_clients(self, settings: dict, method: str | None = None) -> list[str]:
        """The engines that loaded these settings (``clients.settings_of``) in the serving matrix, for the
        card; ``method``: which of ``methods`` wrote them (default the first)."""
        from mergequant.quant import clients

        return clients.verified_clients(self._table_method(method), settings)

    def client_warnings(self, settings: dict, method: str | None = None) -> list[str]:
        """One line per engine that does not load these settings (see ``clients.client_warnings``)."""
        from mergequant.quant import clients

        return clients.client_warnings(self._table_method(method), settings)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


# name -> "module:Class"; imported on first use. Order matters only for format_for_config: the first
# format that handles a quantization_config reads it.
FORMATS: dict[str, str] = {
    "gptq": "mergequant.checkpoint_formats.gptq:GPTQFormat",
    "awq_gemm": "mergequant.checkpoint_formats.awq:AWQGemmFormat",
    "bnb_int8": "mergequant.checkpoint_formats.bnb_int8:BnbInt8Format",
    "compressed_tensors": "mergequant.checkpoint_formats.compressed_tensors:CompressedTensorsInt8Format",
    "gguf": "mergequant.checkpoint_formats.gguf:GGUFFormat",
}

_INSTANCES: dict[str, CheckpointFormat] = {}


def get_format(name: str) -> CheckpointFormat:
    """The (one, shared) instance of format ``name``; KeyError for an unknown name."""
    fmt = _INSTANCES.get(name)
    if fmt is None:
        mod, _, cls = FORMATS[name].partition(":")
        fmt = _INSTANCES[name] = getattr(importlib.import_module(mod), cls)()
    return fmt


def available_formats() -> list[CheckpointFormat]:
    """Every registered format this build can import, in :data:`FORMATS` order."""
    out = []
    for name in FORMATS:
        try:
            out.append(get_format(name))
        except ModuleNotFoundError:
            continue
    return out


def format_for_config(qcfg: dict) -> CheckpointFormat | None:
    """The format whose files a config.json ``quantization_config`` describes; None when none reads it."""
    for fmt in available_formats():
        if fmt.handles(qcfg):
            return fmt
    return None
