"""Mixture-of-experts tensors in their two on-disk layouts, mapped onto one set of names.

Hub checkpoints keep one 2-D weight per expert (``...block_sparse_moe.experts.3.w1.weight``); mergekit
0.1.5 and transformers' ``save_pretrained(save_original_format=False)`` write one fused 3-D tensor per
layer instead: ``mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows [0:I], up rows [I:2I] of each expert)
and ``mlp.experts.down_proj`` [E, H, I], with Mixtral's router renamed ``block_sparse_moe.gate`` ->
``mlp.gate``. The names come from :class:`mergequant.architectures.ExpertLayout`.

The merge always plans in the per-expert names (the architecture's original ones), so inputs in either
layout, or a mix, merge expert by expert:

- :func:`per_expert_view` shows a fused checkpoint under per-expert names; each expert weight is a
  lazy view of its rows of the memory-mapped fused tensor (contiguous: expert ``e`` of a row-major
  [E, R, C] tensor is one block), so a merge reads one expert at a time and never the whole block.
- :func:`fused_output` maps per-expert output tensors to an element offset inside a fused output tensor,
  so the writer can plan the fused tensor's bytes up front and fill it expert by expert.

Everything here but the view's ``get`` works on names and shapes only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from mergequant.architectures import ARCHITECTURES, Architecture
from mergequant.errors import CheckpointError, MergeQuantError
from mergequant.io.checkpoint import Checkpoint, TensorInfo

LAYOUTS = ("per-expert", "fused")
TOP_K_KEY = "num_experts_per_tok"
GATE, UP, DOWN = 0, 1, 2


def moe_architecture(config: Mapping) -> Architecture | None:
    """The MoE description of a config.json, or None for a dense (or undescribed) family: merging works
    for any family, so an unknown ``model_type`` is not an error here."""
    arch = ARCHITECTURES.get(config.get("model_type")) if isinstance(config.get("model_type"), str) else None
    return arch if arch is not None and arch.is_moe else None


def check_layout_name(layout: str) -> str:
    """``layout`` if it is a known output layout, else a one-line error listing the choices."""
    if layout not in LAYOUTS:
        raise MergeQuantError(f"--moe-layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout


# ---- names -----------------------------------------------------------------------------------------------

def fused_names(arch: Architecture, layer: int) -> tuple[str, str]:
    """Full names of layer ``layer``'s fused (gate_up, down) tensors."""
    p, ex = arch.layer_prefix(layer), arch.experts
    return p + ex.fused_gate_up, p + ex.fused_down


def router_names(arch: Architecture, layer: int) -> tuple[str, str]:
    """Full names of layer ``layer``'s router weight: (per-expert layout, fused layout). Equal except for
    Mixtral, whose module is ``block_sparse_moe`` on disk and ``mlp`` in the fused layout."""
    p, ex = arch.layer_prefix(layer), arch.experts
    return p + ex.to_disk(ex.router) + ".weight", p + ex.router + ".weight"


def _expert_re(arch: Architecture) -> re.Pattern:
    ex = arch.experts
    linears = "|".join(re.escape(n) for n in ex.expert_linears)
    return re.compile(rf"{re.escape(arch.layers)}\.(\d+)\.{re.escape(ex.disk_block)}\.experts\.(\d+)\.({linears})\.weight$")


def parse_expert_name(arch: Architecture, name: str) -> tuple[int, int, int] | None:
    """(layer, expert, part) of a per-expert weight name (part: GATE, UP or DOWN), else None."""
    m = _expert_re(arch).match(name)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), arch.experts.expert_linears.index(m.group(3))


def _fused_layer(arch: Architecture, name: str) -> int | None:
    """The layer of a fused gate_up/down tensor name, else None."""
    split = arch.split_name(name)
    if split and split[1] in (arch.experts.fused_gate_up, arch.experts.fused_down):
        return split[0]
    return None


