"""What the machine computes fast: whether bfloat16 matrix products beat float32 ones on a device.

Why this exists: a bfloat16 product is 2-3.5x faster than a float32 one on CPUs with AVX-512 BF16 or
AMX and on GPUs, but a CPU without bfloat16 instructions (AVX2 only: most desktop CPUs, many cloud
VMs) converts every element in software. Measured on such a CPU (AMD EPYC, AVX2, torch 2.13): a
2048x256 by 256x768 product ran at 101 GFLOP/s in float32 and 1.3 in bfloat16 or float16, and a tiny
Mixtral's GPTQ run with bfloat16 expert statistics took 201 s instead of 12.4 s. Every place that
computes in a 16-bit dtype only for speed asks :func:`fast_16bit` (or :func:`fast_bfloat16`) first.

The answer comes from the instruction set the CPU reports, never from timing a product: it decides
which arithmetic a quantization runs (and so its last-bit rounding), which must not depend on how
busy the machine happened to be.
"""

from __future__ import annotations

import functools
import platform

import torch


@functools.lru_cache(maxsize=4)
def _cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags from ``cpuinfo`` (x86 ``flags``, Arm ``Features``); empty where there is none."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def _torch_cpu_check(name: str) -> bool | None:
    """torch's own CPU feature check ``torch.cpu.<name>()`` (private, present in torch >= 2.3), or None."""
    check = getattr(torch.cpu, name, None)
    if check is None:
        return None
    try:
        return bool(check())
    except Exception:  # noqa: BLE001  (a private helper: any failure means "unknown")
        return None


def cpu_bfloat16_instructions() -> str | None:
    """The bfloat16 instruction set this CPU has for matrix products ("AMX", "AVX-512 BF16", "Arm BF16"),
    or None when it has none (products in bfloat16 are then emulated, far slower than float32)."""
    flags = _cpu_flags()
    if _torch_cpu_check("_is_amx_tile_supported") or "amx_bf16" in flags:
        return "AMX"
    if _torch_cpu_check("_is_avx512_bf16_supported") or "avx512_bf16" in flags:
        return "AVX-512 BF16"
    if platform.machine().lower() in ("aarch64", "arm64") and "bf16" in flags:
        return "Arm BF16"
    return None


def fast_bfloat16(device: torch.device | str = "cpu") -> bool:
    """Whether bfloat16 matrix products on ``device`` are at least as fast as float32 ones (see :func:`fast_16bit`)."""
    return fast_16bit(torch.bfloat16, device)


def cpu_float16_instructions() -> str | None:
    """The float16 instruction set this CPU has for matrix products ("AMX-FP16", "AVX-512 FP16",
    "Arm FP16"), or None (F16C only converts: products in float16 are then emulated)."""
    flags = _cpu_flags()
    if _torch_cpu_check("_is_amx_fp16_supported") or "amx_fp16" in flags:
        return "AMX-FP16"
    if "avx512_fp16" in flags:
        return "AVX-512 FP16"
    if platform.machine().lower() in ("aarch64", "arm64") and "asimdhp" in flags:
        return "Arm FP16"
    return None


def fast_16bit(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether products in the 16-bit float ``dtype`` run at least as fast as float32 ones on ``device``
    (True for any other dtype: nothing to decide): on a CUDA device for float16, and for bfloat16 when it
    supports it; on the CPU when it has instructions for ``dtype``. Where they would be emulated (the AVX2
    CPU measured: 1.3 GFLOP/s against 101 in float32) compute in float32 instead."""
    if dtype not in (torch.bfloat16, torch.float16):
        return True
    device = torch.device(device)
    if device.type == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        native = cpu_bfloat16_instructions if dtype == torch.bfloat16 else cpu_float16_instructions
        return native() is not None
    return False


def slow_bfloat16_note(device: torch.device | str = "cpu") -> str:
    """Why bfloat16 is slow on ``device``, for warnings: names the missing instructions on a CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return "this CPU has no bfloat16 instructions (AVX-512 BF16, AMX or Arm BF16): bfloat16 products are emulated"
    return f"{device.type} does not compute bfloat16 natively"
