"""The contract between the quantization driver and each method (gptq, rtn, awq, int8, w8a8).

The driver (``quantize.py``) owns everything methods share: finding the decoder Linear modules
(from the family's ``mergequant.architectures`` description, handed to methods as ``ctx.arch``),
calibration data, the layer runner, the sharded atomic writer, config/card files and ``--eval``.
A method is the math: how it turns weights (and, if calibrated, a materialized decoder layer with
its inputs) into codes, and how it describes its settings on the card. Everything about the files
those codes go into (which tensors replace each quantized ``weight``, so the shard layout can be
planned before any work; how codes are packed; the ``quantization_config``; how ``mergequant eval``
turns the tensors back into float weights; which engines load them) belongs to the method's
on-disk format, ``method.format``, a ``mergequant.checkpoint_formats.CheckpointFormat`` that
several methods may share (gptq and rtn both write GPTQ files).

Methods are found by name through ``METHODS`` (lazy imports: a method's heavy dependencies load
only when it is used); formats through ``mergequant.checkpoint_formats``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from mergequant.checkpoint_formats.base import CheckpointFormat, format_for_config  # noqa: F401 (re-exported)
from mergequant.errors import MergeQuantError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from mergequant.architectures import Architecture
    from mergequant.io.checkpoint import Checkpoint
    from mergequant.io.writer import PlannedTensor, ShardedWriter
    from mergequant.quant.runner import LayerInputs


@dataclass(frozen=True)
class QuantLinear:
    """One decoder Linear that gets quantized, as found in the checkpoint."""

    prefix: str  # output name, e.g. model.layers.3.self_attn.q_proj
    layer: int
    suffix: str  # name in the (un-fused) decoder layer module, e.g. self_attn.q_proj, mlp.experts.3.gate_proj
    out_features: int
    in_features: int
    has_bias: bool
    source: str = ""  # name in the input checkpoint when it differs from ``prefix`` (renamed MoE experts)

    @property
    def source_prefix(self) -> str:
        return self.source or self.prefix


@dataclass
class QuantContext:
    """What a method may use while it runs: options, the writer, a log, and the shared result."""

    opts: "object"  # QuantizeOptions (not imported: avoids a cycle)
    writer: "ShardedWriter"
    result: "object"  # QuantizeResult
    log: Callable[[str], None]
    extra: dict = field(default_factory=dict)  # per-run scratch space for a method
    source: "Checkpoint | None" = None  # the input checkpoint (memory-mapped), for deferred weights
    arch: "Architecture | None" = None  # the model family's description: groups, scaling map, names

    def source_weight(self, lin: QuantLinear) -> torch.Tensor:
        """``lin``'s float weight [out, in] as stored in the input checkpoint (memory-mapped: reading it
        costs file-backed pages, not anonymous memory; cast or copy it to compute with it)."""
        if self.source is None:
            raise RuntimeError("QuantContext.source is not set")
        name = f"{lin.source_prefix}.weight"
        return require_finite(self.source.path, name, self.source.get(name))

    def groups(self, i: int) -> tuple[tuple[str, ...], ...]:
        """Layer ``i``'s quantized Linears in true-sequential groups (names in the layer module)."""
        return self.arch.layer_groups(self.source.config, i)

    def write(self, lin: QuantLinear, tensors: dict[str, torch.Tensor]) -> None:
        """Write ``{key: tensor}`` as ``<lin.prefix>.<key>`` (each tensor in its planned dtype)."""
        for key, t in tensors.items():
            self.writer.write(f"{lin.prefix}.{key}", t.contiguous())


