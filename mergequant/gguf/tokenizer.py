"""Tokenizer metadata for a GGUF file: what llama.cpp needs to tokenize exactly as transformers does.

Byte-level BPE (``tokenizer.json`` with a BPE model and a byte-level pre-tokenizer) becomes
``tokenizer.ggml.model = "gpt2"`` with the token list, token types and merges. llama.cpp splits text
with one of a fixed set of pre-tokenizer regexes chosen by ``tokenizer.ggml.pre``; llama.cpp's own
converter picks that name by hashing the tokenization of a test string, which only works for
tokenizers it has seen (a merged or newly trained vocabulary hashes differently). Here the name is
read from the pre-tokenizer itself: GPT-2's ``ByteLevel(use_regex=True)`` -> ``gpt-2``; a ``Split`` on the
Llama-3 regex -> ``llama-bpe``; on Qwen2's -> ``qwen2``. Anything else is refused with one line: a
wrong ``pre`` would load and silently tokenize differently.

SentencePiece (``tokenizer.model``, Llama-2 / Mistral style) becomes ``"llama"`` with pieces, scores
and types, read with the ``sentencepiece`` package.

Special token ids, add-BOS/EOS flags, merges and the chat template come from gguf-py's
``SpecialVocab`` (llama.cpp's own reader of those files).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mergequant.errors import MergeQuantError

# gguf TokenType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# Split regexes (as tokenizer.json writes them) -> llama.cpp pre-tokenizer name
KNOWN_SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    _GPT2_REGEX: "gpt-2",
}
KNOWN_PRE = ("gpt-2", "llama-bpe", "qwen2")


@dataclass
class TokenizerMeta:
    model: str  # "gpt2" or "llama"
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    special: object = None  # gguf.SpecialVocab
    add_bos: bool | None = None
    notes: list[str] = field(default_factory=list)


def _describe(pre: object) -> str:
    if not isinstance(pre, dict):
        return repr(pre)
    if pre.get("type") == "Sequence":
        return "Sequence[" + ", ".join(_describe(p) for p in pre.get("pretokenizers") or []) + "]"
    if pre.get("type") == "Split":
        pat = pre.get("pattern") or {}
        return f"Split({pat.get('Regex') or pat.get('String')!r})"
    return str(pre.get("type"))


def byte_level_pre(tj: dict, where: str) -> str:
    """The llama.cpp pre-tokenizer name for a byte-level BPE ``tokenizer.json``; one-line refusal if unknown."""
    pre = tj.get("pre_tokenizer")
    name = None
    if isinstance(pre, dict) and pre.get("type") == "ByteLevel":
        if pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
            name = "gpt-2"
    elif isinstance(pre, dict) and pre.get("type") == "Sequence":
        items = pre.get("pretokenizers") or []
        splits = [p for p in items if isinstance(p, dict) and p.get("type") == "Split"]
        last = items[-1] if items else None
        if (len(splits) == 1 and len(items) == 2 and items[0] is splits[0] and isinstance(last, dict)
                and last.get("type") == "ByteLevel" and not last.get("use_regex", True)
                and not last.get("add_prefix_space", False)
                and splits[0].get("behavior") == "Isolated" and not splits[0].get("invert", False)):
            name = KNOWN_SPLITS.get((splits[0].get("pattern") or {}).get("Regex"))
    if name is None:
        raise MergeQuantError(f"{where}: pre-tokenizer {_describe(pre)} is not one llama.cpp implements "
                              f"(known: {', '.join(KNOWN_PRE)}); refusing to write a GGUF that would tokenize differently")
    return name


def _special_vocab(model_dir: Path, n_vocab: int, merges: bool):
    import logging

    import gguf

    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)  # it logs every key at INFO/WARNING
    try:
        return gguf.SpecialVocab(model_dir, load_merges=merges, n_vocab=n_vocab)
    finally:
        log.setLevel(level)


def _adds_bos(tj: dict, bos_token: str | None) -> bool:
    """Whether transformers' post-processor puts a BOS in front of a single sequence."""
    post = tj.get("post_processor") or {}
    for p in post.get("processors", [post]) if isinstance(post, dict) else []:
        if isinstance(p, dict) and p.get("type") == "TemplateProcessing":
            first = (p.get("single") or [{}])[0]
            return "SpecialToken" in first and (bos_token is None or first["SpecialToken"].get("id") == bos_token)
    return False


