"""Calibration data: local text/JSONL/Parquet files or a Hub dataset -> fixed-size token windows.

Quantizers need a few hundred thousand representative tokens, not a dataset pipeline. Every source
is reduced to a list of documents (strings), tokenized once, concatenated into one stream with the
tokenizer's EOS between documents, and ``samples`` windows of ``seqlen`` tokens are drawn at
seeded random offsets, so the same (source, tokenizer, samples, seqlen, seed) always gives the same
batch.

Sources (``--calib``):
  path.txt               the whole file is one document (split on blank lines into documents)
  path.jsonl             one JSON object per line with ``text``, or ``messages`` rendered with the
                         tokenizer's chat template
  path.parquet           the ``text`` column (else the only string column)
  hf:NAME[:CONFIG]:SPLIT[:COLUMN]   a Hub dataset through ``datasets`` (online, or cached)
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path

import torch

from mergequant.errors import MergeQuantError

KNOWN_SPLITS = ("train", "test", "validation", "valid", "dev", "eval")
# Files whose presence means a model folder has a tokenizer AutoTokenizer can try: a fast tokenizer,
# a sentencepiece or BPE/WordPiece vocabulary, or a tokenizer_config.json (byte-level tokenizers
# such as ByT5 have nothing else). generation_config.json and chat templates alone are not one.
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                     "spiece.model", "sentencepiece.bpe.model")
CALIBRATION = "calibration data (--calib)"


class CalibrationError(MergeQuantError):
    """Calibration data that cannot be used: missing, empty, too short, undecodable."""


@dataclass(frozen=True)
class HubSource:
    name: str
    config: str | None
    split: str
    column: str


def parse_hub_source(spec: str) -> HubSource:
    """``hf:NAME[:CONFIG]:SPLIT[:COLUMN]``. With three fields, the middle one is a split when it looks
    like one (train/test/validation/... or a slice like ``train[:1000]``), else a config."""
    parts, depth, cur = [], 0, ""
    for ch in spec.removeprefix("hf:"):  # split on ':' outside brackets ("train[:1000]" is one field)
        depth += (ch == "[") - (ch == "]")
        if ch == ":" and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    if len(parts) == 2:
        return HubSource(parts[0], None, parts[1], "text")
    if len(parts) == 3:
        if parts[1].split("[")[0] in KNOWN_SPLITS:
            return HubSource(parts[0], None, parts[1], parts[2])
        return HubSource(parts[0], parts[1], parts[2], "text")
    if len(parts) == 4:
        return HubSource(*parts)
    raise CalibrationError(f"{spec}: expected hf:NAME[:CONFIG]:SPLIT[:COLUMN], e.g. hf:wikitext:wikitext-2-raw-v1:train")


def check_count(value, option: str, minimum: int, why: str = "", *, optional: bool = False) -> None:
    """Refuse a count option (--seqlen, --samples, --stride...) that is not an integer >= ``minimum``.
    Checked up front by every command and by release files, because the loops these counts drive
    either never advance (a 1-token eval window) or silently fall back to a default (0)."""
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise MergeQuantError(f"{option} must be an integer >= {minimum}" + (f" ({why})" if why else "")
                              + f", got {value!r}")


def check_seed(seed) -> None:
    """``--seed`` must be a 64-bit integer (torch's generators take no more; 2**70 was a traceback)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63:
        raise MergeQuantError(f"--seed must be a 64-bit integer, got {seed!r}")


def local_data_file(source: str, what: str = CALIBRATION) -> Path | None:
    """The local file a data source names (None for ``hf:`` sources), checked to be a regular file:
    cheap, so callers run it before loading a model. ``what`` names the data and its option in
    messages ("eval data (--data)"), since the same loader serves --calib, --data and --eval.
    A directory or a FIFO is refused here: reading either fails late or blocks forever."""
    if source.startswith("hf:"):
        return None
    path = Path(source)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CalibrationError(f"{path}: {what}: file not found") from None
    except OSError as e:
        raise CalibrationError(f"{path}: {what}: cannot read ({e.strerror or e})") from None
    if stat.S_ISDIR(mode):
        raise CalibrationError(f"{path}: {what}: is a directory; give a .txt, .jsonl or .parquet file "
                               "(or hf:NAME[:CONFIG]:SPLIT[:COLUMN])")
    if not stat.S_ISREG(mode):
        raise CalibrationError(f"{path}: {what}: not a regular file; give a .txt, .jsonl or .parquet file")
    return path


def load_documents(source: str, *, chat_template=None, what: str = CALIBRATION) -> list[str]:
    """The documents of a data source (``what`` names it in messages, see ``local_data_file``).
    ``chat_template`` renders ``messages`` records (a callable list[dict] -> str, usually
    ``tokenizer.apply_chat_template(..., tokenize=False)``)."""
    path = local_data_file(source, what)
    if path is None:
        return _hub_documents(parse_hub_source(source))
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        docs = _jsonl_documents(path, chat_template)
    elif suffix == ".parquet":
        docs = _parquet_documents(path)
    else:
        docs = [d for d in _read_text(path).split("\n\n") if d.strip()]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CalibrationError(f"{path}: {what}: the file is empty (no text)")
    return docs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _jsonl_documents(path: Path, chat_template) -> list[str]:
    docs = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            docs.append(record["text"])
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            if chat_template is None:
                raise CalibrationError(f"{path}:{lineno}: 'messages' records need a tokenizer with a chat template")
            docs.append(chat_template(record["messages"]))
        else:
            raise CalibrationError(f"{path}:{lineno}: expected an object with a 'text' string or a 'messages' list")
    return docs


def _parquet_documents(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CalibrationError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # corrupt file
        raise CalibrationError(f"{path}: cannot read Parquet ({e})") from None
    strings = [f.name for f in table.schema if str(f.type) in ("string", "large_string")]
    column = "text" if "text" in table.column_names else (strings[0] if len(strings) == 1 else None)
    if column is None:
        raise CalibrationError(f"{path}: no 'text' column (string columns: {strings or 'none'})")
    return [v for v in table.column(column).to_pylist() if isinstance(v, str)]


def _hub_documents(src: HubSource) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise CalibrationError("hub calibration data needs the 'datasets' package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(src.name, src.config, split=src.split)
    except Exception as e:  # offline, not found, gated
        raise CalibrationError(f"hf:{src.name}: cannot load the dataset ({type(e).__name__}: {e}); "
                               "offline? give a local .txt/.jsonl/.parquet file instead") from None
    if src.column not in ds.column_names:
        raise CalibrationError(f"hf:{src.name}: no column '{src.column}' (columns: {', '.join(ds.column_names)})")
    return [v for v in ds[src.column] if isinstance(v, str) and v.strip()]


def require_tokenizer(model_dir: str | Path, why: str) -> None:
    """Refuse a model folder with no tokenizer files before any heavy work: without this, AutoTokenizer
    treats the folder name as a Hub id or fails with a multi-line message about converting slow
    tokenizers, after the model (for eval) or the checkpoint scan (for quantize) already ran."""
    folder = Path(model_dir)
    if not any((folder / name).is_file() for name in TOKENIZER_MARKERS):
        raise MergeQuantError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_MARKERS[:3])}, ...); {why} "
                              "needs the model's tokenizer: copy it into the folder")


