"""Models with a LoRA adapter in a release (``BASE+ADAPTER``, an adapter-only folder): which folders they read.

A release reads such a model in two places: ``merge: {model: ...}`` (quantized without a merge) and a merge
recipe's parents. Both are read through :func:`mergequant.peft.adapted.open_model` (the adapter applied tensor
by tensor; no merged copy is ever written), but the release needs two things before it opens anything: the
folders behind each side, so that the skip decision covers the base's files AND the adapter's (a changed
adapter redoes what read it) and no output may overlap either; and nothing downloaded just to decide a skip.

:func:`adapter_sides` resolves the two sides as ``open_model`` does (a local path as given, then relative to
``base_dir``; anything else a Hub id; an adapter-only folder's base from its ``base_model_name_or_path``),
reading at most the adapter's ``adapter_config.json``. :func:`sides_identity` is their fingerprint: each
local side by :func:`mergequant.release.hashing.dir_fingerprint`, a Hub side by its reference string (as a Hub
merge parent: pin a revision). References without an adapter keep their identities unchanged.
"""

from __future__ import annotations

from pathlib import Path

from mergequant.release.hashing import dir_fingerprint


def local_side(ref: str, base_dir: Path | None) -> Path | None:
    """The local path ``ref`` names (as given, then relative to ``base_dir``), as
    :func:`mergequant.io.resolve.resolve_model` finds it; None when it is not local (a Hub id)."""
    p = Path(ref).expanduser()
    if p.exists():
        return p
    if base_dir is not None and not p.is_absolute() and (base_dir / p).exists():
        return base_dir / p
    return None


def adapter_sides(ref: str, base_dir: Path | None) -> dict[str, tuple[str, Path | None]] | None:
    """``{"base": (reference, local folder or None), "adapter": (...)}`` of a model with a LoRA adapter;
    None for any other reference (a model folder, a Hub id). Opens nothing but an adapter-only folder's
    ``adapter_config.json`` (a malformed one is refused in one line, as ``open_model`` would)."""
    from mergequant.peft.config import is_adapter_dir, read_adapter_config
    from mergequant.peft.reference import parse_reference

    parsed = parse_reference(str(ref), base_dir=base_dir)
    if parsed.adapter is not None:
        return {"base": (parsed.base, local_side(parsed.base, base_dir)),
                "adapter": (parsed.adapter, local_side(parsed.adapter, base_dir))}
    p = local_side(parsed.base, base_dir)
    if p is None or not is_adapter_dir(p):
        return None
    base = read_adapter_config(p).base_model  # None: open_model refuses it (name the base: BASE+ADAPTER)
    return {"base": (base or "", local_side(base, base_dir) if base else None), "adapter": (parsed.base, p)}


def sides_identity(sides: dict[str, tuple[str, Path | None]]) -> dict[str, str]:
    """``{"base": ..., "adapter": ...}``: each local folder's :func:`dir_fingerprint`, a Hub side's reference."""
    return {role: dir_fingerprint(p) if p is not None and p.is_dir() else f"hub:{ref}"
            for role, (ref, p) in sides.items()}


def side_dirs(sides: dict[str, tuple[str, Path | None]]) -> list[tuple[str, Path]]:
    """(role, local folder) of each local side: what no output may overlap."""
    return [(role, p) for role, (_, p) in sides.items() if p is not None]
