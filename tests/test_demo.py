"""`mergequant demo`: the story its numbers tell, and those numbers against independent measurements.

One run of `mergequant demo --quick` (module scope, in process, seed 0) serves every test here: its
results.json must say that each specialist beats the base on its own domain, that both merges beat
the base on both specialist domains and keep most of each gain, that GPTQ lands closer to the
full-precision merge than round-to-nearest, that the samples read like their domain; and its
perplexities must be what `mergequant eval` and a plain loop over the held-out text measure.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mergequant import demo
from mergequant.cli import app

pytestmark = pytest.mark.slow  # trains the demo's models

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as the demo itself: on shared cores a second thread mostly spins."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    """(folder, printed output, results.json) of one `mergequant demo --quick`."""
    work = tmp_path_factory.mktemp("demo") / "mergequant-demo"
    res = invoke("demo", "--quick", "--dir", work)
    assert res.exit_code == 0, res.output
    return work, res.stdout, json.loads((work / "results.json").read_text())


def ppl(results, name: str, domain: str) -> float:
    return results["models"][name]["perplexity"][domain]


def kept(results, merge: str, specialist: str, domain: str) -> float:
    """The share of the specialist's gain over the base (in nats per token) that the merge keeps."""
    base = ppl(results, "base", domain)
    return math.log(base / ppl(results, merge, domain)) / math.log(base / ppl(results, specialist, domain))


def test_roles_recorded(run):
    _, _, results = run
    roles = {n: (m["role"], m.get("domain"), m.get("method"), m.get("source")) for n, m in results["models"].items()}
    assert roles == {
        "base": ("base", None, None, None),
        "poet": ("specialist", "verse", None, None),
        "coder": ("specialist", "code", None, None),
        "task-arithmetic": ("merge", None, "task_arithmetic", None),
        "merged": ("merge", None, "ties", None),
        demo.GPTQ_NAME: ("quantized", None, "gptq", "merged"),
        demo.RTN_NAME: ("quantized", None, "rtn", "merged"),
    }
    assert results["seed"] == 0 and results["size"]["name"] == "quick"
    assert set(results["heldout"]) == set(demo.DOMAINS)
    for m in results["models"].values():
        assert set(m["perplexity"]) == set(demo.DOMAINS) and all(1 < v < 1024 for v in m["perplexity"].values())


def test_specialists_beat_the_base_on_their_domain(run):
    _, _, r = run
    assert ppl(r, "poet", "verse") < 0.95 * ppl(r, "base", "verse")
    assert ppl(r, "coder", "code") < 0.9 * ppl(r, "base", "code")
    assert ppl(r, "poet", "verse") < ppl(r, "coder", "verse") and ppl(r, "coder", "code") < ppl(r, "poet", "code")


@pytest.mark.parametrize("merge", ["merged", "task-arithmetic"])
def test_merges_keep_most_of_both_gains(run, merge):
    _, _, r = run
    for specialist, domain in demo.SPECIALISTS.items():
        assert ppl(r, merge, domain) < ppl(r, "base", domain)
        assert kept(r, merge, specialist, domain) > 0.5, (merge, domain)


def test_gptq_closer_to_full_precision_than_rtn(run):
    _, _, r = run
    gap = {name: [abs(math.log(ppl(r, name, d) / ppl(r, "merged", d))) for d in demo.DOMAINS]
           for name in (demo.GPTQ_NAME, demo.RTN_NAME)}
    assert sum(gap[demo.GPTQ_NAME]) < 0.6 * sum(gap[demo.RTN_NAME])
    assert sum(g < h for g, h in zip(gap[demo.GPTQ_NAME], gap[demo.RTN_NAME])) >= 2
    sizes = {n: m["bytes"] for n, m in r["models"].items()}
    assert sizes[demo.GPTQ_NAME] < 0.7 * sizes["merged"] and sizes[demo.RTN_NAME] < 0.7 * sizes["merged"]


