"""Tokenizer merging: the output vocabulary (``tokenizer_source`` / ``tokenizer:``) and, for every input, which
of its embedding / lm_head rows feeds each output row, aligned **by token string**, not by id.

mergekit 0.1.5 semantics (docs/merge.md, "Tokenizers"): each input's vocabulary-indexed tensor is first
re-indexed into the output vocabulary; an output token the input lacks (or a ``force``d token) gets a default
row: the ``tokens:`` override if given, else the row of the one input that has the token, else the base's row,
else the mean of the rows of the inputs that have it (zero when none has it). The method then merges the
re-indexed tensors as usual. Rows past the tokenizer (padding: Qwen2.5 stores 152064 rows for 151665 tokens,
or ``pad_to_multiple_of``) are kept, unlike mergekit (#425): an input that has the same padding row keeps it
(by index), any other input contributes the mean of its re-indexed token rows (mergekit's value for padding).

Nothing here reads a tensor: the plan holds only index maps; ``AlignedRows`` gathers rows per chunk from the
memory-mapped inputs (engine.py), so an embedding matrix is never copied whole.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergequant.errors import CheckpointError, RecipeError

# Non-layer tensors indexed by token id (embeddings and output head of the supported architectures)
VOCAB_TENSOR_KEYS = ("embed_tokens", "wte", "word_embeddings", "lm_head", "embed_out", "tok_embeddings")

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
          "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
NAMED_TEMPLATES = {"chatml": CHATML}


@dataclass
class TokenizerInfo:
    """One model's fast tokenizer (tokenizer.json) as plain data; ``vocab`` only holds ids below ``rows``."""

    path: Path
    data: dict
    vocab: dict[str, int]
    added: dict[str, dict]  # content -> added_tokens entry
    rows: int
    dropped: int = 0  # tokens with an id >= rows (no embedding row): ignored, as mergekit does


def read_tokenizer(path: Path, rows: int) -> TokenizerInfo | None:
    """The model's tokenizer.json, or None when it has no tokenizer file at all (mergekit then assumes the
    base's). A SentencePiece-only or slow tokenizer is refused in one line."""
    tj = path / "tokenizer.json"
    if not tj.exists():
        slow = [f for f in ("tokenizer.model", "vocab.json", "vocab.txt") if (path / f).exists()]
        if slow:
            raise CheckpointError(
                f"{path}: only a slow tokenizer ({slow[0]}), no tokenizer.json; tokenizer merging reads fast tokenizers: "
                "convert it first (transformers: AutoTokenizer.from_pretrained(PATH).save_pretrained(PATH) writes tokenizer.json)")
        return None
    try:
        data = json.loads(tj.read_text(encoding="utf-8"))
        full, added = token_ids(data)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{tj}: not a readable tokenizer.json ({type(e).__name__}: {e})") from None
    except CheckpointError as e:
        raise CheckpointError(f"{tj}: {e}") from None
    vocab = {t: i for t, i in full.items() if 0 <= i < rows}
    return TokenizerInfo(path, data, vocab, added, rows, len(full) - len(vocab))


def token_ids(data: dict) -> tuple[dict[str, int], dict[str, dict]]:
    """Every token's id as the ``tokenizers`` library assigns it when it loads this tokenizer.json, and the added
    tokens by content. The ``id`` written in ``added_tokens`` is not what counts: an added token that is not in the
    model's vocabulary gets the model's vocabulary size (its number of entries), or the largest added id + 1 once
    that is past it, in file order."""
    model = data["model"]
    mtype = model.get("type")
    if mtype == "Unigram":
        vocab = {piece[0]: i for i, piece in enumerate(model["vocab"])}
    elif isinstance(model.get("vocab"), dict):
        vocab = {t: int(i) for t, i in model["vocab"].items()}
    else:
        raise CheckpointError(f"tokenizer model type {mtype!r} is not supported for tokenizer merging "
                              "(BPE, WordPiece, WordLevel, Unigram)")
    size = len(vocab)
    added_ids: dict[str, int] = {}
    added: dict[str, dict] = {}
    for e in data.get("added_tokens") or []:
        c = e["content"]
        if c in vocab:
            tid = vocab[c]
        elif c in added_ids:
            tid = added_ids[c]
        else:
            top = max(added_ids.values(), default=None)
            tid = size if top is None or (top < size and size > 0) else top + 1
        added_ids[c] = tid
        added[c] = dict(e, id=tid)
    return {**vocab, **added_ids}, added


