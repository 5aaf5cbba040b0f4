"""Write a PEFT LoRA folder: ``adapter_config.json``, ``adapter_model.safetensors`` and a README.md card.

Used by ``extract-lora`` and by merges whose recipe asks for ``output: adapter``. Both hand over one
module at a time, so the tensors are streamed: a factor's shape is only known once its SVD has chosen a
rank, so each tensor is appended to a spill file as it comes, and the safetensors file is the header
(written last, when every name and shape is known) followed by the spill's bytes. Memory holds one
module's factors at most; disk holds the adapter twice, briefly (adapters are small).

Format (peft 0.21, see the module notes in docs/extract-lora.md):

- ``base_model.model.<module>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r] for Linear modules,
  ``.lora_B.bias`` [out] with ``lora_bias``;
- ``base_model.model.<module>.lora_embedding_A`` [r, vocab] and ``.lora_embedding_B`` [dim, r] for
  embeddings (``E' = E + s (B A)^T``);
- ``base_model.model.<module>.weight`` (and ``.bias``) for ``modules_to_save``: the whole replacement.

``lora_alpha = r`` and ``alpha_pattern = rank_pattern`` make the scale ``alpha / r`` exactly 1 for every
module, so ``W' = W + B @ A`` (what mergekit writes too).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergequant import __version__
from mergequant.io.safetensors_format import dtype_itemsize
from mergequant.io.writer import PlannedTensor, plan_shards, pwrite_all, write_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
SPILL = ".adapter_model.spill"
# Leaf names of input-embedding modules (LoRA on them is ``lora_embedding_A/B``, transposed).
EMBEDDING_LEAVES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")


def is_embedding(module: str) -> bool:
    return module.rsplit(".", 1)[-1] in EMBEDDING_LEAVES


def module_type(module: str) -> str:
    """What the card groups errors by: the module's leaf name (``q_proj``, ``embed_tokens``, ``lm_head``)."""
    return module.rsplit(".", 1)[-1]


@dataclass
class ModuleRecord:
    """One module written as LoRA: its rank and relative reconstruction error, for the config and card."""

    module: str
    rank: int
    error: float
    norm_sq: float  # ||delta||_F^2, to weigh the per-type errors
    shape: tuple[int, int]
    embedding: bool = False


@dataclass
class AdapterContents:
    """What was written: LoRA modules, modules kept whole, and notes for the card."""

    lora: list[ModuleRecord] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)  # modules_to_save (full module names)
    lora_bias: bool = False
    notes: list[str] = field(default_factory=list)


class AdapterTensorWriter:
    """Append tensors (any order, shapes decided late) to a spill file; ``finish`` writes the safetensors file."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.planned: list[PlannedTensor] = []
        self._names: set[str] = set()
        self._fd = os.open(folder / SPILL, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pos = 0

    def add(self, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
        if name in self._names:
            raise RuntimeError(f"internal error: adapter tensor {name} written twice")
        t = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        pwrite_all(self._fd, data, self._pos)
        self._pos += t.numel() * dtype_itemsize(dtype)
        self._names.add(name)
        self.planned.append(PlannedTensor(name, dtype, tuple(t.shape)))

    @property
    def nbytes(self) -> int:
        return self._pos

    def finish(self, fsync: bool = True) -> Path:
        """Header + the spill's bytes (the data offsets follow the order the tensors were added in)."""
        shard = plan_shards(self.planned, 1 << 62)[0]
        out = self.folder / ADAPTER_WEIGHTS
        with open(out, "wb") as f:
            f.write(shard.header)
            f.flush()
            os.lseek(self._fd, 0, os.SEEK_SET)
            with os.fdopen(os.dup(self._fd), "rb") as src:
                shutil.copyfileobj(src, f, 16 << 20)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        self.close()
        os.unlink(self.folder / SPILL)
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _compact_targets(lora: list[str], all_linear: list[str]) -> list[str]:
    """target_modules as peft matches them (exact name or ``.``-suffix): a leaf name (``q_proj``) when every
    2-D module of the base with that leaf is in the adapter, else the full module names."""
    by_leaf = defaultdict(set)
    for m in all_linear:
        by_leaf[module_type(m)].add(m)
    chosen = set(lora)
    out = []
    for leaf in sorted({module_type(m) for m in lora}):
        mods = sorted(m for m in chosen if module_type(m) == leaf)
        out.extend([leaf] if by_leaf[leaf] <= chosen else mods)
    return out


