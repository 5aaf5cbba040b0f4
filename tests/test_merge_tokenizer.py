"""Tokenizer merging (issue 13, item 4): embedding and lm_head rows aligned by token string.

Fixtures: tiny float32 Llamas with the shared BPE tokenizer (``base``, ``a``), ``b`` whose tokenizer has three
extra added tokens and three extra embedding rows, ``c`` whose vocabulary is permuted (every id moved, rows moved
with them) with two extra BPE tokens (and their merges) and one of ``b``'s added tokens.

- differential against mergekit 0.1.5 (``tokenizer_source: union``, ``base``, and a ``tokenizer:`` section with
  ``tokens:`` overrides and ``pad_to_multiple_of``): for every token of our output tokenizer, our embedding and
  lm_head rows equal mergekit's rows *for the same token string* (ids may differ), padding rows too, every other
  tensor identical, same token set;
- logits: a model merged with its own permuted copy, written in the permuted copy's vocabulary, gives the
  original model's logits token for token (by string), through transformers;
- refusals: slow-only tokenizers, unknown models in ``tokens:``, both ``tokenizer`` and ``tokenizer_source``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mergequant.demo import build_tiny_llama, finetune_of, write_checkpoint
from mergequant.errors import MergeQuantError
from mergequant.io.checkpoint import Checkpoint
from mergequant.merge.run import MergeOptions, run_merge

# the bundled byte-level BPE tokenizer of the tiny Llamas (2048 tokens, the same as the shared tiny base's)
TOKENIZER = Path(__file__).resolve().parents[1] / "mergequant" / "data" / "tokenizer.json"
VOCAB = ("embed_tokens", "lm_head")


def _tokenizer_json() -> dict:
    return json.loads(TOKENIZER.read_text())


def _write_tok(path: Path, tok: dict) -> None:
    (path / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"backend": "tokenizers", "bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "TokenizersBackend"}))


def _with_vocab(src: Path, dst: Path, tok: dict, perm: torch.Tensor, extra_rows: int, seed: int) -> Path:
    """``src``'s weights with vocabulary rows re-indexed (new row ``perm[i]`` = old row i) and ``extra_rows``
    random rows appended, saved with tokenizer ``tok``."""
    ck = Checkpoint.open(src)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in ck.tensors:
        x = ck.get(name).clone()
        if any(k in name for k in VOCAB):
            y = torch.empty_like(x)
            y[perm] = x
            x = torch.cat([y, torch.randn((extra_rows, x.shape[1]), generator=gen) * 0.05])
        out[name] = x
    cfg = dict(ck.config, vocab_size=ck.config["vocab_size"] + extra_rows)
    write_checkpoint(dst, cfg, out, shards=1)
    _write_tok(dst, tok)
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    tok = _tokenizer_json()
    n = len(tok["model"]["vocab"])  # 2048 today; every id below n is a vocabulary token
    assert sorted(tok["model"]["vocab"].values()) == list(range(n))
    base = build_tiny_llama(root / "base", seed=0, dtype=torch.float32, hidden=64, intermediate=128, layers=2, vocab=n,
                            shards=1)
    _write_tok(base, tok)
    a = finetune_of(base, root / "a", seed=1, shards=1)
    _write_tok(a, tok)
    # b: three added tokens (two special), three extra rows
    tb = json.loads(json.dumps(tok))
    for k, (content, special) in enumerate([("<extra_0>", True), ("<extra_1>", True), ("[[tool]]", False)]):
        tb["added_tokens"].append({"id": n + k, "content": content, "single_word": False, "lstrip": False,
                                   "rstrip": False, "normalized": not special, "special": special})
    b = _with_vocab(finetune_of(base, root / "b0", seed=2, shards=1), root / "b", tb, torch.arange(n), 3, seed=3)
    # c: every id permuted (special tokens included), two new BPE tokens with their merges, and b's <extra_1>
    gen = torch.Generator().manual_seed(4)
    perm = torch.randperm(n, generator=gen)
    tc = json.loads(json.dumps(tok))
    tc["model"]["vocab"] = {t: int(perm[i]) for t, i in tok["model"]["vocab"].items()}
    for e in tc["added_tokens"]:
        e["id"] = int(perm[e["id"]])
    vocab = tc["model"]["vocab"]
    pieces = sorted((t for t in vocab if t.isalpha() and len(t) >= 3), key=lambda t: tok["model"]["vocab"][t])
    new = []
    for x in pieces:
        for y in pieces:
            if x + y not in vocab and len(new) < 2 and x + y not in new:
                new.append(x + y)
                vocab[x + y] = n + len(new) - 1
                tc["model"]["merges"].append([x, y] if isinstance(tc["model"]["merges"][0], list) else f"{x} {y}")
                break
    # and three of the base's tokens removed (ones no merge builds on, with the merge that builds them): for those
    # c's rows come from the base (present in the base and another model) or the mean (base absent)
    parts = {p for m in tok["model"]["merges"] for p in (m if isinstance(m, list) else m.split(" "))}
    gone = [t for t in pieces if t not in parts and t not in new][:3]
    for t in gone:
        del vocab[t]
    tc["model"]["merges"] = [m for m in tc["model"]["merges"]
                             if "".join(m if isinstance(m, list) else m.split(" ")) not in gone]
    tc["added_tokens"].append({"id": n + 2, "content": "<extra_1>", "single_word": False, "lstrip": False,
                               "rstrip": False, "normalized": False, "special": True})
    c = _with_vocab(finetune_of(base, root / "c0", seed=5, shards=1), root / "c", tc, perm, 3, seed=6)
    # d: base itself, permuted, plus one added token (for the logits test)
    td = json.loads(json.dumps(tc))
    td["model"]["merges"] = tok["model"]["merges"]
    td["model"]["vocab"] = {t: int(perm[i]) for t, i in tok["model"]["vocab"].items()}
    td["added_tokens"][-1] = dict(td["added_tokens"][-1], id=n, content="<only_d>")
    d = _with_vocab(base, root / "d", td, perm, 1, seed=7)
    return {"base": base, "a": a, "b": b, "c": c, "d": d, "root": root, "new": new, "gone": gone, "n": n}


RECIPES = {
    "union": """
        merge_method: linear
        base_model: $base
        models:
          - {model: $base, parameters: {weight: 0.4}}
          - {model: $b, parameters: {weight: 0.3}}
          - {model: $c, parameters: {weight: 0.3}}
        dtype: float32
        tokenizer_source: union
    """,
    "base": """
        merge_method: task_arithmetic
        base_model: $base
        models:
          - {model: $a, parameters: {weight: 0.5}}
          - {model: $b, parameters: {weight: 0.7}}
          - {model: $c, parameters: {weight: 0.4}}
        dtype: float32
        tokenizer_source: base
    """,
    "tokens": """
        merge_method: task_arithmetic
        base_model: $base
        models:
          - {model: $b, parameters: {weight: 0.6}}
          - {model: $c, parameters: {weight: 0.5}}
        dtype: float32
        tokenizer:
          source: union
          pad_to_multiple_of: 64
          tokens:
            "<extra_0>": {source: {kind: zero}}
            "[[tool]]": {source: $c_tool}
            "<s>": {source: $b, force: true}
            "<brand_new>": {source: {kind: model_token, model: $base, token: "the"}}
    """,
}


def _recipe(name: str, m: dict, root: Path) -> Path:
    text = textwrap.dedent(RECIPES[name])
    # `[[tool]]` exists in b only; `source: c` for it would fail in mergekit (assert), so it names b
    text = text.replace("$c_tool", str(m["b"]))
    for k in ("base", "a", "b", "c"):
        text = text.replace(f"${k}", str(m[k]))
    p = root / f"{name}.yaml"
    p.write_text(text)
    return p


MERGEKIT_SCRIPT = """
import sys, yaml, logging
logging.disable(logging.WARNING)
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
for cfg, out in zip(sys.argv[1::2], sys.argv[2::2]):
    with open(cfg) as f:
        c = MergeConfiguration.model_validate(yaml.safe_load(f))
    run_merge(c, out, options=MergeOptions(cuda=False, copy_tokenizer=True, lazy_unpickle=False, quiet=True))
