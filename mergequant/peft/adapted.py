"""A base checkpoint seen through a LoRA adapter, tensor by tensor: the ``BASE+ADAPTER`` model.

:class:`AdaptedCheckpoint` has the interface of :class:`mergequant.io.checkpoint.Checkpoint` (config,
tensors, ``get``), so merges, quantization, eval and inspect read it unchanged. Its ``get(name)`` reads the
base tensor and, when the adapter touches it, returns ``W + s * B @ A`` (or DoRA's rescaled sum, or a
replacement tensor) computed in float32 and rounded once to the base tensor's dtype. Nothing merged is
ever written: memory holds the adapter (small) and the one tensor being read.

Everything that can be wrong (no adapter_config.json, an unsupported peft_type or option, factors whose
shapes do not fit the base, a module the base does not have) is refused when the view is opened, from
headers and the adapter's own tensors, before any base tensor is read.

:func:`open_model` is where a model reference (a folder, a Hub id, ``BASE+ADAPTER``, or an adapter-only
folder or repo whose base comes from ``base_model_name_or_path``) becomes a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mergequant.errors import CheckpointError, MergeQuantError
from mergequant.io.checkpoint import Checkpoint, TensorInfo
from mergequant.peft.apply import (adapted_bias, adapted_weight, compute_dtype, expected_shapes, expert_delta,
                                   experts_delta)
from mergequant.peft.config import (ADAPTER_CONFIG, AdapterConfig, ModuleLora, adapter_weights_file, is_adapter_dir,
                                    load_adapter_tensors, read_adapter_config, split_adapter_tensors)
from mergequant.peft.reference import parse_reference

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class AdapterInput:
    """What a card and a log say about one adapted model."""

    reference: str  # as the user wrote it
    adapter: str  # the adapter side (path or Hub id)
    adapter_path: Path
    base: str  # the base side (path or Hub id), written or from adapter_config.json
    base_path: Path
    base_from_config: bool  # the base came from adapter_config.json's base_model_name_or_path
    description: str  # "LoRA r=16 alpha=32"
    modules: int  # modules with LoRA factors
    replaced: int  # base tensors replaced whole (modules_to_save)


@dataclass(frozen=True)
class _Job:
    kind: str  # "weight", "bias" or "replace"
    module: ModuleLora | None = None
    scale: float = 1.0
    tensor: torch.Tensor | None = None  # "replace": the new tensor; "weight": a saved base_layer replacing the base's
    num_experts: int = 0  # "experts" (a fused [E, out, in] tensor) and "expert" (one per-expert tensor)
    expert: int = 0
    rows: tuple[int, int] | None = None  # "expert": the rows of the expert's fused gate_up delta (gate or up)


class AdaptedCheckpoint(Checkpoint):
    """``base`` with ``adapter`` applied on read (see the module docstring)."""

    def __init__(self, base: Checkpoint, cfg: AdapterConfig, info: AdapterInput):
        super().__init__(base.path, base.config, dict(base.tensors), base._files)
        self.base, self.adapter_config, self.adapter = base, cfg, info
        tensors = load_adapter_tensors(cfg.path)
        modules, replaced = split_adapter_tensors(cfg, tensors)
        self._jobs = _plan_jobs(base, cfg, modules, replaced, info)
        self.adapter = replace(info, modules=len(modules), replaced=len(replaced))

    @property
    def note(self) -> str:
        """One log line: which adapter, on which base, and where the base came from."""
        a = self.adapter
        src = f" (base_model_name_or_path of {a.adapter_path / ADAPTER_CONFIG})" if a.base_from_config else ""
        whole = f", {a.replaced} tensor(s) replaced whole" if a.replaced else ""
        return (f"note: {a.reference}: {a.description} adapter {a.adapter} on base {a.base}{src}: {a.modules} "
                f"module(s){whole}, applied tensor by tensor as they are read (no merged copy is written)")

    @property
    def tokenizer_path(self) -> Path:
        """The adapter folder when it carries a tokenizer (fine-tunes often add a chat template), else the base's."""
        ap = self.adapter.adapter_path
        return ap if any((ap / m).is_file() for m in TOKENIZER_MARKERS) else self.path

    @property
    def input_dirs(self) -> list[Path]:
        return [self.path, self.adapter.adapter_path]

    def get(self, name: str) -> torch.Tensor:
        """The base tensor, or the adapted one (float32 arithmetic, rounded once to the base's dtype)."""
        job = self._jobs.get(name)
        if job is None:
            return self.base.get(name)
        dtype = self.tensors[name].dtype
        if job.kind == "replace":
            return job.tensor.to(dtype)
        base = self.base.get(name) if job.tensor is None else job.tensor
        m = job.module
        if job.kind in ("experts", "expert"):  # target_parameters on fused experts (see apply.expert_delta)
            cd = compute_dtype(base)
            delta = (experts_delta(m.A, m.B, job.scale, job.num_experts, dtype=cd) if job.kind == "experts" else
                     expert_delta(m.A, m.B, job.scale, job.num_experts, job.expert, job.rows, dtype=cd))
            return (base.to(cd) + delta).to(dtype)
        if job.kind == "bias":
            return adapted_bias(base, m.bias, job.scale).to(dtype)
        return adapted_weight(base, m.A, m.B, job.scale, embedding=m.embedding,
                              fan_in_fan_out=self.adapter_config.fan_in_fan_out and not m.embedding,
                              magnitude=m.magnitude, out_dtype=dtype)

    def get_expert(self, name: str, expert: int) -> torch.Tensor:
        """``get(name)[expert]`` for a fused [E, ...] tensor, computing only that expert's delta (what
        :class:`mergequant.merge.moe_layout.PerExpertView` reads, one expert at a time)."""
        job = self._jobs.get(name)
        if job is None or job.kind != "experts":
            return self.get(name)[expert]
        base = self.base.get(name)[expert]
        cd = compute_dtype(base)
        delta = expert_delta(job.module.A, job.module.B, job.scale, job.num_experts, expert, dtype=cd)
        return (base.to(cd) + delta).to(self.tensors[name].dtype)


