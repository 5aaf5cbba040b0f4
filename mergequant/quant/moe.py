"""Mixture-of-experts layers during quantization: experts as plain Linears, and how they see calibration.

transformers 5 keeps a layer's experts as two 3-D parameters (``experts.gate_up_proj`` [E, 2I, H],
``experts.down_proj`` [E, H, I]) that no Linear-walking quantizer can see. ``unfuse_experts`` swaps
each such module in the (meta) skeleton for :class:`UnfusedExperts`: the same call signature
(``hidden_states [N, H], top_k_index [N, k], top_k_weights [N, k]``), the same arithmetic, but one
``nn.Linear`` per expert projection, named ``mlp.experts.E.gate_proj|up_proj|down_proj`` (the
architecture description maps these to the names on disk). Every method then treats an expert like
any Linear: hooks see its input, GPTQ installs a forward on it, AWQ scales its columns.

Calibration modes (``--moe-calibration``):

- ``all`` (default): every expert runs on *all* tokens, so a rarely chosen expert still gets
  statistics from the whole calibration set, and the output of the block is still built from the
  routed tokens only (what the next layer receives is the real routed forward). All experts' gate and
  up are called with the very same input tensor, so a statistics hook sees one input for all of them
  (GPTQ: one Hessian and one factorization for every expert's gate/up).
- ``routed``: each expert sees only the tokens the router sends it (what it sees at inference). An
  expert that gets fewer than ``min_tokens`` tokens is too starved for a calibrated solve; methods
  fall back to round-to-nearest for it (see ``starved``).

In either mode the router's choices are counted per expert (``tokens``), for the log and the card.
The layer output never depends on the mode.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from mergequant.architectures import Architecture, resolve
from mergequant.errors import MergeQuantError
from mergequant.quant.meta import meta_linear

__all__ = ["CALIBRATION_MODES", "ExpertActivationReplay", "MoECalibration", "UnfusedExperts", "calibrating",
           "counted", "experts_of", "unfuse_experts"]

CALIBRATION_MODES = ("all", "routed")
# GPTQModel falls back below 0.5% of the calibration tokens; ours is a share of the tokens an expert
# would get under uniform routing (top_k / E of them), so it scales with the expert count
DEFAULT_MIN_SHARE = 0.05


@dataclass
class MoECalibration:
    """How experts see calibration tokens (see the module docstring); ``tokens[layer][e]`` counts the
    tokens the router sent to expert ``e`` over the whole calibration set (from the last pass)."""

    mode: str = "all"
    min_share: float = DEFAULT_MIN_SHARE
    tokens: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in CALIBRATION_MODES:
            raise MergeQuantError(f"--moe-calibration must be one of {', '.join(CALIBRATION_MODES)}, got {self.mode!r}")
        if not 0 <= self.min_share < 1:
            raise MergeQuantError(f"--moe-min-share must be in [0, 1), got {self.min_share}")

    def min_tokens(self, total_tokens: int, top_k: int, num_experts: int) -> int:
        """Fewest routed tokens an expert needs for a calibrated solve in routed mode."""
        return max(1, int(self.min_share * total_tokens * top_k / num_experts))

    def starved(self, layer: int, total_tokens: int, top_k: int) -> list[int]:
        """Experts of ``layer`` that got too few routed tokens (only in routed mode: with all-token
        calibration every expert sees every token)."""
        counts = self.tokens.get(layer)
        if self.mode != "routed" or not counts:
            return []
        need = self.min_tokens(total_tokens, top_k, len(counts))
        return [e for e, c in enumerate(counts) if c < need]


# gate's (or up's) output per row block of ``UnfusedExperts.gate_up`` with a buffer, in float32 bytes:
# three such blocks (gate, up, the input) stay in a 2-core CPU's cache share (measured: 2048 rows of
# the tiny Mixtral's 384 features beat 8192 by 30%, 512 and 4096 lose)
GATE_UP_BLOCK_BYTES = 3 * 2**20
MIN_GATE_UP_ROWS = 256


def gate_up_rows(inter: int) -> int:
    """Rows per block of an expert's gate/up product with ``inter`` output features."""
    return max(MIN_GATE_UP_ROWS, GATE_UP_BLOCK_BYTES // (4 * inter))


class _Expert(nn.Module):
    """One expert's three projections (the names GPTQModel and Qwen's checkpoints use)."""

    def __init__(self, hidden: int, inter: int, device):
        super().__init__()
        make = meta_linear if torch.device(device).type == "meta" else (
            lambda n_in, n_out: nn.Linear(n_in, n_out, bias=False, device=device))
        self.gate_proj = make(hidden, inter)
        self.up_proj = make(hidden, inter)
        self.down_proj = make(inter, hidden)


class UnfusedExperts(nn.ModuleList):
    """Drop-in for transformers 5's fused experts module, with one Linear per expert projection.

    A ``ModuleList`` of experts, so expert ``e``'s projections are named ``<block>.experts.e.gate_proj``
    etc. ``calibrating`` (set by the runner while a method collects statistics) turns on all-token
    calibration when the mode asks for it; ``counting`` (see ``counted``) counts routed tokens."""

    def __init__(self, num_experts: int, hidden: int, inter: int, act_fn, layer: int, calib: MoECalibration,
                 device="meta"):
        super().__init__(_Expert(hidden, inter, device) for _ in range(num_experts))
        self.num_experts = num_experts
        self._act = [act_fn]  # in a list: a Module attribute would become an entry of this ModuleList
        self.layer = layer
        self.calib = calib
        self.calibrating = False
        self.counting = False

    def _count(self, top_k_index: torch.Tensor) -> None:
        counts = torch.bincount(top_k_index.reshape(-1).long(), minlength=self.num_experts)[: self.num_experts]
        have = self.calib.tokens.setdefault(self.layer, [0] * self.num_experts)
        for e, c in enumerate(counts.tolist()):
            have[e] += c

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if self.counting:
            self._count(top_k_index)
        if not (self.calibrating and self.calib.mode == "all"):
            # routed: each expert on its own tokens only (possibly none: its Linears are still called, so
            # a statistics hook waiting for them is not left hanging)
            return self.routed_from({}, hidden_states, top_k_index, top_k_weights)
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            # the same tensor for every expert, so hooks see one input for every gate/up; the output still
            # mixes only routed tokens: a dense weight per token, 0 where not routed (adds exact zeros
            # elsewhere; a scatter over [N, H] was a tenth of the run)
            w = (top_k_weights * (top_k_index == e)).sum(dim=-1, keepdim=True)
            y = expert.down_proj(self.gate_up(e, hidden_states))
            out.addcmul_(y, w.to(y.dtype))
        return out

    def gate_up(self, e: int, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``act(gate(x)) * up(x)`` of expert ``e``: the input of its down projection. ``out``: a buffer
        (any float dtype, e.g. float32 for a Hessian of bfloat16 products) that receives the product,
        rounded as ``(act(gate(x)) * up(x)).to(out.dtype)`` would be, without that extra pass.

        With ``out`` (the statistics passes, every token through every expert) the rows go a block at
        a time (``gate_up_rows``): gate's and up's outputs for a block stay in cache for the
        activation and the product instead of round-tripping through memory (tiny Mixtral, 8192
        tokens: 45 -> 31 ms per expert on a 2-core AVX2 CPU). The same products; a BLAS may pick another kernel
        for another row count, so the last bits can differ from one product over all rows (the tiny
        Mixtral's GPTQ checkpoint came out byte-identical)."""
        act, expert = self._act[0], self[e]
        if out is None:
            return act(expert.gate_proj(x)) * expert.up_proj(x)
        rows = gate_up_rows(expert.gate_proj.out_features)
        n = x.shape[0]
        for r in range(0, n, rows):
            xb = x[r:r + rows]
            torch.mul(act(expert.gate_proj(xb)), expert.up_proj(xb), out=out[r:r + rows])
        return out

    def routed_activations(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, e: int) -> torch.Tensor:
        """``gate_up`` of expert ``e`` on the tokens the router sent it (in token order): exactly what the
        routed forward computes before expert ``e``'s down projection."""
        return self.gate_up(e, hidden_states[torch.where(top_k_index == e)[0]])

    def _add_routed(self, out, e, hidden_states, top_k_index, top_k_weights, act=None) -> None:
        """Add expert ``e``'s weighted output on its routed tokens to ``out``; ``act``: its
        ``routed_activations``, when already computed."""
        token_idx, slot = torch.where(top_k_index == e)
        if act is None or act.shape[0] != token_idx.numel():
            act = self.gate_up(e, hidden_states[token_idx])
        y = self[e].down_proj(act)
        if token_idx.numel():
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None]).to(out.dtype))

    def routed_from(self, acts: dict, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        """The routed forward with ``acts[e]`` (``routed_activations``) standing in for the gate/up
        products of the experts it has; the others are computed."""
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            self._add_routed(out, e, hidden_states, top_k_index, top_k_weights, acts.get(e))
        return out


class ExpertActivationReplay:
    """Instance ``forward`` of an ``UnfusedExperts`` for the rest of a layer's passes once its gate and up
    are final: per calibration chunk (identified by ``replay.checksum`` of the experts' input) the
    experts' ``routed_activations``, kept by the pass that took the down projections' statistics, which
    computed them anyway. The routed forward then only runs the down projections (bit-identical: the
    same modules on the same rows). Statistics passes (``calibrating``/``counting``) and an input not
    recorded compute as usual."""

    def __init__(self, module: UnfusedExperts, keys: list[tuple], acts: list[dict]):
        self.module = module
        self.compute = type(module).forward.__get__(module)
        self.kept = dict(zip(keys, acts))
        self.replayed = 0
        self.recomputed = 0

    @classmethod
    def install(cls, module: UnfusedExperts, keys: list[tuple], acts: list[dict]) -> "ExpertActivationReplay | None":
        if not keys or "forward" in module.__dict__:
            return None
        replay = cls(module, keys, acts)
        module.forward = replay
        return replay

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        from mergequant.quant.replay import checksum

        m = self.module
        acts = None if m.calibrating or m.counting else self.kept.get(checksum(hidden_states))
        if acts is None:
            self.recomputed += 1
            return self.compute(hidden_states, top_k_index, top_k_weights)
        self.replayed += 1
        return m.routed_from(acts, hidden_states, top_k_index, top_k_weights)


def experts_of(layer: nn.Module) -> list[UnfusedExperts]:
    """The un-fused experts modules inside a decoder layer (none for a dense layer)."""
    return [m for m in layer.modules() if isinstance(m, UnfusedExperts)]


@contextlib.contextmanager
def calibrating(layer: nn.Module):
    """While statistics are collected on ``layer``: all-token calibration (if that is the mode)."""
    mods = experts_of(layer)
    for m in mods:
        m.calibrating = True
    try:
        yield
    finally:
        for m in mods:
            m.calibrating = False


@contextlib.contextmanager
def counted(layer: nn.Module):
    """Count the router's choices over the forwards run inside (the layer's counts start from zero)."""
    mods = experts_of(layer)
    for m in mods:
        m.calib.tokens[m.layer] = [0] * m.num_experts
        m.counting = True
    try:
        yield
    finally:
        for m in mods:
            m.counting = False


def _sizes(module: nn.Module) -> tuple[int, int, int]:
    """(E, H, I) of a fused experts module from its [E, 2I, H] gate_up parameter."""
    gu = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(down, torch.Tensor) or gu.dim() != 3:
        raise MergeQuantError(f"{type(module).__name__}: unknown expert layout (no 3-D gate_up_proj / down_proj); "
                              "this mixture-of-experts architecture cannot be quantized")
    return gu.shape[0], gu.shape[2], gu.shape[1] // 2


def unfuse_experts(model: nn.Module, arch: Architecture, config, calib: MoECalibration) -> list[UnfusedExperts]:
    """Replace every fused experts module of ``model`` (built on meta) by an :class:`UnfusedExperts`;
    returns them (one per sparse layer). Dense layers of a MoE family are left alone."""
    ex = arch.experts
    layers = resolve(model, arch.layers)
    done = []
    for i, layer in enumerate(layers):
        if not ex.is_sparse_layer(config, i):
            continue
        block = resolve(layer, ex.memory_block)
        fused = getattr(block, "experts", None)
        if fused is None or isinstance(fused, UnfusedExperts):
            raise MergeQuantError(f"{type(layer).__name__} {i}: no {ex.memory_block}.experts module; this "
                                  "mixture-of-experts architecture cannot be quantized")
        n, hidden, inter = _sizes(fused)
        act = getattr(fused, "act_fn", None)
        if act is None:
            raise MergeQuantError(f"{type(fused).__name__}: no act_fn; unknown expert layout")
        block.experts = UnfusedExperts(n, hidden, inter, act, i, calib, device=fused.gate_up_proj.device)
        done.append(block.experts)
    return done


def fused_state(arch: Architecture, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A float state dict with per-expert names (either ``--moe-names``) -> transformers 5's in-memory
    names: each layer's experts stacked into ``gate_up_proj`` [E, 2I, H] / ``down_proj`` [E, H, I],
    Mixtral's ``block_sparse_moe`` renamed ``mlp``. For ``load_state_dict`` on a model built from
    config (our dequantizing loader): transformers' own renaming only runs inside ``from_pretrained``."""
    ex = arch.experts
    out: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[tuple[int, int], torch.Tensor]] = {}
    for name, t in state.items():
        split = arch.split_name(name)
        if not split:
            out[name] = t
            continue
        layer, rel = split
        mem = arch.to_memory(rel)
        parsed = ex.parse_expert_module(mem[: -len(".weight")]) if mem.endswith(".weight") else None
        if parsed is None:
            out[arch.layer_prefix(layer) + mem] = t
        else:
            experts.setdefault(layer, {})[parsed] = t
    for layer, parts in experts.items():
        n = 1 + max(e for e, _ in parts)
        missing = [(e, w) for e in range(n) for w in range(3) if (e, w) not in parts]
        if missing:
            e, w = missing[0]
            raise MergeQuantError(f"layer {layer}: expert {e} has no {ex.memory_linears[w]} weight")
        p = arch.layer_prefix(layer)
        out[p + ex.fused_gate_up] = torch.stack([torch.cat([parts[(e, 0)], parts[(e, 1)]]) for e in range(n)])
        out[p + ex.fused_down] = torch.stack([parts[(e, 2)] for e in range(n)])
    return out
