"""`mergequant run` writes the same manifests, byte for byte, as before `release.py` became a package (issue 15).

A few representative release files run (in a fresh interpreter: see ``digests``) on the tiny float32 Llama family:
a TIES merge quantized with GPTQ, RTN and AWQ, evaluated and pushed as a dry run; the same workdir after one
quantization's settings change, first interrupted in the middle of that quantization and then resumed; a
linear merge with only the merge pushed; a release that quantizes an existing model (int8, no merge step).
Each manifest is reduced to one sha256 of its canonical JSON, normalised only where a run legitimately
varies: the step timestamps (``started``/``finished``), the durations (``seconds``) and a claim's
``since_ns``. The dry runs' plans are pinned the same way (their ``disk: ... free`` figure varies).

Absolute paths are not normalised by rewriting strings: they are hashed into fingerprints, recipe and card
hashes and content hashes, so a string substitution could not undo them. Instead everything runs under one
fixed root (:data:`ROOT`, the models copied there), held with an ``flock`` so that two test runs on one
machine take turns. The split (ec4dcdd) was checked against digests computed with the code before it
(``release.py`` at 8d5abf7). They were regenerated once since, for an intended change of what steps write:
quantization cards gained a "Verified clients" section, which changes the card hashes recorded in the
manifests. Any other change of a byte in any manifest or plan fails here, and names the manifest.

The outputs hold quantized weights and perplexities, so the digests are those of this machine's float
arithmetic (x86-64, one thread); elementwise steps (merges, RTN) do not depend on it, GPTQ, AWQ and the
evaluations do on other hardware: the manifests are pinned per CPU kernel class (``PINNED_MANIFESTS``,
by torch's CPU capability: AVX512, AVX2), the plans once. Regenerate (only when a change of manifests is
intended and documented, or to add a class): ``python tests/test_release_manifests_pinned.py``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path("/tmp/mergequant-release-pinned")  # fixed: absolute paths end up inside hashes (see the docstring)

# The dry runs' plans: the same on every machine
PINNED_PLANS: dict[str, str] = {
    "main.dry-run.fresh": "0937f4ed0e7c7e006d4c043c5dbb6cd88b824703f9e9da7b733e1a16f0e32337",
    "main.dry-run.changed": "badc1126be2c6c6151daa32e80e98f3d5779fb07ca39fe7b1a5745971a891e7e",
    "model.dry-run.fresh": "9bbe58f7543105e5bf060f2aa75c6c3a482ca35b92552d5faf5949580f7864af",
}
# The manifests, per CPU kernel class (torch.backends.cpu.get_cpu_capability()): they hold quantized weights and
# perplexities, whose last bits follow the float kernels of the class (AVX512: the machines of the earlier
# sessions; AVX2: an AMD EPYC without AVX-512, 2026-12-02, the same digests before and after that day's changes)
PINNED_MANIFESTS: dict[str, dict[str, str]] = {
    "AVX512": {  # regenerated after the cards gained "Verified clients" (see the docstring)
        "main.manifest": "a41121d3058ca9ad4a168429e630e162ab217d3b286e4d95ce39519111cd2aac",
        "main.manifest.interrupted": "b94f1c68461540c9066113629040a2b48d9611353b9b48fedd478c4e72b8f75d",
        "main.manifest.resumed": "ae9eecdfdc133cb09fef0c1c0a1a2f56606ac59866ba3f64f79e502dc9879bea",
        "linear.manifest": "6bad14f449d02d2c123779890f474b72323fe7ecf09b8a7876885a337e47c735",
        "model.manifest": "215d516d92abf6d63a30c90715e6f31f959efbeb864c637ccf106d8f7c758e02",
    },
    "AVX2": {
        "main.manifest": "84967c4990c4dcba2ea305a0e7373584c93af770516be5a5329e1078fcd28d98",
        "main.manifest.interrupted": "6c52e29f04a2e9e4494d66e510aa6d1d10f6522f06bc256ac1b494e630921bcc",
        "main.manifest.resumed": "8ec1bfa2a5c72eae1b6b8a0ce00d9d59ada05d75b801d7be8a081903b44c5837",
        "linear.manifest": "6bad14f449d02d2c123779890f474b72323fe7ecf09b8a7876885a337e47c735",
        "model.manifest": "b4e72fd89303e69709ae7fbd894602c7296ea9c65c05fa04dee41e4160cf43db",
    },
}


def cpu_kernels() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


TIES = """\
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.4, density: [0.8, 0.3]}}
dtype: float32
"""

LINEAR = """\
merge_method: linear
models:
  - {{model: {a}, parameters: {{weight: 0.7}}}}
  - {{model: {b}, parameters: {{weight: 0.3}}}}
