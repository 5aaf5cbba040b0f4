"""Model cards from one place (mergequant/card.py): front matter that round-trips through
huggingface_hub.ModelCard, licenses carried from the parents, push-time base_model rewriting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from mergequant.card import (MODEL_PATH_PLACEHOLDER, CardError, license_from_dir, license_of, merge_card,
                             quant_card, rewrite_card, split_card, validate_card)

RECIPE = "merge_method: ties\nbase_model: org/base\nmodels:\n  - model: ./poet\n  - model: ./coder\n"


def parent(tmp_path: Path, name: str, license: str | None = None, *, in_config: bool = False) -> Path:
    d = tmp_path / name
    d.mkdir()
    cfg = {"model_type": "llama"}
    if license and in_config:
        cfg["license"] = license
    (d / "config.json").write_text(json.dumps(cfg))
    if license and not in_config:
        (d / "README.md").write_text(f"---\nlicense: {license}\ntags: [x]\n---\n# {name}\n")
    return d


def make_merge_card(tmp_path: Path, licenses: dict[str, str | None] | None = None, **kw) -> str:
    dirs = {}
    for ref, lic in (licenses or {}).items():
        dirs[ref] = parent(tmp_path, Path(ref).name, lic)
    return merge_card(method="ties", pretty_name="TIES", paper="https://arxiv.org/abs/2306.01708",
                      models=["org/base", "./poet", "./coder"], base_model="org/base", recipe_text=RECIPE,
                      out_dtype="bfloat16", num_parameters=1234, base_dir=tmp_path, parent_dirs=dirs or None, **kw)


def make_quant_card(source: str, **kw) -> str:
    """Called exactly as mergequant/quant/quantize.py calls it (keyword arguments), plus optional extras."""
    return quant_card(source=source, method="gptq", bits=4, settings=[("bits", "4"), ("group size", "128")],
                      tags=["gptq", "4-bit", "gptq"], requirements="gptqmodel", calib="data.jsonl", calib_tokens=2048,
                      samples=16, fallbacks=[], perplexity={"full precision": 10.0, "gptq 4-bit": 10.5},
                      eval_data="heldout.txt", **kw)


# ---- merge cards -------------------------------------------------------------------------------------
def test_merge_card_round_trips_through_modelcard_with_agreeing_licenses(tmp_path):
    text = make_merge_card(tmp_path, {"org/base": "apache-2.0", "./poet": "apache-2.0", "./coder": "apache-2.0"})
    data = ModelCard(text).data
    assert data.base_model == ["org/base"]  # the local parents are not Hub ids
    assert data.base_model_relation == "merge"
    assert data.license == "apache-2.0"
    assert data.tags == ["merge", "mergequant", "ties"]
    assert data.library_name == "transformers"
    assert "## License" not in text
    validate_card(text)


def test_merge_card_disagreeing_licenses_say_other_and_list_each_parent(tmp_path):
    text = make_merge_card(tmp_path, {"org/base": "apache-2.0", "./poet": "mit", "./coder": None})
    assert ModelCard(text).data.license == "other"
    _, body = split_card(text)
    assert "## License" in body
    assert "- `org/base`: apache-2.0" in body and "- `./poet`: mit" in body and "- `./coder`: not declared" in body


def test_license_of_reads_readme_then_config(tmp_path):
    a = parent(tmp_path, "a", "llama3.1")
    b = parent(tmp_path, "b", "llama3.1", in_config=True)
    c = parent(tmp_path, "c", None)
    assert license_from_dir(a) == "llama3.1" and license_from_dir(b) == "llama3.1" and license_from_dir(c) is None
    assert license_of([a, b]) == "llama3.1"
    assert license_of([c]) is None  # nobody declares one: the card says nothing
    assert license_of([a, c]) == "other"  # one unknown: do not claim the known one
    assert license_of({"x": a, "y": parent(tmp_path, "d", "mit")}) == "other"


def test_explicit_license_wins(tmp_path):
    text = make_merge_card(tmp_path, {"./poet": "mit"}, license="apache-2.0")
    assert ModelCard(text).data.license == "apache-2.0"


# ---- push-time rewriting -------------------------------------------------------------------------------
def test_rewrite_maps_local_parents_to_hub_ids_and_lists_unmapped_in_the_body(tmp_path):
    (tmp_path / "poet").mkdir()
    (tmp_path / "coder").mkdir()
    text = make_merge_card(tmp_path)
    assert "mergequant-parents" in text  # the record push needs
    # the key may be the path as written in the card or any path to the same directory
    out = rewrite_card(text, {str(tmp_path / "poet"): "me/poet"}, "me/merged")
    data = ModelCard(out).data
    assert data.base_model == ["org/base", "me/poet"]
    assert data.base_model_relation == "merge"
    meta, body = split_card(out)
    assert "mergequant-parents" not in out and str(tmp_path) not in out.split("## Recipe")[0]  # no absolute paths leak
    assert "[`me/poet`](https://huggingface.co/me/poet)" in body
    unmapped = body.split("## Parents not on the Hub")[1]
    assert "`./coder`" in unmapped and "poet" not in unmapped
    assert "./coder" not in meta["base_model"]
    # mapping both: every parent is on the Hub, nothing listed as local
    out2 = rewrite_card(text, {"./poet": "me/poet", "coder": "me/coder"}, "me/merged")
    assert ModelCard(out2).data.base_model == ["org/base", "me/poet", "me/coder"]
    assert "Parents not on the Hub" not in out2


def test_rewrite_of_local_only_card_without_mapping_has_no_base_model(tmp_path):
    text = merge_card(method="linear", pretty_name="Linear", paper="p", models=["./a", "./b"], base_model=None,
                      recipe_text="x: 1", out_dtype=None, num_parameters=1, base_dir=tmp_path)
    out = rewrite_card(text, {}, "me/m")
    data = ModelCard(out).data
    assert data.base_model is None and getattr(data, "base_model_relation", None) is None
    assert "- `./a`" in out.split("## Parents not on the Hub")[1]


def test_rewrite_fixes_a_handwritten_local_base_model(tmp_path):
    text = "---\nbase_model:\n- ./my-model\n- org/x\nbase_model_relation: merge\n---\n# hi\n"
    with pytest.raises(CardError, match="not a Hub id"):
        validate_card(text)
    out = rewrite_card(text, {"./my-model": "me/my-model"}, "me/m")
    assert ModelCard(out).data.base_model == ["me/my-model", "org/x"]
    assert ModelCard(rewrite_card(text, {}, "me/m")).data.base_model == ["org/x"]


def test_bad_mapping_values_are_refused(tmp_path):
    with pytest.raises(CardError, match="not a Hub id"):
        rewrite_card(make_merge_card(tmp_path), {"./poet": "/not/a/hub/id"}, "me/m")


# ---- quant cards ---------------------------------------------------------------------------------------
def test_quant_card_has_exactly_one_base_model_after_push_rewrite(tmp_path):
    src = parent(tmp_path, "merged", "apache-2.0")
    text = make_quant_card(str(src))
    data = ModelCard(text).data
    assert data.base_model is None  # a local source is not a Hub id
    assert data.license == "apache-2.0"  # carried from the source's card
    assert data.tags == ["mergequant", "gptq", "4-bit"]
    out = rewrite_card(text, {str(src): "me/merged"}, "me/merged-gptq")
    data = ModelCard(out).data
    assert data.base_model == ["me/merged"] and data.base_model_relation == "quantized"
    assert data.license == "apache-2.0"
    assert 'from_pretrained("me/merged-gptq"' in out and MODEL_PATH_PLACEHOLDER not in out
    # unmapped: no base_model, the source is listed in the body
    out = rewrite_card(text, {}, "me/merged-gptq")
    assert ModelCard(out).data.base_model is None
    assert f"`{src}`" in out.split("## Parents not on the Hub")[1]


def test_quant_card_base_model_argument_and_hub_source(tmp_path):
    text = make_quant_card(str(tmp_path / "nowhere"), base_model="me/merged")
    data = ModelCard(text).data
    assert data.base_model == ["me/merged"] and data.base_model_relation == "quantized"
    data = ModelCard(make_quant_card("org/some-model")).data  # a Hub id source
    assert data.base_model == ["org/some-model"] and data.base_model_relation == "quantized"
    with pytest.raises(CardError):
        make_quant_card(str(tmp_path), base_model="./local")


def test_quantized_relation_with_two_bases_is_refused():
    text = "---\nbase_model:\n- a/b\n- c/d\nbase_model_relation: quantized\n---\n"
    with pytest.raises(CardError, match="exactly one base_model"):
        validate_card(text)
    # a mapping that would give a quantization a second base is refused too
    card = ('---\nbase_model: [a/b]\nbase_model_relation: quantized\n---\n'
            '<!-- mergequant-parents: {"local": [{"path": "/x", "ref": "./x"}], "relation": "quantized"} -->\n')
    with pytest.raises(CardError, match="exactly one base_model"):
        rewrite_card(card, {"./x": "c/d"}, "me/q")


@pytest.mark.parametrize("text, msg", [
    ("---\nbase_model: [a/b]\nbase_model_relation: merged\n---\n", "not one of"),
    ("---\nbase_model_relation: merge\n---\n", "without a base_model"),
    ("---\nbase_model: [me/m]\n---\n", "the repo being pushed to"),
    ("---\nbase_model: [a/b, a/b]\n---\n", "twice"),
    ("---\nlicense: [1, 2]\n---\n", "license"),
    ("---\ntags: a\n---\n", "tags"),
    ("---\n[unclosed\n---\n", "invalid YAML"),
    ("---\nlicense: mit\nlicense: apache-2.0\n---\n", "duplicate key 'license'"),
    ("---\na: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n---\n", "nodes"),
    ("---\n- a\n- b\n---\n", "mapping"),
    ("---\nlicense: mit\n", "never closed"),
])
def test_invalid_front_matter_is_refused(text, msg):
    with pytest.raises(CardError, match=msg):
        validate_card(text, repo="me/m")


def test_parent_record_survives_a_path_that_would_end_the_html_comment():
    """A local parent named like 'x-->y' must not end the hidden record early (the rest would render)."""
    import json as _json

    from mergequant.card import _MARK_RE, _parents_mark

    local = [{"path": "/models/x-->y <b>", "role": "base"}]
    mark = _parents_mark("merge", local)
    assert mark.count("-->") == 1 and mark.endswith(" -->") and "<b>" not in mark
    m = _MARK_RE.search(mark + "\n")
    assert m and _json.loads(m.group(1)) == {"relation": "merge", "local": local}