def _tensor_for(module: str, suffix: str, tensors: dict[str, TensorInfo]) -> str | None:
    """The base tensor holding ``module``'s ``suffix`` (``weight``/``bias``). peft names modules as the
    transformers model does; a checkpoint saved without the model's prefix (GPT-2's ``h.0...`` for
    ``transformer.h.0...``) is matched by dropping the first component."""
    for cand in (module, module.partition(".")[2]):
        if cand and f"{cand}.{suffix}" in tensors:
            return f"{cand}.{suffix}"
    return None


def _plan_jobs(base: Checkpoint, cfg: AdapterConfig, modules: dict[str, ModuleLora], replaced: dict,
               info: AdapterInput) -> dict[str, _Job]:
    """Base tensor name -> what to do when it is read; every shape checked against the base's headers."""
    where = f"{cfg.path / adapter_weights_file(cfg.path).name}"
    hint = (f"; is {info.base} the adapter's base model?" + ("" if info.base_from_config else
            f" (adapter_config.json names {cfg.base_model})" if cfg.base_model else ""))
    jobs: dict[str, _Job] = {}
    tied = bool(base.config.get("tie_word_embeddings"))
    for mod in sorted(modules):
        m = modules[mod]
        if m.parameter is not None:
            jobs.update(_expert_jobs(base, cfg, m, where, hint))
            continue
        wname = _tensor_for(mod, "weight", base.tensors)
        if wname is None:
            raise CheckpointError(f"{where}: module {mod} is not in the base model {base.path} (no tensor {mod}.weight)"
                                  + hint)
        shape = base.tensors[wname].shape
        fifo = cfg.fan_in_fan_out and not m.embedding
        if not expected_shapes(shape, tuple(m.A.shape), tuple(m.B.shape), embedding=m.embedding, fan_in_fan_out=fifo):
            raise CheckpointError(f"{where}: module {mod}: lora_A {list(m.A.shape)} and lora_B {list(m.B.shape)} do not "
                                  f"fit the base tensor {wname} {list(shape)}" + (" (fan_in_fan_out)" if fifo else "") + hint)
        if not base.tensors[wname].dtype.is_floating_point:
            raise CheckpointError(f"{where}: module {mod}: the base tensor {wname} is {base.tensors[wname].dtype} "
                                  "(quantized?); LoRA applies to full-precision bases only")
        if m.magnitude is not None:
            dim = shape[1] if (m.embedding or fifo) else shape[0]
            if tuple(m.magnitude.shape) != (dim,):
                raise CheckpointError(f"{where}: module {mod}: lora_magnitude_vector has shape {list(m.magnitude.shape)}, "
                                      f"expected [{dim}] for {wname} {list(shape)}" + hint)
        if tied and wname in ("lm_head.weight", "model.embed_tokens.weight") and "lm_head.weight" not in base.tensors:
            raise CheckpointError(f"{where}: module {mod}: the base ties lm_head to the embeddings "
                                  "(tie_word_embeddings), so adapting one changes both; not supported")
        jobs[wname] = _Job("weight", m, cfg.scale(mod))
        if m.bias is not None:
            bname = _tensor_for(mod, "bias", base.tensors)
            if bname is None:
                raise CheckpointError(f"{where}: module {mod} has lora_B.bias (lora_bias) but the base tensor has no bias"
                                      + hint)
            if tuple(m.bias.shape) != tuple(base.tensors[bname].shape):
                raise CheckpointError(f"{where}: module {mod}: lora_B.bias has shape {list(m.bias.shape)}, base "
                                      f"{bname} has {list(base.tensors[bname].shape)}" + hint)
            jobs[bname] = _Job("bias", m, cfg.scale(mod))
    for name in sorted(replaced):
        t = replaced[name]
        target = name if name in base.tensors else _tensor_for(name.rpartition(".")[0], name.rpartition(".")[2], base.tensors)
        if target is None:
            raise CheckpointError(f"{where}: tensor {name} (modules_to_save) is not in the base model {base.path}" + hint)
        want = base.tensors[target].shape
        if tuple(t.shape) != tuple(want):
            raise CheckpointError(f"{where}: tensor {name} (modules_to_save) has shape {list(t.shape)}, base {target} "
                                  f"has {list(want)}" + ("; a resized vocabulary is not supported" if len(want) == 2 and
                                                         t.shape[1:] == tuple(want[1:]) else "") + hint)
        if not t.dtype.is_floating_point or not torch.isfinite(t).all():
            raise CheckpointError(f"{where}: tensor {name} (modules_to_save) is not a finite float tensor")
        job = jobs.get(target)
        if job is not None and job.kind == "weight":  # an embedding's saved base_layer: peft loads it, then adds LoRA
            jobs[target] = replace(job, tensor=t)
        elif job is not None:
            raise CheckpointError(f"{where}: {target} is both replaced (modules_to_save) and adapted by LoRA")
        else:
            jobs[target] = _Job("replace", tensor=t)
    return jobs


