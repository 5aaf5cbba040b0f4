"""`mergequant inspect`: what is in a model directory, from headers only (no tensor data is read)."""

from __future__ import annotations

from collections import Counter

from mergequant.io.checkpoint import Checkpoint
from mergequant.units import format_bytes


def inspect_model(path: str) -> dict:
    ck = Checkpoint.open(path, require_config=False)
    shards: dict[str, dict] = {}
    for t in ck.tensors.values():
        s = shards.setdefault(t.file, {"tensors": 0, "bytes": 0})
        s["tensors"] += 1
        s["bytes"] += t.nbytes
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in ck.tensors.values())
    return {
        "path": str(ck.path),
        "architecture": ck.architecture,
        "model_type": ck.config.get("model_type"),
        "layers": ck.num_layers,
        "hidden_size": ck.config.get("hidden_size"),
        "vocab_size": ck.vocab_size,
        "tensors": len(ck.tensors),
        "parameters": ck.num_parameters,
        "bytes": ck.total_bytes,
        "dtypes": dict(dtypes),
        "shards": shards,
        "quantization": (ck.config.get("quantization_config") or {}).get("quant_method"),
    }


def format_inspection(info: dict) -> str:
    lines = [
        f"model:         {info['path']}",
        f"architecture:  {info['architecture']} ({info['model_type']})",
        f"layers:        {info['layers']}   hidden: {info['hidden_size']}   vocab: {info['vocab_size']}",
        f"parameters:    {info['parameters']:,} ({info['parameters'] / 1e9:.3f} B)",
        f"tensors:       {info['tensors']}",
        "dtypes:        " + ", ".join(f"{k} x{v}" for k, v in sorted(info["dtypes"].items())),
        f"size:          {format_bytes(info['bytes'])}",
    ]
    if info.get("quantization"):
        lines.append(f"quantization:  {info['quantization']}")
    lines.append(f"shards:        {len(info['shards'])}")
    for f, s in sorted(info["shards"].items()):
        lines.append(f"  {f}: {s['tensors']} tensors, {format_bytes(s['bytes'])}")
    return "\n".join(lines)
