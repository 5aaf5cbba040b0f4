"""Running a release: for each step in order, decide run or skip, claim, execute, record.

The loop (:meth:`_Runner.run`) is the only place that acts on the workdir: before the lock it refuses
what it may not write (:mod:`mergequant.release.workdir`); under the lock it re-reads the manifest,
checks every quantization against the source shapes (:mod:`mergequant.release.shapes`), and then per
step: removes the step's verified leftovers, decides (:meth:`_Runner.decide`: fingerprint and output
check, the step class supplying both), sets aside an unrecorded output under ``--force-step``, claims
the outputs in the manifest, runs the step (:class:`mergequant.release.steps.Step.execute`) and writes
its record (atomically, after the output's own rename). So a kill at any moment leaves either the old
state or a finished, claimed output without its record (redone next time, identical bytes).

The runner is also the context steps see: the release, the workdir, the records, and the identities of
the outputs earlier steps made (content hashes, or None in a dry run when an input is rebuilt first).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mergequant.errors import MergeQuantError
from mergequant.release import shapes
from mergequant.release.adapters import adapter_sides, side_dirs, sides_identity
from mergequant.release.hashing import dir_fingerprint
from mergequant.release.layout import RESULTS_PNG, ReleaseError
from mergequant.release.manifest import PENDING, add_claims, drop_claims, now, read_manifest, write_manifest
from mergequant.release.spec import Release
from mergequant.release.steps import STEP_KINDS, Step, build_steps, resolve_force
from mergequant.release.workdir import (WorkdirLock, aside, foreign_files, is_ours, leftover_refusal, leftovers,
                                        location_refusals, unrecorded_refusal)


@dataclass
class StepOutcome:
    """What happened to one step (or, in a dry run, would happen), for the summary table."""

    id: str
    status: str  # "ran", "skipped" ("would run", "would skip" in a dry run)
    reason: str
    seconds: float = 0.0
    detail: dict = field(default_factory=dict)


@dataclass
class RunOptions:
    """The command-line options of ``mergequant run`` (``fsync=False``: tests, where durability does not matter)."""

    dry_run: bool = False
    force_steps: list[str] = field(default_factory=list)
    quiet: bool = False
    push_dry_run: bool = False
    fsync: bool = True


@dataclass
class ReleaseResult:
    """What :func:`mergequant.release.run_release` returns: one outcome per step, the perplexities, a dry run's plan."""

    workdir: Path
    outcomes: list[StepOutcome]
    results: dict | None = None  # eval results {output name: perplexity}
    plan_text: str | None = None  # dry run
    refusals: list[str] = field(default_factory=list)  # dry run: why the run would not start


