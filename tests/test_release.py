"""`mergequant run RELEASE.yaml`: validation, skip rules, dry run, and resuming after a real SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mergequant.cli import app
from mergequant.demo import build_tiny_llama, demo_text, finetune_of
from mergequant.release import (
    MANIFEST,
    ReleaseError,
    RunOptions,
    parse_release,
    run_release,
)

RECIPE = """\
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5, density: 0.5}}
dtype: float32
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread (as the subprocesses below): the cores are shared, and OpenMP spinning on an
    oversubscribed machine costs more than a second thread gains on these tiny models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    """Tiny float32 base + two fine-tunes, a TIES recipe and calibration / held-out text in one folder."""
    root = tmp_path_factory.mktemp("release")
    base = build_tiny_llama(root / "models" / "base", dtype=torch.float32, hidden=64, intermediate=160, layers=2, seed=0)
    a = finetune_of(base, root / "models" / "a", seed=1)
    b = finetune_of(base, root / "models" / "b", seed=2)
    (root / "ties.yaml").write_text(RECIPE.format(base=base, a=a, b=b))
    (root / "calib.txt").write_text(demo_text(1))
    (root / "heldout.txt").write_text(demo_text(2))
    return root


def write_release(family: Path, folder: Path, *, gptq: str = "bits: 4", rtn: str = "bits: 4", samples: int = 8,
                  eval_: bool = True, push: bool = True) -> Path:
    """A release file in ``folder`` (workdir ``folder/out``) over the ``family`` models and texts."""
    folder.mkdir(parents=True, exist_ok=True)
    text = (f"workdir: out\n"
            f"merge: {{recipe: {family / 'ties.yaml'}}}\n"
            f"quantize:\n"
            f"  - {{name: gptq, method: gptq, {gptq}, group_size: 32, calib: {family / 'calib.txt'}, samples: {samples}, seqlen: 64}}\n"
            f"  - {{name: rtn, method: rtn, {rtn}, group_size: 32}}\n")
    if eval_:
        text += f"eval: {{data: {family / 'heldout.txt'}, seqlen: 64, backend: dequant}}\n"
    if push:
        text += "push:\n  merged: org/tiny\n  gptq: org/tiny-gptq\n  rtn: org/tiny-rtn\n"
    path = folder / "release.yaml"
    path.write_text(text)
    return path


def outputs(workdir: Path) -> dict[str, bytes]:
    """Every file a run leaves in the workdir except the manifest (timings) and the lock file."""
    return {p.relative_to(workdir).as_posix(): p.read_bytes() for p in sorted(workdir.rglob("*"))
            if p.is_file() and p.name not in (MANIFEST, ".lock")}


def run(path: Path, push_dry_run: bool = True, **kw):
    lines: list[str] = []
    res = run_release(path, RunOptions(quiet=True, push_dry_run=push_dry_run, **kw), log=lines.append)
    return res, "\n".join(lines)


def statuses(res) -> dict[str, str]:
    return {o.id: o.status for o in res.outcomes}