def _strip(info: TokenizerInfo) -> dict:
    """tokenizer.json without the tokens that have no embedding row (mergekit strips the base's the same way)."""
    data = copy.deepcopy(info.data)
    if not info.dropped:
        return data
    keep = info.vocab
    data["added_tokens"] = [e for e in data.get("added_tokens") or [] if e["content"] in keep]
    model = data["model"]
    if isinstance(model.get("vocab"), dict):
        model["vocab"] = {t: i for t, i in model["vocab"].items() if t in keep}
        if "merges" in model:
            model["merges"] = [m for m in model["merges"] if all(p in keep for p in _merge_parts(m))]
    else:
        raise CheckpointError(f"{info.path}: tokenizer has ids past the {info.rows} embedding rows; "
                              "stripping them is only supported for BPE/WordPiece tokenizers")
    return data


def _merge_parts(m) -> list[str]:
    return list(m) if isinstance(m, list) else m.split(" ", 1)


@dataclass
class VocabAlignment:
    """The output vocabulary and, per model reference, output row -> input row (-1: the token is missing)."""

    tokens: dict[str, int]
    rows: int  # output rows (>= len(tokens): padding kept, pad_to_multiple_of)
    n_tokens: int  # ids below this are tokens; rows from here on are padding
    index: dict[str, torch.Tensor]  # model ref -> LongTensor[rows] (input row or -1)
    model_vocab: dict[str, dict[str, int]]  # model ref -> its (row-bounded) vocabulary, for tokens: overrides
    overrides: dict[str, tuple] = field(default_factory=dict)  # token -> (TokenSource | None, force)
    base: str | None = None
    tokenizer_json: dict | None = None  # the output tokenizer.json to write (None: copy ``files_from``'s files)
    files_from: Path | None = None
    new_added: list[dict] = field(default_factory=list)  # added tokens to register in tokenizer_config.json
    identity: bool = False  # every input row r feeds output row r: the merge is the plain row-by-row one


def is_vocab_tensor(name: str, shape: tuple[int, ...], rows: int | None) -> bool:
    return bool(rows) and len(shape) >= 1 and shape[0] == rows and any(k in name for k in VOCAB_TENSOR_KEYS)