class _Runner:
    """One run (or dry run) of one release: the steps, the manifest as read, and what is rebuilt."""

    def __init__(self, rel: Release, opts: RunOptions, log: Callable[[str], None]):
        self.rel, self.opts, self.log = rel, opts, log
        self.wd = rel.workdir
        self.steps = build_steps(rel)
        self.force = resolve_force(self.steps, opts.force_steps)
        self._load_manifest()
        self.rebuilt: set[str] = set()  # dry run: outputs that would be rewritten (unknown new content)
        self.quantizations: dict = {}  # {name: (QuantizeOptions, method, linears, stand-in)}, once checked
        self._merge_plan = None
        self._source_ck = None  # merge.model with a LoRA adapter: its adapted view, opened once

    # ---- inputs ------------------------------------------------------------------------------------
    def source_dir(self) -> Path:
        """The folder of the model the quantizations read (with an adapter: its base's folder)."""
        if self.rel.merge.adapted:
            return self.source_checkpoint().path
        return self.rel.merge.model if self.rel.merge.model is not None else self.wd / self.rel.merge.out

    def source_ref(self) -> str | Path:
        """What the quantizations open: the source folder, or ``merge.model``'s reference when it has an adapter."""
        return self.rel.merge.model if self.rel.merge.adapted else self.source_dir().resolve()

    def source_checkpoint(self):
        """``merge.model`` with its adapter, as quantize reads it (:func:`mergequant.peft.adapted.open_model`, fused
        experts per expert), opened once; anything wrong with the adapter is one line naming ``merge.model``."""
        if self._source_ck is None:
            from mergequant.merge.moe_layout import per_expert_view
            from mergequant.peft.adapted import open_model

            try:
                self._source_ck = per_expert_view(open_model(self.rel.merge.model))
            except MergeQuantError as e:
                raise ReleaseError(f"{self.rel.path}: merge.model: {e}") from None
        return self._source_ck

    def check_source(self) -> None:
        """Open ``merge.model``'s adapter now (before anything is written) when it has one, and say which it is."""
        if self.rel.merge.adapted:
            self.log(self.source_checkpoint().note)

    def _sides(self, ref: str, base_dir: Path | None, where: str):
        try:
            return adapter_sides(ref, base_dir)
        except MergeQuantError as e:
            raise ReleaseError(f"{self.rel.path}: {where}: {e}") from None

    def source_sides(self):
        """The base and adapter sides of ``merge.model`` (:func:`mergequant.release.adapters.adapter_sides`)."""
        # base_dir None: local sides are absolute already (spec), and an adapter-only folder's base_model_name_or_path
        # is resolved as `mergequant quantize` resolves it (as written: peft records it as it was given)
        return self._sides(self.rel.merge.model, None, "merge.model")

    def source_identity(self) -> str | dict | None:
        """Content hash of the model the quantizations read; None when it is not known yet (dry run). With an
        adapter: the reference and the identities of both the base's and the adapter's folders."""
        if self.rel.merge.adapted:
            return {"reference": self.rel.merge.model, **sides_identity(self.source_sides())}
        if self.rel.merge.model is not None:
            return dir_fingerprint(self.rel.merge.model)
        name = self.rel.merge.out
        rec = self.records.get("merge")
        if name in self.rebuilt or rec is None:
            return None
        return rec["content_hash"]

    def output_identity(self, name: str) -> str | None:
        if name == self.rel.merge.out and self.rel.merge.recipe is not None:
            return self.source_identity()
        step_id = f"quantize/{name}"
        rec = self.records.get(step_id)
        return None if rec is None or name in self.rebuilt else rec["content_hash"]

    def parent_dirs(self) -> dict[str, Path | None]:
        """{reference: local directory, or None for a Hub id} of every merge parent, resolved as the
        merge resolves them (as given, then relative to the recipe)."""
        from mergequant.recipe import load_recipe

        recipe = load_recipe(self.rel.merge.recipe)
        out = {}
        for ref in recipe.model_refs():
            p = Path(ref).expanduser()
            if not p.exists() and not p.is_absolute() and (recipe.path.parent / p).exists():
                p = recipe.path.parent / p
            out[ref] = p if p.is_dir() else None
        return out

    def parent_sides(self) -> dict:
        """{reference: its base and adapter sides} of every merge parent with a LoRA adapter."""
        from mergequant.recipe import load_recipe

        folder = load_recipe(self.rel.merge.recipe).path.parent
        out = {}
        for ref in self.parent_dirs():
            sides = self._sides(ref, folder, "merge.recipe")
            if sides is not None:
                out[ref] = sides
        return out

    def parents(self) -> dict:
        """Each parent's identity; a parent with an adapter: both sides' (a changed adapter redoes the merge)."""
        adapted = self.parent_sides()
        return {ref: sides_identity(adapted[ref]) if ref in adapted else dir_fingerprint(p) if p is not None
                else f"hub:{ref}" for ref, p in self.parent_dirs().items()}

    def input_paths(self) -> list[tuple[str, Path, bool]]:
        """(what it is, path, is a model folder) for every local input of the release: nothing of
        these may be written to, replaced, or hold the workdir."""
        rel = self.rel
        out = [("the release file", rel.path, False)]
        if rel.merge.recipe is not None:
            out.append(("merge.recipe", rel.merge.recipe, False))
            adapted = self.parent_sides()
            for ref, p in self.parent_dirs().items():
                if ref in adapted:
                    out += [(f"merge parent {ref} ({role})", d, True) for role, d in side_dirs(adapted[ref])]
                elif p is not None:
                    out.append((f"merge parent {ref}", p, True))
        elif rel.merge.adapted:
            out += [(f"merge.model {role}", d, True) for role, d in side_dirs(self.source_sides())]
        else:
            out.append(("merge.model", rel.merge.model, True))
        out += [(f"quantize {q.name} calib", Path(q.settings["calib"]), False)
                for q in rel.quantize if q.settings.get("calib") and not q.settings["calib"].startswith("hf:")]
        if rel.eval is not None and not rel.eval.data.startswith("hf:"):
            out.append(("eval.data", Path(rel.eval.data), False))
        return out

    def eval_models(self) -> list[str]:
        first = self.rel.merge.out if self.rel.merge.recipe is not None else "(model)"
        return [first] + [q.name for q in self.rel.quantize]

    def is_gguf(self, name: str) -> bool:
        """Whether the output ``name`` is a quantization with ``method: gguf`` (llama.cpp files)."""
        return any(q.name == name and q.settings.get("method") == "gguf" for q in self.rel.quantize)

    def model_dir(self, name: str) -> Path:
        """The folder of an evaluated model (its size in results.md; with an adapter, the base's folder)."""
        return self.source_dir() if name == "(model)" else self.wd / name

    def model_ref(self, name: str) -> str:
        """What the eval step opens for ``name``: its folder, or ``merge.model``'s reference with its adapter."""
        return str(self.source_ref() if name == "(model)" and self.rel.merge.adapted else self.model_dir(name))

    def push_map(self, name: str) -> dict[str, str]:
        mapping = dict(self.rel.push.base_model_map)
        src = self.rel.merge.out
        if name != src and self.rel.merge.recipe is not None and src in self.rel.push.repos:
            mapping[str(self.source_dir().resolve())] = self.rel.push.repos[src]  # the quant card points at the merge repo
        return dict(sorted(mapping.items()))

    def plot_for_push(self) -> Path | None:
        """The eval step's results.png, attached to every push (uploaded beside the weights, shown in the card)."""
        rec = self.records.get("eval")
        return self.wd / RESULTS_PNG if isinstance(rec, dict) and RESULTS_PNG in rec.get("files", {}) else None

    def merge_plan(self):
        if self._merge_plan is None:
            self._merge_plan = shapes.merge_plan(self.rel)
        return self._merge_plan

    def validate_quantizations(self) -> dict:
        """Check every quantization against the source shapes (:func:`mergequant.release.shapes.check_quantizations`);
        kept in :attr:`quantizations` for the dry run's estimates."""
        self.quantizations = shapes.check_quantizations(self)
        return self.quantizations

    # ---- what the run may write -------------------------------------------------------------------
    def _load_manifest(self) -> None:
        """Read the manifest, keeping a copy as it was: what earlier runs wrote stays ours for this whole
        run, even after a step's new record replaces the one that named it (merge.out renamed and a
        quantization given the old name)."""
        self.manifest = read_manifest(self.wd)
        self.records: dict = self.manifest["steps"]
        self.manifest_at_start = json.loads(json.dumps(self.manifest))

    def location_refusals(self) -> list[str]:
        """See :func:`mergequant.release.workdir.location_refusals`."""
        return location_refusals(self.rel.path, self.wd, self.input_paths(),
                                 [(step.id, name) for step in self.steps for name in step.outputs()])

    def is_ours(self, name: str) -> bool:
        """See :func:`mergequant.release.workdir.is_ours` (the manifest now and as read at the start)."""
        return is_ours(self.wd, name, [self.manifest, self.manifest_at_start])

    def foreign_files(self, name: str) -> list[str]:
        records = [*self.records.values(), *self.manifest_at_start["steps"].values()]
        return foreign_files(self.wd, name, records)

    def unrecorded(self) -> list[tuple[Step, Path]]:
        """(step, path) of every existing entry a step would replace that is not ours."""
        return [(step, self.wd / name) for step in self.steps for name in step.outputs()
                if os.path.lexists(self.wd / name) and not self.is_ours(name)]

    def refusals(self) -> list[str]:
        """Everything that stops this run, before it writes anything (workdir and manifest as read now)."""
        # a misplaced output is fixed in the release file first; what it would replace matters after that
        return self.location_refusals() or [unrecorded_refusal(self.wd, s.id, p, self.foreign_files(p.name))
                                            for s, p in self.unrecorded() if s.id not in self.force]

    def set_aside(self, step: Step) -> None:
        """--force-step on an output that is not ours: rename it out of the way (never delete it), and say so."""
        for s, path in self.unrecorded():
            if s is step:
                kept = aside(path)
                os.rename(path, kept)
                self.log(f"[{step.id}] {path} was not written by mergequant: kept as {kept.name} (--force-step); "
                         "delete it yourself if it is not needed")

    def claim(self, step: Step) -> None:
        """Record in the manifest, before ``step`` writes anything, that it is writing its outputs.

        A run killed after an output is renamed into place but before its record is written leaves
        a finished output without a record; the claim is what lets the next run tell that folder
        (and the step's .partial/.old leftovers) from one a user put there."""
        names = step.outputs()
        if names:
            add_claims(self.manifest, step.id, names, time.time_ns())
            write_manifest(self.wd, self.manifest)

    def clean_leftovers(self, step: Step) -> None:
        """Delete the temporary folders an interrupted run of ``step`` left, when verifiably ours; keep and report the rest."""
        for junk in leftovers(self.wd, step.name) if step.writes_folder else []:
            why = leftover_refusal(junk, step.name, self.manifest.get(PENDING, {}))
            if why is None:
                shutil.rmtree(junk)
                self.log(f"removed {junk.name} (left by an interrupted run)")
            else:
                self.log(f"kept {junk.name}: {why}; not verifiably left by mergequant, delete it yourself if it is")

    def _drop_unused_claims(self, step: Step) -> None:
        """After a step failed or was interrupted (exception, Ctrl-C, SIGTERM), drop its claims on outputs
        that do not exist: the writer cleaned up and renamed nothing into place, so nothing there is
        ours, and a folder a user puts at that name later must be refused, not replaced. A claim whose
        output exists stays (the rename happened, the record did not). Only a SIGKILL, which runs no
        code, can leave a claim on a missing output."""
        pending = self.manifest.get(PENDING, {})
        gone = [n for n in step.outputs() if n in pending and not os.path.lexists(self.wd / n)]
        if gone:
            drop_claims(self.manifest, gone)
            with contextlib.suppress(OSError):  # already failing: keep the first error
                write_manifest(self.wd, self.manifest)

    # ---- decide ------------------------------------------------------------------------------------
    def decide(self, step: Step, *, verify: bool = True) -> tuple[bool, str, dict | None, str | None]:
        """(run?, reason, inputs, fingerprint)."""
        inputs = step.inputs(self)
        if inputs is None:
            why = "not done yet" if step.id not in self.records else "an input is rebuilt first; skipped then if it comes out identical"
            return True, why, None, None
        fp = step.fingerprint(inputs)
        rec = self.records.get(step.id)
        if step.id in self.force:
            return True, "forced (--force-step)", inputs, fp
        if rec is None:
            return True, "not done yet", inputs, fp
        if rec.get("fingerprint") != fp:
            return True, "inputs or settings changed: " + changed(rec, step, inputs), inputs, fp
        if verify:
            bad = step.verify(self, rec)
            if bad:
                return True, bad, inputs, fp
        return False, "unchanged", inputs, fp

    # ---- execute -----------------------------------------------------------------------------------
    def run(self) -> ReleaseResult:
        refuse(self.refusals())  # before the lock: a refused run creates nothing (not even the workdir)
        self.check_source()  # so is a bad adapter in merge.model
        lock = WorkdirLock(self.wd)
        try:
            self._load_manifest()  # again, now that no other run can be writing it
            refuse(self.refusals())
            self.validate_quantizations()
            outcomes = []
            for step in self.steps:
                self.clean_leftovers(step)
                run, reason, inputs, fp = self.decide(step)
                if not run:
                    self.log(f"[{step.id}] skip ({reason})")
                    outcomes.append(StepOutcome(step.id, "skipped", reason, self.records[step.id].get("seconds", 0.0),
                                                self.records[step.id].get("result", {})))
                    continue
                if inputs is None:  # cannot happen in a real run: dependencies ran first
                    raise AssertionError(step.id)
                self.log(f"[{step.id}] run ({reason})")
                self.set_aside(step)
                self.claim(step)
                started, t0 = now(), time.perf_counter()
                record = {"kind": step.kind, "settings": step.settings, "inputs": inputs, "fingerprint": fp,
                          "started": started}
                try:
                    record.update(self.execute(step))
                except BaseException:
                    self._drop_unused_claims(step)
                    raise
                record["finished"] = now()
                record["seconds"] = round(time.perf_counter() - t0, 3)
                self.records[step.id] = record
                self.manifest["release"] = str(self.rel.path)
                drop_claims(self.manifest, step.outputs())
                write_manifest(self.wd, self.manifest)
                self.log(f"[{step.id}] done in {record['seconds']:.1f} s")
                outcomes.append(StepOutcome(step.id, "ran", reason, record["seconds"], record.get("result", {})))
            results = self.records.get("eval", {}).get("result", {}).get("perplexity") if self.rel.eval else None
            return ReleaseResult(self.wd, outcomes, results)
        finally:
            lock.release()

    def execute(self, step: Step) -> dict:
        """Run ``step`` through this runner's hook for its kind, ``_do_<kind>`` (by default the step
        class's own :meth:`~mergequant.release.steps.Step.execute`). The hooks are the seam where a test
        replaces one kind's work (an interruption in the middle of a merge) without touching the rest."""
        return getattr(self, f"_do_{step.kind}")(step)


def _execute_step(self: _Runner, step: Step) -> dict:
    return step.execute(self)


for _kind in STEP_KINDS:  # _Runner._do_merge, _do_quantize, _do_eval, _do_push
    setattr(_Runner, f"_do_{_kind.kind}", _execute_step)


def refuse(refusals: list[str], where: str = "see --dry-run") -> None:
    """Raise the first refusal as one line (the dry run lists them all)."""
    if refusals:
        more = f" (and {len(refusals) - 1} more refusal(s): {where})" if len(refusals) > 1 else ""
        raise ReleaseError(refusals[0] + more)


def changed(rec: dict, step: Step, inputs: dict) -> str:
    """The settings and inputs whose recorded value differs from the current one, for the run's reason."""
    what = []
    old_s, old_i = rec.get("settings", {}), rec.get("inputs", {})
    for k in sorted(set(old_s) | set(step.settings)):
        if old_s.get(k) != step.settings.get(k):
            what.append(k)
    for k in sorted(set(old_i) | set(inputs)):
        if old_i.get(k) != inputs.get(k):
            what.append(k)
    return ", ".join(what) or "fingerprint"
