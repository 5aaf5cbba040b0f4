"""LoRA adapters in release files: ``merge: {model: BASE+ADAPTER}``, an adapter-only folder, and merge parents.

The model is read through the same adapted view as ``mergequant quantize BASE+ADAPTER`` (nothing merged is
written), so a release's quantization must be byte-identical to quantizing the reference directly; the skip
decision must cover the adapter's files as well as the base's (a changed adapter redoes what read it); a bad
reference is one error line before the workdir exists. Tiny float32 Llama (session fixture ``tiny_models``),
random adapters made with peft (every factor randomised, or the adapter would be a no-op), RTN (fastest).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import cli, load_dir, random_lora
from mergequant.release import MANIFEST, ReleaseError, RunOptions, run_release

pytest.importorskip("peft")

RTN = "{name: rtn4, method: rtn, bits: 4, group_size: 32}"
QUANT_ARGS = ("--method", "rtn", "--bits", "4", "--group-size", "32", "-q")
TEXT = " ".join(f"word{i % 37} and sentence {i} goes on." for i in range(400))


def reseed_adapter(folder: Path, seed: int) -> None:
    """New values for every factor of the adapter's safetensors (same names, shapes, size, config)."""
    f = folder / "adapter_model.safetensors"
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) * 0.2 for k, v in load_file(f).items()}
    save_file(tensors, f, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def lora(tiny_models, tmp_path_factory) -> Path:
    """A LoRA adapter of the shared tiny base (read-only: tests that change it copy it first)."""
    return random_lora(tiny_models["base"], tmp_path_factory.mktemp("rp") / "lora", seed=3)


def run(release: Path, **kw):
    lines: list[str] = []
    res = run_release(release, RunOptions(quiet=True, fsync=False, **kw), log=lines.append)
    return res, "\n".join(lines)


def status(res) -> dict[str, str]:
    return {o.id: o.status for o in res.outcomes}


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_base_plus_adapter_release_equals_quantize_and_resumes(tiny_models, lora, tmp_path):
    base = tiny_models["base"].resolve()
    shutil.copytree(lora, tmp_path / "lora")  # changed below
    release = tmp_path / "release.yaml"
    # the adapter side relative to the release file, the base absolute
    release.write_text(f"workdir: out\nmerge: {{model: {base}+lora}}\nquantize:\n  - {RTN}\n")
    before = tree(base)

    # --dry-run: the adapter is named, the quantization planned, nothing written
    res, _ = run(release, dry_run=True)
    assert "applied tensor by tensor" in res.plan_text and str(tmp_path / "lora") in res.plan_text
    assert status(res) == {"quantize/rtn4": "would run"} and not (tmp_path / "out").exists()

    res, log = run(release)
    assert status(res) == {"quantize/rtn4": "ran"}
    assert "applied tensor by tensor" in log and "no merged copy" in log
    out = tmp_path / "out" / "rtn4"

    # the same bytes as `mergequant quantize BASE+ADAPTER` (card included: it names the same reference)
    cli("quantize", f"{base}+{(tmp_path / 'lora').resolve()}", "-o", tmp_path / "direct", *QUANT_ARGS, check=True)
    assert files(out) == files(tmp_path / "direct")
    card = (out / "README.md").read_text()
    assert "## Adapters" in card and f"on base `{base}`" in card
    # ... and not those of the base alone: the adapter was applied
    cli("quantize", base, "-o", tmp_path / "plain", *QUANT_ARGS, check=True)
    ours, plain = load_dir(out), load_dir(tmp_path / "plain")
    assert ours.keys() == plain.keys() and any(not torch.equal(ours[k], plain[k]) for k in ours)

    # the fingerprint holds both sides; no merged copy anywhere (workdir: the manifest, the lock, the output)
    rec = json.loads((tmp_path / "out" / MANIFEST).read_text())["steps"]["quantize/rtn4"]
    assert set(rec["inputs"]["source"]) == {"reference", "base", "adapter"}
    assert rec["inputs"]["source"]["reference"] == f"{base}+{(tmp_path / 'lora').resolve()}"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lock", MANIFEST, "rtn4"]
    assert tree(base) == before

    # resume: nothing changed -> everything skipped
    res, _ = run(release)
    assert status(res) == {"quantize/rtn4": "skipped"}
    res, _ = run(release, dry_run=True)
    assert status(res) == {"quantize/rtn4": "would skip"}

    # the adapter's weights change (same size, same config) -> the quantization is redone, and differs
    first = files(out)
    reseed_adapter(tmp_path / "lora", seed=11)
    res, _ = run(release, dry_run=True)
    assert status(res) == {"quantize/rtn4": "would run"} and "source" in res.outcomes[0].reason
    res, _ = run(release)
    assert status(res) == {"quantize/rtn4": "ran"} and "source" in res.outcomes[0].reason
    second = files(out)
    assert second["README.md"] == first["README.md"] and second != first
    res, _ = run(release)
    assert status(res) == {"quantize/rtn4": "skipped"}

    # a push (dry run): the card's one base_model is the adapter, mapped to its Hub id by base_model_map
    release.write_text(release.read_text() + "push: {rtn4: me/q, base_model_map: {lora: me/my-lora}}\n")
    lines: list[str] = []
    res = run_release(release, RunOptions(push_dry_run=True, fsync=False), log=lines.append)
    assert status(res) == {"quantize/rtn4": "skipped", "push/rtn4": "ran"}
    assert re.search(r"base_model:\n\s*- me/my-lora\n", "\n".join(lines))


@pytest.mark.slow
def test_adapter_only_folder_with_eval(tiny_models, lora, tmp_path):
    """An adapter-only folder: its base from base_model_name_or_path; quantized and evaluated through the view."""
    cfg = json.loads((lora / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]).resolve() == tiny_models["base"].resolve()
    (tmp_path / "heldout.txt").write_text(TEXT)
    release = tmp_path / "release.yaml"
    release.write_text(f"workdir: out\nmerge: {{model: {lora}}}\nquantize:\n  - {RTN}\n"
                       "eval: {data: heldout.txt, seqlen: 32, backend: dequant, device: cpu}\n")
    res, log = run(release)
    assert status(res) == {"quantize/rtn4": "ran", "eval": "ran"}
    assert "base_model_name_or_path" in log
    out = tmp_path / "out"
    cli("quantize", lora.resolve(), "-o", tmp_path / "direct", *QUANT_ARGS, check=True)
    ours, direct_q = load_dir(out / "rtn4"), load_dir(tmp_path / "direct")  # (the release's card adds perplexities)
    assert ours.keys() == direct_q.keys() and all(torch.equal(ours[k], direct_q[k]) for k in ours)
    assert "base_model_name_or_path" in (out / "rtn4" / "README.md").read_text()
    # the adapted model was evaluated, not the base: its perplexity is that of `mergequant eval ADAPTER`
    ppl = json.loads((out / "results.json").read_text())["models"]
    direct = json.loads(cli("eval", lora, "--data", tmp_path / "heldout.txt", "--seqlen", 32, "--json", "-q",
                            "--device", "cpu", check=True).stdout.strip().splitlines()[-1])["perplexity"]
    base = json.loads(cli("eval", tiny_models["base"], "--data", tmp_path / "heldout.txt", "--seqlen", 32, "--json",
                          "-q", "--device", "cpu", check=True).stdout.strip().splitlines()[-1])["perplexity"]
    assert ppl["(model)"]["perplexity"] == pytest.approx(direct, rel=1e-6)
    assert abs(ppl["(model)"]["perplexity"] - base) > 1e-3
    res, _ = run(release)
    assert set(status(res).values()) == {"skipped"}


@pytest.mark.parametrize("case", ["no-adapter-side", "missing", "full-model", "wrong-base", "a+b+c"])
def test_bad_adapter_reference_is_one_line_before_anything(case, tiny_models, lora, tmp_path):
    base = tiny_models["base"]
    if case == "wrong-base":  # a Llama of another width: the factors do not fit
        from mergequant.demo import build_tiny_llama

        other = build_tiny_llama(tmp_path / "other", seed=0, dtype=torch.float32, layers=2, hidden=32,
                                 intermediate=96, vocab=2048)
    ref = {"no-adapter-side": f"{base}+", "missing": f"{base}+nope", "full-model": f"{base}+{tiny_models['a']}",
           "wrong-base": f"{tmp_path / 'other'}+{lora}", "a+b+c": f"{base}+{lora}+{lora}"}[case]
    says = {"no-adapter-side": "the adapter is missing", "missing": "does not exist",
            "full-model": "no adapter_config.json", "wrong-base": "do not fit the base tensor",
            "a+b+c": "one adapter per model"}[case]
    release = tmp_path / "release.yaml"
    release.write_text(f"workdir: out\nmerge: {{model: '{ref}'}}\nquantize:\n  - {RTN}\n")
    for args in ([], ["--dry-run"]):
        proc = cli("run", release, *args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0] and f"{release}: merge.model: " in lines[0], proc.stderr
        assert not (tmp_path / "out").exists()
    if case == "wrong-base":
        assert other.is_dir()
    with pytest.raises(ReleaseError, match="merge.model"):
        run(release)


def test_outputs_may_not_overlap_the_adapter(tiny_models, lora, tmp_path):
    """The adapter folder is an input like the base: a workdir inside it is refused before anything is written."""
    shutil.copytree(lora, tmp_path / "lora")
    release = tmp_path / "release.yaml"
    release.write_text(f"workdir: lora/out\nmerge: {{model: {tiny_models['base']}+lora}}\nquantize:\n  - {RTN}\n")
    proc = cli("run", release)
    assert proc.returncode == 2 and "lora" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "lora" / "out").exists()