def test_samples_read_like_their_domain(run):
    _, _, r = run
    verse, code = r["models"]["poet"]["samples"]["verse"], r["models"]["coder"]["samples"]["code"]
    assert verse.startswith(demo.SAMPLE_PROMPTS["verse"]) and code.startswith(demo.SAMPLE_PROMPTS["code"])
    syntax = lambda s: sum(s.count(c) for c in "()[]=_")  # noqa: E731
    assert syntax(code) >= 3 and syntax(verse) <= 1
    assert re.search(r"\n    +\S", code) and not re.search(r"\n    +\S", verse)  # indented blocks only in code
    for name in ("merged", demo.GPTQ_NAME):  # the merge writes both
        assert r["models"][name]["samples"]["verse"] != r["models"][name]["samples"]["code"]


def test_printed_table_is_results_json(run):
    _, out, r = run
    for name, m in r["models"].items():
        row = next(line for line in out.splitlines() if line.startswith(name + " "))
        numbers = [float(x) for x in re.findall(r"\d+\.\d\d(?= |$)", row)[:3]]
        assert numbers == [round(m["perplexity"][d], 2) for d in demo.DOMAINS], row
    assert "the TIES merge keeps" in out and "GPTQ +" in out and "round-to-nearest +" in out
    assert "samples" in out and "done in" in out


def test_perplexity_matches_mergequant_eval(run):
    """Quantized and merged models through the real `eval` command (its own loading and windows)."""
    work, _, r = run
    for name in ("merged", demo.GPTQ_NAME):
        m = r["models"][name]
        res = invoke("eval", work / m["path"], "--data", work / r["heldout"]["code"], "--seqlen", r["seqlen"],
                     "--backend", "dequant", "--device", "cpu", "--json", "-q")
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout.strip().splitlines()[-1])["perplexity"] == pytest.approx(m["perplexity"]["code"], rel=1e-9)


def test_perplexity_matches_a_plain_loop(run):
    """The base's verse perplexity from transformers' own loss over windows of seqlen tokens, each
    window starting on the last token of the one before (independent of mergequant's evaluate)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work, _, r = run
    path, seqlen = work / r["models"]["base"]["path"], r["seqlen"]
    text = (work / r["heldout"]["verse"]).read_text()
    text = "\n\n".join(d for d in text.split("\n\n") if d.strip())  # eval's documents: blank-line separated
    ids = AutoTokenizer.from_pretrained(path)(text, add_special_tokens=False)["input_ids"]
    # in the dtype eval computes in: the checkpoint's (bfloat16), or float32 on a CPU that would emulate it
    from mergequant.hardware import fast_16bit

    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto" if fast_16bit(torch.bfloat16, "cpu")
                                                 else torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, seqlen - 1):
            window = torch.tensor([ids[start:start + seqlen]])
            if window.shape[1] < 2:
                break
            n = window.shape[1] - 1
            total += float(model(input_ids=window, labels=window).loss) * n
            count += n
    assert count == len(ids) - 1
    assert math.exp(total / count) == pytest.approx(ppl(r, "base", "verse"), rel=1e-4)


def test_plots_and_release_files(run):
    pytest.importorskip("matplotlib")
    work, _, _ = run
    for png in (work / "results.png", work / "release" / "results.png"):
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert "![held-out perplexity and size per model](results.png)" in (work / "release" / "results.md").read_text()
    manifest = json.loads((work / "release" / "manifest.json").read_text())
    assert "results.png" in manifest["steps"]["eval"]["files"]
    for name in ("merged", demo.GPTQ_NAME, demo.RTN_NAME):  # every push carries the plot: 7 model files + results.png
        assert manifest["steps"][f"push/{name}"]["result"]["files"] == 8


def test_models_reused_only_when_trained_with_the_same_settings(run):
    work, _, _ = run
    models, corpus = work / "models", demo.demo_corpus()
    logs: list[str] = []
    assert demo.train_demo_models(models, corpus, seed=0, size=demo.QUICK, log=logs.append)["poet"] == models / "poet"
    assert len(logs) == 1 and logs[0].startswith("reusing the models")  # nothing trained, nothing written
    stamp = json.loads((models / demo.STAMP).read_text())
    assert stamp["seed"] == 0 and stamp["size"]["base_steps"] == demo.QUICK.base_steps
    assert demo._stamp(1, demo.QUICK, corpus) != demo._stamp(0, demo.QUICK, corpus)  # another seed: retrained
    assert demo._stamp(0, demo.FULL, corpus) != demo._stamp(0, demo.QUICK, corpus)
    model = demo._new_model(demo._demo_config(), 0)
    assert demo.sample_text(model, "def", tokens=5, seed=3) == demo.sample_text(model, "def", tokens=5, seed=3)


def test_example_configs_run_on_the_demo_models(run, tmp_path):
    """configs/ says its recipes and release file run against the demo's folder: plan each of them there."""
    from mergequant.merge.run import MergeOptions, run_merge
    from mergequant.release import RunOptions, run_release

    work, _, _ = run
    configs = work.parent / "configs"
    if not configs.exists():
        shutil.copytree(Path(__file__).resolve().parents[1] / "configs", configs)
    for recipe in sorted(configs.glob("*.yaml")):
        if recipe.name == "release.yaml":
            res = run_release(recipe, RunOptions(dry_run=True), log=lambda m: None)
            assert not res.refusals and all(o.status == "would run" for o in res.outcomes)
        else:
            assert run_merge(recipe, MergeOptions(out=tmp_path / recipe.stem, dry_run=True, quiet=True),
                             log=lambda m: None).tensors >= 39
    assert not (work / "release-example").exists() and not list(tmp_path.iterdir())


