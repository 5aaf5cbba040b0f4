"""Calibration tokenization with the ``tokenizers`` library alone, where that provably equals AutoTokenizer.

Why: ``mergequant quantize`` needs a tokenizer only to turn --calib text into token ids and an EOS id.
``from transformers import AutoTokenizer`` plus ``from_pretrained`` costs ~1.3 s on a 2-core machine (a run
that should take ~10 s); ``import tokenizers`` and loading tokenizer.json take ~0.015 s. For a folder whose
tokenizer AutoTokenizer would load as a plain ``TokenizersBackend`` over ``tokenizer.json``, transformers adds
nothing to the ids of ``tokenizer(text, add_special_tokens=False)``: it calls the same Rust tokenizer's
``encode_batch``. So :func:`fast_tokenizer` loads ``tokenizer.json`` directly when, and only when, every
condition below holds, and returns None otherwise (the caller then uses AutoTokenizer exactly as before, errors
included).

Equivalence rule (read from transformers 5.24's source; anything not listed here gives None):

1. transformers 5.24.x is installed (these rules were read from it; another version may load differently).
2. ``tokenizer.json`` loads with ``tokenizers.Tokenizer.from_file`` and has no truncation or padding
   (TokenizersBackend.__init__ would turn a padding into a ``pad_token`` that may be added as a token).
3. ``tokenizer_config.json`` is a JSON object whose ``tokenizer_class`` makes AutoTokenizer build exactly
   ``TokenizersBackend`` from tokenizer.json (models/auto/tokenization_auto.py, AutoTokenizer.from_pretrained):
   ``TokenizersBackend`` or its alias ``PreTrainedTokenizerFast``; or ``LlamaTokenizer[Fast]`` when
   tokenizer.json contains ``"ByteLevel"`` (the ``_tokenizer_json_has_byte_level`` branch). Any other class
   (LlamaTokenizer over sentencepiece, GemmaTokenizer, Qwen2Tokenizer, GPT2Tokenizer...) has its own
   ``__init__`` that rebuilds the normalizer / pre-tokenizer / model from vocab and merges
   (``TokenizersBackend.convert_to_native_format``), and sets default special tokens: not equivalent.
4. ``config.json``, when present, has a ``model_type`` in :data:`MODEL_TYPES` and no ``auto_map`` or
   ``model_name``: AutoTokenizer reads it, and for some model types (``qwen2``, listed in
   MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS) it replaces the declared class with the model's own
   (Qwen2Tokenizer). No ``tekken.json`` (MistralCommonBackend, if mistral-common is installed), no
   ``auto_map`` in tokenizer_config.json (remote code), no ``added_tokens.json``.
5. No chat template: none in tokenizer_config.json, no ``chat_template.jinja`` or ``chat_template.json``,
   no ``additional_chat_templates/`` (PreTrainedTokenizerBase.from_pretrained / _from_pretrained). A chat
   template means the calibration data may need ``apply_chat_template``, which needs transformers.
6. Every tokenizer_config.json key is one of :data:`INERT_KEYS` (read and ignored for encoding by
   TokenizersBackend: e.g. ``add_bos_token``/``add_eos_token`` are popped when tokenizer.json exists,
   ``add_prefix_space`` is only stored, ``legacy`` only matters when converting a sentencepiece model,
   ``clean_up_tokenization_spaces`` only when decoding), or a special-token key checked by 7-8, or
   ``padding_side``/``truncation_side`` ("left"/"right"), ``model_input_names`` (a list of strings),
   ``split_special_tokens`` (false; true would set the backend's ``encode_special_tokens``), ``backend``
   ("tokenizers").
7. Every special token (``bos_token``, ``eos_token``, ``unk_token``, ``sep_token``, ``pad_token``,
   ``cls_token``, ``mask_token``, ``additional_special_tokens``/``extra_special_tokens`` as a list, from
   tokenizer_config.json and, when that has no ``added_tokens_decoder``, from ``special_tokens_map.json``)
   is a string or an AddedToken object that is already an added token of tokenizer.json: TokenizersBackend
   adds every special token missing from the backend (which changes the ids), and only those.
8. Every ``added_tokens_decoder`` entry equals tokenizer.json's added token with that id in all six fields
   (TokenizersBackend.__init__ re-adds each entry, which would otherwise change its matching flags).

EOS: AutoTokenizer's ``eos_token_id`` is ``backend.token_to_id(str(eos_token))`` (PreTrainedTokenizerBase
.__getattr__ -> convert_tokens_to_ids), ``eos_token`` coming from tokenizer_config.json, overridden by
special_tokens_map.json when the config has no ``added_tokens_decoder`` (_from_pretrained's legacy branch).
Neither generation_config.json nor config.json's ``eos_token_id`` is read. :class:`FastTokenizer` does the
same lookup. tests/test_fast_tokenizer.py checks ids and EOS against AutoTokenizer for many tokenizers.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["INERT_KEYS", "MODEL_TYPES", "TOKENIZER_CLASSES", "FastTokenizer", "fast_tokenizer"]

# the transformers release the rules above were read from (major, minor)
TRANSFORMERS_VERSION = ("5", "24")
# tokenizer_class values AutoTokenizer loads as TokenizersBackend over tokenizer.json
TOKENIZER_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})
# ... and these, only when tokenizer.json is byte-level
BYTE_LEVEL_CLASSES = frozenset({"LlamaTokenizer", "LlamaTokenizerFast"})
# config.json model types for which AutoTokenizer keeps the declared class above (mergequant's families
# but qwen2, which AutoTokenizer always loads as Qwen2Tokenizer); no config.json is fine too
MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen3", "qwen2_moe", "qwen3_moe", "gemma", "gemma2",
                         "gemma3_text", "phi3"})
# tokenizer_config.json keys that change neither the ids of tokenizer(text, add_special_tokens=False) nor the
# EOS id of a TokenizersBackend built from tokenizer.json
INERT_KEYS = frozenset({
    "tokenizer_class",  # checked against TOKENIZER_CLASSES
    "model_max_length",  # truncation only when asked (calibration never asks); a warning otherwise
    "clean_up_tokenization_spaces", "spaces_between_special_tokens",  # decoding
    "add_bos_token", "add_eos_token",  # popped by _from_pretrained when tokenizer.json exists
    "add_prefix_space",  # stored on the tokenizer, the backend's pre-tokenizer is left as in tokenizer.json
    "legacy",  # sentencepiece conversion only (no tokenizer.json)
    "from_slow", "errors", "use_default_system_prompt", "processor_class", "verbose",  # unused / stored
    "is_local", "local_files_only", "name_or_path",  # overwritten by _from_pretrained
})
NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
LIST_SPECIAL = ("additional_special_tokens", "extra_special_tokens")
ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


class FastTokenizer:
    """The part of a transformers tokenizer that calibration uses, over a ``tokenizers.Tokenizer``: call it
    on one string with ``add_special_tokens=False`` for ``{"input_ids": [...]}``; ``eos_token_id``;
    ``chat_template`` (always None: a folder with a chat template never gets one)."""

    chat_template = None

    def __init__(self, backend, eos_token: str | None, name_or_path: str = ""):
        self.backend = backend
        self.eos_token = eos_token
        self.eos_token_id = None if eos_token is None else backend.token_to_id(eos_token)
        self.name_or_path = name_or_path

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        # transformers' default is True (a post-processor may then add BOS/EOS): only False is known equal
        if add_special_tokens:
            raise NotImplementedError("FastTokenizer encodes without special tokens only: pass add_special_tokens=False")
        if not isinstance(text, str):
            raise TypeError(f"FastTokenizer encodes one string, got {type(text).__name__}")
        # what TokenizersBackend._encode_plus calls for one text
        return {"input_ids": self.backend.encode_batch([text], add_special_tokens=False)[0].ids}

    def __repr__(self) -> str:
        return f"FastTokenizer({self.name_or_path!r}, eos_token={self.eos_token!r})"


def fast_tokenizer(folder: str | Path) -> FastTokenizer | None:
    """A :class:`FastTokenizer` for ``folder`` when it provably gives AutoTokenizer's ids and EOS id (see the
    module docstring for the rule), else None. Never raises for bad files: None lets AutoTokenizer report."""
    try:
        return _fast_tokenizer(Path(folder))
    except Exception:  # unreadable or malformed files: AutoTokenizer's error path speaks
        return None


def _transformers_version_ok() -> bool:
    from importlib import metadata

    try:
        version = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return False
    return tuple(version.split(".")[:2]) == TRANSFORMERS_VERSION


def _json_object(path: Path) -> dict | None:
    """A JSON object file's contents; None for another JSON value (a bad file raises, see fast_tokenizer)."""
    from mergequant.io.model_files import load_json_file

    data = load_json_file(path)
    return data if isinstance(data, dict) else None


