"""The step kinds of a release, one class each: which steps a release file has, what each one reads
(its fingerprinted inputs), how it runs, how its output is checked, and what the dry run says it costs.

A step is skipped when its fingerprint (sha256 of its kind, its settings and its inputs) equals the
recorded one and :meth:`Step.verify` finds its output as recorded; the runner
(:mod:`mergequant.release.runner`) makes that decision, and the dry run
(:mod:`mergequant.release.dryrun`) calls the same :meth:`Step.inputs` and :meth:`Step.estimate`. Keeping
the four views of one kind in one class is what makes them agree: the dry run cannot plan a step
differently from how the run fingerprints it.

Steps run in the order of :data:`STEP_KINDS` (merge, quantize/NAME in file order, eval, push/NAME).
Adding a kind is one subclass here, added to :data:`STEP_KINDS` (and the key in the release file,
:mod:`mergequant.release.spec`). Steps see the run through ``ctx``, the runner: the release
(``ctx.rel``), the workdir (``ctx.wd``), the options, the log, the records (``ctx.records``) and the
identities of the outputs earlier steps made (``ctx.output_identity``...).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from mergequant.errors import suggestion
from mergequant.release.hashing import (content_hash, data_fingerprint, output_files, sha256_file, sha256_json,
                                        verify_files, verify_output)
from mergequant.release.layout import RESULTS_JSON, RESULTS_MD, RESULTS_PNG, ReleaseError
from mergequant.release.manifest import write_atomic
from mergequant.release.report import results_markdown, write_plot
from mergequant.release.spec import Release

if TYPE_CHECKING:
    from mergequant.release.runner import _Runner

# Settings that do not change what a step writes (left out of its fingerprint).
NOT_FINGERPRINTED = {"workers"}


@dataclass
class Estimate:
    """What the dry run prints after a step's run/skip line, and the bytes the step would write."""
    text: str = ""
    writes: int = 0


@dataclass
class Step:
    """One step of a release. Subclasses set :attr:`kind` and implement the hooks below."""

    id: str  # merge, quantize/NAME, eval, push/NAME: the key of its record in the manifest
    name: str  # the output name (merge/quantize), the output pushed (push), or "eval"
    settings: dict  # recorded in the manifest (JSON)

    kind: ClassVar[str] = ""
    # the step writes one folder WORKDIR/NAME through atomic_output_dir (.NAME.partial-*/.old-* leftovers,
    # verified file by file; --force-step NAME names it)
    writes_folder: ClassVar[bool] = False

    @classmethod
    def from_release(cls, rel: Release) -> list[Step]:
        """The steps of this kind ``rel`` has, in the order they run."""
        raise NotImplementedError

    def outputs(self) -> list[str]:
        """What the step writes in the workdir (names relative to it)."""
        return [self.name] if self.writes_folder else []

    def inputs(self, ctx: _Runner) -> dict | None:
        """The fingerprints of what the step reads; None when an input is rebuilt first (dry run)."""
        raise NotImplementedError

    def fingerprint_settings(self) -> dict:
        """The settings that change what the step writes (paths of data files do not: their content is an input)."""
        return {k: v for k, v in self.settings.items() if k not in NOT_FINGERPRINTED}

    def fingerprint(self, inputs: dict) -> str:
        return sha256_json({"kind": self.kind, "settings": self.fingerprint_settings(), "inputs": inputs})

    def verify(self, ctx: _Runner, rec: dict) -> str | None:
        """None when the recorded output is still on disk as recorded, else what changed."""
        if not self.writes_folder:
            return None
        bad = verify_output(ctx.wd / self.name, rec["files"])
        return f"output {self.name}: {bad}" if bad else None

    def execute(self, ctx: _Runner) -> dict:
        """Run the step; the fields it adds to its record (``result``; ``output``/``files``/``content_hash``)."""
        raise NotImplementedError

    def estimate(self, ctx: _Runner, run: bool, sizes: dict[str, int]) -> Estimate:
        """The dry run's costs of the step (``run``: whether it would run). ``sizes`` holds the size of
        every output planned so far (recorded or estimated); a step that writes a folder adds its own."""
        return Estimate()


def record_output(wd: Path, name: str) -> dict:
    """The record fields of a finished output folder: its files (size, sha256) and content hash."""
    files = output_files(wd / name)
    return {"output": name, "files": files, "content_hash": content_hash(files)}


def _recorded_size(ctx: _Runner, step: Step) -> int:
    return sum(f["size"] for f in ctx.records[step.id]["files"].values())


