"""One picture of evaluation results: held-out perplexity per model and domain, and bytes per model.

:func:`plot_results` is a pure function from a results table to a PNG file, written atomically
(temporary file in the same folder, then a rename), with the same bytes for the same table. It is
what `mergequant eval --plot`, the release's eval step (``results.png`` next to ``results.md``) and
`mergequant demo` draw. matplotlib is optional (``pip install 'mergequant[plot]'``): without it,
:func:`require` and :func:`plot_results` raise :class:`PlotUnavailable`, one line saying so.

Example::

    plot_results({"base": {"perplexity": {"verse": 90.1, "code": 3.2}, "bytes": 950_000},
                  "merged": {"perplexity": {"verse": 84.0, "code": 2.4}, "bytes": 950_000}}, "ppl.png")
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping
from pathlib import Path

from mergequant.errors import MergeQuantError

INSTALL_HINT = "pip install 'mergequant[plot]'"


class PlotUnavailable(MergeQuantError):
    """matplotlib is not installed."""


def require() -> None:
    """Raise :class:`PlotUnavailable` unless matplotlib can be imported (checked before any work)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(f"plotting needs matplotlib, which is not installed ({INSTALL_HINT})") from None


def check_plot_path(path: str | Path, inputs=()) -> None:
    """Refuse a plot path that cannot be right, before any work: not ending in .png, in a folder that
    does not exist, an existing folder, one of ``inputs`` (data files, model folders: overwriting one
    would destroy it) or a file inside an input folder (a model folder gains no files it did not have)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise MergeQuantError(f"--plot {path}: the plot is a PNG file; give a name ending in .png")
    if path.is_dir():
        raise MergeQuantError(f"--plot {path}: is a folder; give a file name ending in .png")
    if not path.parent.is_dir():
        raise MergeQuantError(f"--plot {path}: folder {path.parent} does not exist")
    real = path.resolve()
    for item in inputs:
        item = Path(item)
        if not item.exists():
            continue
        other = item.resolve()
        if real == other:
            raise MergeQuantError(f"--plot {path}: is one of the inputs ({item}); refusing to overwrite it")
        if other.is_dir() and other in real.parents:
            raise MergeQuantError(f"--plot {path}: lies inside the input folder {item}; write it elsewhere")


def check_table(table: Mapping[str, Mapping]) -> list[str]:
    """The domains of ``table`` ({model: {"perplexity": {domain: value}, "bytes": int (optional)}}), in
    first-seen order; MergeQuantError for an empty table or a perplexity that is not a positive number."""
    if not table:
        raise MergeQuantError("nothing to plot: no models")
    domains: dict[str, None] = {}
    for model, row in table.items():
        ppl = row.get("perplexity")
        if not isinstance(ppl, Mapping) or not ppl:
            raise MergeQuantError(f"nothing to plot for {model}: no perplexity")
        for domain, value in ppl.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise MergeQuantError(f"{model} on {domain}: perplexity {value!r} is not a positive number")
            domains.setdefault(str(domain), None)
    return list(domains)


def plot_results(table: Mapping[str, Mapping], path: str | Path, *, title: str | None = None) -> Path:
    """Draw ``table`` (see :func:`check_table`; models in display order) into the PNG file ``path``:
    on the left, perplexity per model with one bar per domain (values written on the bars; a log
    scale when they span more than a factor of 4, else a linear one from 0); on the right, bytes
    per model when the table has them. Returns ``path``."""
    domains = check_table(table)
    require()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from mergequant.units import format_bytes

    path = Path(path)
    models = list(table)
    sizes = [table[m].get("bytes") for m in models]
    with_sizes = all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sizes)
    n = len(models)
    fig = Figure(figsize=(min(24.0, 4.0 + 1.0 * n * max(1, len(domains)) ** 0.5 + (2.5 if with_sizes else 0)), 4.6),
                 dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, 2, width_ratios=[3, 1.2]) if with_sizes else fig.add_gridspec(1, 1)
    ax = fig.add_subplot(grid[0, 0])
    width = 0.8 / len(domains)
    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]
    for j, domain in enumerate(domains):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(n)]
        values = [table[m]["perplexity"].get(domain) for m in models]
        shown = [(x, v) for x, v in zip(xs, values) if v is not None]
        bars = ax.bar([x for x, _ in shown], [v for _, v in shown], width * 0.92, label=domain,
                      color=colors[j % len(colors)])
        ax.bar_label(bars, labels=[f"{v:.2f}" for _, v in shown], fontsize=7, padding=1,
                     rotation=90 if n * len(domains) > 8 else 0)
    values = [v for row in table.values() for v in row["perplexity"].values()]
    if max(values) / min(values) > 4:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        scale = "log scale, "
    else:
        scale = ""
    ax.set_xticks(range(n), models, rotation=25 if n > 3 else 0, ha="right" if n > 3 else "center", fontsize=8)
    ax.set_ylabel(f"held-out perplexity ({scale}lower is better)")
    ax.margins(y=0.15)
    if len(domains) > 1:
        ax.legend(fontsize=8, title="domain", title_fontsize=8)
    else:
        ax.set_title(f"data: {domains[0]}", fontsize=9)
    if with_sizes:
        bx = fig.add_subplot(grid[0, 1])
        bars = bx.bar(range(n), [s / 2**20 for s in sizes], 0.6, color="#7F7F7F")
        bx.bar_label(bars, labels=[format_bytes(s) for s in sizes], fontsize=7, padding=1)
        bx.set_xticks(range(n), models, rotation=25 if n > 1 else 0, ha="right" if n > 1 else "center", fontsize=8)
        bx.set_ylabel("size on disk (MiB)")
        bx.margins(y=0.15)
    if title:
        fig.suptitle(title, fontsize=10)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", metadata={"Software": None})  # no version stamp: same table, same bytes
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path
