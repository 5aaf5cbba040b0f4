"""`mergequant push`: check a model folder, fix up its card for the Hub, upload it with huggingface_hub.

Pure helpers (no network): :func:`plan_upload` (files and sizes), :func:`validate_folder` (the
folder is a complete checkpoint and no file is over the Hub's limit), :func:`rewrite_card` (from
:mod:`mergequant.card`: local parents -> Hub ids, loading snippet -> the repo). :func:`push` does
the I/O: ``HfApi(endpoint=, token=)``, ``create_repo(exist_ok=True)``, then one commit made of the
folder's files plus the rewritten README as an in-memory operation, so the input folder is never
modified. Files the Hub already has (same content at the same path) are skipped by
huggingface_hub, so pushing an unchanged folder again uploads nothing.

The token is resolved here (``--token``, else ``HF_TOKEN``, else the saved login) and never
printed: every message leaving this module has it replaced by ``***``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mergequant.card import CardError, check_mapping, rewrite_card, split_card, validate_meta
from mergequant.errors import MergeQuantError

DEFAULT_ENDPOINT = "https://huggingface.co"
# The Hub refuses single files over 50 GB stored through LFS (Xet raises it; 50 GB is what every path takes).
MAX_FILE_BYTES = 50 * 1000**3
# Never uploaded: VCS and cache folders, editor/OS litter, our own temporary files.
IGNORE_PATTERNS = (".git/*", ".cache/*", "*/.cache/*", ".huggingface/*", "__pycache__/*", "*/__pycache__/*",
                   ".DS_Store", "*/.DS_Store", "*.tmp", "*.partial", ".ipynb_checkpoints/*")
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
CARD = "README.md"
REPO_PART_MAX = 96  # characters in a namespace or a name (the Hub's limit, as huggingface_hub checks it)
_REPO_CHARS = re.compile(r"[A-Za-z0-9._-]")


class PushError(MergeQuantError):
    """The push cannot proceed (folder incomplete, bad card, offline, auth, network)."""


@dataclass(frozen=True)
class PlannedFile:
    path: str  # posix path inside the repo
    size: int
    source: Path  # the regular file on disk that is read (a link's target, resolved)
    link: str | None = None  # when ``path`` goes through a link: the file it resolves to, relative to the folder


@dataclass
class PushOptions:
    repo: str
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None
    token: str | None = None
    endpoint: str | None = None
    dry_run: bool = False
    base_model_map: dict[str, str] = field(default_factory=dict)
    plot: Path | None = None  # an image (a release's results.png) uploaded beside the weights and shown in the card


@dataclass
class PushResult:
    repo: str
    files: list[PlannedFile]
    card: str | None  # the README.md that is (or would be) uploaded
    dry_run: bool = False
    repo_url: str | None = None
    commit_url: str | None = None
    pr_url: str | None = None
    changed: list[str] = field(default_factory=list)  # paths whose content the Hub did not have yet

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


# ---- pure helpers ------------------------------------------------------------------------------------
def _ignored(rel: str) -> bool:
    return any(fnmatch.fnmatch(rel, pat) for pat in IGNORE_PATTERNS)


def _within(path: str, root: str) -> bool:
    """Whether the resolved ``path`` is ``root`` or lies inside it (both already resolved)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _not_regular(mode: int) -> str:
    """What a non-regular, non-directory file is, in words (for the refusal)."""
    for test, what in ((stat.S_ISFIFO, "a fifo"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "not a regular file"


def _walk(folder: Path, root: str, rel_dir: str, real_dir: str, open_dirs: tuple[str, ...]) -> list[PlannedFile]:
    """The files under ``real_dir`` (shown as ``rel_dir``), each resolved to the real file it reads.

    Links are followed only to check where they lead: anything resolving outside ``root`` (the
    folder, resolved) is refused, so a link to ``/etc/passwd`` or ``~/.ssh`` is never read, let alone
    sent. Fifos, sockets and devices are refused (reading one blocks or streams forever), and so
    is a link back to a folder being walked (it would never end). Ignored paths are skipped first:
    what is never uploaded is not examined."""
    out = []
    with os.scandir(real_dir) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
        if _ignored(rel) or _ignored(rel + "/"):
            continue
        shown = folder / rel
        real = os.path.realpath(entry.path)
        if not _within(real, root):
            raise PushError(f"{shown}: a link to {real}, outside the folder: refused, nothing was sent "
                            "(copy the file into the folder, e.g. cp -L, to upload it)")
        try:
            st = os.stat(real)
        except OSError:
            raise PushError(f"{shown}: a link to {real}, which does not exist: refused, nothing was sent") from None
        if stat.S_ISDIR(st.st_mode):
            if real in open_dirs:
                raise PushError(f"{shown}: a link to {real}, a folder that contains it (a loop): refused, nothing was sent")
            out += _walk(folder, root, rel, real, open_dirs + (real,))
        elif stat.S_ISREG(st.st_mode):
            target = Path(real).relative_to(root).as_posix()
            out.append(PlannedFile(rel, st.st_size, Path(real), None if target == rel else target))
        else:
            raise PushError(f"{shown}: {_not_regular(st.st_mode)}, not a regular file: refused, nothing was sent")
    return out


def plan_upload(folder: str | Path) -> list[PlannedFile]:
    """Every file under ``folder`` that would be uploaded (sorted, ignoring VCS/cache litter), with sizes.

    Only regular files inside the folder: a link is listed with the file it resolves to when that
    file is inside the folder, and refused otherwise (see :func:`_walk`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder}: not a directory" if folder.exists() else f"{folder}: does not exist")
    root = os.path.realpath(folder)
    return sorted(_walk(folder, root, "", root, (root,)), key=lambda f: f.path)


def _json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise PushError(f"{path}: invalid JSON ({e})") from None


def validate_folder(folder: str | Path, files: list[PlannedFile] | None = None) -> None:
    """Raise PushError unless ``folder`` is a complete checkpoint that the Hub will accept.

    config.json parses; weights exist; with a safetensors index, the shards it names are exactly the
    .safetensors files present, every tensor it lists is in the header of its shard (and no shard
    holds a tensor the index does not list); every safetensors header parses; no file exceeds
    :data:`MAX_FILE_BYTES`."""
    from mergequant.io.safetensors_format import read_header

    folder = Path(folder)
    files = plan_upload(folder) if files is None else files
    names = {f.path for f in files}
    for f in files:
        if f.size > MAX_FILE_BYTES:
            raise PushError(f"{f.source}: {f.size / 1e9:.1f} GB is over the Hub's per-file limit of "
                            f"{MAX_FILE_BYTES / 1e9:.0f} GB; re-shard it (e.g. mergequant merge/quantize --shard-size 5GB)")
    if "config.json" not in names and "adapter_config.json" in names:
        validate_adapter_folder(folder, names)  # a PEFT adapter (extract-lora, a merge with output: adapter)
        return
    if "config.json" not in names and any(n.endswith(".gguf") for n in names):
        validate_gguf_folder(folder, files)  # llama.cpp files (quantize --method gguf): no config.json, no safetensors
        return
    if "config.json" not in names:
        raise PushError(f"{folder}: no config.json (is this a model folder?)")
    from mergequant.io.model_files import read_config

    try:  # the same type checks as every other command (counts are integers, architectures a list, ...)
        read_config(folder)
    except MergeQuantError as e:
        raise PushError(str(e)) from None
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    bins = sorted(n for n in names if n.endswith(".bin") and n.rsplit("/", 1)[-1] != "training_args.bin")
    if SAFE_INDEX in names:
        index = _json(folder / SAFE_INDEX)
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
            raise PushError(f"{folder / SAFE_INDEX}: invalid index (expected a non-empty weight_map object)")
        listed = sorted(set(wm.values()))
        missing = [s for s in listed if s not in names]
        if missing:
            raise PushError(f"{folder}: incomplete checkpoint: the index lists {len(missing)} shard(s) that are not in "
                            f"the folder: {', '.join(missing)}")
        extra = [s for s in shards if s not in listed]
        if extra:
            raise PushError(f"{folder}: shard(s) {', '.join(extra)} are in the folder but not in {SAFE_INDEX} "
                            "(a leftover from another save?); remove them or fix the index")
        headers = {s: read_header(folder / s)[0] for s in listed}
        for name, shard in wm.items():
            if name not in headers[shard]:
                raise PushError(f"{folder / shard}: tensor {name} is listed in the index but missing from the shard")
        for shard, entries in headers.items():
            stray = [n for n in entries if wm.get(n) != shard]
            if stray:
                raise PushError(f"{folder / shard}: holds {len(stray)} tensor(s) the index does not map to it "
                                f"(e.g. {stray[0]}); the index is stale")
    elif shards:
        if len(shards) > 1 and not any(s.endswith(("adapter_model.safetensors",)) for s in shards):
            raise PushError(f"{folder}: {len(shards)} safetensors files but no {SAFE_INDEX}: loaders cannot find the shards")
        for s in shards:
            read_header(folder / s)
    elif bins:
        if BIN_INDEX in names:
            index = _json(folder / BIN_INDEX)
            wm = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(wm, dict):
                raise PushError(f"{folder / BIN_INDEX}: invalid index (expected a weight_map object)")
            missing = sorted(set(wm.values()) - names)
            if missing:
                raise PushError(f"{folder}: incomplete checkpoint: the index lists shard(s) not in the folder: {', '.join(missing)}")
        from mergequant.io.checkpoint import Checkpoint

        try:  # a .bin has no header to check: load it as every command does (weights_only, memory-mapped)
            Checkpoint.open(folder)
        except MergeQuantError as e:
            raise PushError(str(e)) from None
    else:
        raise PushError(f"{folder}: no weights (expected *.safetensors or pytorch_model*.bin)")


def validate_adapter_folder(folder: Path, names: set[str]) -> None:
    """A PEFT adapter folder: adapter_config.json is a LoRA-style config object, and the adapter weights
    exist (safetensors: its header parses; a pickled adapter_model.bin is uploaded as is, never loaded)."""
    from mergequant.io.safetensors_format import read_header

    cfg = _json(folder / "adapter_config.json")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("peft_type"), str):
        raise PushError(f"{folder / 'adapter_config.json'}: not a PEFT adapter config (expected an object with peft_type)")
    if "adapter_model.safetensors" in names:
        read_header(folder / "adapter_model.safetensors")
    elif "adapter_model.bin" not in names:
        raise PushError(f"{folder}: adapter_config.json but no adapter weights (adapter_model.safetensors)")


GGUF_MAGIC = b"GGUF"


def validate_gguf_folder(folder: Path, files: list[PlannedFile]) -> None:
    """A folder of GGUF files (``quantize --method gguf``, a release's gguf step): every ``.gguf`` starts with
    GGUF's header (magic, version 2 or 3, tensor and metadata counts), read from the real file inside the folder
    (:func:`plan_upload` refused links out of it); no safetensors or pickled weights beside them (a mix of
    formats in one repo is a mistake, e.g. the wrong folder)."""
    import struct

    ggufs = [f for f in files if f.path.endswith(".gguf")]
    others = [f.path for f in files if f.path.endswith((".safetensors", ".bin", ".pt", ".pth"))]
    if others:
        raise PushError(f"{folder}: GGUF files next to other weights ({', '.join(others[:3])}): push one format per repo")
    for f in ggufs:
        with open(f.source, "rb") as fh:
            head = fh.read(24)
        if len(head) < 24 or head[:4] != GGUF_MAGIC:
            raise PushError(f"{folder / f.path}: not a GGUF file (no GGUF header)")
        version, = struct.unpack("<I", head[4:8])
        if version not in (2, 3):
            raise PushError(f"{folder / f.path}: GGUF version {version} (llama.cpp reads versions 2 and 3)")


def prepare_card(folder: str | Path, repo: str, mapping: dict[str, str] | None = None) -> str | None:
    """The README.md to upload (rewritten for ``repo``), or None when the folder has no card."""
    path = Path(folder) / CARD
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PushError(f"{path}: not UTF-8 text") from None
    try:
        return rewrite_card(text, mapping or {}, repo)
    except CardError as e:
        raise PushError(f"{path}: {str(e).removeprefix('README.md: ')}") from None


def repo_id_problem(repo: object) -> str | None:
    """Why ``repo`` is not a model repo id ``namespace/name`` the Hub accepts; None when it is one.

    The one check for every push (dry run or real, ``mergequant push`` or a release file), so a
    dry run never approves an id the real push then refuses. At least as strict as
    :func:`huggingface_hub.utils.validate_repo_id` (which is applied last), and stricter where that
    one is loose: exactly one ``/`` (a namespace is required), ASCII only (its ``\\w`` takes any
    Unicode letter), and each part checked on its own."""
    if not isinstance(repo, str) or not repo:
        return "empty"
    if repo.count("/") != 1:
        return f"expected exactly one '/' between namespace and name, found {repo.count('/')}"
    for label, part in zip(("namespace", "name"), repo.split("/")):
        bad = next((c for c in part if not _REPO_CHARS.fullmatch(c)), None)
        if not part:
            return f"the {label} is empty"
        if len(part) > REPO_PART_MAX:
            return f"the {label} is {len(part)} characters long (at most {REPO_PART_MAX})"
        if bad is not None:
            return f"the {label} contains {bad!r} (allowed: letters, digits, '-', '_', '.')"
        if part[0] in "-." or part[-1] in "-.":
            return f"the {label} starts or ends with '-' or '.'"
        if "--" in part or ".." in part:
            return f"the {label} contains '--' or '..'"
    if repo.endswith(".git"):
        return "the name ends with '.git'"
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        return " ".join(str(e).split())
    return None


def branch_name_problem(name: str) -> str | None:
    """Why ``name`` is not a git branch name (git check-ref-format's rules, which the Hub applies);
    None when it is. Checked before any request, so ``--revision ../x`` fails the same way offline."""
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 or c in "~^:?*[\\" for c in name):
        return "no spaces, control characters or any of ~ ^ : ? * [ \\"
    if ".." in name or "@{" in name or "//" in name:
        return "no '..', '@{' or '//'"
    if name.startswith(("-", "/", ".")) or name.endswith(("/", ".", ".lock")) or "/." in name or name == "@":
        return "no leading '-', '/' or '.', no trailing '/', '.' or '.lock', no component starting with '.'"
    return None


def public_endpoint(endpoint: str) -> str:
    """``endpoint`` without credentials (``https://user:secret@host`` -> ``https://host``) for messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(endpoint)
    if parts.username is None and parts.password is None:
        return endpoint
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def check_options(opts: PushOptions) -> None:
    """Option errors found before anything is read or sent."""
    repo = opts.repo
    problem = repo_id_problem(repo)
    if problem:
        raise PushError(f"--repo {repo!r}: expected a Hub repo id namespace/name (e.g. my-org/my-merge): {problem}")
    if opts.create_pr and opts.revision not in (None, "", "main"):
        raise PushError(f"--create-pr opens a pull request against main; it cannot be combined with --revision "
                        f"{opts.revision!r} (push to the branch without --create-pr, or drop --revision)")
    if opts.revision is not None and (not opts.revision.strip() or opts.revision.startswith("refs/pr/")):
        raise PushError(f"--revision {opts.revision!r}: expected a branch name")
    if opts.revision is not None and branch_name_problem(opts.revision):
        raise PushError(f"--revision {opts.revision!r}: not a valid branch name ({branch_name_problem(opts.revision)})")
    if opts.commit_message is not None and not opts.commit_message.strip():
        raise PushError("--commit-message must not be empty")
    try:
        check_mapping(opts.base_model_map)
    except CardError as e:
        raise PushError(str(e)) from None


def plan_push(folder: str | Path, opts: PushOptions) -> PushResult:
    """Everything a push checks, without the network: options, folder, card. Returns the plan."""
    check_options(opts)
    files = plan_upload(folder)
    validate_folder(folder, files)
    card = prepare_card(folder, opts.repo, opts.base_model_map)
    if card is not None:
        on_disk = next(f for f in files if f.path == CARD)
        files = [f for f in files if f.path != CARD] + [PlannedFile(CARD, len(card.encode()), on_disk.source, on_disk.link)]
        files.sort(key=lambda f: f.path)
    if opts.plot is not None:
        files, card = _attach_plot(Path(folder), files, card, Path(opts.plot))
    return PushResult(repo=opts.repo, files=files, card=card, dry_run=True)


def _attach_plot(folder: Path, files: list[PlannedFile], card: str | None, plot: Path) -> tuple[list[PlannedFile], str | None]:
    """Add ``plot`` to the upload as results.png and show it in the card (see :func:`embed_plot`)."""
    from mergequant.card import PLOT_FILE, embed_plot

    if any(f.path == PLOT_FILE for f in files):
        raise PushError(f"{folder / PLOT_FILE}: the folder already has a {PLOT_FILE}; the release's plot would replace it")
    if not plot.is_file():
        raise PushError(f"{plot}: the plot to attach is missing")
    files = sorted([*files, PlannedFile(PLOT_FILE, plot.stat().st_size, plot.resolve())], key=lambda f: f.path)
    return files, (embed_plot(card) if card is not None else None)


def _label(f: PlannedFile) -> str:
    """The file as listed: its path in the repo, and where it really is when that is through a link."""
    return f"{f.path} -> {f.link}" if f.link else f.path


def _notes(f: PlannedFile) -> list[str]:
    return (["link inside the folder"] if f.link else []) + (["card, rewritten for the Hub"] if f.path == CARD else [])


def describe_plan(res: PushResult) -> str:
    """What --dry-run prints: the files and sizes, then the card."""
    from mergequant.units import format_bytes

    width = max((len(_label(f)) for f in res.files), default=0)
    lines = [f"would push {len(res.files)} file(s), {format_bytes(res.total_bytes)} to {res.repo}:"]
    lines += [f"  {_label(f):<{width}}  {format_bytes(f.size):>10}" + "".join(f"  ({n})" for n in _notes(f)) for f in res.files]
    if res.card is not None:
        lines += ["", "README.md as it would be uploaded:", "", res.card.rstrip("\n")]
    else:
        lines += ["", "(no README.md: the repo will have no model card)"]
    return "\n".join(lines)


# ---- I/O ---------------------------------------------------------------------------------------------
def _truthy(v: str | None) -> bool:
    return (v or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def offline_mode() -> bool:
    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE")):
        return True
    import huggingface_hub.constants as constants

    return bool(constants.is_offline_mode())


def resolve_token(token: str | None) -> str | None:
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # a broken token file is the same as none
        return None


def resolve_endpoint(endpoint: str | None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def token_shape_problem(token: str) -> str | None:
    """Why ``token`` cannot be a Hub token, never quoting it; None when it can.

    Checked before any request: a token read from a file with a Windows line ending (``\r\n``) or
    with a stray space used to fail inside the HTTP client, whose message shows the header's escaped
    repr (``Bearer hf_...\r``), which the exact-string redaction does not recognise, so the token
    was printed; a non-ASCII one failed with a bare UnicodeEncodeError."""
    bad = next((c for c in token if not (c.isascii() and c.isprintable()) or c.isspace()), None)
    if bad is None:
        return None
    kind = "whitespace or a line ending" if bad.isspace() else ("a control character" if bad.isascii() else "a non-ASCII character")
    return (f"the Hugging Face token (--token, HF_TOKEN or the saved login) contains {kind} at position "
            f"{token.index(bad) + 1} of {len(token)}; tokens are printable ASCII (strip the line ending "
            "of the file it was read from)")


def _scrub(text: str, token: str | None) -> str:
    """Replace the token in ``text``, also in the escaped forms exception messages show it in."""
    if not token:
        return text
    for form in {token, repr(token)[1:-1], token.encode("unicode_escape").decode("ascii", "replace")}:
        if form:
            text = text.replace(form, "***")
    return text


def _explain(e: BaseException, *, repo: str, endpoint: str, revision: str | None) -> str:
    """One line a user can act on, for an exception raised while talking to the Hub."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    cause = e
    while isinstance(cause, RuntimeError) and cause.__cause__ is not None and not isinstance(cause, HfHubHTTPError):
        cause = cause.__cause__  # "Error while uploading 'x' to the Hub." wraps the real error
    if isinstance(cause, OfflineModeIsEnabled):
        return "offline mode is on (HF_HUB_OFFLINE=1): unset HF_HUB_OFFLINE to push"
    if isinstance(cause, HfHubHTTPError) and cause.response is not None:
        status = cause.response.status_code
        server = (cause.response.headers.get("X-Error-Message") or "").strip()
        why = f" ({server})" if server else ""
        if status == 401:
            return (f"the Hub at {endpoint} rejected the token for {repo} (401 Unauthorized{why}): pass a valid token "
                    "with --token or HF_TOKEN, or log in with `hf auth login`")
        if status == 403:
            return (f"the token may not write to {repo} (403 Forbidden{why}): use a token with write access to the "
                    f"'{repo.split('/')[0]}' namespace (fine-grained tokens need the 'write' permission on it)")
        if status == 404:
            what = f"revision {revision!r} of {repo}" if cause.response.headers.get("X-Error-Code") == "RevisionNotFound" else repo
            return (f"{endpoint} answered 404 Not Found for {what} ({cause.response.request.method} "
                    f"{cause.response.request.url.path}): check --endpoint/HF_ENDPOINT points at a Hugging Face Hub "
                    "and that the repo exists")
        if status == 400 and "README" in str(cause):
            return f"the Hub rejected README.md's metadata for {repo}: {' '.join(str(cause).split())}"
        return f"the Hub at {endpoint} answered {status} for {repo}{why}: {' '.join(str(cause).split())[:300]}"
    if isinstance(cause, ValueError) and "metadata in README.md" in str(cause):
        return f"the Hub rejected README.md's metadata for {repo}: {' '.join(str(cause).split())}"
    # huggingface_hub 2.x talks through httpx (vendored as httpx2): match its transport errors by name
    transport = ("Connect", "Network", "Timeout", "Transport", "Protocol")
    if isinstance(cause, (ConnectionError, OSError)) or any(t in type(cause).__name__ for t in transport):
        kind = "connection refused" if "refused" in str(cause).lower() else (str(cause) or type(cause).__name__)
        return (f"cannot reach the Hub endpoint {endpoint} ({' '.join(kind.split())}): check --endpoint/HF_ENDPOINT "
                "and the network")
    return f"push to {repo} failed: {type(cause).__name__}: {' '.join(str(cause).split())}"


HUB_TIMEOUT_ENV = "MERGEQUANT_HUB_TIMEOUT"  # seconds without progress before a Hub request is given up
DEFAULT_HUB_TIMEOUT = 120.0


def hub_timeout() -> float:
    raw = os.environ.get(HUB_TIMEOUT_ENV)
    try:
        value = float(raw) if raw else DEFAULT_HUB_TIMEOUT
    except ValueError:
        raise PushError(f"{HUB_TIMEOUT_ENV}={raw!r}: expected a number of seconds") from None
    if not value > 0:
        raise PushError(f"{HUB_TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


def bound_hub_requests() -> None:
    """Give huggingface_hub's HTTP client a timeout. Its default has none, so an endpoint that accepts
    the connection and never answers (a black-holing proxy, a stalled server) hung `push` and `run`
    silently for as long as one waited. The limit is per wait (connect, each read or write), not per
    transfer: a large upload that keeps moving is never cut."""
    import httpx2
    from huggingface_hub import close_session, set_client_factory
    from huggingface_hub.utils import _http

    seconds = hub_timeout()

    def factory():
        client = _http.default_client_factory()
        client.timeout = httpx2.Timeout(seconds, connect=min(seconds, 30.0))
        return client

    set_client_factory(factory)
    close_session()  # a session made before (by the caller or an earlier push) picks up the factory


def push(folder: str | Path, opts: PushOptions, log: Callable[[str], None] = print) -> PushResult:
    """Validate ``folder`` and push it to ``opts.repo`` as one commit (or PR). With ``opts.dry_run``,
    only the plan (nothing is sent and no token is needed)."""
    folder = Path(folder)
    plan = plan_push(folder, opts)
    if opts.dry_run:
        return plan
    if offline_mode():
        raise PushError("offline mode is on (HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1): nothing was sent; "
                        "unset it to push")
    token = resolve_token(opts.token)
    if not token:
        raise PushError("no Hugging Face token: pass --token, set HF_TOKEN, or log in with `hf auth login`")
    token_problem = token_shape_problem(token)
    if token_problem:
        raise PushError(token_problem)
    endpoint = resolve_endpoint(opts.endpoint)
    from urllib.parse import urlsplit

    secrets = [token, urlsplit(endpoint).password or ""]
    clean = lambda text: _scrub(_scrub(text.replace(endpoint, public_endpoint(endpoint)), secrets[0]), secrets[1])  # noqa: E731
    try:
        return _push(folder, opts, plan, token, endpoint, log)
    except PushError as e:
        raise PushError(clean(str(e))) from None
    except MergeQuantError:
        raise
    except Exception as e:  # translate what the client raises into one line, without the token or URL password
        raise PushError(clean(_explain(e, repo=opts.repo, endpoint=public_endpoint(endpoint), revision=opts.revision))) from None


def _push(folder: Path, opts: PushOptions, plan: PushResult, token: str, endpoint: str,
          log: Callable[[str], None]) -> PushResult:
    from huggingface_hub import CommitOperationAdd, HfApi

    for f in plan.files:
        if f.link:
            log(f"{f.path} -> {f.link} (link inside the folder): uploading the file it points to as {f.path}")
    bound_hub_requests()
    api = HfApi(endpoint=endpoint, token=token)
    repo = opts.repo
    repo_url = str(api.create_repo(repo, private=True if opts.private else None, exist_ok=True))
    if opts.private:
        info = api.repo_info(repo)
        if not info.private:
            raise PushError(f"{repo} already exists and is public: --private cannot make an existing repo private "
                            "(change its visibility in the repo settings first); nothing was uploaded")
    revision = opts.revision or None
    if revision and revision != "main" and not opts.create_pr:
        api.create_branch(repo, branch=revision, exist_ok=True)
    ops = []
    for f in plan.files:
        if f.path == CARD and plan.card is not None:
            ops.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=plan.card.encode("utf-8")))
        else:
            ops.append(CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(f.source)))
    message = opts.commit_message or f"Upload {folder.name or 'model'} with mergequant"
    log(f"pushing {len(ops)} file(s) to {repo} ({public_endpoint(endpoint)}) ...")
    info = api.create_commit(repo, ops, commit_message=message, revision=revision,
                             create_pr=opts.create_pr or None)
    changed = [op.path_in_repo for op in ops
               if getattr(op, "_remote_oid", None) is None or op._remote_oid != op._local_oid]
    return PushResult(repo=repo, files=plan.files, card=plan.card, repo_url=repo_url,
                      commit_url=info.commit_url, pr_url=info.pr_url, changed=changed)


def summary(res: PushResult) -> str:
    from mergequant.units import format_bytes

    if res.pr_url:
        return f"opened pull request {res.pr_url} on {res.repo_url} ({len(res.changed)} file(s) changed)"
    if not res.changed:
        return f"{res.repo_url} is up to date: nothing changed, nothing uploaded (commit {res.commit_url})"
    return (f"pushed {len(res.changed)} changed file(s) of {len(res.files)} ({format_bytes(res.total_bytes)} in the folder) "
            f"to {res.repo_url}: commit {res.commit_url}")


def parse_base_model_map(items: list[str]) -> dict[str, str]:
    """``LOCAL=NS/NAME`` strings (the CLI's --base-model-map) to a dict."""
    out = {}
    for item in items:
        local, sep, hub_id = item.rpartition("=")
        if not sep or not local or not hub_id:
            raise PushError(f"--base-model-map {item!r}: expected LOCAL=NS/NAME")
        out[local] = hub_id
    return check_mapping(out) if out else out


__all__ = ["MAX_FILE_BYTES", "PlannedFile", "PushOptions", "PushResult", "PushError", "plan_upload", "validate_folder",
           "rewrite_card", "prepare_card", "plan_push", "push", "summary", "describe_plan", "parse_base_model_map",
           "split_card", "validate_meta"]
