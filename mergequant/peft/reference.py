"""``BASE+ADAPTER`` model references (mergekit's syntax): parsing only, no I/O beyond an existence test.

Each side is a local path or a Hub id, optionally with ``@revision`` (``org/base@main+org/lora@v2``). A
reference naming an existing local path is that path even if it contains ``+`` (a folder called
``model+v2`` stays usable); otherwise the first ``+`` splits it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mergequant.errors import MergeQuantError

SEPARATOR = "+"


@dataclass(frozen=True)
class ModelReference:
    """A model as written: ``base`` (path or Hub id, maybe ``@rev``) and the ``adapter`` applied to it, if any."""

    base: str
    adapter: str | None = None

    def __str__(self) -> str:
        return self.base if self.adapter is None else f"{self.base}{SEPARATOR}{self.adapter}"


def _exists(ref: str, base_dir: Path | None) -> bool:
    p = Path(ref).expanduser()
    return p.exists() or (base_dir is not None and not p.is_absolute() and (base_dir / p).exists())


def parse_reference(ref: str, *, base_dir: Path | None = None, where: str = "") -> ModelReference:
    """Split ``ref`` into base and adapter. One line naming ``where`` for an empty side or a second ``+``."""
    ref = str(ref)
    if SEPARATOR not in ref or _exists(ref, base_dir):
        return ModelReference(ref)
    base, _, adapter = ref.partition(SEPARATOR)
    ctx = f" ({where})" if where else ""
    if not base.strip() or not adapter.strip():
        raise MergeQuantError(f"{ref}: a model reference with an adapter is BASE+ADAPTER; the "
                              f"{'base' if not base.strip() else 'adapter'} is missing{ctx}")
    if SEPARATOR in adapter and not _exists(adapter, base_dir):
        raise MergeQuantError(f"{ref}: one adapter per model (BASE+ADAPTER); to apply several, merge them{ctx}")
    return ModelReference(base.strip(), adapter.strip())


def has_adapter(ref: str, base_dir: Path | None = None) -> bool:
    """Whether ``ref`` is written as ``BASE+ADAPTER`` (cheap: no folder is opened)."""
    try:
        return parse_reference(ref, base_dir=base_dir).adapter is not None
    except MergeQuantError:
        return True  # malformed, but meant as one: the caller's resolution reports it