def tokenizer_metadata(model_dir: str | Path, config: dict) -> TokenizerMeta:
    model_dir = Path(model_dir)
    tj_path = model_dir / "tokenizer.json"
    sp_path = model_dir / "tokenizer.model"
    n_vocab = int(config.get("vocab_size") or 0)
    if tj_path.is_file():
        tj = json.loads(tj_path.read_text(encoding="utf-8"))
        model = tj.get("model") or {}
        if model.get("type") == "BPE" and not model.get("byte_fallback"):
            return _bpe(model_dir, tj, n_vocab)
        if sp_path.is_file():
            return _sentencepiece(model_dir, sp_path, n_vocab)
        raise MergeQuantError(f"{tj_path}: tokenizer model {model.get('type')!r}"
                              f"{' with byte fallback' if model.get('byte_fallback') else ''} is not supported for GGUF "
                              "(byte-level BPE, or SentencePiece with tokenizer.model)")
    if sp_path.is_file():
        return _sentencepiece(model_dir, sp_path, n_vocab)
    raise MergeQuantError(f"{model_dir}: no tokenizer.json or tokenizer.model; a GGUF file needs the tokenizer")


def _bpe(model_dir: Path, tj: dict, n_vocab: int) -> TokenizerMeta:
    where = str(model_dir / "tokenizer.json")
    pre = byte_level_pre(tj, where)
    vocab: dict[str, int] = dict(tj["model"].get("vocab") or {})
    added = {int(t["id"]): t for t in tj.get("added_tokens") or []}
    by_id: dict[int, str] = {i: tok for tok, i in vocab.items()}
    for i, t in added.items():
        by_id[i] = t["content"]
    size = max(n_vocab, max(by_id) + 1 if by_id else 0)
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)
    sv = _special_vocab(model_dir, size, True)
    bos_id = sv.special_token_ids.get("bos")
    add_bos = sv.add_special_token.get("bos")
    if add_bos is None:
        add_bos = _adds_bos(tj, by_id.get(bos_id) if bos_id is not None else None)
    return TokenizerMeta("gpt2", pre, tokens, types, None, sv, add_bos)


def _sentencepiece(model_dir: Path, sp_path: Path, n_vocab: int) -> TokenizerMeta:
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:  # pragma: no cover - sentencepiece is a transformers extra
        raise MergeQuantError(f"{sp_path}: reading a SentencePiece tokenizer needs the sentencepiece package") from None
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(sp_path))
    size = max(n_vocab, sp.vocab_size())
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.IdToPiece(i))
        scores.append(float(sp.GetScore(i)))
        types.append(UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else UNUSED if sp.IsUnused(i)
                     else BYTE if sp.IsByte(i) else NORMAL)
    added_path = model_dir / "added_tokens.json"
    extra = json.loads(added_path.read_text(encoding="utf-8")) if added_path.is_file() else {}
    tj_path = model_dir / "tokenizer.json"
    if tj_path.is_file():
        for t in json.loads(tj_path.read_text(encoding="utf-8")).get("added_tokens") or []:
            extra.setdefault(t["content"], t["id"])
    for piece, i in sorted(extra.items(), key=lambda kv: kv[1]):
        i = int(i)
        while len(tokens) <= i:
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(-1000.0)
            types.append(UNUSED)
        if i >= sp.vocab_size():
            tokens[i] = piece
            scores[i] = -1000.0
            types[i] = USER_DEFINED
    while len(tokens) < size:
        tokens.append(f"[PAD{len(tokens)}]")
        scores.append(-1000.0)
        types.append(UNUSED)
    sv = _special_vocab(model_dir, len(tokens), False)
    return TokenizerMeta("llama", "default", tokens, types, scores, sv, sv.add_special_token.get("bos"))


def add_to_writer(meta: TokenizerMeta, w) -> None:
    """Write the tokenizer keys into a gguf.GGUFWriter (before its header is written)."""
    import logging

    w.add_tokenizer_model(meta.model)
    if meta.pre:
        w.add_tokenizer_pre(meta.pre)
    w.add_token_list(meta.tokens)
    if meta.scores is not None:
        w.add_token_scores(meta.scores)
    w.add_token_types(meta.types)
    if meta.special is not None:
        log = logging.getLogger("gguf.vocab")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            meta.special.add_to_gguf(w, quiet=True)
        finally:
            log.setLevel(level)
    if meta.add_bos is not None and "bos" not in getattr(meta.special, "add_special_token", {}):
        w.add_add_bos_token(bool(meta.add_bos))
