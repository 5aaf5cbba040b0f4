"""FastTokenizer (``tokenizers`` alone, no transformers import) against AutoTokenizer: the same token ids and
EOS id wherever ``fast_tokenizer`` accepts a folder, and None wherever transformers would load or encode
differently (see the rule in mergequant/quant/fast_tokenizer.py).

Tokenizers are the shared model folders plus ones built here offline (trained on the shared corpus with the
``tokenizers`` library): byte-level BPE (GPT-2 / Llama 3), a Qwen-like NFC + regex-split byte-level BPE with
added tokens, sentencepiece-style Metaspace BPE with byte fallback (Llama 2 / Mistral, both tokenizer.json
layouts), a Metaspace Unigram (Gemma / T5) and a WordPiece (BERT)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, TokenizersBackend

from mergequant.errors import MergeQuantError
from mergequant.quant import calib
from mergequant.quant.fast_tokenizer import MODEL_TYPES, FastTokenizer, _transformers_version_ok, fast_tokenizer

SHARED = Path("/work/shared/models")
CORPUS = Path("/work/shared/corpus")
MIXTRAL = SHARED / "moe-mixtral" / "base"


def _corpus(name: str) -> str:
    path = CORPUS / name
    if path.is_file():
        return path.read_text(encoding="utf-8")
    from importlib import resources  # the package's demo text where the shared corpus is absent

    return (resources.files("mergequant") / "data" / "demo-prose.txt").read_text(encoding="utf-8")


AUSTEN = _corpus("austen.txt")
SHAKESPEARE = _corpus("shakespeare.txt")

SYNTHETIC = [
    "", " ", "  two leading spaces", "trailing spaces   ", "\n", "\n\nblank lines\n\n\nand three\n",
    "\ttabs\tand\r\nCRLF\r\n", "   \n  \n ",
    "Ünïcödé café naïve résumé — “curly quotes” ‘single’… ¿Qué? ß Ω ≤ ∑",
    "日本語のテキスト、中文文本。한국어 텍스트", "emoji 🙂🚀, flags 🇫🇷, ZWJ 👩‍💻, skin 👍🏽",
    "e\u0301 is not é; Å vs \u212b; ﬁne ligature; full-width ＡＢＣ１２３; ² ½",
    "digits 0123456789 3.14159 -42 1,234,567 2024-06-01 12:30:45 0x1F 1e-9",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\nclass A:\n\tpass\n",
    "special strings </s> <s> <unk> <|end_of_text|> <|begin_of_text|> <|im_start|>user\nhi<|im_end|>",
    "[CLS] [SEP] [MASK] [PAD] <pad> <eos> <bos> <mask> x <mask>y <think>z</think> ▁ <0x41>",
    "averyveryverylongwordwithoutanyspaces" * 40,
]


def _excerpts() -> list[str]:
    """Real text as calibration sees it: whole blank-line documents, and longer slices cut anywhere."""
    texts = []
    for corpus in (AUSTEN, SHAKESPEARE):
        docs = [d for d in corpus.split("\n\n") if d.strip()]
        texts += docs[:40] + docs[len(docs) // 2:len(docs) // 2 + 40]
        texts += [corpus[:6000], corpus[len(corpus) // 3 + 17:len(corpus) // 3 + 30000]]
    return texts + SYNTHETIC


TEXTS = _excerpts()


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# the rules were read from one transformers version; under another the fast path is off by design, and
# the tests that need it on have nothing to compare
VERIFIED_VERSION = _transformers_version_ok()
needs_verified_version = pytest.mark.skipif(
    not VERIFIED_VERSION, reason="fast_tokenizer's rules were read from transformers 5.24; it stays off under this version")


def assert_equivalent(folder: Path, texts=TEXTS) -> FastTokenizer:
    """``fast_tokenizer(folder)`` exists and matches AutoTokenizer (a plain TokenizersBackend) on every text."""
    if not VERIFIED_VERSION:
        pytest.skip("fast_tokenizer's rules were read from transformers 5.24; it stays off under this version")
    fast = fast_tokenizer(folder)
    assert fast is not None, f"{folder}: expected the fast path"
    auto = AutoTokenizer.from_pretrained(str(folder))
    assert type(auto) is TokenizersBackend
    assert fast.eos_token_id == auto.eos_token_id
    assert fast.chat_template is None and auto.chat_template is None
    for text in texts:
        assert _ids(fast, text) == _ids(auto, text), f"{folder}: ids differ on {text[:60]!r}"
    return fast


# --- tokenizers built offline ------------------------------------------------------------------------------

def _train_docs() -> list[str]:
    return [d for d in (AUSTEN[:150_000] + "\n\n" + SHAKESPEARE[:150_000]).split("\n\n") if d.strip()] + SYNTHETIC


def _write(folder: Path, tok: Tokenizer, config: dict, *, model_type: str | None = None, extra: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if model_type:
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    for name, content in (extra or {}).items():
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return folder


def _decoder_entries(tok: Tokenizer) -> dict:
    """tokenizer.json's added tokens as transformers 4.x wrote them into tokenizer_config.json."""
    return {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(tok.get_added_tokens_decoder().items())}