dtype: float32
"""

HELDOUT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
           "of a wife. However little known the feelings or views of such a man may be on his first entering a "
           "neighbourhood, this truth is so well fixed in the minds of the surrounding families. ") * 6


def _release(name: str, text: str) -> Path:
    path = ROOT / f"release-{name}.yaml"
    path.write_text(text)
    return path


def _main_release(rtn: str = "bits: 4") -> Path:
    return _release("main", "workdir: out-main\n"
                            "merge: {recipe: ties.yaml, shard_size: 200KB, workers: 1}\n"
                            "quantize:\n"
                            "  - {name: gptq, method: gptq, bits: 4, group_size: 32, calib: calib.txt, samples: 4, seqlen: 32}\n"
                            f"  - {{name: rtn, method: rtn, {rtn}, group_size: 32}}\n"
                            "  - {name: awq, method: awq, bits: 4, group_size: 32, calib: calib.txt, samples: 4, seqlen: 32, n_grid: 4}\n"
                            "eval: {data: heldout.txt, seqlen: 32, backend: dequant}\n"
                            "push:\n  merged: org/tiny\n  gptq: org/tiny-gptq\n  rtn: org/tiny-rtn\n"
                            "  base_model_map: {models/base: org/base}\n")


def normalised(manifest: dict) -> dict:
    """The manifest without what varies between two runs of the same release: when steps ran, how long they
    took, when a claim was made. Values are replaced in place: keys keep their order."""
    out = json.loads(json.dumps(manifest))
    for rec in out.get("steps", {}).values():
        for key in ("started", "finished", "seconds"):
            if key in rec:
                rec[key] = key
    for claim in out.get("pending", {}).values():
        claim["since_ns"] = 0
    return out


def digest(manifest: dict) -> str:
    """sha256 of the manifest file as the runner writes it (``json.dumps(manifest, indent=2)``: key order counts)."""
    return hashlib.sha256((json.dumps(manifest, indent=2) + "\n").encode()).hexdigest()


def manifest_digest(workdir: Path) -> str:
    raw = (workdir / "manifest.json").read_text()
    manifest = json.loads(raw)
    assert digest(manifest) == hashlib.sha256(raw.encode()).hexdigest()  # the digest is of the file's exact bytes
    return digest(normalised(manifest))


def plan_digest(text: str) -> str:
    return hashlib.sha256(re.sub(r"to write, .* free under", "to write, FREE free under", text).encode()).hexdigest()


@contextlib.contextmanager
def fixed_root(models: dict[str, Path]):
    """:data:`ROOT`, emptied and filled with copies of ``models`` and the texts, held for the duration."""
    ROOT.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{ROOT}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.rmtree(ROOT, ignore_errors=True)
        ROOT.mkdir()
        for name, src in models.items():
            shutil.copytree(src, ROOT / "models" / name)
        m = {k: ROOT / "models" / k for k in models}
        (ROOT / "ties.yaml").write_text(TIES.format(**m))
        (ROOT / "linear.yaml").write_text(LINEAR.format(**m))
        from mergequant.demo import demo_text

        (ROOT / "calib.txt").write_text(demo_text(1))
        (ROOT / "heldout.txt").write_text(HELDOUT)
        try:
            yield ROOT
        finally:
            shutil.rmtree(ROOT, ignore_errors=True)


def compute(models: dict[str, Path]) -> dict[str, str]:
    """Run every case; {case: digest}."""
    from mergequant.release import RunOptions, run_release

    def run(path: Path, **kw):
        return run_release(path, RunOptions(quiet=True, push_dry_run=True, fsync=False, **kw), log=lambda m: None)

    out: dict[str, str] = {}
    with fixed_root(models) as root:
        main = _main_release()
        out["main.dry-run.fresh"] = plan_digest(run(main, dry_run=True).plan_text)
        run(main)
        out["main.manifest"] = manifest_digest(root / "out-main")

        main = _main_release(rtn="bits: 8, sym: false")  # one quantization changed: redo it, eval and its push
        out["main.dry-run.changed"] = plan_digest(run(main, dry_run=True).plan_text)
        import mergequant.quant.quantize as quantize_mod

        real = quantize_mod.run_quantize

        def interrupted(*a, **kw):
            raise KeyboardInterrupt

        quantize_mod.run_quantize = interrupted
        try:
            with pytest.raises(KeyboardInterrupt):
                run(main)
        finally:
            quantize_mod.run_quantize = real
        out["main.manifest.interrupted"] = manifest_digest(root / "out-main")
        run(main)
        out["main.manifest.resumed"] = manifest_digest(root / "out-main")

        linear = _release("linear", "workdir: out-linear\nmerge: {recipe: linear.yaml, out: lin}\n"
                                    "push: {lin: org/lin, private: true, revision: dev, commit_message: pinned}\n")
        run(linear)
        out["linear.manifest"] = manifest_digest(root / "out-linear")

        model = _release("model", "workdir: out-model\nmerge: {model: models/a}\n"
                                  "quantize:\n  - {name: int8, method: int8}\n  - {name: rtn3, method: rtn, bits: 3, group_size: 32}\n"
                                  "eval: {data: heldout.txt, seqlen: 32, stride: 16, backend: dequant}\n")
        out["model.dry-run.fresh"] = plan_digest(run(model, dry_run=True).plan_text)
        run(model)
        out["model.manifest"] = manifest_digest(root / "out-model")
    return out


@pytest.fixture(scope="module")
def digests() -> dict[str, str]:
    """The digests, computed by this file run as a script in a fresh interpreter (one torch thread). In the
    full suite, run in-process after hundreds of other tests, five manifests came out different from a run of
    this file alone (not reproduced with any subset of the files tried); a fresh process keeps the pins about
    what the release code writes, not about what earlier tests left in the process."""
    root = Path(__file__).resolve().parents[1]
    # the checkout's own package first: a script's sys.path starts at tests/, and an editable install
    # may point at another checkout
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(re.findall(r'^    "([^"]+)": "([0-9a-f]{64})",$', proc.stdout, flags=re.M))


def test_the_pins_cover_the_same_cases():
    assert all(set(pins) == set(PINNED_MANIFESTS["AVX512"]) for pins in PINNED_MANIFESTS.values())
    assert not set(PINNED_PLANS) & set(PINNED_MANIFESTS["AVX512"])
    # the merges' manifests are elementwise arithmetic: the same on every class
    assert len({pins["linear.manifest"] for pins in PINNED_MANIFESTS.values()}) == 1


@pytest.mark.slow
def test_manifests_and_plans_byte_identical(digests):
    manifests = PINNED_MANIFESTS.get(cpu_kernels())
    expected = set(PINNED_PLANS) | set(PINNED_MANIFESTS["AVX512"])
    assert set(digests) == expected, f"cases changed: {sorted(set(digests) ^ expected)}"
    changed = {k: v for k, v in digests.items() if k in PINNED_PLANS and PINNED_PLANS[k] != v}
    assert not changed, f"plans differ from the pinned ones: {sorted(changed)}"
    if manifests is None:
        pytest.skip(f"plans checked; no manifest digests pinned for this CPU's kernels ({cpu_kernels()}): "
                    "pin them from `python tests/test_release_manifests_pinned.py` run on such a machine")
    changed = {k: v for k, v in digests.items() if k in manifests and manifests[k] != v}
    assert not changed, f"manifests differ from the ones pinned for {cpu_kernels()}: {sorted(changed)}"


def test_the_digest_sees_one_changed_field():
    """The reduction keeps every field but the timings: editing any recorded value, or the order of two keys
    (the file's bytes), changes the digest."""
    manifest = {"format": "mergequant-release/1", "steps": {"merge": {
        "kind": "merge", "fingerprint": "ab", "started": "2026-12-01T00:00:00.000+00:00", "seconds": 1.5,
        "files": {"model.safetensors": {"size": 10, "sha256": "cd"}}, "result": {"tensors": 3, "warnings": []}}}}
    base = digest(normalised(manifest))
    timed = json.loads(json.dumps(manifest))
    timed["steps"]["merge"].update(started="2027-01-01T00:00:00.000+00:00", seconds=9.0)
    assert digest(normalised(timed)) == base
    for path, value in ((("fingerprint",), "ac"), (("files", "model.safetensors", "size"), 11),
                        (("result", "tensors"), 4), (("kind",), "quantize"), (("result", "warnings"), ["w"])):
        edited = json.loads(json.dumps(manifest))
        rec = edited["steps"]["merge"]
        for key in path[:-1]:
            rec = rec[key]
        rec[path[-1]] = value
        assert digest(normalised(edited)) != base, path
    reordered = json.loads(json.dumps(manifest))
    reordered["steps"]["merge"]["result"] = {"warnings": [], "tensors": 3}
    assert digest(normalised(reordered)) != base


if __name__ == "__main__":  # print the digests of the current code
    import tempfile

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import tiny_family

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        found = compute(tiny_family(Path(tmp), torch.float32, layers=2))
    # (the digests fixture reads every '    "case": "digest",' line, whichever section it is in)
    for title, plans in (("PINNED_PLANS (every CPU) = {", True),
                         (f'PINNED_MANIFESTS["{cpu_kernels()}"] = {{', False)):
        print(title)
        for k, v in found.items():
            if (k in PINNED_PLANS) == plans:
                print(f'    "{k}": "{v}",')
        print("}")
