"""`mergequant inspect`: what is in a model directory, from headers only (no tensor data is read)."""

from __future__ import annotations

from collections import Counter

from mergequant.io.checkpoint import Checkpoint
from mergequant.units import format_bytes


def inspect_model(path: str) -> dict:
    from mergequant.peft.adapted import adapter_of, open_model

    ck = open_model(path, require_config=False, hub=False)  # a folder, BASE+ADAPTER or an adapter-only folder
    adapter = adapter_of(ck)
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
        "experts": _experts(ck),
        **({"adapter": {"reference": adapter.reference, "adapter": str(adapter.adapter_path), "base": adapter.base,
                        "base_path": str(adapter.base_path), "base_from_config": adapter.base_from_config,
                        "description": adapter.description, "modules": adapter.modules,
                        "replaced_tensors": adapter.replaced}} if adapter else {}),
    }


def _experts(ck: Checkpoint) -> dict | None:
    """A mixture-of-experts model's experts per layer, top-k, on-disk layout and total vs active
    parameters (a token runs only top-k experts of each sparse layer); None for a dense model."""
    from mergequant.merge.moe_layout import is_fused, moe_architecture, per_expert_view

    arch = moe_architecture(ck.config)
    if arch is None:
        return None
    view = per_expert_view(ck)
    shapes = {n: t.shape for n, t in view.tensors.items()}
    total, active = arch.parameter_counts(ck.config, shapes)
    prefix = f".{arch.experts.disk_block}.experts."
    per_layer = {}
    for name in shapes:
        split = arch.split_name(name)
        if split and prefix in f".{split[1]}":
            per_layer.setdefault(split[0], set()).add(split[1].split(".experts.")[1].split(".")[0])
    counts = sorted({len(v) for v in per_layer.values()})
    return {"experts": counts[0] if len(counts) == 1 else counts, "top_k": ck.config.get("num_experts_per_tok"),
            "sparse_layers": len(per_layer), "layout": "fused" if is_fused(arch, ck.tensors) else "per-expert",
            "total_parameters": total, "active_parameters": active}


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
    if info.get("experts"):
        e = info["experts"]
        lines.append(f"experts:       {e['experts']} per layer in {e['sparse_layers']} layers, {e['top_k']} active per token "
                     f"({e['layout']} layout); {e['active_parameters']:,} of {e['total_parameters']:,} parameters active")
    if info.get("quantization"):
        lines.append(f"quantization:  {info['quantization']}")
    if info.get("adapter"):
        a = info["adapter"]
        lines.append(f"adapter:       {a['description']} ({a['adapter']}): {a['modules']} module(s)"
                     + (f", {a['replaced_tensors']} tensor(s) replaced" if a["replaced_tensors"] else "")
                     + f"; base {a['base']}" + (" (from adapter_config.json)" if a["base_from_config"] else "")
                     + "; tensors below are the base's, adapted as they are read")
    lines.append(f"shards:        {len(info['shards'])}")
    for f, s in sorted(info["shards"].items()):
        lines.append(f"  {f}: {s['tensors']} tensors, {format_bytes(s['bytes'])}")
    return "\n".join(lines)