"""


@pytest.fixture(scope="module")
def merged(models) -> dict[str, tuple[Path, Path]]:
    pytest.importorskip("mergekit")
    root = models["root"]
    args, outs = [], {}
    for name in RECIPES:
        r = _recipe(name, models, root)
        outs[name] = (r, root / f"ours-{name}", root / f"mk-{name}")
        args += [str(r), str(root / f"mk-{name}")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", MERGEKIT_SCRIPT, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for r, ours, _ in outs.values():
        run_merge(r, MergeOptions(out=ours, quiet=True, workers=1, fsync=False), log=lambda *_: None)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return {k: (o, m) for k, (_, o, m) in outs.items()}


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            for k in s.keys():
                out[k] = s.get_tensor(k)
    return out


def _vocab(d: Path) -> dict[str, int]:
    """Token -> id as the tokenizers library loads the directory's tokenizer.json (what the model will see)."""
    import tokenizers
    return tokenizers.Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab(with_added_tokens=True)


def test_token_ids_as_tokenizers_assigns(models):
    """Our reading of tokenizer.json gives the ids the tokenizers library gives (c has vocabulary gaps, so its
    added token's written id is not the one used)."""
    from mergequant.merge.tokenizer import token_ids
    for k in ("base", "b", "c", "d"):
        assert token_ids(json.loads((models[k] / "tokenizer.json").read_text()))[0] == _vocab(models[k]), k


