"""``mergequant run --dry-run``: the plan of a run, computed by the code the run uses, writing nothing.

Every step is decided by the runner's own :meth:`~mergequant.release.runner._Runner.decide` (same
fingerprints, same output checks) and costed by its class's
:meth:`~mergequant.release.steps.Step.estimate` (sizes from the planned shards, peak memory from the
merge and quantize estimators). A step that would run marks its output as rebuilt, so the steps that
read it are shown as waiting for it ("an input is rebuilt first"). The refusals the run would raise and
the leftovers it would remove or keep are listed too; nothing is created (no workdir, no lock, no
manifest, no cleanup).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mergequant.release.manifest import PENDING
from mergequant.release.runner import ReleaseResult, RunOptions, StepOutcome, _Runner
from mergequant.release.spec import Release
from mergequant.release.workdir import leftover_refusal, leftovers


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that holds ``path`` (or its nearest existing parent)."""
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def dry_run(rel: Release, opts: RunOptions) -> ReleaseResult:
    """Print what a run would do: each step with run/skip and why, disk needed vs free, peak memory,
    and what each push would upload. Writes nothing (no workdir, no manifest, no cleanup)."""
    from mergequant.units import format_bytes

    notes: list[str] = []
    r = _Runner(rel, opts, log=notes.append)
    r.check_source()  # merge.model with a LoRA adapter: opened (a bad one refused in one line); its note is shown
    r.log = lambda m: None
    r.validate_quantizations()
    lines = [f"release {rel.path}", f"workdir {rel.workdir}" + ("" if rel.workdir.exists() else " (created on the first run)")]
    lines += notes
    refusals = r.refusals()
    lines += [f"REFUSED: {why}" for why in refusals]
    pending = r.manifest.get(PENDING, {})
    junk = [(p.name, leftover_refusal(p, s.name, pending)) for s in r.steps if s.writes_folder
            for p in leftovers(rel.workdir, s.name)]
    if any(why is None for _, why in junk):
        lines.append(f"leftovers of an interrupted run (removed by the next run): {', '.join(n for n, why in junk if why is None)}")
    lines += [f"kept by the next run (not verifiably left by mergequant): {n}: {why}" for n, why in junk if why is not None]
    refused_steps = {s.id for s, _ in r.unrecorded() if s.id not in r.force}
    forced_aside = {s.id: p for s, p in r.unrecorded() if s.id in r.force}
    need = 0
    outcomes = []
    sizes: dict[str, int] = {}
    for step in r.steps:
        run, reason, _, _ = r.decide(step)
        status = "run " if run else "skip"
        estimate = step.estimate(r, run, sizes)
        if run and step.writes_folder:
            r.rebuilt.add(step.name)  # what reads it cannot be decided until it is rebuilt
        need += estimate.writes
        extra = estimate.text
        if step.id in forced_aside:
            extra += f"; {forced_aside[step.id]} is not mergequant's: kept under another name first (--force-step)"
        if step.id in refused_steps:
            status, reason = "REFUSED", "an existing output is not mergequant's: see REFUSED above"
        lines.append(f"  {status} {step.id:<28} ({reason}){extra}")
        outcomes.append(StepOutcome(step.id, "would run" if run else "would skip", reason))
    free = free_bytes(rel.workdir)
    lines.append(f"disk: ~{format_bytes(need)} to write, {format_bytes(free)} free under {rel.workdir}"
                 + ("" if need <= free else "  NOT ENOUGH SPACE"))
    text = "\n".join(lines)
    return ReleaseResult(rel.workdir, outcomes, plan_text=text, refusals=refusals)