# ---- validation (pure) -----------------------------------------------------------------------------
@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.replace("quantize:", "quantise:"), "unknown key 'quantise' (did you mean 'quantize'?)"),
    (lambda t: t.replace("group_size: 32, calib", "group_sze: 32, calib"), "quantize[0].group_sze: unknown key 'group_sze' (did you mean 'group_size'?)"),
    (lambda t: t.replace("method: gptq", "method: gtpq"), "quantize[0].method: unknown method 'gtpq' (did you mean 'gptq'?)"),
    (lambda t: t.replace("ties.yaml", "missing.yaml"), "merge.recipe: recipe not found"),
    (lambda t: t.replace("bits: 4, group_size: 32, calib", "bits: four, group_size: 32, calib"), "quantize[0].bits: expected an integer"),
    (lambda t: t.replace("name: rtn", "name: gptq"), "quantize[1].name: 'gptq' is already used"),
    (lambda t: t.replace("gptq: org/tiny-gptq", "gtpq: org/tiny-gptq"), "push.gtpq: unknown key 'gtpq' (did you mean 'gptq'?)"),
    (lambda t: t.replace("merged: org/tiny", "merged: not a repo"), "push.merged: 'not a repo' is not a Hub repo id"),
    (lambda t: t.replace("backend: dequant", "backend: dequnt"), "eval.backend: 'dequnt' is not one of"),
    (lambda t: t.replace("ties.yaml}", "ties.yaml, out: results.md}").replace("merged: org", "results.md: org"),
     "merge.out: 'results.md' is reserved"),
    (lambda t: t.replace("ties.yaml}", "ties.yaml, out: manifest.json}").replace("merged: org", "manifest.json: org"),
     "merge.out: 'manifest.json' is reserved"),
    (lambda t: t.replace("seqlen: 64, backend", "seqlen: 64, stride: 0, backend"), "eval: --stride must be an integer >= 1, got 0"),
    (lambda t: t + "push: {merged: org/other}\n", "duplicate key 'push'"),
])
def test_invalid_release_files_are_rejected_with_file_and_key(family, tmp_path, edit, needle):
    path = write_release(family, tmp_path / "r")
    path.write_text(edit(path.read_text()))
    with pytest.raises(ReleaseError) as e:
        parse_release(path.read_text(), path)
    assert needle in str(e.value) and str(path) in str(e.value)
    # the CLI prints it as one line and exits 2, before anything is written
    proc = CliRunner().invoke(app, ["run", str(path)])
    assert proc.exit_code == 2 and needle in proc.output and len(proc.output.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "out").exists()


def test_bad_group_size_fails_before_the_merge(family, tmp_path):
    path = write_release(family, tmp_path / "r")
    path.write_text(path.read_text().replace("method: rtn, bits: 4, group_size: 32", "method: rtn, bits: 4, group_size: 48"))
    with pytest.raises(ReleaseError, match=r"quantize rtn: --group-size 48 does not divide"):
        run(path)
    assert not (tmp_path / "r" / "out" / "merged").exists()


# ---- skip rules ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_rerun_skips_unchanged_steps_and_redoes_only_what_changed(family, tmp_path):
    folder = tmp_path / "r"
    path = write_release(family, folder)
    wd = folder / "out"

    res, _ = run(path)
    assert set(statuses(res).values()) == {"ran"}
    assert list(statuses(res)) == ["merge", "quantize/gptq", "quantize/rtn", "eval", "push/merged", "push/gptq", "push/rtn"]
    first = outputs(wd)
    manifest = json.loads((wd / MANIFEST).read_text())
    assert manifest["steps"]["quantize/gptq"]["files"]["model.safetensors"]["size"] == (wd / "gptq" / "model.safetensors").stat().st_size
    assert set(json.loads((wd / "results.json").read_text())["models"]) == {"merged", "gptq", "rtn"}
    assert "| full precision |" in (wd / "gptq" / "README.md").read_text()  # eval numbers in the card
    manifest_bytes = (wd / MANIFEST).read_bytes()

    # 1. nothing changed: every step skipped, nothing rewritten
    res, log = run(path)
    assert set(statuses(res).values()) == {"skipped"}
    assert log.count("skip (unchanged)") == 7
    assert outputs(wd) == first and (wd / MANIFEST).read_bytes() == manifest_bytes

    # 2. dry run on the finished workdir: all skipped, the push lists what it would upload; writes nothing
    proc = CliRunner().invoke(app, ["run", str(path), "--dry-run", "--push-dry-run"])
    assert proc.exit_code == 0, proc.output
    assert proc.output.count("  skip ") == 7 and "print the plan (--push-dry-run) ~" in proc.output
    assert (wd / MANIFEST).read_bytes() == manifest_bytes

    # 3. one quantization's setting changes: only it, the eval and its push run again
    path.write_text(path.read_text().replace("method: rtn, bits: 4", "method: rtn, bits: 8"))
    dry = CliRunner().invoke(app, ["run", str(path), "--dry-run"]).output
    assert "run  quantize/rtn" in dry and "inputs or settings changed: bits" in dry and "skip quantize/gptq" in dry
    res, log = run(path)
    assert statuses(res) == {"merge": "skipped", "quantize/gptq": "skipped", "quantize/rtn": "ran", "eval": "ran",
                             "push/merged": "skipped", "push/gptq": "skipped", "push/rtn": "ran"}
    assert json.loads((wd / "rtn" / "config.json").read_text())["quantization_config"]["bits"] == 8
    after_bits = outputs(wd)
    assert {k for k in first if first[k] != after_bits.get(k)} <= {k for k in first if k.startswith(("rtn/", "results."))}

    # 4. a corrupted output file is detected and that step redone, with the same bytes, so nothing
    #    downstream changes (eval and pushes are skipped)
    shard = wd / "gptq" / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    res, log = run(path)
    assert "[quantize/gptq] run (output gptq: model.safetensors changed content)" in log
    assert statuses(res)["quantize/gptq"] == "ran" and statuses(res)["eval"] == "skipped"
    assert outputs(wd) == after_bits

    # 5. a deleted output: the merge is redone (identical bytes), the quantizations are not
    shutil.rmtree(wd / "merged")
    res, log = run(path)
    assert "[merge] run (output merged: output missing)" in log
    assert [k for k, v in statuses(res).items() if v == "ran"] == ["merge"]
    assert outputs(wd) == after_bits

    # 6. --force-step by output name
    res, _ = run(path, force_steps=["rtn"])
    assert [k for k, v in statuses(res).items() if v == "ran"] == ["quantize/rtn"]
    with pytest.raises(ReleaseError, match="--force-step rnt: no such step.*did you mean 'rtn'"):
        run(path, force_steps=["rnt"])