@pytest.mark.slow  # runs mergekit
@pytest.mark.parametrize("name", list(RECIPES))
def test_rows_match_mergekit_by_token(merged, name):
    ours_dir, mk_dir = merged[name]
    ours, mk = _tensors(ours_dir), _tensors(mk_dir)
    vo, vm = _vocab(ours_dir), _vocab(mk_dir)
    assert set(vo) == set(vm)
    assert set(ours) == set(mk)
    n_tok = len(vo)
    rows = json.loads((ours_dir / "config.json").read_text())["vocab_size"]
    toks = sorted(vo)
    io = torch.tensor([vo[t] for t in toks])
    im = torch.tensor([vm[t] for t in toks])
    worst = 0.0
    for k in ours:
        if any(v in k for v in VOCAB):
            assert ours[k].shape[0] == rows == mk[k].shape[0], (k, ours[k].shape, mk[k].shape, rows)
            worst = max(worst, float((ours[k][io] - mk[k][im]).abs().max()))
            if rows > n_tok:  # padding rows: mergekit fills them with the mean of the token rows, so do we
                worst = max(worst, float((ours[k][n_tok:] - mk[k][n_tok:]).abs().max()))
        else:
            assert ours[k].shape == mk[k].shape, k
            worst = max(worst, float((ours[k] - mk[k]).abs().max()))
    assert worst <= 1e-6, f"{name}: max |ours - mergekit| by token = {worst}"
    print(f"{name}: {n_tok} tokens, {rows} rows, max |ours - mergekit| = {worst:.2e}")


def test_union_tokenizer_encodes_both_vocabularies(merged, models):
    tokenizers = pytest.importorskip("tokenizers")
    ours_dir = merged["union"][0]
    t = tokenizers.Tokenizer.from_file(str(ours_dir / "tokenizer.json"))
    base = tokenizers.Tokenizer.from_file(str(models["base"] / "tokenizer.json"))
    text = "To be, or not to be, that is the question."
    assert t.encode(text).ids == base.encode(text).ids  # the base's own ids and splits are unchanged
    for special in ("<extra_0>", "<extra_1>", "[[tool]]"):
        enc = t.encode(f"hello {special} world")
        assert t.token_to_id(special) in enc.ids
        assert special in t.decode(enc.ids, skip_special_tokens=False)
    for word in models["new"]:  # c's extra BPE tokens exist, and their merges build them
        assert t.token_to_id(word) is not None
    assert json.loads((ours_dir / "config.json").read_text())["vocab_size"] == t.get_vocab_size()