def load_tokenizer(model_dir: str | Path, why: str, *, fast: bool = False):
    """AutoTokenizer for ``model_dir``, with every failure (missing files, a corrupt tokenizer.json, a
    tokenizer class that needs an uninstalled package) as one MergeQuantError line naming the folder.

    ``fast=True`` (for callers that only tokenize text without special tokens and read ``eos_token_id``,
    i.e. ``calibration_batch``): a :class:`~mergequant.quant.fast_tokenizer.FastTokenizer` over tokenizer.json
    when it provably gives AutoTokenizer's ids and EOS id, which saves importing transformers (~1.3 s);
    otherwise, and for any file it cannot read, AutoTokenizer as above."""
    require_tokenizer(model_dir, why)
    if fast:
        from mergequant.quant.fast_tokenizer import fast_tokenizer

        tok = fast_tokenizer(model_dir)
        if tok is not None:
            return tok
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises OSError, ValueError, TypeError... for bad tokenizer files
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise MergeQuantError(f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: {first})") from None


# Texts longer than this are tokenized in pieces cut after a newline: a fast tokenizer's memory for one
# call grows with the text (a 30 MB file took 5.4 GB and a 264 MB one exhausted the machine), and a
# signal is acted on only between calls. Shorter texts are tokenized whole, exactly as before.
ENCODE_PIECE_CHARS = 4 * 2**20
# Calibration windows are drawn from at most this many times samples x seqlen tokens of the data.
CALIB_OVERSAMPLE = 16


