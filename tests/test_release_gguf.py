"""GGUF outputs in release files and in ``mergequant push``.

A release's quantize step with ``method: gguf`` and ``gguf_types`` writes one ``.gguf`` per type (the shared tiny
float32 Llama, session fixture ``tiny_models``: its byte-level BPE tokenizer is one llama.cpp knows), records
every file with its hash, skips when nothing changed, re-runs when the types change or a file is damaged, and
estimates per-type sizes in a dry run. ``push`` accepts a folder of GGUF files and a card (no config.json),
uploads every file, refuses links out of the folder, and the card lists each file with its size (and, measured
in llama.cpp when llama-cpp-python is installed, its held-out perplexity).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from helpers import REPO, TOKEN
from mergequant.release import MANIFEST, ReleaseError, RunOptions, parse_release, run_release

pytest.importorskip("gguf")

TEXT = " ".join(f"word{i % 37} and sentence {i} goes on." for i in range(300))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def write_release(folder: Path, base: Path, types: str = "[Q4_K_M, Q8_0]", *, eval_: bool = False,
                  push: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = (f"workdir: out\nmerge: {{model: {base}}}\n"
            f"quantize:\n  - {{name: gguf, method: gguf, gguf_types: {types}}}\n")
    if eval_:
        (folder / "heldout.txt").write_text(TEXT)
        text += "eval: {data: heldout.txt, seqlen: 64, max_tokens: 256, backend: dequant}\n"
    if push:
        text += f"push:\n  gguf: org/tiny-gguf\n  base_model_map: {{{base}: me/tiny-base}}\n"
    path = folder / "release.yaml"
    path.write_text(text)
    return path


def run(path: Path, **kw):
    lines: list[str] = []
    res = run_release(path, RunOptions(quiet=True, fsync=False, **kw), log=lines.append)
    return res, "\n".join(lines)


def statuses(res) -> dict[str, str]:
    return {o.id: o.status for o in res.outcomes}


# ---- the release file --------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry, key, words", [
    ("{name: g, method: gguf, gguf_types: [Q4_K_M, Q4_K_XL]}", "quantize[0].gguf_types", "unknown GGUF type 'Q4_K_XL'"),
    ("{name: g, method: gguf}", "quantize[0].gguf_types", "missing"),
    ("{name: g, method: gguf, gguf_types: []}", "quantize[0].gguf_types", "expected a list of GGUF types"),
    ("{name: g, method: gguf, gguf_types: [4]}", "quantize[0].gguf_types", "expected a list of GGUF types"),
    ("{name: g, method: rtn, bits: 4, gguf_types: [Q8_0]}", "quantize[0].gguf_types", "only applies to method gguf"),
    ("{name: g, method: ggfu, gguf_types: [Q8_0]}", "quantize[0].method", "did you mean 'gguf'"),
])
def test_bad_gguf_settings_are_one_line_naming_the_key(tiny_models, tmp_path, entry, key, words):
    text = f"workdir: out\nmerge: {{model: {tiny_models['base']}}}\nquantize:\n  - {entry}\n"
    with pytest.raises(ReleaseError) as e:
        parse_release(text, tmp_path / "release.yaml")
    msg = str(e.value)
    assert "\n" not in msg and f"release.yaml: {key}: " in msg and words in msg, msg


def test_gguf_types_are_normalized_like_the_command_line(tiny_models, tmp_path):
    text = (f"workdir: out\nmerge: {{model: {tiny_models['base']}}}\n"
            "quantize:\n  - {name: g, method: gguf, gguf_types: [q8_0, Q4_K_M, Q8_0]}\n")
    rel = parse_release(text, tmp_path / "release.yaml")
    assert rel.quantize[0].settings == {"method": "gguf", "gguf_types": ["Q8_0", "Q4_K_M"]}
    one = parse_release(text.replace("[q8_0, Q4_K_M, Q8_0]", "Q6_K"), tmp_path / "release.yaml")
    assert one.quantize[0].settings["gguf_types"] == ["Q6_K"]


def test_architecture_gguf_cannot_convert_is_refused_before_anything_is_written(tiny_models, tmp_path):
    model = Path(shutil.copytree(tiny_models["base"], tmp_path / "phi"))
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "model_type": "phi3"}))
    path = write_release(tmp_path / "r", model)
    with pytest.raises(ReleaseError) as e:
        run(path)
    assert "quantize gguf:" in str(e.value) and "phi3" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "r" / "out" / "gguf").exists()


# ---- run, record, skip, re-run -----------------------------------------------------------------------------
def test_release_writes_records_skips_and_reruns_when_the_types_change(tiny_models, tmp_path):
    base = tiny_models["base"]
    path = write_release(tmp_path, base)
    wd = tmp_path / "out"

    dry, _ = run(path, dry_run=True)
    assert "Q4_K_M ~" in dry.plan_text and "Q8_0 ~" in dry.plan_text and "2 GGUF file(s)" in dry.plan_text
    assert not wd.exists()

    res, _ = run(path)
    assert statuses(res) == {"quantize/gguf": "ran"}
    out = wd / "gguf"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "base-Q4_K_M.gguf", "base-Q8_0.gguf"]
    rec = json.loads((wd / MANIFEST).read_text())["steps"]["quantize/gguf"]
    assert rec["settings"]["gguf_types"] == ["Q4_K_M", "Q8_0"]
    assert rec["result"]["gguf_files"] == ["base-Q4_K_M.gguf", "base-Q8_0.gguf"]
    for name in ("base-Q4_K_M.gguf", "base-Q8_0.gguf", "README.md"):
        assert rec["files"][name] == {"size": (out / name).stat().st_size, "sha256": sha256(out / name)}, name
    # the dry run's estimate is the tensor data: within a few percent of the file (header, vocabulary aside)
    for t in ("Q4_K_M", "Q8_0"):
        assert f"base-{t}.gguf" in (out / "README.md").read_text()

    again, _ = run(path)
    assert statuses(again) == {"quantize/gguf": "skipped"}

    # a damaged file is found on resume (the recorded hashes) and the step redone
    f = out / "base-Q8_0.gguf"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    redo, log = run(path)
    assert statuses(redo) == {"quantize/gguf": "ran"} and "base-Q8_0.gguf" in log
    assert sha256(f) == rec["files"]["base-Q8_0.gguf"]["sha256"]  # the same bytes again

    # other types: re-run, and the folder holds exactly the new files
    write_release(tmp_path, base, "[Q8_0, Q6_K]")
    changed, log = run(path)
    assert statuses(changed) == {"quantize/gguf": "ran"} and "gguf_types" in log
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "base-Q6_K.gguf", "base-Q8_0.gguf"]
    rec2 = json.loads((wd / MANIFEST).read_text())["steps"]["quantize/gguf"]
    assert set(rec2["files"]) == {"README.md", "base-Q6_K.gguf", "base-Q8_0.gguf"}
    assert rec2["files"]["base-Q8_0.gguf"]["sha256"] == rec["files"]["base-Q8_0.gguf"]["sha256"]
    assert statuses(run(path)[0]) == {"quantize/gguf": "skipped"}


def test_dry_run_estimate_is_close_to_the_files(tiny_models, tmp_path):
    from mergequant.release.gguf import check_gguf
    from mergequant.quant.quantize import QuantizeOptions, run_quantize
    from mergequant.io.checkpoint import Checkpoint

    opts = QuantizeOptions(out=tmp_path / "o", method="gguf", gguf_types=["Q4_K_M", "Q8_0", "F16"], quiet=True,
                           fsync=False)
    sizes = check_gguf(Checkpoint.open(tiny_models["base"]), opts)
    run_quantize(tiny_models["base"], opts, log=lambda m: None)
    for t, est in sizes.items():
        real = (tmp_path / "o" / f"base-{t}.gguf").stat().st_size
        assert est < real < est + 200_000, (t, est, real)  # + metadata: the 2048-token vocabulary and merges


# ---- push --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_folder(tiny_models, tmp_path_factory) -> Path:
    path = write_release(tmp_path_factory.mktemp("rg"), tiny_models["base"], push=True)
    res, _ = run(path, push_dry_run=True)
    assert statuses(res) == {"quantize/gguf": "ran", "push/gguf": "ran"}
    assert res.outcomes[-1].detail["files"] == 3
    return path.parent / "out" / "gguf"


def test_push_plan_lists_every_gguf_and_the_card_lists_each_with_its_size(gguf_folder, tiny_models):
    from mergequant.card import validate_card
    from mergequant.hub import PushOptions, plan_push
    from mergequant.units import format_bytes

    plan = plan_push(gguf_folder, PushOptions(repo=REPO, dry_run=True,
                                              base_model_map={str(tiny_models["base"].resolve()): "me/tiny-base"}))
    ggufs = sorted(p.name for p in gguf_folder.glob("*.gguf"))
    assert sorted(f.path for f in plan.files) == ["README.md", *ggufs]
    meta = validate_card(plan.card, repo=REPO)
    assert meta["base_model"] in ("me/tiny-base", ["me/tiny-base"]) and meta["base_model_relation"] == "quantized"
    assert "gguf" in meta["tags"] and meta["library_name"] == "gguf"
    rows = [ln for ln in plan.card.splitlines() if ln.startswith("| `")]
    assert len(rows) == len(ggufs)
    for name, row in zip(ggufs, rows):
        t = name.removeprefix("base-").removesuffix(".gguf")
        assert row.startswith(f"| `{name}` | {t} | {format_bytes((gguf_folder / name).stat().st_size)} | not measured |")


def test_push_uploads_every_gguf_to_the_loopback_hub(gguf_folder, tiny_models, online, hub):
    from mergequant.hub import PushOptions, push

    before = {p.name: sha256(p) for p in gguf_folder.iterdir()}
    res = push(gguf_folder, PushOptions(repo=REPO, endpoint=hub.url, token=TOKEN,
                                        base_model_map={str(tiny_models["base"].resolve()): "me/tiny-base"}),
               log=lambda m: None)
    files = hub.files(REPO)
    ggufs = sorted(n for n in before if n.endswith(".gguf"))
    assert sorted(files) == ["README.md", *ggufs] and len(ggufs) == 2
    for n in ggufs:
        assert files[n].sha256 == before[n] and files[n].lfs, n
    card = files["README.md"].content.decode()
    assert "base_model: me/tiny-base" in card or "- me/tiny-base" in card
    assert all(f"`{n}`" in card for n in ggufs)
    assert {p.name: sha256(p) for p in gguf_folder.iterdir()} == before  # the folder is never modified
    assert sorted(res.changed) == sorted(files)


def _copy(folder: Path, dst: Path) -> Path:
    return Path(shutil.copytree(folder, dst))


def test_push_refuses_a_gguf_link_out_of_the_folder_and_a_fake_gguf(gguf_folder, tmp_path):
    from mergequant.hub import PushError, PushOptions, plan_push

    outside = tmp_path / "elsewhere.gguf"
    shutil.copy(next(gguf_folder.glob("*.gguf")), outside)
    linked = _copy(gguf_folder, tmp_path / "linked")
    os.symlink(outside, linked / "extra-Q2_K.gguf")
    with pytest.raises(PushError, match="outside the folder"):
        plan_push(linked, PushOptions(repo=REPO, dry_run=True))

    fake = _copy(gguf_folder, tmp_path / "fake")
    (fake / "base-Q8_0.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(PushError, match="not a GGUF file"):
        plan_push(fake, PushOptions(repo=REPO, dry_run=True))

    mixed = _copy(gguf_folder, tmp_path / "mixed")
    (mixed / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(PushError, match="one format per repo"):
        plan_push(mixed, PushOptions(repo=REPO, dry_run=True))

    inside = _copy(gguf_folder, tmp_path / "inside")  # a link inside the folder is fine (the file it points to)
    os.symlink("base-Q8_0.gguf", inside / "alias-Q8_0.gguf")
    plan = plan_push(inside, PushOptions(repo=REPO, dry_run=True))
    assert {f.path: f.link for f in plan.files}["alias-Q8_0.gguf"] == "base-Q8_0.gguf"


# ---- held-out perplexity in llama.cpp ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.client
def test_release_eval_measures_each_gguf_in_llama_cpp(tiny_models, tmp_path):
    pytest.importorskip("llama_cpp")
    path = write_release(tmp_path, tiny_models["base"], "[Q8_0, F32]", eval_=True)
    res, log = run(path)
    assert statuses(res) == {"quantize/gguf": "ran", "eval": "ran"}
    wd = tmp_path / "out"
    rec = json.loads((wd / MANIFEST).read_text())["steps"]["quantize/gguf"]
    ppl = rec["result"]["perplexity"]
    assert set(ppl) == {"base-Q8_0.gguf", "base-F32.gguf"}
    results = json.loads((wd / "results.json").read_text())["models"]
    fp = results["(model)"]["perplexity"]
    # llama.cpp on the F32 file scores the same tokens in the same windows as mergequant eval (transformers)
    assert results["gguf/base-F32.gguf"]["tokens"] == results["(model)"]["tokens"]
    assert abs(results["gguf/base-F32.gguf"]["perplexity"] / fp - 1) < 1e-3, (results, fp)
    assert abs(ppl["base-Q8_0.gguf"] / fp - 1) < 0.02
    card = (wd / "gguf" / "README.md").read_text()
    assert f"| {ppl['base-Q8_0.gguf']:.4f} |" in card and "not measured |" not in card
    assert rec["files"]["README.md"]["sha256"] == sha256(wd / "gguf" / "README.md")
    assert "gguf/base-Q8_0.gguf" in (wd / "results.md").read_text()
    assert statuses(run(path)[0]) == {"quantize/gguf": "skipped", "eval": "skipped"}
