"""Findings of the follow-up hostile-input campaign: inputs that used to give a silently wrong model or a
traceback. Each is refused by the CLI with one `error:` line (exit 2), no output left behind and every
input byte-identical (helpers from test_hostile_checkpoint), or, for partial problems, warned about.
Each test's first case runs the real CLI in a subprocess (``case_cli``), the other cases and the runs
that only prepare an input run the same CLI in-process (``helpers.cli``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from helpers import cli, run_cli
from test_hostile_checkpoint import assert_refused, command, edit_json, recipe_for


def single_file_copy(src: Path, dst: Path, *, drop=(), config=None) -> Path:
    """``src`` re-saved as one model.safetensors without the tensors in ``drop``, config.json updated."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    save_file({k: v for k, v in tensors.items() if k not in drop}, dst / "model.safetensors", metadata={"format": "pt"})
    if config:
        edit_json(dst / "config.json", lambda c: c.update(config))
    return dst


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------------
# tensors the merge would drop without a word
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [{"tie_word_embeddings": True}, {}], ids=["tied-base", "base-without-head"])
def test_merge_refuses_to_drop_a_fine_tunes_lm_head(f32_models, tmp_path, config, case_cli):
    base = single_file_copy(f32_models["base"], tmp_path / "base", drop={"lm_head.weight"}, config=config)
    recipe = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                                               f"  - model: {f32_models['a']}\n    parameters: {{weight: 0.5}}\n")
    out = tmp_path / "out"
    line = assert_refused(["merge", recipe, "-o", out], out, [base, f32_models["a"]],
                          "lm_head.weight", str(base), "would drop it", runner=case_cli)
    assert ("tie_word_embeddings" in line) == bool(config)


# ---------------------------------------------------------------------------------------------------
# weights that make the output all zeros
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_all_zero_weights_without_normalize_refused(f32_models, tmp_path):
    a, b = f32_models["a"], f32_models["b"]
    recipe = write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 0}}}}\n"
                                               f"  - {{model: {b}, parameters: {{weight: 0.0}}}}\nparameters: {{normalize: false}}\n")
    out = tmp_path / "out"
    assert_refused(["merge", recipe, "-o", out], out, [a, b], str(recipe), "weight 0", "all zeros")


def test_some_zero_weight_tensors_are_warned_about(f32_models, tmp_path):
    a, b = f32_models["a"], f32_models["b"]
    w = "{weight: [{filter: mlp, value: 0}, {value: 0.5}]}"
    recipe = write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {w}}}\n"
                                               f"  - {{model: {b}, parameters: {w}}}\nparameters: {{normalize: false}}\n")
    out = tmp_path / "out"
    proc = cli("merge", recipe, "-o", out, "-q", check=True)
    mlp = [n for n in load_file(next(out.glob("*.safetensors"))) if ".mlp." in n]
    n_mlp = sum(1 for f in out.glob("*.safetensors") for n in load_file(f) if ".mlp." in n)
    assert mlp and f"warning: {n_mlp} tensor(s) have weight 0 for every model" in proc.stderr


# ---------------------------------------------------------------------------------------------------
# config.json that contradicts the weights
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, needle", [
    ("hidden_size", 128, "hidden_size is 128"),
    ("vocab_size", 4096, "vocab_size is 4096"),
    ("num_hidden_layers", 6, "num_hidden_layers is 6 but layer 4 has no tensors"),
    ("num_hidden_layers", 2, "num_hidden_layers is 2 but the weights have layer 2"),
])
@pytest.mark.parametrize("cmd", ["merge", "inspect", "eval", "quantize"])
def test_config_contradicting_the_weights_refused(f32_models, tmp_path, key, value, needle, cmd, case_cli):
    model = tmp_path / "model"
    shutil.copytree(f32_models["a"], model)
    edit_json(model / "config.json", lambda c: c.update({key: value}))
    args, out = command(cmd, model, f32_models["b"], tmp_path)
    assert_refused(args, out, [model, f32_models["b"]], str(model / "config.json"), needle, runner=case_cli)


# ---------------------------------------------------------------------------------------------------
# eval of a checkpoint with weights missing: transformers fills them randomly and only logs it
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_eval_refuses_a_checkpoint_without_its_lm_head(f32_models, tmp_path):
    model = single_file_copy(f32_models["a"], tmp_path / "nohead", drop={"lm_head.weight"})
    assert json.loads((model / "config.json").read_text()).get("tie_word_embeddings") is not True
    args, _ = command("eval", model, f32_models["b"], tmp_path)
    assert_refused([*args, "-q"], None, [model], str(model), "lm_head.weight", "missing")