def is_fused(arch: Architecture, names) -> bool:
    """Whether a checkpoint's tensor names use the fused expert layout."""
    return any(_fused_layer(arch, n) is not None for n in names)


# ---- reading fused inputs ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExpertSlice:
    """Where one per-expert weight lives in a fused tensor: ``fused[expert, rows[0]:rows[1]]``
    (``rows`` None: the whole ``fused[expert]``)."""

    fused: str
    expert: int
    rows: tuple[int, int] | None


def _fused_shapes(path, arch: Architecture, layer: int, tensors: Mapping[str, TensorInfo]) -> tuple[int, int, int]:
    """(E, I, H) of a layer's fused tensors, after checking they describe one expert block: gate_up
    [E, 2I, H] and down [E, H, I]. A mismatch would slice wrong rows silently, hence the error."""
    gu_name, down_name = fused_names(arch, layer)
    gu, down = tensors.get(gu_name), tensors.get(down_name)
    if gu is None or down is None:
        missing = gu_name if gu is None else down_name
        raise CheckpointError(f"{path}: tensor {missing} is missing (the fused expert layout needs both "
                              f"{arch.experts.fused_gate_up} and {arch.experts.fused_down} in every MoE layer)")
    ok = (len(gu.shape) == 3 and len(down.shape) == 3 and gu.shape[1] % 2 == 0
          and down.shape == (gu.shape[0], gu.shape[2], gu.shape[1] // 2))
    if not ok:
        raise CheckpointError(f"{path}: tensor {gu_name} has shape {list(gu.shape)} and {down_name} "
                              f"{list(down.shape)}; expected [E, 2I, H] and [E, H, I]")
    return gu.shape[0], gu.shape[1] // 2, gu.shape[2]


def unfused_names(path, arch: Architecture, config: Mapping, tensors: Mapping[str, TensorInfo]
                  ) -> tuple[dict[str, TensorInfo], dict[str, ExpertSlice], dict[str, str]]:
    """A fused checkpoint's tensors under per-expert names: (name -> TensorInfo with the expert's 2-D
    shape, per-expert name -> ExpertSlice, renamed router -> its name in the file). Other tensors keep
    their names; tensor order follows the checkpoint's."""
    out: dict[str, TensorInfo] = {}
    slices: dict[str, ExpertSlice] = {}
    aliases: dict[str, str] = {}
    key, configured = expert_count(arch, config)
    for name, info in tensors.items():
        layer = _fused_layer(arch, name)
        if layer is None:
            split = arch.split_name(name)
            renamed = router_names(arch, split[0])[0] if split and name == router_names(arch, split[0])[1] else name
            if renamed != name:
                aliases[renamed] = name
            out[renamed] = replace(info, name=renamed) if renamed != name else info
            continue
        n_exp, inter, hidden = _fused_shapes(path, arch, layer, tensors)  # also refuses a lone gate_up or down
        if name != fused_names(arch, layer)[0]:
            continue  # the down tensor is expanded together with gate_up
        if isinstance(configured, int) and configured != n_exp:
            raise CheckpointError(f"{path}: {name} holds {n_exp} experts but config.json has {key} {configured}")
        down = fused_names(arch, layer)[1]
        for e in range(n_exp):
            for part, (src, rows, shape) in enumerate((
                    (name, (0, inter), (inter, hidden)), (name, (inter, 2 * inter), (inter, hidden)),
                    (down, None, (hidden, inter)))):
                pe = arch.layer_prefix(layer) + arch.experts.expert_weight(e, part)
                out[pe] = TensorInfo(pe, tensors[src].dtype, shape, tensors[src].file)
                slices[pe] = ExpertSlice(src, e, rows)
    return out, slices, aliases


class PerExpertView(Checkpoint):
    """A checkpoint in the fused expert layout, seen under per-expert names (see the module docstring).
    ``get`` of an expert weight is a zero-copy view of its rows of the memory-mapped fused tensor."""

    def __init__(self, inner: Checkpoint, tensors: dict[str, TensorInfo], slices: dict[str, ExpertSlice],
                 renamed: dict[str, str]):
        super().__init__(inner.path, inner.config, tensors, inner._files)
        self.inner, self.slices, self.renamed = inner, slices, renamed

    def get(self, name: str) -> torch.Tensor:
        s = self.slices.get(name)
        if s is None:
            return self.inner.get(self.renamed.get(name, name))
        get_expert = getattr(self.inner, "get_expert", None)  # an adapted view computes one expert, not the block
        block = get_expert(s.fused, s.expert) if get_expert else self.inner.get(s.fused)[s.expert]
        return block if s.rows is None else block[s.rows[0]:s.rows[1]]


def per_expert_view(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` itself when it is dense or already per-expert, else its :class:`PerExpertView`."""
    arch = moe_architecture(ckpt.config)
    if arch is None or isinstance(ckpt, PerExpertView) or not is_fused(arch, ckpt.tensors):
        return ckpt
    return PerExpertView(ckpt, *unfused_names(ckpt.path, arch, ckpt.config, ckpt.tensors))


# ---- writing fused outputs ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class FusedOutput:
    """The output tensors to plan, in order, as (name, dtype, shape), and where each per-expert output
    tensor goes: name -> (written tensor, element offset). Tensors absent from ``placement`` are
    written as they are."""

    tensors: list[tuple[str, torch.dtype, tuple[int, ...]]]
    placement: dict[str, tuple[str, int]]


def fused_output(arch: Architecture, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> FusedOutput:
    """Group per-expert output tensors (name, dtype, shape) into the fused layout.

    Expert ``e``'s gate starts at element ``e*2I*H`` of gate_up [E, 2I, H] and its up ``I*H`` later;
    its down at ``e*H*I`` of down [E, H, I]: each per-expert tensor is one contiguous block of the fused
    one, so it is written at an offset and the [E, ...] block never exists in memory. The fused tensor
    takes the place of its layer's first expert tensor in the order. Raises MergeQuantError when a
    layer's experts cannot form one block (missing expert or part, shapes or dtypes that differ)."""
    members: dict[int, dict[tuple[int, int], tuple[str, torch.dtype, tuple[int, ...]]]] = {}
    for t in tensors:
        parsed = parse_expert_name(arch, t[0])
        if parsed:
            members.setdefault(parsed[0], {})[parsed[1:]] = t
    fused_shapes = {layer: _check_block(arch, layer, m) for layer, m in members.items()}

    out: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    placement: dict[str, tuple[str, int]] = {}
    for name, dtype, shape in tensors:
        parsed = parse_expert_name(arch, name)
        if parsed is None:
            split = arch.split_name(name)
            per_expert_router, fused_router = router_names(arch, split[0]) if split else (None, None)
            if split and split[0] in members and name == per_expert_router and fused_router != name:
                placement[name] = (fused_router, 0)
                name = fused_router
            out.append((name, dtype, shape))
            continue
        layer, e, part = parsed
        (gu, down), (n_exp, inter, hidden), dt = fused_names(arch, layer), fused_shapes[layer][:3], fused_shapes[layer][3]
        if part == DOWN:
            placement[name] = (down, e * hidden * inter)
        else:
            placement[name] = (gu, (2 * e + part) * inter * hidden)
        if (e, part) == (0, GATE):
            out += [(gu, dt, (n_exp, 2 * inter, hidden)), (down, dt, (n_exp, hidden, inter))]
    return FusedOutput(out, placement)


def _check_block(arch: Architecture, layer: int, members: dict) -> tuple[int, int, int, torch.dtype]:
    """(E, I, H, dtype) of one layer's per-expert output tensors, once they are certain to fill a fused block."""
    where = f"--moe-layout fused: layer {layer}"
    n_exp = 1 + max(e for e, _ in members)
    missing = [(e, p) for e in range(n_exp) for p in (GATE, UP, DOWN) if (e, p) not in members]
    if missing:
        e, p = missing[0]
        raise MergeQuantError(f"{where}: expert {e} has no {arch.experts.expert_linears[p]} weight, so the experts "
                              "cannot be fused into one tensor; write the per-expert layout")
    inter, hidden = members[(0, GATE)][2]
    dtypes = {m[1] for m in members.values()}
    want = {GATE: (inter, hidden), UP: (inter, hidden), DOWN: (hidden, inter)}
    bad = next((m for (e, p), m in members.items() if m[2] != want[p]), None)
    if bad is not None or len(dtypes) > 1:
        why = (f"{bad[0]} has shape {list(bad[2])}, expected {list(want[parse_expert_name(arch, bad[0])[2]])}"
               if bad is not None else f"the experts would be written in different dtypes ({sorted(map(str, dtypes))})")
        raise MergeQuantError(f"{where}: {why}; write the per-expert layout or pass --out-dtype")
    return n_exp, inter, hidden, dtypes.pop()


# ---- recipe filters ------------------------------------------------------------------------------------------

class FilterName(str):
    """A tensor name that a recipe filter also matches through its fused-layout name.

    mergekit 0.1.5 names Mixtral's experts ``mlp.experts.gate_up_proj`` whatever the files say, so a
    published recipe's ``filter: mlp`` reaches every expert and the router there; under the per-expert
    name (``block_sparse_moe.experts.3.w1``) it would silently reach none. A filter is a substring test
    (``filter in name``), so this str answers it for either name; it prints as the per-expert name."""

    aliases: tuple[str, ...] = ()

    def __contains__(self, part) -> bool:
        return str.__contains__(self, part) or any(part in a for a in self.aliases)


def filter_name(arch: Architecture | None, name: str) -> str:
    """``name`` as recipe filters should see it: with its fused-layout name as an alias when it is an
    expert weight or a router of ``arch`` (see :class:`FilterName`), else unchanged."""
    if arch is None:
        return name
    parsed = parse_expert_name(arch, name)
    split = arch.split_name(name)
    if parsed is not None:
        alias = fused_names(arch, parsed[0])[parsed[2] == DOWN]
    elif split is not None and name == router_names(arch, split[0])[0]:
        alias = router_names(arch, split[0])[1]
    else:
        return name
    out = FilterName(name)
    out.aliases = (alias,)
    return out


# ---- compatibility between inputs ---------------------------------------------------------------------------

EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts")  # transformers 5 saves Qwen-MoE's num_experts as the first


def expert_count(arch: Architecture, config: Mapping) -> tuple[str, object]:
    """(key, value) of a config's expert count: the family's own key, else its alias (transformers 5 writes
    ``num_local_experts`` for every family, older Qwen-MoE configs ``num_experts``); (key, None) if absent."""
    for key in (arch.experts.num_experts_key, *EXPERT_COUNT_KEYS):
        if config.get(key) is not None:
            return key, config[key]
    return arch.experts.num_experts_key, None


def check_same_experts(models: list[tuple[object, Mapping]]) -> None:
    """Refuse inputs whose expert count or top-k differ: experts merge by index, so a model with more
    experts would lose some and a different top-k changes what every expert was trained to do alongside
    the others. ``models`` is [(path, config)], the reference first. One line naming both models."""
    (ref_path, ref_cfg), *others = models
    arch = moe_architecture(ref_cfg)
    if arch is None:
        return
    for path, cfg in others:
        pairs = [(expert_count(arch, cfg), expert_count(arch, ref_cfg)),
                 ((TOP_K_KEY, cfg.get(TOP_K_KEY)), (TOP_K_KEY, ref_cfg.get(TOP_K_KEY)))]
        for (key, value), (ref_key, ref_value) in pairs:
            if value != ref_value:
                raise CheckpointError(f"{path}: {key} is {value} but {ref_path} has {ref_key} {ref_value}; "
                                      "mixture-of-experts models merge expert by expert and need the same experts "
                                      "and top-k")