def _byte_level_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_train_docs(), trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    return tok


QWEN_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")


def _qwen_like_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_train_docs(), trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_tokens([AddedToken("<think>", normalized=True), AddedToken("</think>", normalized=True)])
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    return tok


def _metaspace_bpe(*, legacy_layout: bool) -> Tokenizer:
    """Llama 2 / Mistral: BPE with byte fallback, <unk>, and "▁" for spaces; either the old layout
    (normalizer Prepend + Replace, no pre-tokenizer) or the newer Metaspace pre-tokenizer."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(_train_docs(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for b in range(256):  # byte-fallback pieces, as sentencepiece vocabularies have them
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    data["model"].update(byte_fallback=True, fuse_unk=True)
    if legacy_layout:
        data["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                                  {"type": "Replace", "pattern": {"String": " "},
                                                                   "content": "▁"}]}
        data["pre_tokenizer"] = None
    data["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]}
    tok = Tokenizer.from_str(json.dumps(data))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def _unigram_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(_train_docs(), trainers.UnigramTrainer(
        vocab_size=500, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"], unk_token="<unk>", show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return tok


def _wordpiece_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(_train_docs(), trainers.WordPieceTrainer(
        vocab_size=600, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory) -> Path:
    """Saved the way transformers 5 saves one: TokenizersBackend(tokenizer_object=...).save_pretrained."""
    folder = tmp_path_factory.mktemp("ft") / "byte-level"
    TokenizersBackend(tokenizer_object=_byte_level_tokenizer(), bos_token="<|begin_of_text|>",
                      eos_token="<|end_of_text|>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory, byte_level) -> dict[str, Path]:
    """The other offline tokenizers, in the file layouts of transformers 4.x checkpoints."""
    root = tmp_path_factory.mktemp("ft")
    qwen = _qwen_like_tokenizer()
    llama2 = _metaspace_bpe(legacy_layout=False)
    llama2_old = _metaspace_bpe(legacy_layout=True)
    unigram = _unigram_tokenizer()
    special_map = {"bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False},
                   "eos_token": {"content": "</s>", "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False},
                   "unk_token": "<unk>"}
    return {
        "byte-level": byte_level,
        # added_tokens_decoder + additional special tokens + non-special and lstrip added tokens, model_type qwen3
        "qwen-like": _write(root / "qwen-like", qwen, {
            "add_prefix_space": False, "added_tokens_decoder": _decoder_entries(qwen),
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
            "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
            "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": False,
            "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": None}, model_type="qwen3"),
        # Llama 2 style: add_bos_token (BOS must still not appear without special tokens), legacy, and the
        # special tokens only in special_tokens_map.json (no added_tokens_decoder: the legacy branch)
        "llama2-metaspace": _write(root / "llama2-metaspace", llama2, {
            "add_bos_token": True, "add_eos_token": False, "add_prefix_space": True, "legacy": False,
            "clean_up_tokenization_spaces": False, "model_max_length": 8, "padding_side": "left",
            "tokenizer_class": "TokenizersBackend", "use_default_system_prompt": False},
            model_type="llama", extra={"special_tokens_map.json": special_map}),
        "llama2-legacy-layout": _write(root / "llama2-legacy-layout", llama2_old, {
            "add_bos_token": True, "add_eos_token": True, "legacy": True, "from_slow": True,
            "added_tokens_decoder": _decoder_entries(llama2_old),
            "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                          "rstrip": False, "single_word": False},
            "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False,
                          "rstrip": False, "single_word": False},
            "unk_token": "<unk>", "pad_token": None, "spaces_between_special_tokens": False,
            "tokenizer_class": "PreTrainedTokenizerFast"}, model_type="mistral"),
        "unigram": _write(root / "unigram", unigram, {
            "add_bos_token": True, "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
            "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast",
            "model_input_names": ["input_ids", "attention_mask"], "backend": "tokenizers"}, model_type="gemma"),
        # no EOS at all: both give None (no config.json either)
        "wordpiece": _write(root / "wordpiece", _wordpiece_tokenizer(), {
            "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]", "pad_token": "[PAD]",
            "unk_token": "[UNK]", "tokenizer_class": "TokenizersBackend", "truncation_side": "left"}),
    }


def _variant(src: Path, dst: Path, *, config: dict | None = None, drop: tuple[str, ...] = (),
             model_type: str | None = None, files: dict | None = None) -> Path:
    """A copy of ``src`` with tokenizer_config.json keys changed (``config``) or removed (``drop``)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.update(config or {})
    for key in drop:
        cfg.pop(key, None)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    if model_type:
        (dst / "config.json").write_text(json.dumps({"model_type": model_type}))
    for name, content in (files or {}).items():
        if content is None:
            (dst / name).mkdir()
        else:
            (dst / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return dst


# --- equivalence -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["base", "poet", "coder", "moe-mixtral/base"])
def test_shared_models(name):
    folder = SHARED / name
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"{folder} is not on this machine")
    fast = assert_equivalent(folder)
    assert fast.eos_token_id == 1