class MergeStep(Step):
    """``merge``: the recipe merged into WORKDIR/OUT (absent with ``merge: {model: ...}``)."""

    kind = "merge"
    writes_folder = True

    @classmethod
    def from_release(cls, rel: Release) -> list[Step]:
        if rel.merge.recipe is None:
            return []
        return [cls("merge", rel.merge.out, {"recipe": str(rel.merge.recipe), "out": rel.merge.out, **rel.merge.options})]

    def inputs(self, ctx: _Runner) -> dict | None:
        return {"recipe": sha256_file(ctx.rel.merge.recipe), "parents": ctx.parents()}

    def execute(self, ctx: _Runner) -> dict:
        from mergequant.merge.run import MergeOptions, run_merge

        opts = MergeOptions(out=ctx.wd / self.name, force=True, quiet=ctx.opts.quiet, fsync=ctx.opts.fsync,
                            **ctx.rel.merge.options)
        res = run_merge(ctx.rel.merge.recipe, opts, log=ctx.log)
        return {**record_output(ctx.wd, self.name),
                "result": {"tensors": res.tensors, "bytes_written": res.bytes_written, "warnings": res.warnings}}

    def estimate(self, ctx: _Runner, run: bool, sizes: dict[str, int]) -> Estimate:
        if not run:
            sizes[self.name] = _recorded_size(ctx, self)
            return Estimate()
        from mergequant.io.writer import PlannedTensor, plan_shards
        from mergequant.merge.run import estimate_peak_bytes
        from mergequant.units import format_bytes

        plan = ctx.merge_plan()
        o = ctx.rel.merge.options
        shards = plan_shards([PlannedTensor(t.name, t.out_dtype, t.shape) for t in plan.tensors], o.get("shard_size", 5 * 10**9))
        sizes[self.name] = sum(s.file_size for s in shards)
        return Estimate(f"; writes ~{format_bytes(sizes[self.name])}, reads {format_bytes(plan.bytes_to_read)}, peak memory "
                        f"~{format_bytes(estimate_peak_bytes(plan, o.get('workers', 2)))} + ~0.2 GiB (inputs memory-mapped)",
                        sizes[self.name])


class QuantizeStep(Step):
    """``quantize/NAME``: the merge output (or ``merge.model``) quantized into WORKDIR/NAME."""

    kind = "quantize"
    writes_folder = True

    @classmethod
    def from_release(cls, rel: Release) -> list[Step]:
        return [cls(f"quantize/{q.name}", q.name, dict(q.settings)) for q in rel.quantize]

    def inputs(self, ctx: _Runner) -> dict | None:
        src = ctx.source_identity()
        if src is None:
            return None
        ins = {"source": src}
        if self.settings.get("calib"):
            ins["calib"] = data_fingerprint(self.settings["calib"])
        if ctx.rel.eval is not None:  # the card carries perplexities measured on the eval data
            ins["eval_data"] = data_fingerprint(ctx.rel.eval.data)
            ins["eval_backend"] = ctx.rel.eval.backend
            if self.gguf:  # measured in llama.cpp (when installed), in eval's windows
                from mergequant.release.gguf import llama_cpp_available

                ev = ctx.rel.eval
                ins["eval_windows"] = {"seqlen": ev.seqlen, "stride": ev.stride, "max_tokens": ev.max_tokens}
                ins["gguf_perplexity"] = "llama.cpp" if llama_cpp_available() else "not measured"
        return ins

    @property
    def gguf(self) -> bool:
        """``method: gguf``: llama.cpp files (WORKDIR/NAME/<source>-<TYPE>.gguf + README.md), see :mod:`mergequant.release.gguf`."""
        return self.settings.get("method") == "gguf"

    def fingerprint_settings(self) -> dict:
        settings = super().fingerprint_settings()
        settings.pop("calib", None)
        return settings

    def execute(self, ctx: _Runner) -> dict:
        from mergequant.quant.quantize import QuantizeOptions, run_quantize

        ev = ctx.rel.eval
        if self.gguf:
            return self._execute_gguf(ctx)
        opts = QuantizeOptions(out=ctx.wd / self.name, force=True, quiet=ctx.opts.quiet, fsync=ctx.opts.fsync,
                               eval_data=ev.data if ev else None, eval_backend=ev.backend if ev else "auto",
                               **self.settings)
        res = run_quantize(ctx.source_ref(), opts, log=ctx.log)  # a folder, or BASE+ADAPTER / an adapter
        return {**record_output(ctx.wd, self.name),
                "result": {"modules": res.modules, "fallbacks": res.fallbacks, "calib_tokens": res.calib_tokens,
                           "perplexity": res.perplexity}}

    def _execute_gguf(self, ctx: _Runner) -> dict:
        """The GGUF files (one pass), then, with an eval step and llama-cpp-python, each file's held-out perplexity
        measured in llama.cpp and written into the card's table (before the folder is recorded)."""
        from mergequant.card import gguf_card_perplexity
        from mergequant.quant.quantize import QuantizeOptions, run_quantize
        from mergequant.release.gguf import llama_cpp_available, measure_perplexity

        ev = ctx.rel.eval
        out = ctx.wd / self.name
        opts = QuantizeOptions(out=out, force=True, quiet=ctx.opts.quiet, fsync=ctx.opts.fsync, **self.settings)
        src = ctx.source_dir().resolve()
        res = run_quantize(src, opts, log=ctx.log)
        files = {p.name: out / p.name for p in res.files}
        measured = None
        if ev is not None and llama_cpp_available():
            ctx.log(f"  measuring {len(files)} GGUF file(s) in llama.cpp on {ev.data}")
            measured = measure_perplexity(src, files, ev, log=ctx.log)
        elif ev is not None:
            ctx.log("  note: llama-cpp-python is not installed (scripts/install-llama-cpp.sh): the GGUF files' "
                    "perplexity is not measured")
        if measured:
            card = out / "README.md"
            write_atomic(card, gguf_card_perplexity(card.read_text(encoding="utf-8"),
                                                    {n: r["perplexity"] for n, r in measured.items()}))
        return {**record_output(ctx.wd, self.name),
                "result": {"modules": res.modules, "gguf_files": sorted(files), "calib_tokens": res.calib_tokens,
                           "perplexity": None if measured is None else {n: r["perplexity"] for n, r in measured.items()},
                           "perplexity_detail": measured}}

    def estimate(self, ctx: _Runner, run: bool, sizes: dict[str, int]) -> Estimate:
        if not run:
            sizes[self.name] = _recorded_size(ctx, self)
            return Estimate()
        if self.gguf:
            from mergequant.units import format_bytes

            per_type = ctx.quantizations[self.name][2]
            sizes[self.name] = sum(per_type.values())
            return Estimate(f"; writes ~{format_bytes(sizes[self.name])} in {len(per_type)} GGUF file(s) ("
                            + ", ".join(f"{t} ~{format_bytes(b)}" for t, b in per_type.items())
                            + "), peak memory ~0.1 GiB + the interpreter (one tensor slab at a time)", sizes[self.name])
        from mergequant.architectures import architecture_for
        from mergequant.io.writer import plan_shards
        from mergequant.quant.quantize import estimate_peak_bytes, planned_tensors
        from mergequant.units import format_bytes

        qopts, method, linears, stand_in = ctx.quantizations[self.name]
        shards = plan_shards(planned_tensors(stand_in, linears, method, qopts), qopts.shard_size)
        sizes[self.name] = sum(s.file_size for s in shards)
        peak = estimate_peak_bytes(stand_in.config, stand_in.tensors, linears, qopts, method,
                                   architecture_for(stand_in.config))
        return Estimate(f"; writes ~{format_bytes(sizes[self.name])}, peak memory ~{format_bytes(peak)} + the interpreter",
                        sizes[self.name])


