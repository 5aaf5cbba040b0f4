"""Plots: ``mergequant.plot`` (a results table -> a PNG file), `mergequant eval --plot`, the release's
results.png (attached to every push and shown in the card), and what happens without matplotlib."""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys

import pytest
import torch
from typer.testing import CliRunner

from mergequant.card import embed_plot, quant_card, validate_card
from mergequant.cli import app
from mergequant.errors import MergeQuantError
from mergequant.plot import PlotUnavailable, plot_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TABLE = {"base": {"perplexity": {"verse": 68.2, "prose": 55.8, "code": 2.96}, "bytes": 718_000},
         "merged": {"perplexity": {"verse": 61.9, "prose": 56.1, "code": 2.55}, "bytes": 717_000},
         "gptq-w3g64": {"perplexity": {"verse": 62.3, "prose": 57.3, "code": 2.61}, "bytes": 422_000}}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def png_dimensions(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk (read by hand, not by the library that wrote it)."""
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on shared cores a second one mostly spins (as in test_release)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_matplotlib(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError


def test_plot_is_a_png_the_same_for_the_same_table(tmp_path):
    pytest.importorskip("matplotlib")
    a = plot_results(TABLE, tmp_path / "a.png", title="demo")
    data = a.read_bytes()
    width, height = png_dimensions(data)
    assert width > 600 and height > 300 and len(data) > 10_000
    assert plot_results(TABLE, tmp_path / "b.png", title="demo").read_bytes() == data  # no timestamps, no version stamp
    changed = {**TABLE, "merged": {**TABLE["merged"], "perplexity": {"verse": 70.0, "prose": 56.1, "code": 2.55}}}
    assert plot_results(changed, tmp_path / "c.png", title="demo").read_bytes() != data
    plot_results({"m": {"perplexity": {"heldout": 12.5}}}, tmp_path / "d.png")  # one domain, no sizes
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png", "c.png", "d.png"]  # written atomically: no temporaries left


@pytest.mark.parametrize("table, needle", [
    ({}, "no models"),
    ({"m": {"bytes": 3}}, "no perplexity"),
    ({"m": {"perplexity": {"x": float("nan")}}}, "not a positive number"),
    ({"m": {"perplexity": {"x": -1.0}}}, "not a positive number"),
    ({"m": {"perplexity": {"x": True}}}, "not a positive number"),
])
def test_bad_tables_refused(tmp_path, table, needle):
    with pytest.raises(MergeQuantError, match=needle):
        plot_results(table, tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


def test_without_matplotlib_one_clear_error(no_matplotlib, f32_models, tmp_path):
    with pytest.raises(PlotUnavailable, match=r"matplotlib.*pip install 'mergequant\[plot\]'"):
        plot_results(TABLE, tmp_path / "p.png")
    text = tmp_path / "heldout.txt"
    text.write_text("To be, or not to be, that is the question. " * 20)
    res = invoke("eval", f32_models["a"], "--data", text, "--plot", tmp_path / "p.png", "-q")
    assert res.exit_code == 2 and res.stdout == ""  # refused before any model was loaded or measured
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
    assert "matplotlib" in res.stderr and "mergequant[plot]" in res.stderr
    assert sorted(os.listdir(tmp_path)) == ["heldout.txt"]


def test_eval_several_models_and_domains_with_plot(f32_models, tmp_path):
    pytest.importorskip("matplotlib")
    verse, code = tmp_path / "verse.txt", tmp_path / "code.txt"
    verse.write_text("Shall I compare thee to a summer's day? Thou art more lovely and more temperate.\n" * 8)
    code.write_text("def total(values):\n    return sum(v for v in values if v > 0)\n\n" * 8)
    out = tmp_path / "ppl.png"
    res = invoke("eval", f32_models["base"], f32_models["a"], "--data", f"poems={verse}", "--data", code,
                 "--seqlen", 32, "--device", "cpu", "--json", "-q", "--plot", out)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [(r["model"], r["label"], r["data"]) for r in rows] == [
        (str(f32_models[m]), label, str(src)) for m in ("base", "a") for label, src in (("poems", verse), ("code", code))]
    for r in rows[1:3]:  # each number is what a one-model, one-text eval measures
        single = invoke("eval", r["model"], "--data", r["data"], "--seqlen", 32, "--device", "cpu", "--json", "-q")
        assert json.loads(single.stdout.strip().splitlines()[-1])["perplexity"] == pytest.approx(r["perplexity"], rel=1e-9)
    assert png_dimensions(out.read_bytes())[0] > 600 and f"wrote {out}" in res.stdout


def test_eval_plot_path_refusals(f32_models, tmp_path):
    text = tmp_path / "heldout.txt"
    text.write_text("It is a truth universally acknowledged. " * 20)
    model = tmp_path / "model"
    shutil.copytree(f32_models["a"], model)
    before = sorted(p.name for p in model.iterdir())
    cases = [(tmp_path / "plot.jpg", ".png"), (model / "plot.png", "inside the input folder"),
             (tmp_path / "missing" / "p.png", "does not exist"), (tmp_path / "dir.png", "is a folder")]
    (tmp_path / "dir.png").mkdir()
    for plot, needle in cases:
        res = invoke("eval", model, "--data", text, "--plot", plot, "-q")
        assert res.exit_code == 2 and needle in res.stderr and res.stdout == "", (plot, res.output)
    res = invoke("eval", model, "--data", f"a={text}", "--data", f"a={text}", "-q")
    assert res.exit_code == 2 and "both named 'a'" in res.stderr
    assert sorted(p.name for p in model.iterdir()) == before and sorted(os.listdir(tmp_path)) == ["dir.png", "heldout.txt", "model"]


def _quant_card() -> str:
    return quant_card(source="./merged", method="gptq", bits=4, settings=[("group size", "128")], tags=["gptq"],
                      requirements="gptqmodel", calib="calib.txt", calib_tokens=1000, samples=8, fallbacks=[],
                      base_model="org/merged")


def test_card_embeds_the_plot_before_loading():
    card = _quant_card()
    with_plot = embed_plot(card)
    assert "![held-out perplexity and size of each model of this release](results.png)" in with_plot
    assert with_plot.index("## Evaluation") < with_plot.index("## Loading")
    assert embed_plot(with_plot) == with_plot  # once
    assert validate_card(with_plot) == validate_card(card)  # front matter untouched
    assert embed_plot("# A card\n").endswith("## Evaluation\n\n![held-out perplexity and size of each model of this "
                                             "release](results.png)\n\nHeld-out perplexity of the models made together "
                                             "with this one (and their size on disk), measured by `mergequant run`.\n")


def test_push_plan_attaches_the_plot(f32_models, tmp_path):
    from mergequant.hub import PushError, PushOptions, plan_push

    folder = tmp_path / "model"
    shutil.copytree(f32_models["a"], folder)
    (folder / "README.md").write_text(_quant_card())
    plot = tmp_path / "results.png"
    plot.write_bytes(PNG_MAGIC + b"\0" * 100)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    plan = plan_push(folder, PushOptions(repo="org/tiny", dry_run=True, plot=plot))
    attached = next(f for f in plan.files if f.path == "results.png")
    assert attached.size == 108 and attached.source == plot.resolve()
    assert "](results.png)" in plan.card and "## Evaluation" in plan.card
    plain = plan_push(folder, PushOptions(repo="org/tiny", dry_run=True))
    assert len(plan.files) == len(plain.files) + 1 and "results.png" not in plain.card
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the folder is never changed
    (folder / "results.png").write_bytes(b"mine")
    with pytest.raises(PushError, match="already has a results.png"):
        plan_push(folder, PushOptions(repo="org/tiny", dry_run=True, plot=plot))


def test_release_plot_recorded_attached_and_dropped_without_matplotlib(f32_models, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from mergequant.release import RunOptions, run_release

    text = tmp_path / "heldout.txt"
    text.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 12)
    release = tmp_path / "release.yaml"
    release.write_text(f"workdir: out\nmerge: {{model: {f32_models['a']}}}\n"
                       "quantize:\n  - {name: rtn, method: rtn, bits: 4, group_size: 32}\n"
                       f"eval: {{data: {text}, seqlen: 32, backend: dequant}}\npush:\n  rtn: org/tiny-rtn\n")
    out = tmp_path / "out"
    logs: list[str] = []
    run_release(release, RunOptions(quiet=True, push_dry_run=True, fsync=False), log=logs.append)
    manifest = json.loads((out / "manifest.json").read_text())
    assert png_dimensions((out / "results.png").read_bytes())[0] > 300
    assert "results.png" in manifest["steps"]["eval"]["files"] and "](results.png)" in (out / "results.md").read_text()
    files = sorted(p.name for p in (out / "rtn").iterdir())
    assert manifest["steps"]["push/rtn"]["result"]["files"] == len(files) + 1  # the plot goes with the push

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    logs.clear()
    run_release(release, RunOptions(quiet=True, push_dry_run=True, fsync=False, force_steps=["eval"]), log=logs.append)
    assert any(line.startswith("note: plotting needs matplotlib") for line in logs)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not (out / "results.png").exists() and "results.png" not in manifest["steps"]["eval"]["files"]
    assert "results.png" not in (out / "results.md").read_text()
    logs.clear()
    run_release(release, RunOptions(quiet=True, push_dry_run=True, fsync=False), log=logs.append)  # nothing unrecorded left
    assert all("skip" in line for line in logs if line.startswith("["))


def test_demo_skips_the_plot_with_one_note(no_matplotlib, tmp_path):
    from mergequant import demo

    res = demo.DemoResult(tmp_path, [demo.DemoModel("base", tmp_path, "base", "base", perplexity={"verse": 9.5}, bytes=10)],
                          heldout={}, seed=0, size=demo.QUICK)
    logs: list[str] = []
    assert demo._write_plot(res, logs.append) is None
    assert len(logs) == 1 and logs[0].startswith("note: plotting needs matplotlib") and "results.png" in logs[0]
    assert list(tmp_path.iterdir()) == []
