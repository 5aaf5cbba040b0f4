"""Turn model references (local paths or Hub ids) into local directories."""

from __future__ import annotations

import os
import re
from pathlib import Path

from mergequant.errors import CheckpointError

# adapter_model.bin: PEFT adapters saved as pickles, read only with torch.load(weights_only=True) (mergequant/peft)
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.py", "adapter_model.bin"]


HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def looks_like_hub_id(ref: str) -> bool:
    """``namespace/name[@revision]`` that is not a relative or absolute path."""
    return bool(HUB_ID_RE.match(ref)) and not ref.startswith((".", "/", "~"))


def resolve_model(ref: str, *, base_dir: Path | None = None, where: str = "") -> Path:
    """A local directory for ``ref``.

    Local paths are tried as given (relative to the working directory), then relative to
    ``base_dir`` (the recipe's folder). Anything else that looks like ``namespace/name`` is
    fetched with ``huggingface_hub.snapshot_download`` (weights as safetensors only); offline,
    a cached snapshot is used if present, else a clear error.
    """
    p = Path(ref).expanduser()
    if p.exists():
        return p
    if base_dir is not None and not p.is_absolute() and (base_dir / p).exists():
        return base_dir / p
    ctx = f" ({where})" if where else ""
    if not looks_like_hub_id(ref):
        raise CheckpointError(f"{ref}: model path does not exist{ctx}")
    repo, _, revision = ref.partition("@")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a core dependency
        raise CheckpointError(f"{ref}: not a local path and huggingface_hub is not installed{ctx}") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=DOWNLOAD_PATTERNS,
                                      local_files_only=offline))
    except RepositoryNotFoundError:
        raise CheckpointError(f"{ref}: no such local path, and no such model on the Hub (or it is gated/private: log in){ctx}") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{ref}: not a local path and not in the Hub cache; the Hub cannot be reached"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ' (offline?)'}{ctx}. Download it first or give a local path."
        ) from None
    except Exception as e:  # network errors of every flavour
        raise CheckpointError(f"{ref}: cannot download from the Hub: {type(e).__name__}: {e}{ctx}") from None


def containment_root(folder: Path) -> Path:
    """The folder a model's weight files must resolve inside (symlinks followed).

    Normally the model folder itself. A Hub cache snapshot (``models--org--name/snapshots/<rev>/``) is
    a folder of symlinks into the same repo's ``blobs/``, so for it the root is the repo's cache folder:
    a snapshot file may point at its own blobs, never at anything outside that repo."""
    real = Path(folder).resolve()
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        return real.parent.parent
    return real