def _fast_tokenizer(folder: Path) -> FastTokenizer | None:
    tokenizer_file = folder / "tokenizer.json"
    config_file = folder / "tokenizer_config.json"
    if not tokenizer_file.is_file() or not config_file.is_file():
        return None
    # rules 4-5: files that change the class, add tokens or bring a chat template
    if any((folder / name).exists() for name in ("added_tokens.json", "tekken.json", "chat_template.jinja",
                                                 "chat_template.json", "additional_chat_templates")):
        return None
    config = _json_object(config_file)
    if config is None or not _config_keys_ok(config):
        return None
    model_config = folder / "config.json"
    if model_config.exists():
        mc = _json_object(model_config)
        if mc is None or mc.get("model_type") not in MODEL_TYPES or "auto_map" in mc or "model_name" in mc:
            return None
    cls = config.get("tokenizer_class")
    if cls not in TOKENIZER_CLASSES and (
            cls not in BYTE_LEVEL_CLASSES or '"ByteLevel"' not in tokenizer_file.read_text(encoding="utf-8")):
        return None
    if not _transformers_version_ok():
        return None

    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(tokenizer_file))
    if backend.truncation is not None or backend.padding is not None:
        return None
    added = backend.get_added_tokens_decoder()  # {id: AddedToken}
    added_contents = {t.content for t in added.values()}

    # rule 8: added_tokens_decoder entries as in tokenizer.json
    decoder = config.get("added_tokens_decoder")
    if decoder is not None:
        if not isinstance(decoder, dict):
            return None
        for idx, entry in decoder.items():
            if not isinstance(entry, dict) or set(entry) != set(ADDED_TOKEN_FIELDS):
                return None
            token = added.get(int(idx))
            if token is None or any(getattr(token, f) != entry[f] for f in ADDED_TOKEN_FIELDS):
                return None

    # rule 7: special tokens, with special_tokens_map.json merged in as _from_pretrained does
    specials = {k: config[k] for k in NAMED_SPECIAL + LIST_SPECIAL if k in config}
    if specials.get("extra_special_tokens", None) in ({}, []):
        del specials["extra_special_tokens"]  # empty: _from_pretrained drops it or replaces it with the other spelling
    if all(k in specials for k in LIST_SPECIAL):
        return None  # both spellings: which one wins depends on their values
    special_map = folder / "special_tokens_map.json"
    if decoder is None and special_map.exists():
        extra = _json_object(special_map)
        if extra is None or not set(extra) <= set(NAMED_SPECIAL + LIST_SPECIAL):
            return None
        for key, value in extra.items():
            if key in LIST_SPECIAL:
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    return None
                specials[f"map:{key}"] = value  # merged or kept aside: either way it must be present
            else:
                specials[key] = _map_token(value)
    contents = []
    for key, value in specials.items():
        if key.removeprefix("map:") in LIST_SPECIAL:
            if not isinstance(value, list):
                return None
            contents += [_config_token(v) for v in value]
        elif value is not None:
            contents.append(_config_token(value))
    if any(c is None or c not in added_contents for c in contents):
        return None

    backend.encode_special_tokens = False  # split_special_tokens is false (rule 6)
    eos = specials.get("eos_token")
    return FastTokenizer(backend, None if eos is None else _config_token(eos), str(folder))