# ---------------------------------------------------------------------------------------------------
# .bin weights that are not PyTorch checkpoints; output names too long for the temporary sibling
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b"garbage" * 100], ids=["empty", "garbage"])
@pytest.mark.parametrize("cmd", ["inspect", "push --dry-run"])
def test_bin_that_is_not_a_checkpoint_refused(f32_models, tmp_path, content, cmd, case_cli):
    model = tmp_path / "binmodel"
    model.mkdir()
    shutil.copy(f32_models["a"] / "config.json", model / "config.json")
    (model / "pytorch_model.bin").write_bytes(content)
    args, out = command(cmd, model, f32_models["b"], tmp_path)
    line = assert_refused(args, out, [model], str(model / "pytorch_model.bin"), "not a PyTorch checkpoint",
                          runner=case_cli)
    assert "unpickle code" not in line


@pytest.mark.slow
def test_output_name_too_long_for_the_temporary_sibling(f32_models, tmp_path):
    name = "y" * 240  # a legal name, but '.NAME.partial-XXXXXXXX' would not be
    out = tmp_path / name
    recipe = recipe_for(tmp_path, f32_models["a"], f32_models["b"])
    assert_refused(["merge", recipe, "-o", out], out, [f32_models["a"], f32_models["b"]], "240 bytes", "at most 237")


# ---------------------------------------------------------------------------------------------------
# NaN / inf weights: RTN used to crash in the packer, GPTQ to write a garbage checkpoint with exit 0
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["rtn", "int8", "gptq", "w8a8"])
def test_quantize_refuses_non_finite_weights(f32_models, tmp_path, method, case_cli):
    import torch

    src = f32_models["a"]
    model = tmp_path / "nan"
    shutil.copytree(src, model, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    bad = "model.layers.2.mlp.up_proj.weight"
    tensors[bad] = tensors[bad].clone()
    tensors[bad][3, 5] = float("nan") if method != "int8" else float("inf")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    data = tmp_path / "calib.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "out"
    args = ["quantize", model, "-o", out, "--method", method, "-q"]
    if method in ("rtn", "gptq"):
        args += ["--group-size", 32]
    if method in ("gptq", "w8a8"):
        args += ["--calib", data, "--samples", 4, "--seqlen", 32]
    assert_refused(args, out, [model], str(model), bad, "NaN or infinite", runner=case_cli)
    assert torch.isnan(tensors[bad]).any() or torch.isinf(tensors[bad]).any()


# ---------------------------------------------------------------------------------------------------
# already-quantized inputs: used to be "quantized" again (exit 0, an output nothing loads) or crash
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("again", ["rtn", "int8"])
def test_quantize_refuses_an_already_quantized_checkpoint(f32_models, tmp_path, again, case_cli):
    first = tmp_path / "int8"
    cli("quantize", f32_models["a"], "-o", first, "--method", "int8", "-q", check=True)
    out = tmp_path / "again"
    assert_refused(["quantize", first, "-o", out, "--method", again, "--group-size", 32], out, [first],
                   str(first), "already quantized", "bitsandbytes", runner=case_cli)
    cfg = json.loads((first / "config.json").read_text())  # and without its quantization_config: int8 weights
    del cfg["quantization_config"]
    (first / "config.json").write_text(json.dumps(cfg))
    assert_refused(["quantize", first, "-o", out, "--method", again, "--group-size", 32], out, [first],
                   str(first), "int8", "not floating point", runner=cli)


# ---------------------------------------------------------------------------------------------------
# merge options: the CLI and release files share one check (workers, shard size, device, seed)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option, value, needle", [("--workers", 0, "--workers must be an integer >= 1"),
                                                   ("--workers", -1, "--workers must be an integer >= 1"),
                                                   ("--workers", 10000, "--workers must be at most"),
                                                   ("--seed", 2**70, "--seed must be a 64-bit integer")])
def test_merge_option_values_refused(f32_models, tmp_path, option, value, needle, case_cli):
    recipe = recipe_for(tmp_path, f32_models["a"], f32_models["b"])
    out = tmp_path / "out"
    assert_refused(["merge", recipe, "-o", out, option, value], out, [f32_models["a"], f32_models["b"]], needle,
                   runner=case_cli)


@pytest.mark.parametrize("merge_opts, needle", [("shard_size: -5", "merge.shard_size: size must be positive"),
                                                ("shard_size: 0", "merge.shard_size: size must be positive"),
                                                ("workers: -5", "merge: --workers must be an integer >= 1"),
                                                ("device: tpu", "merge: --device must be cpu, cuda or auto")])