def test_merge_parent_with_adapter_fingerprints_both_sides(tiny_models, lora, tmp_path):
    """A recipe parent ``BASE+ADAPTER`` in a release: the merge step's fingerprint covers the adapter's files."""
    shutil.copytree(lora, tmp_path / "lora")
    (tmp_path / "recipe.yaml").write_text(
        f"merge_method: linear\nmodels:\n  - model: {tiny_models['base']}+lora\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {tiny_models['a']}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")
    release = tmp_path / "release.yaml"
    release.write_text("workdir: out\nmerge: {recipe: recipe.yaml}\n")
    res, _ = run(release)
    assert status(res) == {"merge": "ran"}
    rec = json.loads((tmp_path / "out" / MANIFEST).read_text())["steps"]["merge"]
    parent = rec["inputs"]["parents"][f"{tiny_models['base']}+lora"]
    assert set(parent) == {"base", "adapter"} and not parent["adapter"].startswith("hub:")
    merged = files(tmp_path / "out" / "merged")
    res, _ = run(release)
    assert status(res) == {"merge": "skipped"}
    reseed_adapter(tmp_path / "lora", seed=12)
    res, _ = run(release)
    assert status(res) == {"merge": "ran"} and "parents" in res.outcomes[0].reason
    assert files(tmp_path / "out" / "merged") != merged
