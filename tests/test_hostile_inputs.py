"""Hostile and degenerate inputs: each is refused quickly with one `error:` line naming the file, key or
option, exit status 2, no output folder (nor a `.OUT.partial-*` sibling), inputs unchanged.

Every CLI case runs with a timeout, so a hang (``eval --seqlen 1`` used to loop forever, a 1 KB
alias-bomb recipe never finished) fails the test instead of hanging it. The cases about hangs and
bounded work, and the first case of every test, run the real `mergequant` in a subprocess (killed at
the timeout); further cases run the same CLI in-process (``helpers.cli``, interrupted at the timeout).
Models and corpus under /work/shared-style fixtures are read-only; tampered copies live in tmp_path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergequant.errors import MergeQuantError, RecipeError
from mergequant.evaluate import check_eval_options
from mergequant.quant.quantize import QuantizeOptions, run_quantize, validate
from mergequant.recipe import load_recipe, parse_recipe
from mergequant.yaml_file import MAX_NODES, load_yaml, parse_yaml

from helpers import cli

TIMEOUT = 20  # seconds; every case here should take a few


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def run_cli(*args, timeout: float = TIMEOUT) -> tuple[subprocess.CompletedProcess, float]:
    """The real CLI in a subprocess, killed after ``timeout`` (a regression to a hang fails here)."""
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "mergequant", *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore",
                                                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    except subprocess.TimeoutExpired:
        pytest.fail(f"mergequant {' '.join(map(str, args))} did not finish within {timeout} s")
    return proc, time.monotonic() - start


def in_process(*args, timeout: float = TIMEOUT) -> tuple[subprocess.CompletedProcess, float]:
    """The same CLI in this process (``helpers.cli``), interrupted after ``timeout``."""
    start = time.monotonic()
    proc = cli(*args, timeout=timeout)
    return proc, time.monotonic() - start


def digests(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or folders), to prove inputs are left untouched."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def refused(args, *needles, out: Path | None = None, inputs=(), max_seconds: float | None = None,
            runner=run_cli) -> str:
    """Run the CLI (``runner``: :func:`run_cli` or :func:`in_process`); assert exit 2, one stderr line
    `error: ...` containing ``needles``, no output folder or partial sibling, inputs byte-identical, and
    (optionally) that it took under ``max_seconds``."""
    before = digests(*inputs)
    proc, took = runner(*args)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in {lines[0]!r}"
    if out is not None:
        assert not out.exists(), f"{out} was created"
        assert sorted(out.parent.glob(f".{out.name}.*")) == []
    assert digests(*inputs) == before
    if max_seconds is not None:
        assert took < max_seconds, f"took {took:.1f} s"
    return lines[0]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory, f32_models) -> Path:
    """A full-precision model with its tokenizer (a copy, so that nothing here can touch the fixtures)."""
    return Path(shutil.copytree(f32_models["base"], tmp_path_factory.mktemp("m") / "base"))


@pytest.fixture(scope="module")
def no_tokenizer(tmp_path_factory, model) -> Path:
    """The same model without any tokenizer file."""
    dst = tmp_path_factory.mktemp("nt") / "no-tokenizer"
    shutil.copytree(model, dst, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json", "vocab*",
                                                              "merges.txt"))
    return dst


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """Plenty of plain text for calibration and eval."""
    path = tmp_path_factory.mktemp("t") / "text.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(300)))
    return path


def linear_recipe(a: Path, b: Path, a_params: str = "{weight: 0.5}", extra: str = "") -> str:
    return (f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {a_params}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.5}}\n{extra}")


def filter_list_bomb(levels: int, width: int) -> str:
    """A ``weight`` filter list whose entry i's value repeats entry i-1's value ``width`` times through
    an alias: valid keys and shapes everywhere, ``width ** (levels - 1)`` leaves once expanded."""
    lines = ["      weight:", "        - {filter: zz, value: &x0 [{value: 0.5}]}"]
    for i in range(1, levels):
        refs = ", ".join([f"{{value: *x{i - 1}}}"] * width)
        lines.append(f"        - {{filter: zz, value: &x{i} [{refs}]}}")
    return "\n".join(lines + ["        - {value: 0.5}"])


# ---------------------------------------------------------------------------------------------------
# item 6: no hangs, bounded work
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_eval_seqlen_1_is_refused_not_a_hang(model, text):
    refused(["eval", model, "--data", text, "--seqlen", 1, "-q"], "--seqlen", ">= 2", inputs=[model, text])


@pytest.mark.slow
def test_quantize_eval_seqlen_1_is_refused_before_any_work(model, text, tmp_path):
    out = tmp_path / "q"
    refused(["quantize", model, "-o", out, "--method", "rtn", "--eval", text, "--seqlen", 1, "-q"], "--seqlen",
            out=out, inputs=[model, text])


@pytest.mark.slow
def test_eval_stride_zero_is_refused_not_a_silent_default(text, tmp_path):
    # the model path does not exist: the option must be what is blamed, so it is checked first
    refused(["eval", tmp_path / "no-model", "--data", text, "--stride", 0], "--stride", inputs=[text])


@pytest.mark.parametrize("seqlen, stride, max_tokens, needle", [
    (1, None, None, "--seqlen"), (-5, None, None, "--seqlen"), (True, None, None, "--seqlen"),
    (16, 0, None, "--stride"), (16, 17, None, "--stride"), (16, None, 0, "--max-tokens"), (16, None, 1, "--max-tokens"),
])
def test_check_eval_options(seqlen, stride, max_tokens, needle):
    with pytest.raises(MergeQuantError, match=needle):
        check_eval_options(seqlen, stride, max_tokens)


@pytest.mark.slow
def test_quantize_batch_size_zero_is_refused_not_a_silent_default(model, text, tmp_path):
    out = tmp_path / "q"
    refused(["quantize", model, "-o", out, "--calib", text, "--group-size", 32, "--batch-size", 0, "-q"],
            "--batch-size", out=out, inputs=[model, text])


@pytest.mark.parametrize("field, value, needle", [
    ("samples", 0, "--samples"), ("seqlen", 1, "--seqlen"), ("batch_size", 0, "--batch-size"),
    ("batch_size", -3, "--batch-size"), ("seqlen", 2.5, "--seqlen"),
])
def test_quantize_options_counts_checked_first(field, value, needle, tmp_path):
    # validate() is what `quantize` and release files (`mergequant run`) both call before any work
    with pytest.raises(MergeQuantError, match=needle):
        validate(QuantizeOptions(out=tmp_path / "q", method="rtn", **{field: value}), [])


@pytest.mark.slow
def test_release_file_counts_checked_by_the_core(model, tmp_path):
    release = write(tmp_path / "release.yaml", f"workdir: {tmp_path / 'wd'}\nmerge: {{model: {model}}}\n"
                                                "quantize:\n  - {name: q, method: rtn, samples: 0}\n")
    refused(["run", release, "--dry-run"], "--samples", inputs=[model, release])
    assert not (tmp_path / "wd").exists()


@pytest.mark.slow
@pytest.mark.parametrize("levels, width", [(8, 5), (40, 9)], ids=["small", "deep"])
def test_alias_bomb_in_a_filter_list_is_refused_quickly(levels, width, f32_models, tmp_path):
    # small: ~1 KB, 78k filter entries; deep: ~4 KB, 9**39 (parsing and validating it never finished)
    recipe = write(tmp_path / "bomb.yaml", f"merge_method: linear\nmodels:\n  - model: {f32_models['a']}\n"
                   f"    parameters:\n{filter_list_bomb(levels, width)}\n"
                   f"  - model: {f32_models['b']}\n    parameters: {{weight: 0.5}}\n")
    out = tmp_path / "out"
    refused(["merge", recipe, "-o", out], recipe, "aliases", str(MAX_NODES), out=out, inputs=[recipe], max_seconds=15)
    start = time.monotonic()  # the check itself, without interpreter start-up
    with pytest.raises(RecipeError):
        parse_recipe(recipe.read_text(), recipe)
    assert time.monotonic() - start < 5


def test_oversized_yaml_file_is_refused_unread(tmp_path):
    recipe = write(tmp_path / "big.yaml", "# " + "x" * (3 * 2**20) + "\n")
    with pytest.raises(RecipeError, match=r"big.yaml: the recipe file is \d+ bytes; more than"):
        load_recipe(recipe)


# ---------------------------------------------------------------------------------------------------
# item 7: one line, exit 2, nothing half-written
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_calib_that_is_a_directory(model, tmp_path):
    data_dir = tmp_path / "calib"
    data_dir.mkdir()
    out = tmp_path / "q"
    refused(["quantize", model, "-o", out, "--calib", data_dir, "--group-size", 32, "-q"], data_dir, "--calib",
            "directory", out=out, inputs=[model])


@pytest.mark.slow
def test_eval_data_that_is_a_directory(model, tmp_path):
    refused(["eval", model, "--data", tmp_path], tmp_path, "--data", "directory", inputs=[model])


@pytest.mark.slow
def test_eval_without_tokenizer(no_tokenizer, text):
    refused(["eval", no_tokenizer, "--data", text, "-q"], no_tokenizer, "tokenizer", inputs=[no_tokenizer, text])


@pytest.mark.slow
def test_calibrated_quantize_without_tokenizer(no_tokenizer, text, tmp_path):
    out = tmp_path / "q"
    refused(["quantize", no_tokenizer, "-o", out, "--method", "gptq", "--group-size", 32, "--calib", text, "-q"],
            no_tokenizer, "tokenizer", out=out, inputs=[no_tokenizer, text])


@pytest.mark.parametrize("method, extra", [("awq", {"group_size": 32}), ("w8a8", {}), ("rtn", {"eval_data": "T", "group_size": 32})])
def test_other_methods_without_tokenizer_refused_before_work(method, extra, no_tokenizer, text, tmp_path):
    out = tmp_path / "q"
    extra = {k: (str(text) if v == "T" else v) for k, v in extra.items()}
    opts = QuantizeOptions(out=out, method=method, calib=str(text), samples=4, seqlen=32, quiet=True, **extra)
    with pytest.raises(MergeQuantError, match="no tokenizer files"):
        run_quantize(no_tokenizer, opts, log=lambda m: None)
    assert not out.exists() and sorted(tmp_path.glob(".q.*")) == []


@pytest.mark.parametrize("a_params, extra, needles", [
    ("{weight: 0.5}", "dtype: [bfloat16]\n", ["dtype", "bfloat16"]),  # was a TypeError traceback
    ("{weight: .nan}", "", ["models[0].parameters.weight", "finite", "nan"]),  # was exit 0, an all-NaN model
], ids=["dtype-list", "weight-nan"])
def test_recipe_values_of_the_wrong_type(a_params, extra, needles, f32_models, tmp_path, case_cli):
    recipe = write(tmp_path / "r.yaml", linear_recipe(f32_models["a"], f32_models["b"], a_params) + extra)
    out = tmp_path / "out"
    refused(["merge", recipe, "-o", out], recipe, *needles, out=out, inputs=[recipe, f32_models["a"]],
            runner=in_process if case_cli is cli else run_cli)  # case_cli: the first case real, marked slow


@pytest.mark.parametrize("text_, needle", [
    ("merge_method: linear\nmodels:\n  - model: A\n    parameters: {weight: abc}\n", "weight: 'weight' must be numeric"),
    ("merge_method: linear\nmodels:\n  - model: A\n    parameters: {weight: [{filter: mlp, value: -.inf}, {value: 1}]}\n",
     "models[0].parameters.weight: 'weight' must be a finite number, got -inf"),
    ("merge_method: linear\nmodels:\n  - model: A\n    parameters: [weight, 1]\n", "models[0].parameters: expected a mapping"),
    ("merge_method: [linear]\nmodels:\n  - model: A\n", "merge_method: expected a method name"),
    ("merge_method: linear\nmodels:\n  - model: A\n    parameters: {weight: 1}\nout_dtype: 16\n", "out_dtype: 16 (int)"),
    ("merge_method: linear\nname: [x]\nmodels:\n  - model: A\n    parameters: {weight: 1}\n", "name: expected a string"),
    ("merge_method: ties\nbase_model: B\nmodels:\n  - model: A\n    parameters: {weight: 1, density: {}}\n",
     "models[0].parameters.density"),
    ("merge_method: linear\nmodels: 5\n", "models: expected a non-empty list"),
    ("merge_method: ties\nbase_model: [a]\nmodels:\n  - model: A\n    parameters: {weight: 1}\n", "base_model"),
    ("merge_method: linear\nslices: [5]\n", "slices[0]"),
    ("merge_method: linear\nslices:\n  - sources: {model: A, layer_range: [0, 2]}\n", "slices[0].sources"),
    ("merge_method: linear\nslices:\n  - sources: [{model: A, layer_range: [0, 2.5]}]\n",
     "slices[0].sources[0].layer_range"),
    ("merge_method: linear\nmodels:\n  - model: A\n    parameters: {weight: 1}\nparameters: [normalize]\n",
     "parameters: expected a mapping"),
    ("merge_method: ties\nbase_model: B\nmodels:\n  - model: A\n    parameters: {weight: 1, density: .inf}\n",
     "density"),
    ("merge_method: slerp\nbase_model: B\nmodels: [{model: A}, {model: B}]\nparameters: {t: .nan}\n", "parameters.t"),
    ("merge_method: linear\nmodels:\n  - model: A\n    parameters: {weight: 1}\ntokenizer_source: {a: 1}\n",
     "tokenizer_source"),
    ("", "empty"),
], ids=["weight-string", "filter-inf", "parameters-list", "method-list", "out-dtype-int", "name-list",
        "density-map", "models-int", "base-list", "slice-int", "sources-map", "layer-range-float", "params-list",
        "density-inf", "t-nan", "tokenizer-map", "empty"])
def test_recipe_shapes_are_refused_naming_the_key(text_, needle):
    with pytest.raises(RecipeError) as e:
        parse_recipe(text_, Path("r.yaml"))
    msg = str(e.value)
    assert msg.startswith("r.yaml: ") and needle in msg and "\n" not in msg, msg


def test_gradient_list_length_is_bounded():
    entries = ", ".join(["0.5"] * 1001)
    with pytest.raises(RecipeError, match=r"models\[0\]\.parameters\.weight: 1001 entries"):
        parse_recipe(f"merge_method: linear\nmodels:\n  - model: A\n    parameters: {{weight: [{entries}]}}\n",
                     Path("r.yaml"))


# ---------------------------------------------------------------------------------------------------
# item 9: messages that name the right thing
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_missing_eval_data_is_called_eval_data(model, tmp_path):
    missing = tmp_path / "heldout.txt"
    line = refused(["eval", model, "--data", missing], missing, "eval data", "--data", "not found", inputs=[model])
    assert "calibration" not in line


@pytest.mark.slow
def test_eval_seqlen_0_blames_seqlen(model, text):
    line = refused(["eval", model, "--data", text, "--seqlen", 0], "--seqlen", inputs=[model, text])
    assert "--stride" not in line


@pytest.mark.slow
def test_duplicate_key_in_a_recipe_names_key_and_line(f32_models, tmp_path):
    body = linear_recipe(f32_models["a"], f32_models["b"])
    recipe = write(tmp_path / "r.yaml", body + "dtype: float32\ndtype: bfloat16\n")
    first = body.count("\n") + 1
    out = tmp_path / "out"
    refused(["merge", recipe, "-o", out], recipe, f"line {first + 1}: duplicate key 'dtype' (first at line {first})",
            out=out, inputs=[recipe])


# ---------------------------------------------------------------------------------------------------
# yaml_file.load_yaml units
# ---------------------------------------------------------------------------------------------------
def test_legitimate_anchors_aliases_and_merge_keys_load(tmp_path):
    path = write(tmp_path / "ok.yaml", "defaults: &d {weight: 0.5, density: 0.7}\n"
                                       "models:\n  - {model: a, parameters: *d}\n"
                                       "  - model: b\n    parameters:\n      <<: *d\n      weight: 0.3\n")
    data = load_yaml(path)
    assert data["models"][0]["parameters"] == {"weight": 0.5, "density": 0.7}
    assert data["models"][1]["parameters"] == {"weight": 0.3, "density": 0.7}  # a merge key may be overridden


def test_many_aliases_to_a_small_anchor_are_fine():
    data = parse_yaml("x: &x [1, 2, 3]\ny: [" + ", ".join(["*x"] * 500) + "]\n")
    assert len(data["y"]) == 500


@pytest.mark.parametrize("text_, match", [
    ("a: 1\nb:\n  c: 2\n  c: 3\n", r"line 4: duplicate key 'c' \(first at line 3\)"),
    ("true: 1\nyes: 2\n", r"line 2: duplicate key 'yes' \(first at line 1, the same key as 'true'\)"),
    ("a: &a [1, *a]\n", "line 1: an alias refers to a node that contains it"),
    ("[" * 100 + "]" * 100, "nested more than"),
    ("a: [1, 2\nb: 3\n", r"invalid YAML: line 2, column 2: expected ',' or ']'"),
    ("a: 1\n---\nb: 2\n", "invalid YAML: line 2, column 1"),
    ("a: !!python/object:os.system {}\n", "invalid YAML: line 1"),
    ("a: " + "9" * 5000 + "\n", "invalid YAML"),
    ("a: [" + "1, " * MAX_NODES + "1]\n", "more than 100000 YAML nodes"),
])
def test_parse_yaml_refusals_are_one_line(text_, match):
    with pytest.raises(MergeQuantError, match=match) as e:
        parse_yaml(text_, "f.yaml")
    assert str(e.value).startswith("f.yaml: ") and "\n" not in str(e.value)


def test_load_yaml_refuses_directories_and_fifos(tmp_path):
    with pytest.raises(MergeQuantError, match="is a directory"):
        load_yaml(tmp_path, "release")
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    with pytest.raises(MergeQuantError, match="not a regular file"):
        load_yaml(fifo)  # reading it would block forever
    with pytest.raises(MergeQuantError, match="release file not found"):
        load_yaml(tmp_path / "nope.yaml", "release")