def test_release_merge_options_checked_when_the_file_is_read(f32_models, tmp_path, merge_opts, needle, case_cli):
    recipe = recipe_for(tmp_path, f32_models["a"], f32_models["b"])
    release = write_recipe(tmp_path / "release.yaml", f"workdir: {tmp_path / 'w'}\nmerge: {{recipe: {recipe}, {merge_opts}}}\n")
    for extra, runner in ((["--dry-run"], case_cli), ([], cli)):
        assert_refused(["run", release, *extra], tmp_path / "w", [f32_models["a"]], str(release), needle, runner=runner)


@pytest.mark.slow
def test_release_quantize_shard_size_checked(f32_models, tmp_path):
    recipe = recipe_for(tmp_path, f32_models["a"], f32_models["b"])
    release = write_recipe(tmp_path / "release.yaml", f"workdir: {tmp_path / 'w'}\nmerge: {{recipe: {recipe}}}\n"
                                                      "quantize:\n  - {name: q, method: rtn, shard_size: 0}\n")
    assert_refused(["run", release, "--dry-run"], tmp_path / "w", [f32_models["a"]], str(release), "size must be positive")


def test_options_a_method_does_not_read_are_named():
    from mergequant.quant.quantize import QuantizeOptions, ignored_options

    out = Path("o")
    assert ignored_options(QuantizeOptions(out=out, method="awq", alpha=0.8, n_grid=5)) == ["--alpha"]
    assert ignored_options(QuantizeOptions(out=out, method="w8a8", alpha=0.8)) == []
    assert ignored_options(QuantizeOptions(out=out, method="rtn", desc_act=True, sym=False)) == ["--desc-act"]
    assert ignored_options(QuantizeOptions(out=out, method="int8")) == []


# ---------------------------------------------------------------------------------------------------
# big data files: tokenized in bounded pieces, and only as far as needed (a 30 MB file took 5.4 GB to
# score 500 tokens; a 264 MB one exhausted the machine)
# ---------------------------------------------------------------------------------------------------
def test_pieces_tokenize_exactly_like_the_whole_text(f32_models):
    import torch
    from transformers import AutoTokenizer

    from mergequant.demo import demo_text
    from mergequant.quant.calib import text_pieces

    tok = AutoTokenizer.from_pretrained(f32_models["a"])
    text = demo_text(3, paragraphs=200) + "\n\n  indented\n\n\nlast line"
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    whole = enc(text)
    for size in (5000, 997, 131):
        pieces = list(text_pieces(text, size))
        assert "".join(pieces) == text and len(pieces) > 2
        assert torch.equal(torch.cat([torch.tensor(enc(p), dtype=torch.long) for p in pieces]),
                           torch.tensor(whole, dtype=torch.long))


def test_token_stream_stops_at_its_limit():
    from mergequant.quant.calib import token_stream

    seen = []
    encode = lambda s: (seen.append(s), [1] * len(s.split()))[1]  # noqa: E731
    stream = token_stream(["a b c"] * 1000, encode, eos_token_id=0, limit=40)
    assert 40 <= stream.numel() <= 44 and len(seen) == 10


@pytest.mark.slow
def test_eval_max_tokens_on_a_big_file_is_bounded(f32_models, tmp_path):
    import resource
    import time

    big = tmp_path / "big.txt"
    line = "the quick brown fox jumps over the lazy dog " * 20 + "\n"
    with open(big, "w") as f:
        for _ in range(20_000_000 // len(line)):
            f.write(line)
    t0 = time.monotonic()
    proc = run_cli("eval", f32_models["a"], "--data", big, "--seqlen", 32, "--max-tokens", 300, "-q", check=True)
    took = time.monotonic() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert "over 299 tokens" in proc.stdout and took < 60
    assert peak < 2 * 2**30, f"peak RSS {peak / 2**30:.1f} GiB"  # whole-file tokenization took ~3.6 GB here


# ---------------------------------------------------------------------------------------------------
# a tokenizer with tokens the embedding has no row for (added without resizing): one line, not an IndexError
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["eval", "gptq"])
def test_token_ids_beyond_the_vocabulary_refused(f32_models, tmp_path, cmd, case_cli):
    from transformers import AutoTokenizer

    model = tmp_path / "grown"
    shutil.copytree(f32_models["a"], model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.add_tokens(["<brand_new_token>"])
    tok.save_pretrained(model)
    data = tmp_path / "text.txt"
    data.write_text("the quick brown fox <brand_new_token> jumps over the lazy dog\n" * 50)
    if cmd == "eval":
        args, out = ["eval", model, "--data", data, "--seqlen", 16, "-q"], None
    else:
        out = tmp_path / "q"
        args = ["quantize", model, "-o", out, "--method", "gptq", "--group-size", 32, "--calib", data,
                "--samples", 4, "--seqlen", 16, "-q"]
    assert_refused(args, out, [model], str(model), "vocab_size is 2048", "without resizing", runner=case_cli)