class EvalStep(Step):
    """``eval``: held-out perplexity of the source and of every quantization -> results.json/.md (and .png)."""

    kind = "eval"

    @classmethod
    def from_release(cls, rel: Release) -> list[Step]:
        return [] if rel.eval is None else [cls("eval", "eval", dataclasses.asdict(rel.eval))]

    def outputs(self) -> list[str]:
        return [RESULTS_JSON, RESULTS_MD, RESULTS_PNG]

    def inputs(self, ctx: _Runner) -> dict | None:
        models = {}
        for name in ctx.eval_models():
            ident = ctx.output_identity(name) if name != "(model)" else ctx.source_identity()
            if ident is None:
                return None
            models[name] = ident
        return {"models": models, "data": data_fingerprint(ctx.rel.eval.data)}

    def fingerprint_settings(self) -> dict:
        settings = super().fingerprint_settings()
        settings.pop("data", None)
        return settings

    def verify(self, ctx: _Runner, rec: dict) -> str | None:
        return verify_files(ctx.wd, rec["files"])

    def execute(self, ctx: _Runner) -> dict:
        from mergequant.evaluate import evaluate_model

        ev, wd = ctx.rel.eval, ctx.wd
        table = {}
        for name in ctx.eval_models():
            if ctx.is_gguf(name):  # mergequant eval does not read GGUF: the quantize step measured them in llama.cpp
                measured = (ctx.records.get(f"quantize/{name}", {}).get("result") or {}).get("perplexity_detail") or {}
                for file, r in measured.items():
                    table[f"{name}/{file}"] = r
                if not measured:
                    ctx.log(f"  {name}: GGUF files not measured (needs llama-cpp-python)")
                continue
            res = evaluate_model(ctx.model_ref(name), ev.data, seqlen=ev.seqlen, stride=ev.stride, device=ev.device,
                                 max_tokens=ev.max_tokens, progress=not ctx.opts.quiet, backend=ev.backend)
            table[name] = res.as_dict()
            ctx.log(f"  {name}: perplexity {res.perplexity:.4f} over {res.tokens} tokens")
        plotted = write_plot(wd, ev, table, ctx.model_dir, ctx.log, ctx.is_ours)
        write_atomic(wd / RESULTS_JSON, json.dumps({"data": ev.data, "models": table}, indent=2) + "\n")
        write_atomic(wd / RESULTS_MD, results_markdown(ev, table, wd, ctx.model_dir)
                     + (f"\n![held-out perplexity and size per model]({RESULTS_PNG})\n" if plotted else ""))
        names = (RESULTS_JSON, RESULTS_MD) + ((RESULTS_PNG,) if plotted else ())
        files = {n: {"size": (wd / n).stat().st_size, "sha256": sha256_file(wd / n)} for n in names}
        return {"files": files, "result": {"perplexity": {k: v["perplexity"] for k, v in table.items()}}}

    def estimate(self, ctx: _Runner, run: bool, sizes: dict[str, int]) -> Estimate:
        return Estimate(f"; {len(ctx.eval_models())} model(s) on {ctx.rel.eval.data}, windows of {ctx.rel.eval.seqlen}")


