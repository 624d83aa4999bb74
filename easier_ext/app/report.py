"""Report of a run directory: ``report.md``, a Markdown summary that links the run's PNG plots.

A run directory (see :class:`easier_ext.methods.rundir.RunDir`) holds ``config.json``, one
``iterations/NNN.json`` log per iteration and, once the run has finished, ``summary.json``.
:func:`write_report` renders everything applicable into ``plots/*.png`` and ``report.md``.

The run is read by :mod:`easier_ext.app.runlog` and plotted by :mod:`easier_ext.app.plots`; their
public functions are re-exported here (this module's names before the split), and can be used on
their own, e.g. in a notebook.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from easier_ext.app import runlog
from easier_ext.app.formatting import cost_ratio, format_cost
from easier_ext.app.plots import plot_accuracy, plot_costs, plot_entropy_heatmap, plot_sparsity
from easier_ext.app.runlog import PathLike, Run, entropy_matrix, load_run, sparsity_matrix
from easier_ext.core.files import atomic_write
from easier_ext.surgery.costs import LatencyComparison

__all__ = [
    "entropy_matrix",
    "load_run",
    "plot_accuracy",
    "plot_costs",
    "plot_entropy_heatmap",
    "plot_sparsity",
    "sparsity_matrix",
    "write_report",
]


def write_report(run_dir: PathLike, out: PathLike | None = None) -> Path:
    """Renders a run directory's plots (``plots/*.png``) and a Markdown report.

    The report has the key settings, the results (accuracy, sites removed, cost before -> after
    with ratios, why the run stopped), one row per iteration, and links to the plots. An
    incomplete run (no ``summary.json``) is reported as such, with the iterations so far.

    Args:
        run_dir: the run directory.
        out: the Markdown file (default: ``run_dir/report.md``). Plots always go to
            ``run_dir/plots``; the report links them by paths relative to ``out``.

    Returns:
        the Markdown file's path.

    Raises:
        FileNotFoundError: ``run_dir`` is not a run directory.
        ImportError: matplotlib is not installed.
    """
    run = load_run(run_dir)
    out = Path(out) if out is not None else run["path"] / "report.md"
    plots_dir = run["path"] / "plots"
    renders = (
        ("Accuracy vs sites linearized", plot_accuracy, "accuracy.png"),
        ("Layer entropy per iteration", plot_entropy_heatmap, "entropy.png"),
        ("Cost before vs after", plot_costs, "costs.png"),
        ("Sparsity per iteration", plot_sparsity, "sparsity.png"),
    )
    plots = [(title, written) for title, plot, name in renders if (written := plot(run, plots_dir / name)) is not None]
    text = "\n".join(_markdown(run, plots, out.parent)) + "\n"
    atomic_write(out, lambda f: f.write(text.encode()))
    return out


def _markdown(run: Run, plots: Sequence[tuple[str, Path]], base: Path) -> list[str]:
    config, summary, logs = run["config"], run["summary"], run["iterations"]
    title = " on ".join(str(config[k]) for k in ("model", "dataset") if config.get(k)) or run["path"].name
    lines = [f"# {runlog.method_label(run)} report: {title}", "", f"Run directory: `{run['path']}`", ""]
    if summary is None:
        banner = (f"> **Run incomplete**: no `summary.json` (interrupted, or still running). The tables report the "
                  f"{len(logs)} iteration(s) logged so far; the \"latest\" column is the last of them, which may be over budget.")
        lines += [banner, ""]
    lines += ["## Settings", "", *_settings(config), ""]
    lines += ["## Results", "", *_results(run), ""]
    lines += ["## Iterations", "", *_iterations(run), ""]
    if plots:
        lines += ["## Plots", ""]
        for title, path in plots:
            lines += [f"### {title}", "", f"![{title}]({Path(os.path.relpath(path, base)).as_posix()})", ""]
    return lines


def _settings(config: dict) -> list[str]:
    # the settings a reader looks for first, then everything else the run recorded
    first = ("method", "model", "dataset", "budget", "aggregate", "recipe", "protect", "max_iterations", "seed")
    keys = [k for k in first if k in config] + sorted(k for k in config if k not in first and k != "sites")
    rows = [(k, _setting(config[k]) + (" top-1 points" if k == "budget" and config[k] is not None else "")) for k in keys]
    if "sites" in config:
        rows.append(("sites", f"{len(config['sites'])}"))
    return _table(("setting", "value"), rows)


def _setting(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_setting(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "-"
    return str(value)


def _results(run: Run) -> list[str]:
    dense = runlog.dense_accuracy(run)
    accuracy, removed = runlog.final_result(run)
    before, after = runlog.before_after(run)
    after_label = "after" if run["summary"] is not None else f"latest (iteration {run['iterations'][-1]['iteration']})"
    rows = [("top-1 accuracy (%)", f"{dense:.2f}", f"{accuracy:.2f}", f"{accuracy - dense:+.2f} points")]
    example = runlog.example_label(run)
    for label, key in (("depth", "depth"), (f"MACs {example}", "macs"), ("params", "params"), (f"latency {example}", "latency_s")):
        rows.append((label, format_cost(key, before.get(key)), format_cost(key, after.get(key)),
                     cost_ratio(before.get(key), after.get(key), run, key)))
    ratio_label = "after / dense" if run["summary"] is not None else "latest / dense"
    lines = _table(("", "dense", after_label, ratio_label), rows, align="lrrr")
    names = ", ".join(f"`{name}`" for name in removed) or "none"
    if run["summary"] is None:
        stopped = "- (run incomplete)"
    else:
        stopped = run["summary"].get("stopped") or "-"
    lines += ["", f"**Sites removed:** {len(removed)}/{len(runlog.site_order(run))}: {names}", "", f"**Stopped:** {stopped}"]
    paired = (run["summary"] or {}).get("latency")
    if paired:  # the latency row's two medians come from these rounds
        lines += ["", f"**Latency, dense against returned model in paired rounds:** {LatencyComparison(**paired)}"]
    wall = sum(float(log.get("wall_s") or 0.0) for log in run["iterations"])
    if wall > 0:
        lines += ["", f"**Wall time (iterations):** {wall / 60:.1f} min"]
    return lines


def _iterations(run: Run) -> list[str]:
    logs, budget, dense = run["iterations"], runlog.budget(run), runlog.dense_accuracy(run)
    chosen = runlog.chosen_log(run)
    total = len(runlog.site_order(run))
    sparse = any(log.get("sparsity") is not None for log in logs)
    example = runlog.example_label(run)
    header = ["iteration", "removed (entropy, bits)", "linearized", "val top-1 (%)", "depth", f"MACs {example}", f"latency {example}"]
    header += ["sparsity"] if sparse else []
    rows = []
    for log in logs:
        entropies = log.get("entropies") or {}
        removed = ", ".join(f"`{n}` ({entropies[n]:.3f})" if entropies.get(n) is not None else f"`{n}`"
                            for n in log.get("removed") or []) or "-"
        notes = ["dense"] if log["iteration"] == 0 else []
        notes += ["chosen"] if log is chosen else []
        notes += ["over budget"] if budget is not None and dense - float(log["val_accuracy"]) > budget else []
        notes += ["undone: the next iteration starts from the last one kept"] if log.get("undone") else []
        notes += ["no finetune: a probe was within the budget"] if log.get("finetuned") is False else []
        for r in log.get("finetune") or []:  # an epoch that ran whole has no note (nor, in older runs, batches)
            if r.get("stopped") or r.get("truncated"):
                after = f" after {r['batches']} batch{'es' * (r['batches'] != 1)}" + (f" of epoch {r['epoch'] + 1}" if r["epoch"] else "")
                notes += [f"finetune ended at a check within the budget{after}" if r.get("stopped")
                          else f"finetune cut{after}: the run's max_finetune_epochs was spent"]
        row = [log["iteration"], removed, f"{len(log.get('linearized') or [])}/{total}",
               f"{float(log['val_accuracy']):.2f}" + (f" ({', '.join(notes)})" if notes else ""),
               format_cost("depth", log.get("depth")), format_cost("macs", log.get("macs")),
               format_cost("latency_s", log.get("latency_s"))]
        row += [f"{100 * float(log['sparsity']):.1f} %" if log.get("sparsity") is not None else "-"] if sparse else []
        rows.append(row)
    return _table(header, rows, align="rlrrrrr" + ("r" if sparse else ""))


# -- Markdown tables -------------------------------------------------------------------------------


def _cell(text: Any) -> str:
    # a '|' inside a cell would end it; newlines would end the row
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> list[str]:
    """A Markdown table; ``align`` is one of ``l``/``r`` per column (default: all left)."""
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(_cell(c) for c in line) + " |" for line in (header, rule, *rows)]