@pytest.mark.parametrize("name", ["byte-level", "qwen-like", "llama2-metaspace", "llama2-legacy-layout", "unigram",
                                  "wordpiece"])
def test_built_tokenizers(built, name):
    fast = assert_equivalent(built[name])
    if name == "wordpiece":
        assert fast.eos_token_id is None
    else:
        assert fast.eos_token_id is not None


def test_no_bos_without_special_tokens(built):
    """add_bos_token and a BOS post-processor only act with add_special_tokens=True, which calibration never
    asks for: AutoTokenizer itself leaves BOS out of ``tok(s, add_special_tokens=False)``."""
    auto = AutoTokenizer.from_pretrained(str(built["llama2-metaspace"]))
    with_special = auto("Hello world")["input_ids"]
    assert with_special[0] == auto.bos_token_id
    assert _ids(auto, "Hello world") == with_special[1:] == _ids(fast_tokenizer(built["llama2-metaspace"]), "Hello world")
    with pytest.raises(NotImplementedError, match="add_special_tokens=False"):
        fast_tokenizer(built["llama2-metaspace"])("Hello world")


@pytest.mark.parametrize("model_type", sorted(MODEL_TYPES))
def test_model_types(byte_level, tmp_path, model_type):
    """Every model type the rule accepts keeps AutoTokenizer on TokenizersBackend (config.json is read)."""
    assert_equivalent(_variant(byte_level, tmp_path / "t", model_type=model_type), SYNTHETIC + TEXTS[:5])