def test_dry_run_on_a_fresh_workdir_prints_the_plan_and_writes_nothing(family, tmp_path):
    path = write_release(family, tmp_path / "r")
    proc = CliRunner().invoke(app, ["run", str(path), "--dry-run"])
    assert proc.exit_code == 0, proc.output
    out = proc.output
    assert "run  merge" in out and "peak memory ~" in out and "reads" in out
    assert "run  quantize/gptq" in out and "not done yet" in out
    assert "upload ~" in out and "org/tiny-gptq" in out
    assert "to write," in out and "free under" in out
    assert not (tmp_path / "r" / "out").exists()


def test_example_release_in_configs_is_valid_against_the_demo_tree(tmp_path):
    from mergequant.demo import build_demo_models, write_demo_release

    configs = Path(__file__).resolve().parents[1] / "configs"
    shutil.copytree(configs, tmp_path / "configs")
    build_demo_models(tmp_path / "mergequant-demo" / "models")
    write_demo_release(tmp_path / "mergequant-demo")  # calib.txt and heldout.txt, as `mergequant demo` writes them
    res, _ = run(tmp_path / "configs" / "release.yaml", dry_run=True)
    assert [o.status for o in res.outcomes] == ["would run"] * len(res.outcomes)
    assert [o.id for o in res.outcomes][:4] == ["merge", "quantize/gptq-w4g64", "quantize/gptq-w8g64", "quantize/rtn-w4g64"]
    assert not (tmp_path / "mergequant-demo" / "release-example").exists()


