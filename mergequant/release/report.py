"""What a release shows people: the results files of the eval step and the summary table.

``results.md`` (a table of perplexity, tokens and size per model), ``results.png`` (the same as a
picture, :mod:`mergequant.plot`, when matplotlib is installed) and :func:`summary_table` (one line per
step, for the terminal). Formatting only: the eval step (:class:`mergequant.release.steps.EvalStep`)
measures and records; these functions turn its table into text or a picture.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mergequant.release.hashing import files_under
from mergequant.release.layout import RESULTS_PNG

if TYPE_CHECKING:
    from mergequant.release.runner import ReleaseResult
    from mergequant.release.spec import EvalSpec


def _folder_bytes(folder: Path) -> int:
    if folder.is_file():  # one GGUF file of a gguf quantization (NAME/<source>-<TYPE>.gguf)
        return folder.stat().st_size
    return sum(p.stat().st_size for p in files_under(folder)) if folder.is_dir() else 0


def results_markdown(ev: EvalSpec, table: dict, wd: Path, model_dir: Callable[[str], Path]) -> str:
    """``results.md``: the data, the window, and a row per model (perplexity, tokens, size on disk)."""
    from mergequant.units import format_bytes

    lines = ["# Held-out perplexity\n", f"Data: `{ev.data}`, windows of {ev.seqlen} tokens"
             + (f", stride {ev.stride}" if ev.stride else "") + ".\n", "| model | perplexity | tokens | size |", "|---|--:|--:|--:|"]
    for name, r in table.items():
        lines.append(f"| {name} | {r['perplexity']:.4f} | {r['tokens']} | {format_bytes(_folder_bytes(model_dir(name)))} |")
    return "\n".join(lines) + "\n"


def write_plot(wd: Path, ev: EvalSpec, table: dict, model_dir: Callable[[str], Path], log: Callable[[str], None],
               is_ours: Callable[[str], bool]) -> bool:
    """results.png (perplexity and size per model) next to results.md; without matplotlib a one-line
    note, and a results.png of an earlier run of ours is removed (it would describe other results).
    Whether the plot was written."""
    from mergequant.evaluate import data_labels
    from mergequant.plot import PlotUnavailable, plot_results

    label = data_labels([ev.data])[0][0]
    try:
        plot_results({n: {"perplexity": {label: r["perplexity"]}, "bytes": _folder_bytes(model_dir(n))}
                      for n, r in table.items()}, wd / RESULTS_PNG, title=f"held-out perplexity on {Path(ev.data).name}")
        return True
    except PlotUnavailable as e:
        log(f"note: {e}; no {RESULTS_PNG} written")
        if (wd / RESULTS_PNG).is_file() and is_ours(RESULTS_PNG):
            os.unlink(wd / RESULTS_PNG)
        return False


def summary_table(res: ReleaseResult) -> str:
    """One line per step: status, seconds, and the perplexity when measured."""
    ppl = res.results or {}
    lines = [f"{'step':<28} {'status':<8} {'seconds':>8}  perplexity"]
    for o in res.outcomes:
        name = o.id.split("/", 1)[1] if "/" in o.id else None
        p = ppl.get(name) if o.id.startswith("quantize/") else (next(iter(ppl.values()), None) if o.id == "merge" else None)
        lines.append(f"{o.id:<28} {o.status:<8} {o.seconds:>8.1f}  {'' if p is None else f'{p:.4f}'}")
    return "\n".join(lines)