class PushStep(Step):
    """``push/NAME``: the output NAME uploaded to its Hub repo (or, with --push-dry-run, its plan printed)."""

    kind = "push"

    @classmethod
    def from_release(cls, rel: Release) -> list[Step]:
        if rel.push is None:
            return []
        opts = {k: v for k, v in dataclasses.asdict(rel.push).items() if k != "repos"}
        return [cls(f"push/{name}", name, {"repo": repo, **opts}) for name, repo in rel.push.repos.items()]

    def inputs(self, ctx: _Runner) -> dict | None:
        ident = ctx.output_identity(self.name)
        if ident is None:
            return None
        return {"folder": ident, "base_model_map": ctx.push_map(self.name), "dry_run": ctx.opts.push_dry_run}

    def execute(self, ctx: _Runner) -> dict:
        from mergequant.hub import PushOptions, describe_plan, push, summary

        p = ctx.rel.push
        opts = PushOptions(repo=p.repos[self.name], private=p.private, revision=p.revision, create_pr=p.create_pr,
                           commit_message=p.commit_message, endpoint=p.endpoint, dry_run=ctx.opts.push_dry_run,
                           base_model_map=ctx.push_map(self.name), plot=ctx.plot_for_push())
        res = push(ctx.wd / self.name, opts, log=ctx.log)
        if ctx.opts.push_dry_run:
            lines = describe_plan(res).splitlines()
            ctx.log("\n".join("  " + ln for ln in (lines[:1] if ctx.opts.quiet else lines)))
            return {"result": {"dry_run": True, "repo": res.repo, "files": len(res.files), "bytes": res.total_bytes}}
        ctx.log("  " + summary(res))
        return {"result": {"dry_run": False, "repo": res.repo, "commit_url": res.commit_url, "pr_url": res.pr_url,
                           "changed": res.changed}}

    def estimate(self, ctx: _Runner, run: bool, sizes: dict[str, int]) -> Estimate:
        from mergequant.units import format_bytes

        repo = ctx.rel.push.repos[self.name]
        mode = "print the plan (--push-dry-run)" if ctx.opts.push_dry_run else "upload"
        folder = ctx.wd / self.name
        if run and folder.is_dir() and self.name not in ctx.rebuilt:  # the real plan of what is there now
            from mergequant.hub import PushOptions, plan_push

            plan = plan_push(folder, PushOptions(repo=repo, dry_run=True, base_model_map=ctx.push_map(self.name),
                                                 plot=ctx.plot_for_push()))
            return Estimate(f"; {mode} {len(plan.files)} file(s), {format_bytes(plan.total_bytes)} to {repo}")
        return Estimate(f"; {mode} ~{format_bytes(sizes.get(self.name, 0))} to {repo}")


STEP_KINDS: tuple[type[Step], ...] = (MergeStep, QuantizeStep, EvalStep, PushStep)  # in the order steps run


def build_steps(rel: Release) -> list[Step]:
    """Every step of ``rel``, in the order they run."""
    return [step for kind in STEP_KINDS for step in kind.from_release(rel)]


def step_outputs(step: Step) -> list[str]:
    """What ``step`` writes in the workdir (names relative to it)."""
    return step.outputs()


def resolve_force(steps: list[Step], names: list[str]) -> set[str]:
    """The step ids ``--force-step`` names: a step id, or an output name for the step that writes it."""
    ids = {s.id for s in steps}
    out = set()
    for n in names:
        if n in ids:
            out.add(n)
            continue
        producers = [s.id for s in steps if s.writes_folder and s.name == n]
        if producers:
            out.update(producers)
            continue
        raise ReleaseError(f"--force-step {n}: no such step" + suggestion(n, ids | {s.name for s in steps if s.kind != "eval"}))
    return out
