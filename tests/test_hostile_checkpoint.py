"""Hostile or inconsistent checkpoints: every one is refused by the CLI with one `error:` line naming
the file and the tensor/key, exit status 2, no output folder (nor a `.OUT.partial-*` sibling), and every
input file byte-identical afterwards. Each test's first case (and every command's first case in
``test_every_command_refuses_the_same_way``) runs the real CLI in a subprocess; the other cases run the
same CLI in-process (``helpers.cli``), without an interpreter start-up each.

- which shard holds a tensor: the index decides; without an index a tensor in two files is refused, and
  no index entry (or symlink) may lead outside the model folder;
- safetensors headers: everything the format spec requires (exact tiling of the data section, string
  map metadata, dtype codes, shapes, span sizes, no duplicate keys);
- config.json and index values of the wrong JSON type.

Models are copies of the tiny session fixtures under tmp_path; headers are rewritten by hand
(8-byte little-endian length + JSON + data) so that malformed ones can be made at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergequant.io.checkpoint import Checkpoint

from helpers import cli, run_cli

TENSOR = "model.layers.1.mlp.up_proj.weight"
INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def read_raw(path: Path) -> tuple[dict, bytes]:
    """(header dict incl. __metadata__, data section) of a safetensors file, parsed independently of mergequant."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path: Path, header: dict | str, data: bytes) -> None:
    """Write a safetensors file by hand; ``header`` may be raw JSON text (to express duplicate keys)."""
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def weight_map(model: Path) -> dict[str, str]:
    return json.loads((model / INDEX).read_text())["weight_map"]


def shard_of(model: Path, tensor: str = TENSOR) -> Path:
    return model / weight_map(model)[tensor]


def digest(*folders: Path) -> dict[str, str]:
    """sha256 of every file under the given folders (symlinks followed), to prove inputs are untouched."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def edit_json(path: Path, mutate) -> None:
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))


def edit_header(shard: Path, mutate) -> None:
    """Rewrite ``shard`` with ``mutate(header, data) -> (header, data)`` applied."""
    header, data = read_raw(shard)
    header, data = mutate(header, data)
    write_raw(shard, header, data)


def recipe_for(tmp_path: Path, *models: Path) -> Path:
    lines = ["merge_method: linear", "models:"]
    for m in models:
        lines += [f"  - model: {m}", "    parameters: {weight: 1.0}"]
    path = tmp_path / "recipe.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def command(name: str, model: Path, other: Path, tmp_path: Path) -> tuple[list, Path | None]:
    """CLI arguments for one command reading ``model``, and the output folder it would create (if any)."""
    out = tmp_path / f"out-{name.split()[0]}"
    if name == "merge":
        return ["merge", recipe_for(tmp_path, model, other), "-o", out, "--workers", 1], out
    if name == "quantize":
        return ["quantize", model, "-o", out, "--method", "int8"], out
    if name == "inspect":
        return ["inspect", model], None
    if name == "eval":
        data = tmp_path / "heldout.txt"
        data.write_text("the quick brown fox jumps over the lazy dog\n" * 20)
        return ["eval", model, "--data", data, "--seqlen", 16], None
    if name == "push --dry-run":
        return ["push", model, "--repo", "org/hostile", "--dry-run"], None
    raise AssertionError(name)


def assert_refused(args: list, out: Path | None, inputs: list[Path], *needles, runner=run_cli) -> str:
    """Run the CLI (``runner``: the real one in a subprocess, or ``helpers.cli`` in-process); exit 2, one
    `error:` line holding every needle, no output, inputs byte-identical."""
    before = digest(*inputs)
    proc = runner(*args)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-3000:]}"
    assert len(lines) == 1, f"expected one error line, got:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith("error: ") and "Traceback" not in proc.stderr, line
    for n in needles:
        assert str(n) in line, f"{n!r} not in {line!r}"
    if out is not None:
        assert not out.exists(), f"{out} was created"
        assert sorted(out.parent.glob(f".{out.name}.*")) == [], "partial output left behind"
    assert digest(*inputs) == before, "an input file changed"
    return line


def refuse_merge(model: Path, other: Path, tmp_path: Path, *needles, runner=run_cli) -> str:
    args, out = command("merge", model, other, tmp_path)
    return assert_refused(args, out, [model, other], *needles, runner=runner)


@pytest.fixture
def model(f32_models, tmp_path) -> Path:
    """A private copy of fine-tune "a" (two shards and an index), free to damage."""
    dst = tmp_path / "model"
    shutil.copytree(f32_models["a"], dst)
    return dst


def add_decoy(model: Path, tensor: str, into: Path) -> torch.Tensor:
    """Put a different copy of ``tensor`` into shard ``into`` (the index is left alone); return the true values."""
    true = load_file(shard_of(model, tensor))[tensor]
    held = load_file(into)
    held[tensor] = true * 0.5 + 1.0
    save_file(held, into, metadata={"format": "pt"})
    return true


# ---------------------------------------------------------------------------------------------------
# (4) the index decides which shard holds a tensor
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoy", ["later", "earlier"])
def test_index_decides_between_two_copies(model, f32_models, tmp_path, decoy):
    """The embedding in two shards: the copy in the shard the index names is the model's, whether the
    other copy's shard sorts after it (where "last file wins" went wrong) or before it."""
    tensor = "model.embed_tokens.weight"
    shards = sorted(set(weight_map(model).values()))
    named = weight_map(model)[tensor]
    others = [s for s in shards if (s > named if decoy == "later" else s < named)]
    assert others, "fixture layout changed: need a shard on that side of the embedding's"
    true = add_decoy(model, tensor, model / others[0])

    assert torch.equal(Checkpoint.open(model).get(tensor), true)
    out = tmp_path / "merged"
    cli("merge", recipe_for(tmp_path, model, f32_models["b"]), "-o", out, "--workers", 1, check=True)
    merged = {}
    for f in out.glob("*.safetensors"):
        merged.update(load_file(f))
    other = load_file(shard_of(f32_models["b"], tensor))[tensor]
    torch.testing.assert_close(merged[tensor], (true + other) / 2)