def adapter_config(contents: AdapterContents, *, base_ref: str, all_modules: list[str], task_type: str | None) -> dict:
    """The ``adapter_config.json`` of an adapter with per-module ranks and scale 1."""
    ranks = {r.module: r.rank for r in contents.lora}
    r = max(ranks.values()) if ranks else 1
    pattern = {m: k for m, k in ranks.items() if k != r}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_ref,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": _compact_targets(list(ranks), all_modules),
        "modules_to_save": list(contents.saved) or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": contents.lora_bias,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def error_table(records: list[ModuleRecord]) -> list[tuple[str, int, str, float, float]]:
    """Per module type: (type, modules, ranks min-max, overall relative error, worst module's error).
    The overall error weighs modules by their delta's squared norm: sqrt(sum err^2 |D|^2 / sum |D|^2),
    the relative error of all those modules' deltas taken together."""
    groups: dict[str, list[ModuleRecord]] = defaultdict(list)
    for r in records:
        groups[module_type(r.module)].append(r)
    rows = []
    for t, rs in groups.items():
        tot = sum(r.norm_sq for r in rs)
        overall = (sum(r.error ** 2 * r.norm_sq for r in rs) / tot) ** 0.5 if tot else 0.0
        lo, hi = min(r.rank for r in rs), max(r.rank for r in rs)
        rows.append((t, len(rs), str(lo) if lo == hi else f"{lo}-{hi}", overall, max(r.error for r in rs)))
    return rows


def adapter_card(contents: AdapterContents, *, base_ref: str, base_dir: Path | None, source_lines: list[str],
                 settings: list[tuple[str, str]], title: str, license: str | None = None,
                 extra_tags: list[str] = ()) -> str:
    """README.md: ``base_model`` + ``base_model_relation: adapter`` when the base is a Hub id (a local base
    is recorded for ``push --base-model-map``), how it was made, and the reconstruction error per type."""
    from mergequant.card import MODEL_PATH_PLACEHOLDER, _local_path, _parents_mark, front_matter, hub_parents

    parents = hub_parents([base_ref], base_dir)
    meta: dict = {}
    if parents:
        meta["base_model"] = parents
        meta["base_model_relation"] = "adapter"
    meta["library_name"] = "peft"
    meta["tags"] = ["mergequant", "lora", "peft", *extra_tags]
    if license:
        meta["license"] = license
    lines = [front_matter(meta), f"# {title}\n",
             f"A LoRA adapter (PEFT format) made with [mergequant](https://github.com/mergequant/mergequant) {__version__}.\n",
             f"Base model: `{base_ref}`" + ("" if parents else " (local path)") + "\n"]
    if not parents:
        lines += [_parents_mark("adapter", [{"ref": base_ref, "path": _local_path(base_ref, base_dir)}]), ""]
    lines += [*source_lines, "", "## Settings\n", "| setting | value |", "|---|---|",
              *[f"| {k} | {v} |" for k, v in settings], ""]
    rows = error_table(contents.lora)
    lines += ["## Reconstruction error\n",
              "Relative Frobenius error `||D - B A|| / ||D||` of each module's delta `D`, per module type "
              "(overall: all modules of the type together).\n",
              "| module type | modules | rank | overall error | worst module |", "|---|--:|--:|--:|--:|",
              *[f"| {t} | {n} | {rk} | {ov:.2e} | {worst:.2e} |" for t, n, rk, ov, worst in rows], ""]
    if contents.saved:
        lines += [f"Kept whole (`modules_to_save`, exact): {len(contents.saved)} module(s): "
                  + ", ".join(f"`{m}`" for m in contents.saved[:12]) + (" ..." if len(contents.saved) > 12 else ""), ""]
    lines += [*[f"Note: {n}.\n" for n in contents.notes], "## Loading\n", "```python",
              "from peft import PeftModel",
              "from transformers import AutoModelForCausalLM",
              f'base = AutoModelForCausalLM.from_pretrained("{base_ref}")',
              f'model = PeftModel.from_pretrained(base, "{MODEL_PATH_PLACEHOLDER}")',
              "```", ""]
    return "\n".join(lines)


def write_adapter_files(folder: Path, contents: AdapterContents, config: dict, card: str) -> None:
    write_json(folder / ADAPTER_CONFIG, config)
    (folder / "README.md").write_text(card, encoding="utf-8")


def is_adapter_folder(path: Path) -> bool:
    """A folder holding a PEFT adapter (what ``--force`` may replace)."""
    return (path / ADAPTER_CONFIG).is_file()


def adapter_bytes(rank: int, shape: tuple[int, int], dtype: torch.dtype) -> int:
    return rank * (shape[0] + shape[1]) * dtype_itemsize(dtype)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