def _cut_point(text: str, start: int, end: int) -> int:
    """Where to end a piece in (start, end]: just after a single newline between two non-space
    characters, else just before a single space between two (a word keeps its leading space). Byte-level
    BPE pre-tokenizers split there the same way whether or not the text is cut; runs of whitespace or a
    cut inside a word would tokenize differently. ``end`` when there is neither (no space in 4 MB)."""
    for sep, after in (("\n", 1), (" ", 0)):
        pos = text.rfind(sep, start, end)
        while pos > start:
            if pos + 1 < len(text) and not text[pos - 1].isspace() and not text[pos + 1].isspace():
                return pos + after
            pos = text.rfind(sep, start, pos)
    return end


def text_pieces(text: str, size: int = ENCODE_PIECE_CHARS):
    """``text`` in consecutive pieces of at most ``size`` characters, cut where tokenization does not
    change (see _cut_point)."""
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            end = _cut_point(text, start, end)
        yield text[start:end]
        start = end


def encode_text(text: str, encode, limit: int | None = None) -> torch.Tensor:
    """``encode(text)`` as a LongTensor, in bounded pieces for long texts (see ENCODE_PIECE_CHARS),
    stopping once ``limit`` tokens are collected."""
    parts, n = [], 0
    for piece in text_pieces(text):
        parts.append(torch.tensor(encode(piece), dtype=torch.long))
        n += parts[-1].numel()
        if limit is not None and n >= limit:
            break
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def check_token_ids(ids: torch.Tensor, vocab_size, model_dir, source: str) -> torch.Tensor:
    """``ids``, after refusing token ids the model's embedding has no row for: a tokenizer with tokens
    added but the embeddings not resized produces them, and the model's forward then fails deep inside
    an embedding lookup (IndexError) after the model is loaded."""
    if isinstance(vocab_size, int) and ids.numel() and int(ids.max()) >= vocab_size:
        raise CalibrationError(f"{model_dir}: the tokenizer gives token id {int(ids.max())} on {source}, but the model's "
                               f"vocab_size is {vocab_size}: tokens were added to the tokenizer without resizing the "
                               "embeddings")
    return ids


def token_stream(documents: list[str], encode, eos_token_id: int | None, limit: int | None = None) -> torch.Tensor:
    """All documents tokenized (``encode(str) -> list[int]``, no special tokens) and joined by EOS,
    stopping after the document that brings the stream to ``limit`` tokens."""
    parts, n = [], 0
    eos = torch.tensor([eos_token_id], dtype=torch.long) if eos_token_id is not None else None
    for doc in documents:
        parts.append(encode_text(doc, encode, None if limit is None else limit - n))
        if eos is not None:
            parts.append(eos)
        n += parts[-1].numel() + (parts[-2].numel() if eos is not None else 0)
        if limit is not None and n >= limit:
            break
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def sample_windows(stream: torch.Tensor, *, samples: int, seqlen: int, seed: int, source: str = "calibration data") -> torch.Tensor:
    """``samples`` windows of ``seqlen`` tokens at seeded random offsets: a [samples, seqlen] LongTensor."""
    if samples < 1 or seqlen < 1:
        raise CalibrationError(f"--samples and --seqlen must be positive (got {samples}, {seqlen})")
    n = stream.numel()
    if n < seqlen:
        raise CalibrationError(f"{source}: only {n} tokens, fewer than --seqlen {seqlen}; give more text or lower --seqlen")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seqlen + 1, (samples,), generator=gen)
    return torch.stack([stream[s:s + seqlen] for s in starts.tolist()])


def calibration_batch(source: str, tokenizer, *, samples: int = 128, seqlen: int = 2048, seed: int = 0) -> torch.Tensor:
    """End to end: source -> documents -> token stream -> [samples, seqlen] token ids."""
    template = None
    if getattr(tokenizer, "chat_template", None):
        def template(messages):
            return tokenizer.apply_chat_template(messages, tokenize=False)
    docs = load_documents(source, chat_template=template)
    stream = token_stream(docs, lambda s: tokenizer(s, add_special_tokens=False)["input_ids"],
                          getattr(tokenizer, "eos_token_id", None), limit=CALIB_OVERSAMPLE * samples * seqlen)
    return sample_windows(stream, samples=samples, seqlen=seqlen, seed=seed, source=source)