@pytest.mark.slow
def test_two_copies_without_index_refused(model, f32_models, tmp_path):
    home = shard_of(model)
    decoy = next(model / s for s in sorted(set(weight_map(model).values())) if model / s != home)
    _two_copies_no_index(model)
    line = refuse_merge(model, f32_models["b"], tmp_path, TENSOR, home.name, decoy.name, "no model.safetensors.index.json")
    assert str(model) in line


@pytest.mark.parametrize("entry", ["absolute", "dotdot", "symlink"])
def test_index_entry_outside_the_model_folder_refused(model, f32_models, tmp_path, entry, case_cli):
    """An index entry may not lead the reader to some other file on the machine (here: another model's shard)."""
    outside = shard_of(f32_models["b"])
    if entry == "absolute":
        target = str(outside)
    elif entry == "dotdot":
        shutil.copyfile(outside, tmp_path / "elsewhere.safetensors")
        target = "../elsewhere.safetensors"
    else:
        target = "linked.safetensors"
        (model / target).symlink_to(outside)
    edit_json(model / INDEX, lambda idx: idx["weight_map"].__setitem__(TENSOR, target))
    refuse_merge(model, f32_models["b"], tmp_path, model / INDEX, target, TENSOR, "outside the model folder",
                 runner=case_cli)


@pytest.mark.slow
def test_single_file_symlinked_outside_refused(f32_models, tmp_path):
    """Without an index the same rule holds: model.safetensors may not be a symlink out of the folder."""
    model = tmp_path / "single"
    model.mkdir()
    shutil.copyfile(f32_models["a"] / "config.json", model / "config.json")
    elsewhere = tmp_path / "elsewhere.safetensors"
    tensors = {}
    for f in sorted(f32_models["a"].glob("*.safetensors")):
        tensors.update(load_file(f))
    save_file(tensors, elsewhere, metadata={"format": "pt"})
    (model / "model.safetensors").symlink_to(elsewhere)
    refuse_merge(model, f32_models["b"], tmp_path, model / "model.safetensors", elsewhere, "outside the model folder")