def _expert_jobs(base: Checkpoint, cfg: AdapterConfig, m: ModuleLora, where: str, hint: str) -> dict[str, _Job]:
    """Jobs for a LoRA on a fused expert parameter (``target_parameters``, e.g. ``mlp.experts.gate_up_proj``
    [E, 2I, H] in transformers 5's memory): on a fused base, the fused tensor itself; on a per-expert base
    (the Hub's layout), each expert's gate (rows ``[0, I)`` of its gate_up delta), up (``[I, 2I)``) or down."""
    from mergequant.merge.moe_layout import expert_count, is_fused, moe_architecture

    arch = moe_architecture(base.config)
    split = arch.split_name(m.module) if arch is not None else None
    ex = arch.experts if arch is not None else None
    if split is None or split[1] not in (ex.fused_gate_up, ex.fused_down):
        raise CheckpointError(f"{where}: target_parameters {m.module}: mergequant applies LoRA to fused expert "
                              "parameters (mlp.experts.gate_up_proj / down_proj) of the mixture-of-experts families it "
                              f"knows; the base {base.path} has no such parameter" + hint)
    layer, rel = split
    n_exp = expert_count(arch, base.config)[1]
    r, _ = cfg.rank_alpha(m.module)
    if not isinstance(n_exp, int) or m.A.dim() != 2 or m.B.dim() != 2 or m.A.shape[0] != r * n_exp \
            or m.B.shape[1] != r * n_exp:
        raise CheckpointError(f"{where}: module {m.module}: lora_A {list(m.A.shape)} and lora_B {list(m.B.shape)} do "
                              f"not hold rank r={r} for each of the base's {n_exp} experts" + hint)
    out, inp = m.B.shape[0], m.A.shape[1]
    scale = cfg.scale(m.module)
    if is_fused(arch, base.tensors):
        have = base.tensors.get(m.module)
        if have is None or tuple(have.shape) != (n_exp, out, inp):
            raise CheckpointError(f"{where}: module {m.module}: factors for [{n_exp}, {out}, {inp}] do not fit the base "
                                  f"tensor {m.module} {list(have.shape) if have else '(missing)'}" + hint)
        return {m.module: _Job("experts", m, scale, num_experts=n_exp)}
    jobs = {}
    prefix = arch.layer_prefix(layer)
    for e in range(n_exp):
        if rel == ex.fused_gate_up:
            inter = out // 2
            parts = [(prefix + ex.expert_weight(e, 0), (0, inter)), (prefix + ex.expert_weight(e, 1), (inter, out))]
        else:
            parts = [(prefix + ex.expert_weight(e, 2), None)]
        for name, rows in parts:
            want = ((rows[1] - rows[0]) if rows else out, inp)
            have = base.tensors.get(name)
            if have is None or tuple(have.shape) != want or (rows and out % 2):
                raise CheckpointError(f"{where}: module {m.module}: expert {e}'s factors do not fit the base tensor {name} "
                                      f"{list(have.shape) if have else '(missing)'} (expected {list(want)})" + hint)
            jobs[name] = _Job("expert", m, scale, num_experts=n_exp, expert=e, rows=rows)
    return jobs