def test_real_push_through_a_loopback_hub_points_the_quantization_at_the_merge_repo(family, tmp_path, monkeypatch):
    from hub_server import HubServer
    from huggingface_hub import ModelCard, constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_TOKEN", "hf_releaseTESTtoken0123456789")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with HubServer() as hub:
        path = write_release(family, tmp_path / "r", eval_=False)
        text = path.read_text().replace("  - {name: gptq", "  # - {name: gptq").replace("  gptq: org/tiny-gptq\n", "")
        path.write_text(text + f"  endpoint: {hub.url}\n  base_model_map: {{{family / 'models' / 'base'}: org/base}}\n")
        res, _ = run(path)  # pushes as a dry run first: recorded as such ...
        assert statuses(res)["push/rtn"] == "ran" and hub.requests_matching("POST", r"/commit/") == []
        res, log = run(path, push_dry_run=False)  # ... so the real push is not skipped
        assert statuses(res) == {"merge": "skipped", "quantize/rtn": "skipped", "push/merged": "ran", "push/rtn": "ran"}
        merged_card = ModelCard(hub.files("org/tiny")["README.md"].content.decode()).data
        assert merged_card.base_model == ["org/base"] and merged_card.base_model_relation == "merge"
        rtn_card = ModelCard(hub.files("org/tiny-rtn")["README.md"].content.decode()).data
        assert rtn_card.base_model == ["org/tiny"] and rtn_card.base_model_relation == "quantized"
        wd = tmp_path / "r" / "out"
        assert hub.files("org/tiny-rtn")["model.safetensors"].content == (wd / "rtn" / "model.safetensors").read_bytes()
        manifest = json.loads((wd / MANIFEST).read_text())
        assert manifest["steps"]["push/rtn"]["result"]["commit_url"].startswith(hub.url)
        assert "hf_releaseTESTtoken" not in (wd / MANIFEST).read_text() + log
        res, _ = run(path, push_dry_run=False)
        assert set(statuses(res).values()) == {"skipped"}


# ---- kill and resume --------------------------------------------------------------------------------
def _env() -> dict:
    # one thread: the same arithmetic in every run (and no oversubscription of the shared cores)
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _cli(path: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mergequant", "run", str(path), "--quiet", "--push-dry-run"],
                          capture_output=True, text=True, env=_env(), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
def test_sigkill_during_quantize_then_rerun_skips_the_merge_and_matches_an_uninterrupted_run(family, tmp_path):
    folder = tmp_path / "r"
    path = write_release(family, folder, samples=48)
    wd = folder / "out"

    # reference: an uninterrupted run (in this process, also one thread); its outputs are kept in memory
    # and the workdir removed, so the killed run writes to the same paths (cards name the absolute path
    # of the model they came from)
    run(path)
    reference = outputs(wd)
    shutil.rmtree(wd)

    proc = subprocess.Popen([sys.executable, "-m", "mergequant", "run", str(path), "--quiet", "--push-dry-run"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 120
    partial = []
    while time.monotonic() < deadline and proc.poll() is None:
        partial = list(wd.glob(".gptq.partial-*")) if wd.is_dir() else []
        if partial:
            break
        time.sleep(0.01)
    assert partial, "the quantize step never started:\n" + (proc.communicate()[0] if proc.poll() is not None else "")
    time.sleep(0.3)  # inside the quantization (calibration, layer by layer)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    manifest = json.loads((wd / MANIFEST).read_text())
    assert list(manifest["steps"]) == ["merge"], "the kill landed after the quantize step finished"
    assert not (wd / "gptq").exists() and list(wd.glob(".gptq.partial-*"))  # no half output under the real name
    merge_record = manifest["steps"]["merge"]
    merged_stat = {p.name: p.stat().st_mtime_ns for p in (wd / "merged").iterdir()}

    done = _cli(path)
    assert "[merge] skip (unchanged)" in done.stdout
    assert "removed .gptq.partial-" in done.stdout and "[quantize/gptq] run (not done yet)" in done.stdout
    after = json.loads((wd / MANIFEST).read_text())
    assert after["steps"]["merge"] == merge_record  # not redone: same record, same timestamps
    assert {p.name: p.stat().st_mtime_ns for p in (wd / "merged").iterdir()} == merged_stat
    assert not list(wd.glob(".*.partial-*"))
    got = outputs(wd)
    assert sorted(got) == sorted(reference)
    differ = [k for k in reference if got[k] != reference[k]]
    detail = {k: [ln for ln in got[k].decode(errors="replace").splitlines()
                  if ln not in reference[k].decode(errors="replace").splitlines()][:6] for k in differ if not k.endswith(".safetensors")}
    assert differ == [], detail  # byte-identical to the uninterrupted run