def test_hub_cache_snapshot_symlinks_are_fine(f32_models, tmp_path):
    """Hub cache snapshots are folders of symlinks into the repo's blobs/: they stay readable."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in f32_models["a"].iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    ck = Checkpoint.open(snap)
    assert torch.equal(ck.get(TENSOR), load_file(shard_of(f32_models["a"]))[TENSOR])
    assert cli("inspect", snap).returncode == 0


# ---------------------------------------------------------------------------------------------------
# (5) the safetensors header check is complete
# ---------------------------------------------------------------------------------------------------
def _overlap(h, d):
    """TENSOR starts 4 bytes inside its predecessor (same length, so only the position is wrong)."""
    b, e = h[TENSOR]["data_offsets"]
    assert b >= 4, "TENSOR must have a predecessor in its shard"
    h[TENSOR]["data_offsets"] = [b - 4, e - 4]
    return h, d


def _hole(h, d):
    """8 unused bytes just before TENSOR."""
    b = h[TENSOR]["data_offsets"][0]
    for n, s in h.items():
        if n != "__metadata__" and s["data_offsets"][0] >= b:
            s["data_offsets"] = [s["data_offsets"][0] + 8, s["data_offsets"][1] + 8]
    return h, d[:b] + bytes(8) + d[b:]


def _field(key, value):
    def mutate(h, d):
        h[TENSOR][key] = value
        return h, d
    return mutate


def _metadata(value):
    def mutate(h, d):
        h["__metadata__"] = value
        return h, d
    return mutate


def _span(h, d):
    """The shape says one row fewer than the bytes the offsets span."""
    h[TENSOR]["shape"] = [h[TENSOR]["shape"][0] - 1, *h[TENSOR]["shape"][1:]]
    return h, d


def _duplicate(h, d):
    """TENSOR's entry twice in the JSON text (json.loads would silently keep the second)."""
    text = json.dumps(h)
    entry = json.dumps({TENSOR: h[TENSOR]})[1:-1]
    return "{" + entry + ", " + text[1:], d


HEADER_CASES = {
    "overlapping offsets": (_overlap, [TENSOR, "overlaps"]),
    "hole before a tensor": (_hole, [TENSOR, "belong to no tensor"]),
    "metadata not an object": (_metadata(["format", "pt"]), ["__metadata__"]),
    "metadata value not a string": (_metadata({"format": "pt", "step": 3}), ["__metadata__", "'step'"]),
    "dtype not a string": (_field("dtype", 7), [TENSOR, "dtype"]),
    "dtype unknown": (_field("dtype", "F33"), [TENSOR, "'F33'"]),
    "shape not a list": (_field("shape", "160x64"), [TENSOR, "shape"]),
    "shape negative": (_field("shape", [-160, -64]), [TENSOR, "shape"]),
    "shape of booleans": (_field("shape", [True, True]), [TENSOR, "shape"]),
    "offsets not a pair": (_field("data_offsets", [0]), [TENSOR, "data_offsets"]),
    "offsets not integers": (_field("data_offsets", ["0", "40960"]), [TENSOR, "data_offsets"]),
    "span does not match shape": (_span, [TENSOR, "needs"]),
    "tensor listed twice": (_duplicate, [TENSOR, "twice"]),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_bad_safetensors_header_refused(model, f32_models, tmp_path, case, case_cli):
    mutate, needles = HEADER_CASES[case]
    shard = shard_of(model)
    edit_header(shard, mutate)
    refuse_merge(model, f32_models["b"], tmp_path, shard, *needles, runner=case_cli)


@pytest.mark.slow
def test_trailing_bytes_after_the_last_tensor_refused(model, f32_models, tmp_path):
    """The data section must end where the last tensor ends (no polyglot payload after it)."""
    shard = shard_of(model)
    header, data = read_raw(shard)
    last = max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][1])
    write_raw(shard, header, data + b"#!/bin/sh\necho hi\n")
    refuse_merge(model, f32_models["b"], tmp_path, shard, last, "belong to no tensor")


# ---------------------------------------------------------------------------------------------------
# (7) config.json and index values of the wrong JSON type
# ---------------------------------------------------------------------------------------------------
def _config_dir(model: Path) -> None:
    (model / "config.json").unlink()
    (model / "config.json").mkdir()


