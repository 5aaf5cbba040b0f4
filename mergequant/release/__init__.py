"""`mergequant run RELEASE.yaml`: merge -> quantize(s) -> eval -> push from one file, resumable.

A release file names the merge recipe (or an existing model), the quantizations to produce, the
held-out text and the Hub repos. Steps run in order: ``merge``, ``quantize/NAME`` (file order),
``eval``, ``push/NAME``. Each finished step is recorded in ``WORKDIR/manifest.json`` with its settings,
the fingerprint of its inputs, the size and sha256 of every output file and its timings; a step is
skipped when its recorded fingerprint equals the current one AND its outputs are still on disk as
recorded. A run killed at any point leaves either the old state or a finished, claimed output without
its record (redone, identical bytes). docs/release.md has the rules; the code is organised as:

- :mod:`~mergequant.release.spec`: the release file, parsed and validated up front (pure).
- :mod:`~mergequant.release.steps`: one class per step kind (which steps a release has, their
  fingerprinted inputs, how each runs, how its output is verified, what the dry run estimates).
- :mod:`~mergequant.release.hashing`: content identities (our outputs in full, others' models cheaply).
- :mod:`~mergequant.release.manifest`: the manifest (read defensively, written atomically) and claims.
- :mod:`~mergequant.release.workdir`: what in a workdir is ours to replace or delete; the one-run lock.
- :mod:`~mergequant.release.shapes`: the source's shapes before it exists, to check quantizations early.
- :mod:`~mergequant.release.runner`: decide, claim, execute, record, step after step.
- :mod:`~mergequant.release.dryrun`: the plan of a run, by the run's own decisions and the steps' estimates.
- :mod:`~mergequant.release.report`: results.md, results.png and the summary table.

Every name earlier versions of the single module ``mergequant/release.py`` defined is importable from
here. Example::

    from mergequant.release import RunOptions, run_release, summary_table
    res = run_release("release.yaml", RunOptions(push_dry_run=True))
    print(summary_table(res))
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mergequant.release.dryrun import dry_run, free_bytes
from mergequant.release.hashing import (HASH_CHUNK, SMALL_FILE, content_hash, data_fingerprint, dir_fingerprint,
                                        files_under, output_files, sha256_file, sha256_json, verify_files,
                                        verify_output)
from mergequant.release.layout import LOCK, MANIFEST, NAME_RE, RESULTS_JSON, RESULTS_MD, RESULTS_PNG, ReleaseError
from mergequant.release.manifest import (MANIFEST_FORMAT, MAX_MANIFEST_BYTES, PENDING, manifest_problem, read_manifest,
                                         recorded_outputs, write_atomic, write_manifest)
from mergequant.release.report import results_markdown, summary_table
from mergequant.release.runner import ReleaseResult, RunOptions, StepOutcome, _Runner, refuse
from mergequant.release.spec import (EVAL_KEYS, MERGE_KEYS, PUSH_OPTION_KEYS, QUANT_RESERVED, TOP_KEYS, EvalSpec,
                                     MergeSpec, PushSpec, QuantSpec, Release, load_release, parse_release,
                                     quantize_fields)
from mergequant.release.steps import (NOT_FINGERPRINTED, STEP_KINDS, EvalStep, MergeStep, PushStep, QuantizeStep, Step,
                                      build_steps, resolve_force, step_outputs)
from mergequant.release.workdir import CLAIM_SLACK_NS, WorkdirLock, leftover_refusal, leftovers

__all__ = [
    "CLAIM_SLACK_NS", "EVAL_KEYS", "HASH_CHUNK", "LOCK", "MANIFEST", "MANIFEST_FORMAT", "MAX_MANIFEST_BYTES",
    "MERGE_KEYS", "NAME_RE", "NOT_FINGERPRINTED", "PENDING", "PUSH_OPTION_KEYS", "QUANT_RESERVED", "RESULTS_JSON",
    "RESULTS_MD", "RESULTS_PNG", "SMALL_FILE", "STEP_KINDS", "TOP_KEYS",
    "EvalSpec", "EvalStep", "MergeSpec", "MergeStep", "PushSpec", "PushStep", "QuantSpec", "QuantizeStep", "Release",
    "ReleaseError", "ReleaseResult", "RunOptions", "Step", "StepOutcome", "WorkdirLock",
    "build_steps", "content_hash", "data_fingerprint", "dir_fingerprint", "dry_run", "files_under", "free_bytes",
    "leftover_refusal", "leftovers", "load_release", "manifest_problem", "output_files", "parse_release",
    "quantize_fields", "read_manifest", "recorded_outputs", "resolve_force", "results_markdown", "run_release",
    "sha256_file", "sha256_json", "step_outputs", "summary_table", "verify_files", "verify_output", "write_atomic",
    "write_manifest",
]


def run_release(path: str | Path, opts: RunOptions | None = None, log: Callable[[str], None] = print) -> ReleaseResult:
    """Load, validate and run (or, with ``opts.dry_run``, plan) the release file at ``path``."""
    opts = opts or RunOptions()
    rel = load_release(path)
    if opts.dry_run:
        res = dry_run(rel, opts)
        log(res.plan_text)
        refuse(res.refusals, "listed above")  # the plan says why; the exit status says that the run would not go ahead
        return res
    return _Runner(rel, opts, log).run()