@pytest.mark.parametrize("cls", ["TokenizersBackend", "PreTrainedTokenizerFast", "LlamaTokenizerFast", "LlamaTokenizer"])
@pytest.mark.parametrize("model_type", [None, "llama", "mistral", "phi3"])
def test_tokenizer_classes(byte_level, tmp_path, cls, model_type):
    """A Llama class over a byte-level tokenizer.json is loaded as TokenizersBackend too."""
    assert_equivalent(_variant(byte_level, tmp_path / "t", config={"tokenizer_class": cls}, model_type=model_type),
                      SYNTHETIC + TEXTS[:5])


@pytest.mark.parametrize("config", [
    {"add_prefix_space": True}, {"add_bos_token": True, "add_eos_token": True}, {"legacy": False},
    {"legacy": True}, {"clean_up_tokenization_spaces": True}, {"model_max_length": 4}, {"split_special_tokens": False},
    {"from_slow": True}, {"padding_side": "left", "truncation_side": "left"}, {"eos_token": None},
    {"unk_token": "<|end_of_text|>", "pad_token": "<|begin_of_text|>"},
    {"additional_special_tokens": ["<|begin_of_text|>"]}, {"extra_special_tokens": ["<|end_of_text|>"]},
    {"extra_special_tokens": {}}, {"additional_special_tokens": ["<|end_of_text|>"], "extra_special_tokens": {}},
    {"additional_special_tokens": [], "extra_special_tokens": []}, {"verbose": True},
    {"model_input_names": ["input_ids"], "errors": "strict", "use_default_system_prompt": True,
     "spaces_between_special_tokens": True, "processor_class": "X", "is_local": False, "name_or_path": "/x"},
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_inert_config_keys(byte_level, tmp_path, config):
    assert_equivalent(_variant(byte_level, tmp_path / "t", config=config), SYNTHETIC + TEXTS[:5])


def test_special_tokens_map_overrides_eos(built, tmp_path):
    """Without added_tokens_decoder, special_tokens_map.json's eos_token wins over tokenizer_config.json's."""
    d = _variant(built["llama2-metaspace"], tmp_path / "t", config={"eos_token": "<unk>"})
    fast = assert_equivalent(d, SYNTHETIC)
    assert fast.eos_token == "</s>"


# --- configurations transformers handles differently: None ------------------------------------------------

def _differs(folder: Path, text: str) -> bool:
    """AutoTokenizer's ids for ``text`` are not the raw tokenizer.json's (the reason for a None)."""
    raw = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    return _ids(AutoTokenizer.from_pretrained(str(folder)), text) != raw


def test_eos_missing_from_added_tokens(byte_level, tmp_path):
    """A special token that tokenizer.json lacks is added by transformers: it changes ids and gets a new id."""
    d = _variant(byte_level, tmp_path / "t", config={"eos_token": "<|eot|>"})
    assert fast_tokenizer(d) is None
    assert _differs(d, "end<|eot|>start")
    assert AutoTokenizer.from_pretrained(str(d)).eos_token_id == Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab_size()


def test_split_special_tokens(byte_level, tmp_path):
    d = _variant(byte_level, tmp_path / "t", config={"split_special_tokens": True})
    assert fast_tokenizer(d) is None
    assert _differs(d, "a<|end_of_text|>b")


def test_added_tokens_decoder_differs(built, tmp_path):
    """An added_tokens_decoder entry whose flags differ from tokenizer.json's is re-added with its flags."""
    cfg = json.loads((built["qwen-like"] / "tokenizer_config.json").read_text())
    think = next(k for k, v in cfg["added_tokens_decoder"].items() if v["content"] == "<think>")
    cfg["added_tokens_decoder"][think]["lstrip"] = True
    d = _variant(built["qwen-like"], tmp_path / "t", config={"added_tokens_decoder": cfg["added_tokens_decoder"]})
    assert fast_tokenizer(d) is None
    assert _differs(d, "a <think> b")


def test_qwen2_model_type(byte_level, tmp_path):
    """AutoTokenizer loads any qwen2 folder with Qwen2Tokenizer, which rebuilds the pipeline."""
    d = _variant(byte_level, tmp_path / "t", model_type="qwen2")
    assert fast_tokenizer(d) is None
    assert type(AutoTokenizer.from_pretrained(str(d))).__name__ == "Qwen2Tokenizer"


def test_llama_class_over_sentencepiece(built, tmp_path):
    """LlamaTokenizerFast over a Metaspace tokenizer.json is LlamaTokenizer, not TokenizersBackend."""
    d = _variant(built["llama2-metaspace"], tmp_path / "t", config={"tokenizer_class": "LlamaTokenizerFast"})
    assert fast_tokenizer(d) is None
    assert type(AutoTokenizer.from_pretrained(str(d))).__name__ == "LlamaTokenizer"


def test_chat_template(byte_level, tmp_path):
    template = "{% for m in messages %}<|begin_of_text|>{{ m['content'] }}<|end_of_text|>{% endfor %}"
    d = _variant(byte_level, tmp_path / "in-config", config={"chat_template": template})
    assert fast_tokenizer(d) is None
    assert AutoTokenizer.from_pretrained(str(d)).chat_template == template
    assert fast_tokenizer(_variant(byte_level, tmp_path / "jinja", files={"chat_template.jinja": template})) is None
    assert fast_tokenizer(_variant(byte_level, tmp_path / "json", files={"chat_template.json": {"chat_template": template}})) is None
    extra = _variant(byte_level, tmp_path / "dir", files={"additional_chat_templates": None})
    (extra / "additional_chat_templates" / "tool_use.jinja").write_text(template)
    assert fast_tokenizer(extra) is None


@pytest.mark.parametrize("change", [
    {"tokenizer_class": "GPT2Tokenizer"}, {"tokenizer_class": "Qwen2Tokenizer"}, {"tokenizer_class": "GemmaTokenizer"},
    {"tokenizer_class": "MyTokenizer"}, {"tokenizer_class": None}, {"auto_map": {"AutoTokenizer": [None, "x.T"]}},
    {"fix_mistral_regex": True}, {"image_token": "<|begin_of_text|>"}, {"fast_tokenizer_files": ["tokenizer.x.json"]},
    {"backend": "sentencepiece"}, {"padding_side": "middle"}, {"model_input_names": "input_ids"},
    {"eos_token": {"content": "<|end_of_text|>"}}, {"eos_token": 1},
    {"additional_special_tokens": ["<|end_of_text|>"], "extra_special_tokens": ["<|begin_of_text|>"]},
    {"extra_special_tokens": {"image_token": "<|begin_of_text|>"}},
    {"added_tokens_decoder": {"5": {"content": "<|end_of_text|>", "lstrip": False, "normalized": False, "rstrip": False,
                                    "single_word": False, "special": True}}},
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())[:60])
def test_unverified_config(byte_level, tmp_path, change):
    config = {k: v for k, v in change.items() if v is not None}
    d = _variant(byte_level, tmp_path / "t", config=config, drop=tuple(k for k, v in change.items() if v is None))
    assert fast_tokenizer(d) is None


@pytest.mark.parametrize("files", [
    {"config.json": {"model_type": "bert"}}, {"config.json": {"architectures": ["LlamaForCausalLM"]}},
    {"config.json": {"model_type": "llama", "auto_map": {"AutoConfig": "x.C"}}}, {"config.json": "{not json"},
    {"added_tokens.json": {"<new>": 700}}, {"tekken.json": {}},
    {"special_tokens_map.json": {"eos_token": "<|eot|>"}}, {"special_tokens_map.json": {"image_token": "<x>"}},
    {"special_tokens_map.json": {"additional_special_tokens": [{"content": "<|end_of_text|>"}]}},
], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items())[:60])
def test_unverified_files(byte_level, tmp_path, files):
    assert fast_tokenizer(_variant(byte_level, tmp_path / "t", files=files)) is None


def test_truncation_or_padding_in_tokenizer_json(byte_level, tmp_path):
    for name, setup in (("trunc", lambda t: t.enable_truncation(16)), ("pad", lambda t: t.enable_padding(pad_id=1))):
        d = _variant(byte_level, tmp_path / name)
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        setup(tok)
        tok.save(str(d / "tokenizer.json"))
        assert fast_tokenizer(d) is None


@needs_verified_version
def test_other_transformers_version(byte_level, monkeypatch):
    """The rule was read from transformers 5.24: under another version the fast path stays off."""
    import mergequant.quant.fast_tokenizer as ft

    assert fast_tokenizer(byte_level) is not None
    monkeypatch.setattr(ft, "TRANSFORMERS_VERSION", ("5", "23"))
    assert fast_tokenizer(byte_level) is None


# --- load_tokenizer and calibration ------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["corrupt-tokenizer-json", "corrupt-config", "no-tokenizer-json", "no-files"])
def test_errors_unchanged(byte_level, tmp_path, damage):
    """fast=True falls back to AutoTokenizer for files it cannot read: the same one-line error either way."""
    d = _variant(byte_level, tmp_path / "t")
    if damage == "corrupt-tokenizer-json":
        (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    elif damage == "corrupt-config":
        (d / "tokenizer_config.json").write_text("{oops")
    elif damage == "no-tokenizer-json":
        (d / "tokenizer.json").unlink()
        (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "NoSuchTokenizer"}))
    else:
        for f in list(d.iterdir()):
            f.unlink()
    assert fast_tokenizer(d) is None
    messages = []
    for fast in (False, True):
        with pytest.raises(MergeQuantError) as e:
            calib.load_tokenizer(d, "--method gptq", fast=fast)
        messages.append(str(e.value))
    assert messages[0] == messages[1] and "\n" not in messages[0] and str(d) in messages[0]