def test_same_logits_for_shared_tokens(models, tmp_path):
    """base merged (linear, 1:1) with its own vocabulary-permuted copy, output in the copy's vocabulary: the
    merged model is the base, so its logits equal the base's token for token, looked up by string."""
    transformers = pytest.importorskip("transformers")
    r = tmp_path / "r.yaml"
    r.write_text(f"merge_method: linear\nbase_model: {models['base']}\nmodels:\n"
                 f"  - {{model: {models['base']}, parameters: {{weight: 1}}}}\n"
                 f"  - {{model: {models['d']}, parameters: {{weight: 1}}}}\n"
                 f"tokenizer_source: {models['d']}\nchat_template: chatml\n")
    out = tmp_path / "out"
    run_merge(r, MergeOptions(out=out, quiet=True, workers=1, fsync=False), log=lambda *_: None)
    tok_m = transformers.AutoTokenizer.from_pretrained(out)
    tok_b = transformers.AutoTokenizer.from_pretrained(models["base"])
    assert "<|im_start|>" in tok_m.chat_template
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["bos_token_id"] == tok_m.convert_tokens_to_ids("<s>") != 0  # the permuted id of <s>
    assert cfg["eos_token_id"] == tok_m.convert_tokens_to_ids("</s>")
    m = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32).eval()
    text = "Shall I compare thee to a summer's day? Thou art more lovely."
    ids_m, ids_b = tok_m(text)["input_ids"], tok_b(text)["input_ids"]
    assert tok_m.convert_ids_to_tokens(ids_m) == tok_b.convert_ids_to_tokens(ids_b)
    assert ids_m != ids_b  # the permuted vocabulary really is different
    with torch.no_grad():
        lm = m(torch.tensor([ids_m])).logits[0]
        lb = b(torch.tensor([ids_b])).logits[0]
    vm, vb = tok_m.get_vocab(), tok_b.get_vocab()
    shared = sorted(set(vm) & set(vb))
    assert len(shared) == models["n"]
    cm, cb = torch.tensor([vm[t] for t in shared]), torch.tensor([vb[t] for t in shared])
    assert torch.allclose(lm[:, cm], lb[:, cb], atol=1e-5, rtol=0), float((lm[:, cm] - lb[:, cb]).abs().max())


def _refused(tmp_path, text: str, match: str):
    r = tmp_path / "r.yaml"
    r.write_text(text)
    with pytest.raises(MergeQuantError, match=match):
        run_merge(r, MergeOptions(out=tmp_path / "o", quiet=True, dry_run=True))


def test_refusals(models, tmp_path):
    def recipe(other: Path) -> str:
        return (f"merge_method: linear\nmodels:\n  - {{model: {models['base']}, parameters: {{weight: 1}}}}\n"
                f"  - {{model: {other}, parameters: {{weight: 1}}}}\n")

    b = models["b"]
    head = recipe(b)
    _refused(tmp_path, head + "tokenizer_source: union\ntokenizer: {source: base}\n", "not both")
    _refused(tmp_path, head + "tokenizer:\n  tokens: {'<x>': {source: nowhere}}\n", "not a model of this recipe")
    _refused(tmp_path, head + "tokenizer:\n  pad_to_multiple_of: 0\n", "pad_to_multiple_of")
    _refused(tmp_path, head + "chat_template: nosuchtemplate\n", "chat_template")
    # different vocabularies without tokenizer merging: refused as before
    _refused(tmp_path, head, "vocabulary size")
    slow = tmp_path / "slow"
    shutil.copytree(b, slow)
    (slow / "tokenizer.json").unlink()
    (slow / "tokenizer.model").write_bytes(b"\x00")
    _refused(tmp_path, recipe(slow) + "tokenizer_source: union\n", "slow tokenizer")