def _config_keys_ok(config: dict) -> bool:
    """Rule 6: every tokenizer_config.json key known and harmless (special tokens are checked later)."""
    for key, value in config.items():
        if key in INERT_KEYS or key in NAMED_SPECIAL or key in LIST_SPECIAL or key == "added_tokens_decoder":
            continue
        if key in ("padding_side", "truncation_side"):
            if value not in ("left", "right"):
                return False
        elif key == "model_input_names":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                return False
        elif key == "split_special_tokens":
            if value is not False:
                return False
        elif key == "backend":
            if value != "tokenizers":
                return False
        else:
            return False
    return True


def _config_token(value) -> str | None:
    """The content of a special token as tokenizer_config.json writes it: a string, or an AddedToken object
    (``{"__type": "AddedToken", "content": ...}``, converted by convert_added_tokens); None for anything
    transformers would refuse or treat otherwise."""
    if isinstance(value, str):
        return value
    if (isinstance(value, dict) and value.get("__type") == "AddedToken" and isinstance(value.get("content"), str)
            and set(value) <= {"__type", *ADDED_TOKEN_FIELDS}):
        return value["content"]
    return None


def _map_token(value):
    """A named token from special_tokens_map.json: a string, or a dict _from_pretrained turns into an
    AddedToken; returned as tokenizer_config.json would write it (see _config_token), else a non-token."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str) and set(value) <= set(ADDED_TOKEN_FIELDS):
        return {"__type": "AddedToken", "content": value["content"]}
    return object()  # refused by _config_token