def require_finite(where, name: str, t: torch.Tensor) -> torch.Tensor:
    """``t``, after refusing NaN or infinite values in the input weight ``name``.

    A non-finite weight makes every rounding grid NaN (RTN's packer then fails on out-of-range
    codes) and, in a calibrated run, poisons the activations of every later layer, so GPTQ reported
    "Cholesky failed" everywhere and wrote a garbage checkpoint with exit 0. Checked where each
    weight is first read; the cost is one pass over values that are being read anyway."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise MergeQuantError(f"{where}: tensor {name} has {bad} NaN or infinite value(s); the checkpoint is "
                              "corrupt or was saved after a diverged update, so it cannot be quantized")
    return t


class QuantMethod:
    """Base class; subclasses set ``name`` and ``format`` and override what they need."""

    name: str = ""
    # the on-disk format this method writes (a shared instance from ``checkpoint_formats.get_format``)
    format: CheckpointFormat | None = None
    calibrated: bool = True  # needs --calib and runs through the layer runner
    bits_allowed: tuple[int, ...] = (2, 3, 4, 8)
    uses_group_size: bool = True  # False: per-row scales, --group-size is ignored (not validated)
    # True: the layer runner does not materialize the weights of the Linears being quantized; the
    # method reads them with ``ctx.source_weight`` and installs a forward for each module before the
    # layer's recompute (GPTQ: ``compact.QuantizedForward``). Saves the float layer's memory.
    defers_weights: bool = False

    @property
    def default_bits(self) -> int:
        """--bits when not given: 4 where allowed, else the method's only/first width (8 for int8)."""
        return 4 if 4 in self.bits_allowed else self.bits_allowed[0]

    # ---- before any work ---------------------------------------------------------------------------
    def validate(self, opts, linears: list[QuantLinear]) -> None:
        """Raise MergeQuantError for options this method (or its format) cannot honour, before anything
        is written. The default checks the format's constraints only."""
        self.format.validate(opts, linears)

    # ---- the work ----------------------------------------------------------------------------------
    def quantize_weight(self, ctx: QuantContext, lin: QuantLinear, W: torch.Tensor) -> None:
        """Uncalibrated methods: quantize one float32 weight [out, in] and ``ctx.write`` its tensors
        (packed by ``self.format``)."""
        raise NotImplementedError

    def process_layer(self, ctx: QuantContext, i: int, layer: "nn.Module", inputs: "LayerInputs",
                      todo: dict[str, QuantLinear], modules: dict[str, "nn.Linear"]) -> None:
        """Calibrated methods: quantize the Linear modules ``todo`` (by suffix) of decoder layer ``i``.

        ``layer`` is materialized in float32 on the run device (except the ``todo`` weights when
        ``defers_weights``) and ``inputs`` are its calibration inputs (computed with every earlier
        layer already quantized). The method writes each module's
        tensors with ``ctx.write`` and must leave in ``layer`` the weights the next layers should see
        (usually the dequantized ones). It may also change other parameters of the layer (AWQ and
        SmoothQuant fold scales into norms): after this call the driver writes every parameter of
        the layer that is not a quantized weight from the module, not from the source checkpoint.
        """
        raise NotImplementedError

    # ---- describing the settings (the card) --------------------------------------------------------
    def card_settings(self, opts) -> list[tuple[str, str]]:
        """(setting, value) rows for the model card's table."""
        return [("bits", str(opts.bits))]

    def card_tags(self, opts) -> list[str]:
        return [self.name, f"{opts.bits}bit"]

    # ---- the format's answers, for callers holding a method --------------------------------------------
    # Shortcuts to ``self.format`` (the driver calls the format itself); the reading-back ones stay
    # class-level so ``RTNMethod.dequantize(get, prefix, qcfg)`` keeps working.
    def planned(self, lin: QuantLinear, opts) -> list["PlannedTensor"]:
        return self.format.planned(lin, opts)

    def float_dtype(self, opts) -> torch.dtype:
        return self.format.float_dtype(opts)

    def quantization_config(self, opts) -> dict:
        return self.format.quantization_config(opts)

    def declare_float(self, qcfg: dict, pattern: str) -> dict:
        return self.format.declare_float(qcfg, pattern)

    def extra_files(self, opts) -> dict[str, dict]:
        return self.format.extra_files(opts)

    def loading_requirements(self) -> str:
        return self.format.loading_requirements()

    @property
    def client_modules(self) -> tuple[str, ...]:
        return self.format.client_modules

    @classmethod
    def handles(cls, qcfg: dict) -> bool:
        return cls.format is not None and cls.format.handles(qcfg)

    @classmethod
    def quantized_prefixes(cls, names: list[str], qcfg: dict) -> list[str]:
        return cls.format.quantized_prefixes(names, qcfg)

    @classmethod
    def dequantize(cls, get: Callable[[str], torch.Tensor], prefix: str, qcfg: dict) -> torch.Tensor:
        return cls.format.dequantize(get, prefix, qcfg)

    @classmethod
    def storage_suffixes(cls) -> tuple[str, ...]:
        return cls.format.storage_suffixes()


# name -> "module:Class"; imported on first use
METHODS: dict[str, str] = {
    "gptq": "mergequant.quant.gptq_method:GPTQMethod",
    "rtn": "mergequant.quant.gptq_method:RTNMethod",
    "awq": "mergequant.quant.awq_method:AWQMethod",
    "int8": "mergequant.quant.int8_method:Int8Method",
    "w8a8": "mergequant.quant.w8a8_method:W8A8Method",
}


def _load_class(path: str) -> type[QuantMethod]:
    mod, _, cls = path.partition(":")
    return getattr(importlib.import_module(mod), cls)


def get_method(name: str) -> QuantMethod:
    if name not in METHODS:
        raise MergeQuantError(f"--method {name}: supported are {', '.join(METHODS)}")
    try:
        return _load_class(METHODS[name])()
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("mergequant."):
            raise MergeQuantError(f"--method {name} is not available in this build of mergequant") from None
        raise