@needs_verified_version
def test_load_tokenizer_fast_flag(byte_level):
    assert isinstance(calib.load_tokenizer(byte_level, "x", fast=True), FastTokenizer)
    assert type(calib.load_tokenizer(byte_level, "x")) is TokenizersBackend


@needs_verified_version
def test_calibration_batch_identical(tmp_path):
    folder = MIXTRAL if (MIXTRAL / "tokenizer.json").is_file() else None
    if folder is None:
        pytest.skip(f"{MIXTRAL} is not on this machine")
    src = tmp_path / "calib.txt"
    src.write_text(AUSTEN[:40_000] + "\n\n" + SHAKESPEARE[:40_000])
    fast = calib.load_tokenizer(folder, "--method gptq", fast=True)
    assert isinstance(fast, FastTokenizer)
    auto = calib.load_tokenizer(folder, "--method gptq")
    a = calib.calibration_batch(str(src), fast, samples=16, seqlen=256, seed=5)
    b = calib.calibration_batch(str(src), auto, samples=16, seqlen=256, seed=5)
    assert a.shape == (16, 256) and torch.equal(a, b)
    # messages records: refused the same way (neither has a chat template)
    msgs = tmp_path / "chat.jsonl"
    msgs.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    errors = []
    for tok in (fast, auto):
        with pytest.raises(calib.CalibrationError) as e:
            calib.calibration_batch(str(msgs), tok, samples=1, seqlen=1)
        errors.append(str(e.value))
    assert errors[0] == errors[1]


@needs_verified_version
def test_fast_path_does_not_import_transformers(byte_level, tmp_path):
    """The point of the fast path: calibration ids in a fresh interpreter without importing transformers."""
    src = tmp_path / "calib.txt"
    src.write_text(AUSTEN[:20_000])
    code = (f"import sys; from mergequant.quant.calib import calibration_batch, load_tokenizer\n"
            f"tok = load_tokenizer({str(byte_level)!r}, 'x', fast=True)\n"
            f"ids = calibration_batch({str(src)!r}, tok, samples=4, seqlen=64)\n"
            f"assert type(tok).__name__ == 'FastTokenizer', tok\n"
            f"assert 'transformers' not in sys.modules, 'transformers was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