def _config_text(text: str):
    return lambda model: (model / "config.json").write_text(text)


def _config_key(key, value):
    return lambda model: edit_json(model / "config.json", lambda c: c.__setitem__(key, value))


def _index_text(text: str):
    return lambda model: (model / INDEX).write_text(text)


def _index_value(tensor, value):
    return lambda model: edit_json(model / INDEX, lambda i: i["weight_map"].__setitem__(tensor, value))


CONFIG_CASES = {
    "config is a list": (_config_text("[1, 2]"), "config.json", ["expected a JSON object", "a list"]),
    "layers as a string": (_config_key("num_hidden_layers", "4"), "config.json", ["num_hidden_layers", '"4"']),
    "architectures as a string": (_config_key("architectures", "Llama"), "config.json", ["architectures"]),
    "vocab as a boolean": (_config_key("vocab_size", True), "config.json", ["vocab_size"]),
    "quantization_config a string": (_config_key("quantization_config", "gptq"), "config.json", ["quantization_config"]),
    "config invalid JSON": (_config_text('{"model_type": "llama",'), "config.json", ["invalid JSON"]),
    "config not UTF-8": (lambda m: (m / "config.json").write_bytes(b'{"a": "\xff"}'), "config.json", ["invalid JSON"]),
    "config is a directory": (_config_dir, "config.json", ["is a directory"]),
    "weight_map a list": (lambda m: edit_json(m / INDEX, lambda i: i.__setitem__("weight_map", [1])), INDEX,
                          ["weight_map", "a list"]),
    "weight_map value a number": (_index_value(TENSOR, 2), INDEX, ["weight_map", TENSOR]),
    "index invalid JSON": (_index_text('{"weight_map": {'), INDEX, ["invalid JSON"]),
    "index is a list": (_index_text("[]"), INDEX, ["weight_map"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_wrongly_typed_config_or_index_refused(model, f32_models, tmp_path, case, case_cli):
    damage, fname, needles = CONFIG_CASES[case]
    damage(model)
    refuse_merge(model, f32_models["b"], tmp_path, model / fname, *needles, runner=case_cli)


# ---------------------------------------------------------------------------------------------------
# every command that reads a checkpoint gives the same one line
# ---------------------------------------------------------------------------------------------------
COMMANDS = ["quantize", "inspect", "eval", "push --dry-run"]  # merge: every case above
REPRESENTATIVES = {  # one per kind of damage
    # push refuses any multi-file folder without an index before looking at tensors: a different, fair line
    "two copies, no index": (lambda m: _two_copies_no_index(m),
                             lambda m, cmd: [m, INDEX] if cmd.startswith("push") else [m, TENSOR]),
    "hole in safetensors data": (lambda m: edit_header(shard_of(m), _hole), lambda m, cmd: [shard_of(m), TENSOR]),
    "layers as a string": (_config_key("num_hidden_layers", "4"),
                           lambda m, cmd: [m / "config.json", "num_hidden_layers"]),
}


def _two_copies_no_index(model: Path) -> None:
    home = shard_of(model)
    add_decoy(model, TENSOR, next(model / s for s in sorted(set(weight_map(model).values())) if model / s != home))
    (model / INDEX).unlink()


# each command's first case through the real CLI in a subprocess (marked slow), the others in-process
EVERY_COMMAND = [pytest.param(case, cmd, marks=[pytest.mark.slow] if case == next(iter(REPRESENTATIVES)) else [],
                              id=f"{case}-{cmd}") for case in REPRESENTATIVES for cmd in COMMANDS]


@pytest.mark.parametrize("case, cmd", EVERY_COMMAND)
def test_every_command_refuses_the_same_way(model, f32_models, tmp_path, case, cmd):
    damage, needles = REPRESENTATIVES[case]
    damage(model)
    args, out = command(cmd, model, f32_models["b"], tmp_path)
    runner = run_cli if case == next(iter(REPRESENTATIVES)) else cli
    assert_refused(args, out, [model, f32_models["b"]], *needles(model, cmd), runner=runner)