def test_padding_rows_kept(models, tmp_path):
    """A Qwen2.5-like base (more embedding rows than tokens): its padding rows and config.vocab_size survive
    (mergekit #425 trims them), by index from the inputs that have the same padding row, else the mean of the
    input's token rows."""
    tok = _tokenizer_json()
    N = models["n"]
    pad = _with_vocab(models["base"], tmp_path / "pad", tok, torch.arange(N), 64, seed=8)
    pad_ft = finetune_of(pad, tmp_path / "pad_ft", seed=9, shards=1)
    _write_tok(pad_ft, tok)
    body = f"merge_method: linear\nmodels:\n  - {{model: {pad}, parameters: {{weight: 0.25}}}}\n"

    # same tokenizer, tokenizer_source: base: the plain merge, every row kept
    r = tmp_path / "same.yaml"
    r.write_text(body + f"  - {{model: {pad_ft}, parameters: {{weight: 0.75}}}}\ndtype: float32\ntokenizer_source: base\n")
    run_merge(r, MergeOptions(out=tmp_path / "same", quiet=True, workers=1, fsync=False), log=lambda *_: None)
    out = _tensors(tmp_path / "same")
    assert json.loads((tmp_path / "same" / "config.json").read_text())["vocab_size"] == N + 64
    x, y = _tensors(pad), _tensors(pad_ft)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[k].shape[0] == N + 64
        assert torch.allclose(out[k], 0.25 * x[k] + 0.75 * y[k], atol=1e-6, rtol=0)

    # union with b (3 added tokens at ids N..N+2): padding rows N+3.. from pad by index, plus b's mean row
    r = tmp_path / "union.yaml"
    r.write_text(body + f"  - {{model: {models['b']}, parameters: {{weight: 0.75}}}}\ndtype: float32\ntokenizer_source: union\n")
    run_merge(r, MergeOptions(out=tmp_path / "union", quiet=True, workers=1, fsync=False), log=lambda *_: None)
    out, b = _tensors(tmp_path / "union"), _tensors(models["b"])
    assert json.loads((tmp_path / "union" / "config.json").read_text())["vocab_size"] == N + 64
    v = _vocab(tmp_path / "union")
    assert len(v) == N + 3 and v["<extra_0>"] == N
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[k].shape[0] == N + 64
        # b's view in the output vocabulary: its rows by token (same ids here), then the mean of those rows
        b_aligned = b[k][:N + 3]
        expect_pad = 0.25 * x[k][N + 3:] + 0.75 * b_aligned.double().mean(0).float()
        assert torch.allclose(out[k][N + 3:], expect_pad, atol=1e-6, rtol=0)
        # an added token only b has: b's row for every input (the donor), so the merge is b's row
        assert torch.allclose(out[k][N], b[k][N], atol=1e-6, rtol=0)
        assert torch.allclose(out[k][:N], 0.25 * x[k][:N] + 0.75 * b[k][:N], atol=1e-6, rtol=0)


def test_chat_template_auto_and_jinja(tmp_path):
    from mergequant.merge.tokenizer import CHATML, resolve_chat_template
    dirs = []
    for k, t in enumerate(["{{ 'one' }} template A", "{{ 'two' }} template B", "{{ 'two' }} template B"]):
        d = tmp_path / str(k)
        d.mkdir()
        (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": t}))
        dirs.append(d)
    assert resolve_chat_template("auto", dirs, "x") == "{{ 'two' }} template B"  # the most common
    assert resolve_chat_template("auto", [tmp_path], "x") is None  # none: leave the tokenizer's
    assert resolve_chat_template("chatml", [], "x") == CHATML
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_chat_template(jinja, [], "x") == jinja