def build_alignment(recipe, checkpoints: dict, ref_model: str) -> VocabAlignment | None:
    """The output vocabulary of ``recipe.tokenizer`` over ``checkpoints`` (model ref -> Checkpoint), or None
    when the recipe asks for no tokenizer merging."""
    spec = recipe.tokenizer
    if spec is None:
        return None
    refs = list(checkpoints)
    base = recipe.base_model or refs[0]
    rows = {r: model_rows(c) for r, c in checkpoints.items()}
    from mergequant.peft.adapted import tokenizer_dir  # BASE+ADAPTER: the adapter's tokenizer when it has one

    infos = {r: read_tokenizer(tokenizer_dir(c), rows[r]) for r, c in checkpoints.items()}
    if infos[base] is None:
        if spec.source == "base" and not spec.tokens and not spec.pad_to_multiple_of:
            return None  # no base tokenizer to align by: the plain merge (rows by index, vocabulary check), as before
        raise CheckpointError(f"{checkpoints[base].path}: no tokenizer.json; tokenizer merging needs the base "
                              "model's tokenizer")
    for r in refs:  # a model without a tokenizer is assumed to share the base's (as mergekit), within its own rows
        if infos[r] is None:
            b = infos[base]
            vocab = {t: i for t, i in b.vocab.items() if i < rows[r]}
            infos[r] = TokenizerInfo(checkpoints[r].path, b.data, vocab, b.added, rows[r], b.dropped + len(b.vocab) - len(vocab))
    start = base if spec.source in ("union", "base") else spec.source
    out = infos[start]
    out_json = _strip(out)
    tokens = token_ids(out_json)[0] if out.dropped else dict(out.vocab)
    new_added: list[dict] = []
    if spec.source == "union":
        _union(out_json, tokens, [infos[r] for r in refs if r != start], new_added)
    for token in spec.tokens:  # tokens named in `tokens:` are added when new (mergekit: non-special added tokens)
        if token not in tokens:
            _add(out_json, tokens, {"content": token, "single_word": False, "lstrip": False, "rstrip": False,
                                    "normalized": True, "special": False}, new_added)
    if new_added:  # the ids tokenizers will assign must be the ones the rows are placed at
        got, _ = token_ids(out_json)
        if {t: got[t] for t in tokens} != tokens:
            raise CheckpointError(f"{out.path}: its tokenizer.json has ids that tokenizers renumbers on loading "
                                  "(gaps in the vocabulary); cannot add tokens to it safely")
    n_tokens = _next_id(tokens)
    n_rows = max(n_tokens, rows[start])  # keep the output tokenizer's model's padding rows (mergekit trims them)
    if spec.pad_to_multiple_of:
        m = spec.pad_to_multiple_of
        n_rows = -(-n_rows // m) * m
    ids_out = set(tokens.values())
    if len(ids_out) != len(tokens):
        raise CheckpointError(f"{out.path}: two tokens share one id in the output tokenizer; cannot align rows")
    no_token = sorted(set(range(n_rows)) - ids_out)  # padding rows, and unused ids inside the vocabulary
    index = {}
    for r in refs:
        idx = torch.full((n_rows,), -1, dtype=torch.long)
        vocab = infos[r].vocab
        ids = [(tokens[t], i) for t, i in vocab.items() if t in tokens]
        if ids:
            o, i = zip(*ids)
            idx[list(o)] = torch.tensor(i, dtype=torch.long)
        # a row that is no token: an input keeps its own row where that row is no token for it either (by index)
        own = set(vocab.values())
        keep = [row for row in no_token if row < rows[r] and row not in own]
        if keep:
            idx[keep] = torch.tensor(keep, dtype=torch.long)
        index[r] = idx
    for token, (src, _force) in spec.tokens.items():
        if src is not None and src.kind == "model" and token not in infos[src.model].vocab:
            raise RecipeError(f"{recipe.path}: tokenizer.tokens.{token}: model '{src.model}' has no token {token!r} "
                              "(use {kind: model_token, model: ..., token: ...} to take another token's row)")
        if src is not None and src.kind == "model_token":
            if src.token is not None and src.token not in infos[src.model].vocab:
                raise RecipeError(f"{recipe.path}: tokenizer.tokens.{token}: model '{src.model}' has no token {src.token!r}")
            if src.token_id is not None and src.token_id >= rows[src.model]:
                raise RecipeError(f"{recipe.path}: tokenizer.tokens.{token}: token_id {src.token_id} is past the "
                                  f"{rows[src.model]} rows of '{src.model}'")
    unchanged = (spec.source in ("base",) or start == ref_model) and out_json == out.data and not new_added
    identity = (unchanged and all(rows[r] == n_rows for r in refs)
                 and all(torch.equal(index[r], torch.arange(n_rows)) for r in refs) and not spec.tokens)
    return VocabAlignment(tokens, n_rows, n_tokens, index, {r: infos[r].vocab for r in refs}, dict(spec.tokens), base,
                          None if out_json == out.data else out_json, out.path, new_added, identity)


def model_rows(ckpt) -> int:
    """Embedding rows of a checkpoint (config vocab_size, else the embedding tensor's rows)."""
    if ckpt.vocab_size:
        return int(ckpt.vocab_size)
    for name, info in ckpt.tensors.items():
        if any(k in name for k in VOCAB_TENSOR_KEYS) and len(info.shape) == 2:
            return int(info.shape[0])
    raise CheckpointError(f"{ckpt.path}: cannot tell the vocabulary size (no vocab_size in config.json, no embedding)")


def _next_id(tokens: dict[str, int]) -> int:
    return max(tokens.values(), default=-1) + 1


def _union(out_json: dict, tokens: dict[str, int], others: list[TokenizerInfo], new_added: list[dict]) -> None:
    """Add every other model's tokens that the output lacks, in model order then id order, as added tokens (as
    mergekit does): an added token keeps its flags (special, lstrip, ...); a vocabulary token of another BPE
    becomes a plain added token (decodable and given its merged row; the output's own vocabulary, merges and
    therefore its splits of any text stay the base's)."""
    for info in others:
        for tok, _i in sorted(info.vocab.items(), key=lambda kv: kv[1]):
            if tok in tokens:
                continue
            if tok in info.added:
                entry = {k: v for k, v in info.added[tok].items() if k != "id"}
            else:
                entry = {"content": tok, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True,
                         "special": False}
            _add(out_json, tokens, entry, new_added)


def _add(out_json: dict, tokens: dict[str, int], entry: dict, new_added: list[dict]) -> None:
    """Append an added token; its id is the one ``tokenizers`` will give it (checked by the caller)."""
    entry = {"id": _next_id(tokens), **entry}
    out_json.setdefault("added_tokens", []).append(entry)
    tokens[entry["content"]] = entry["id"]
    new_added.append(entry)


# ---------------------------------------------------------------------------------------------------------
# per tensor: default rows and the row gatherer
# ---------------------------------------------------------------------------------------------------------
def default_rows(al: VocabAlignment, models: list[str], inputs: list[torch.Tensor], cols: int, dtype: torch.dtype
                 ) -> dict[int, torch.Tensor]:
    """Output row -> the default row for inputs that lack the token (or all, when forced), from the inputs of
    one tensor (``models[i]``'s flat memory-mapped tensor ``inputs[i]``). Reads only the rows it needs."""
    mats = [x.view(-1, cols) for x in inputs]
    where = {m: i for i, m in enumerate(models)}
    present_all = torch.stack([al.index[m][:al.n_tokens] >= 0 for m in models]).all(0)
    forced = {al.tokens[t] for t, (_s, f) in al.overrides.items() if f and t in al.tokens}
    by_id = {i: t for t, i in al.tokens.items()}
    wanted = sorted(set((~present_all).nonzero().flatten().tolist()) & set(by_id) | forced)
    out: dict[int, torch.Tensor] = {}
    for oid in wanted:
        token = by_id[oid]
        src, _force = al.overrides.get(token, (None, False))
        present = [i for i, m in enumerate(models) if int(al.index[m][oid]) >= 0]
        if src is not None:
            if src.kind == "zero":
                row = torch.zeros(cols, dtype=dtype)
            else:
                if src.model not in where:
                    raise RecipeError(f"tokenizer.tokens.{token}: model '{src.model}' is not an input of this tensor")
                j = where[src.model]
                if src.kind == "model":
                    r = int(al.index[src.model][oid])
                else:
                    r = src.token_id if src.token_id is not None else al.model_vocab[src.model][src.token]
                row = mats[j][r].to(dtype)
        elif len(present) == 1:
            row = mats[present[0]][int(al.index[models[present[0]]][oid])].to(dtype)
        elif not present:
            row = torch.zeros(cols, dtype=dtype)
        elif al.base in where and where[al.base] in present:
            row = mats[where[al.base]][int(al.index[al.base][oid])].to(dtype)
        else:  # the mean of the inputs that have it, summed in model order (mergekit)
            acc = torch.zeros(cols, dtype=dtype)
            for i in present:
                acc = acc + mats[i][int(al.index[models[i]][oid])].to(dtype)
            row = acc / len(present)
        out[oid] = row
    return out


class AlignedRows:
    """Input ``i``'s vocabulary-indexed tensor seen in the output vocabulary, flat like the engine's other
    inputs: ``x[a:b]`` gathers just the rows that cover elements [a, b) from the memory map (own rows by
    index, default rows from a small table, padding rows the mean of this input's token rows)."""

    def __init__(self, src: torch.Tensor, cols: int, index: torch.Tensor, force: set[int], defaults: dict[int, torch.Tensor],
                 n_tokens: int, dtype: torch.dtype):
        self.src = src.view(-1, cols)
        self.cols, self.dtype = cols, dtype
        self.index = index.clone()
        for r in force:
            self.index[r] = -1
        rows = self.index.numel()
        use = sorted(r for r in defaults if int(self.index[r]) < 0)
        # table: the default rows, then a zero row (tokens nobody has), then the padding row
        self.table = torch.zeros((len(use) + 2, cols), dtype=dtype)
        self.slot = torch.full((rows,), len(use), dtype=torch.long)
        for k, r in enumerate(use):
            self.table[k] = defaults[r].to(dtype)
            self.slot[r] = k
        pad = [r for r in range(n_tokens, rows) if int(self.index[r]) < 0]
        if pad:  # the mean of this input's token rows (vocab-expansion heuristic, mergekit's padding value)
            acc = torch.zeros(cols, dtype=torch.float64)
            step = max(1, (1 << 20) // cols)
            for a in range(0, n_tokens, step):
                acc += self._rows(a, min(n_tokens, a + step)).double().sum(0)
            self.table[-1] = (acc / max(1, n_tokens)).to(dtype)
            self.slot[pad] = len(use) + 1

    def _rows(self, r0: int, r1: int) -> torch.Tensor:
        idx = self.index[r0:r1]
        own = idx >= 0
        out = torch.empty((r1 - r0, self.cols), dtype=self.dtype)
        if bool(own.any()):
            out[own] = self.src.index_select(0, idx[own]).to(self.dtype)
        if not bool(own.all()):
            out[~own] = self.table.index_select(0, self.slot[r0:r1][~own])
        return out

    def numel(self) -> int:
        return self.index.numel() * self.cols

    def __getitem__(self, s: slice) -> torch.Tensor:
        a, b = s.start or 0, self.numel() if s.stop is None else s.stop
        r0, r1 = a // self.cols, -(-b // self.cols)
        return self._rows(r0, r1).reshape(-1)[a - r0 * self.cols:b - r0 * self.cols]


def aligned_inputs(al: VocabAlignment, models: list[str], flat: list[torch.Tensor], cols: int) -> list[AlignedRows]:
    dtype = flat[0].dtype
    for x in flat[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    defaults = default_rows(al, models, flat, cols, dtype)
    force = {al.tokens[t] for t, (_s, f) in al.overrides.items() if f and t in al.tokens}
    return [AlignedRows(x, cols, al.index[m], force, defaults, al.n_tokens, dtype) for m, x in zip(models, flat)]


# ---------------------------------------------------------------------------------------------------------
# output files
# ---------------------------------------------------------------------------------------------------------
def write_tokenizer(al: VocabAlignment, out: Path) -> None:
    """Write the output tokenizer over the files copied from the reference model: tokenizer.json when the
    vocabulary changed (slow-tokenizer files that would disagree are removed), and the new added tokens in
    tokenizer_config.json's added_tokens_decoder."""
    from mergequant.io.model_files import TOKENIZER_FILES
    for fname in TOKENIZER_FILES:  # the output tokenizer's model's files, not the reference's
        if fname != "generation_config.json" and (out / fname).exists():
            (out / fname).unlink()
    for fname in TOKENIZER_FILES:
        if fname != "generation_config.json" and (al.files_from / fname).exists():
            (out / fname).write_bytes((al.files_from / fname).read_bytes())
    if al.tokenizer_json is None:
        return
    (out / "tokenizer.json").write_text(json.dumps(al.tokenizer_json, ensure_ascii=False, indent=2), encoding="utf-8")
    for stale in ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json"):
        if (out / stale).exists():
            (out / stale).unlink()
    cfg_path = out / "tokenizer_config.json"
    if cfg_path.exists() and al.new_added:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if isinstance(cfg.get("added_tokens_decoder"), dict):
            for e in al.new_added:
                cfg["added_tokens_decoder"][str(e["id"])] = {k: v for k, v in e.items() if k != "id"}
            cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")


def resolve_chat_template(value: str, model_dirs: list[Path], where: str) -> str | None:
    """``chat_template``: "auto" (the template most inputs carry, first one on a tie; None when none has one),
    a name (chatml), or Jinja text."""
    if value == "auto":
        found = []
        for d in model_dirs:
            t = _chat_template_of(d)
            if t:
                found.append(t.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    if "{" not in value or len(value) < 20:
        raise RecipeError(f"{where}: {value[:60]!r} is not auto, a known name "
                          f"({', '.join(NAMED_TEMPLATES)}) or Jinja text")
    return value


def _chat_template_of(d: Path) -> str | None:
    if (d / "chat_template.jinja").exists():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    cfg = d / "tokenizer_config.json"
    if cfg.exists():
        try:
            t = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        except ValueError:
            return None
        if isinstance(t, list):  # [{name, template}]: the default one
            t = next((e.get("template") for e in t if isinstance(e, dict) and e.get("name") == "default"), None)
        return t if isinstance(t, str) else None
    return None


def write_chat_template(template: str, out: Path) -> None:
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    if (out / "chat_template.jinja").exists():  # transformers prefers this file over the config entry
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")


TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id", "unk_token_id")


def remap_token_ids(config: dict, ref_vocab: dict[str, int], out_tokens: dict[str, int]) -> dict:
    """``config`` (config.json or generation_config.json of the reference model) with its special-token ids moved
    to the same tokens' ids in the output vocabulary (they differ when the output takes another model's ids)."""
    by_id = {i: t for t, i in ref_vocab.items()}

    def move(v):
        if isinstance(v, bool) or not isinstance(v, int):
            return v
        t = by_id.get(v)
        return out_tokens.get(t, v) if t is not None else v

    out = dict(config)
    for key in TOKEN_ID_KEYS:
        if key in out:
            v = out[key]
            out[key] = [move(x) for x in v] if isinstance(v, list) else move(v)
    return out