# ---- references --------------------------------------------------------------------------------------------
def _resolve(ref: str, base_dir: Path | None, where: str) -> Path:
    from mergequant.io.resolve import resolve_model

    return resolve_model(ref, base_dir=base_dir, where=where)


def open_model(ref: str | Path, *, base_dir: Path | None = None, where: str = "", require_config: bool = True,
               hub: bool = True) -> Checkpoint:
    """The checkpoint a model reference names: a full model folder or Hub id as :class:`Checkpoint`;
    ``BASE+ADAPTER``, or an adapter-only folder/repo (base from its ``base_model_name_or_path``), as an
    :class:`AdaptedCheckpoint`. Errors are one line naming the reference (and ``where``).

    ``hub=False``: a reference without ``+`` is a local folder only, as the commands that took folders
    always read it (their messages unchanged); the sides of ``BASE+ADAPTER`` may always be Hub ids."""
    ref = str(ref)
    parsed = parse_reference(ref, base_dir=base_dir, where=where)
    ctx = f" ({where})" if where else ""
    if parsed.adapter is None:
        path = _resolve(parsed.base, base_dir, where) if hub else Path(ref)
        if not is_adapter_dir(path):
            return Checkpoint.open(path, require_config=require_config)
        cfg = read_adapter_config(path)
        if not cfg.base_model:
            raise CheckpointError(f"{path}: a LoRA adapter whose {ADAPTER_CONFIG} has no base_model_name_or_path; "
                                  f"name its base: BASE+{ref}{ctx}")
        try:
            base_path = _resolve(cfg.base_model, base_dir, f"base_model_name_or_path of {path / ADAPTER_CONFIG}")
        except MergeQuantError as e:
            raise CheckpointError(f"{e}; if the base is elsewhere (a local copy, a renamed repo), name it: "
                                  f"BASE+{ref}") from None
        return _adapted(ref, base_path, path, cfg, base=cfg.base_model, adapter=parsed.base, from_config=True,
                        require_config=require_config)
    base_path = _resolve(parsed.base, base_dir, where)
    adapter_path = _resolve(parsed.adapter, base_dir, where)
    if is_adapter_dir(base_path):
        raise CheckpointError(f"{ref}: the base {parsed.base} is itself a LoRA adapter; the base of BASE+ADAPTER is a full "
                              f"model{ctx}")
    if not adapter_path.is_dir():
        raise CheckpointError(f"{adapter_path}: expected an adapter folder, found a file{ctx}")
    cfg = read_adapter_config(adapter_path)
    return _adapted(ref, base_path, adapter_path, cfg, base=parsed.base, adapter=parsed.adapter, from_config=False,
                    require_config=require_config)