def test_training_is_deterministic_for_a_seed():
    cfg = demo.tiny_llama_config(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vocab=64)
    streams = [torch.arange(300) % 64, (torch.arange(300) * 7) % 64]

    def trained(seed):
        model = demo._new_model(cfg, seed)
        demo.train_lm(model, streams, steps=3, lr=1e-2, seed=seed, batch=4, seqlen=16)
        return model.state_dict()

    a, b, c = trained(5), trained(5), trained(6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_shipped_text_and_tokenizer():
    corpus = demo.demo_corpus()
    assert set(corpus) == set(demo.DOMAINS)
    for domain, (train, heldout) in corpus.items():
        assert len(train) > 250_000 and len(heldout) > 10_000
        assert heldout[:200] not in train  # held-out text comes from elsewhere in the works
    compile(corpus["code"][0][:20_000].rsplit("\n\n\n", 1)[0], "<generated>", "exec")  # the code is Python
    assert demo.code_text(1, 5000) == demo.code_text(1, 5000) != demo.code_text(2, 5000)
    shipped = json.loads((Path(demo.__file__).parent / "data" / demo.DEMO_TOKENIZER).read_text())
    assert json.loads(demo.train_demo_tokenizer().to_str()) == shipped  # data/demo-tokenizer.json is reproducible


def test_bad_seed_refused(tmp_path):
    res = invoke("demo", "--dir", tmp_path / "d", "--seed", str(2**64))
    assert res.exit_code == 2 and "--seed" in res.stderr and not (tmp_path / "d").exists()


def test_package_data_is_small_and_shipped():
    """setuptools ships data/* (pyproject): the demo's files sit directly in mergequant/data/, and stay small."""
    data = Path(demo.__file__).parent / "data"
    for name in ("demo-verse.txt", "demo-verse-heldout.txt", "demo-prose.txt", "demo-prose-heldout.txt",
                 demo.DEMO_TOKENIZER, "tokenizer_config.json"):
        assert (data / name).is_file(), name
    assert sum(p.stat().st_size for p in data.iterdir()) < 1.5 * 2**20