def _adapted(ref: str, base_path: Path, adapter_path: Path, cfg: AdapterConfig, *, base: str, adapter: str,
             from_config: bool, require_config: bool) -> AdaptedCheckpoint:
    base_ck = Checkpoint.open(base_path, require_config=require_config)
    if isinstance(base_ck, AdaptedCheckpoint):  # pragma: no cover - Checkpoint.open never returns one
        raise CheckpointError(f"{ref}: adapters do not stack")
    if base_ck.config.get("quantization_config"):
        raise CheckpointError(f"{base_path}: the base of {ref} is quantized; LoRA adapters apply to full-precision "
                              "bases only")
    info = AdapterInput(ref, adapter, adapter_path, base, base_path, from_config, cfg.describe(), 0, 0)
    return AdaptedCheckpoint(base_ck, cfg, info)


def adapter_inputs(checkpoints) -> list[AdapterInput]:
    """The :class:`AdapterInput` of every adapted checkpoint among ``checkpoints`` (a list or a dict's values)."""
    items = checkpoints.values() if isinstance(checkpoints, dict) else checkpoints
    out = []
    for c in items:
        c = getattr(c, "inner", c)  # a PerExpertView over an adapted checkpoint
        if isinstance(c, AdaptedCheckpoint):
            out.append(c.adapter)
    return out


def adapter_notes(checkpoints) -> list[str]:
    """One log line per adapted checkpoint among ``checkpoints`` (a list or a dict's values)."""
    items = checkpoints.values() if isinstance(checkpoints, dict) else checkpoints
    return [c.note for c in (getattr(c, "inner", c) for c in items) if isinstance(c, AdaptedCheckpoint)]


def tokenizer_dir(ck: Checkpoint) -> Path:
    """Where ``ck``'s tokenizer files are: its folder, or for an adapted model see :attr:`AdaptedCheckpoint.tokenizer_path`."""
    ck = getattr(ck, "inner", ck)
    return ck.tokenizer_path if isinstance(ck, AdaptedCheckpoint) else ck.path


def model_dirs(ck: Checkpoint) -> list[Path]:
    """Every folder ``ck`` reads (the base and the adapter for an adapted model): what an output must not replace."""
    ck = getattr(ck, "inner", ck)
    return ck.input_dirs if isinstance(ck, AdaptedCheckpoint) else [ck.path]


def source_name(ck: Checkpoint) -> str:
    """How outputs name the model ``ck`` is: the reference as written for an adapted model, else its folder."""
    ck = getattr(ck, "inner", ck)
    return ck.adapter.reference if isinstance(ck, AdaptedCheckpoint) else str(ck.path)


def adapter_of(ck: Checkpoint) -> AdapterInput | None:
    """``ck``'s :class:`AdapterInput` when it is an adapted model, else None."""
    ck = getattr(ck, "inner", ck)
    return ck.adapter if isinstance(ck, AdaptedCheckpoint) else None
