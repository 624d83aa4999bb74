"""The figures of a run's report: PNG plots of accuracy, layer entropy, cost and sparsity.

Each ``plot_*`` function takes a loaded run (see :func:`easier_ext.app.runlog.load_run`) or a run
directory and writes one PNG; :func:`easier_ext.app.report.write_report` calls them all, and they
can be used on their own, e.g. in a notebook.

Plotting uses :class:`matplotlib.figure.Figure` directly, never pyplot: no backend is selected,
no global figure registry grows, so it is safe in headless jobs and in threads.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from easier_ext.app import runlog
from easier_ext.app.formatting import cost_ratio, format_cost, is_positive
from easier_ext.app.runlog import PathLike, Run
from easier_ext.core.files import atomic_write

__all__ = ["plot_accuracy", "plot_costs", "plot_entropy_heatmap", "plot_sparsity"]

_DPI = 120
# above this many cells the per-cell numbers of a heatmap are unreadable; colour alone then
_ANNOTATE_MAX_CELLS = 400


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("easier_ext.app.report needs matplotlib for its plots: pip install matplotlib") from e
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: PathLike) -> Path:
    # written atomically, so a killed job never leaves half a PNG for the report to link; a bare
    # Figure belongs to no pyplot registry, so dropping the reference is all "closing" it takes
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=_DPI))
    fig.clear()
    return path


def plot_entropy_heatmap(run: Run | PathLike, path: PathLike) -> Path | None:
    """Each site's entropy at the start of each iteration, as a heatmap.

    Rows are the sites in execution order, columns the iterations; the colour is the layer
    entropy on a fixed 0..1 bit scale (so runs compare at a glance), grey where the site was
    already linearized, and the site(s) each iteration linearized are outlined.

    Args:
        run: what :func:`~easier_ext.app.runlog.load_run` returns, or a run directory.
        path: the PNG to write (its folder is created).

    Returns:
        ``path``, or ``None`` (nothing written) when the run has no iteration after the dense one.

    Raises:
        ImportError: matplotlib is not installed.
        FileNotFoundError: ``run`` is a path that is not a run directory.
    """
    run = runlog.as_run(run)
    sites, iterations, matrix = runlog.entropy_matrix(run)
    if not iterations or not sites:
        return None
    fig = _figure(min(30.0, max(5.5, 3.0 + 0.45 * len(iterations))), min(30.0, 1.8 + 0.28 * len(sites)))
    import matplotlib
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="layer entropy (bits)")
    row = {name: i for i, name in enumerate(sites)}
    logs = [log for log in run["iterations"] if log["iteration"] >= 1]
    for j, log in enumerate(logs):
        for name in log.get("removed") or []:
            ax.add_patch(Rectangle((j - 0.5, row[name] - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    if matrix.size <= _ANNOTATE_MAX_CELLS:
        for (i, j), h in np.ndenumerate(matrix):
            if not math.isnan(h):
                # dark text on the bright (high) end of viridis, light text on the dark end
                ax.text(j, i, f"{h:.2f}", ha="center", va="center", fontsize=6, color="black" if h > 0.6 else "white")
    ax.set_xticks(range(len(iterations)), [str(k) for k in iterations])
    ax.set_yticks(range(len(sites)), sites, fontsize=7 if len(sites) > 20 else 8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("site (execution order)")
    ax.set_title(f"{runlog.method_label(run)}: layer entropy at the start of each iteration")
    # below the plot, never over cells; "outside" asks the constrained layout to make room
    fig.legend(handles=[Line2D([], [], marker="s", markersize=9, markerfacecolor="none", markeredgecolor="red",
                               linestyle="none", label="linearized in this iteration")],
               loc="outside lower center", fontsize=7, frameon=False)
    return _save(fig, path)


def plot_accuracy(run: Run | PathLike, path: PathLike) -> Path:
    """Validation accuracy against the number of sites linearized.

    Shows the dense accuracy, the budget (dense minus ``config["budget"]``) and, for a finished
    run, the operating point the summary reports.

    Args:
        run: what :func:`~easier_ext.app.runlog.load_run` returns, or a run directory.
        path: the PNG to write (its folder is created).

    Returns:
        ``path``.

    Raises:
        ImportError: matplotlib is not installed.
        FileNotFoundError: ``run`` is a path that is not a run directory.
    """
    run = runlog.as_run(run)
    logs = run["iterations"]
    x = [len(log.get("linearized") or []) for log in logs]
    y = [float(log["val_accuracy"]) for log in logs]
    dense, budget = runlog.dense_accuracy(run), runlog.budget(run)
    fig = _figure(6.4, 4.2)
    from matplotlib.ticker import MaxNLocator

    ax = fig.add_subplot()
    ax.plot(x, y, marker="o", color="tab:blue", label="validation top-1")
    ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense ({dense:.2f} %)")
    if budget is not None:
        ax.axhline(dense - budget, color="tab:red", linestyle=":", linewidth=1.2,
                   label=f"budget: dense - {budget:g} ({dense - budget:.2f} %)")
    if run["summary"] is not None:
        chosen = runlog.chosen_log(run)
        accuracy, removed = runlog.final_result(run)
        point = (len(chosen.get("linearized") or []), float(chosen["val_accuracy"])) if chosen else (len(removed), accuracy)
        ax.scatter(*point, s=180, marker="*", color="tab:orange", edgecolor="black", zorder=5,
                   label=f"chosen: {point[0]} linearized, {point[1]:.2f} %")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("sites linearized")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(f"{runlog.method_label(run)}: accuracy vs sites linearized" + ("" if run["summary"] else " (run incomplete)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_costs(run: Run | PathLike, path: PathLike) -> Path:
    """Cost of the reported model relative to the dense one: MACs, params, depth, latency.

    Bars are normalized to the dense model (= 1) and annotated with the absolute values. A
    finished run compares the summary's ``before`` and ``after``; an incomplete one the first
    and the latest iteration. Quantities not measured (latency, often) are left out.

    Args:
        run: what :func:`~easier_ext.app.runlog.load_run` returns, or a run directory.
        path: the PNG to write (its folder is created).

    Returns:
        ``path``.

    Raises:
        ImportError: matplotlib is not installed.
        FileNotFoundError: ``run`` is a path that is not a run directory.
    """
    run = runlog.as_run(run)
    before, after = runlog.before_after(run)
    shown = [(label, key) for label, key in runlog.COSTS if is_positive(before.get(key)) and after.get(key) is not None]
    after_label = "after" if run["summary"] is not None else f"iteration {run['iterations'][-1]['iteration']} (latest)"
    fig = _figure(1.8 + 1.5 * max(len(shown), 1), 4.2)
    ax = fig.add_subplot()
    width = 0.38
    top = 1.0
    for i, (_, key) in enumerate(shown):
        ratio = after[key] / before[key]
        top = max(top, ratio)
        for dx, value, height, colour, name in ((-width / 2, before[key], 1.0, "tab:grey", "before"),
                                                 (width / 2, after[key], ratio, "tab:blue", after_label)):
            ax.bar(i + dx, height, width, color=colour, label=name if i == 0 else None)
            text = format_cost(key, value) + ("" if name == "before" else f"\n{cost_ratio(before[key], after[key], run, key)}")
            ax.text(i + dx, height, text, ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(shown)), [label for label, _ in shown])
    ax.set_ylim(0, top * 1.3)
    ax.set_ylabel("relative to dense")
    ax.set_title(f"{runlog.method_label(run)}: cost before vs {after_label}")
    if shown:
        ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def plot_sparsity(run: Run | PathLike, path: PathLike) -> Path | None:
    """Sparsity over the iterations of a NEPENTHE run: global (line) and per layer (heatmap).

    Args:
        run: what :func:`~easier_ext.app.runlog.load_run` returns, or a run directory.
        path: the PNG to write (its folder is created).

    Returns:
        ``path``, or ``None`` (nothing written) when the run logs no sparsity (an EASIER run).

    Raises:
        ImportError: matplotlib is not installed.
        FileNotFoundError: ``run`` is a path that is not a run directory.
    """
    run = runlog.as_run(run)
    data = runlog.sparsity_matrix(run)
    if data is None:
        return None
    layers, iterations, per_layer, overall = data
    columns = np.arange(len(iterations))
    heights = [1.0] + ([max(2.0, 0.25 * len(layers))] if layers else [])
    fig = _figure(min(30.0, max(5.5, 3.5 + 0.45 * len(iterations))), min(30.0, 1.2 + 1.6 + (0.28 * len(layers) if layers else 0)))
    import matplotlib

    axes = fig.subplots(len(heights), 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    line = axes[0]
    if np.isfinite(overall).any():
        line.plot(columns, overall, marker="o", color="tab:purple")
    line.set_ylim(-0.02, 1.02)
    line.set_ylabel("global\nsparsity")
    line.grid(alpha=0.3)
    line.set_title(f"{runlog.method_label(run)}: sparsity over iterations")
    if layers:
        heat = axes[1]
        cmap = matplotlib.colormaps["magma"].with_extremes(bad="lightgrey")
        image = heat.imshow(np.ma.masked_invalid(per_layer), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        # one colorbar beside both panels keeps them equally wide, so the shared columns line up
        fig.colorbar(image, ax=list(axes), label="layer sparsity")
        heat.set_yticks(range(len(layers)), layers, fontsize=7 if len(layers) > 20 else 8)
        heat.set_ylabel("layer")
    axes[-1].set_xticks(columns, [str(k) for k in iterations])
    axes[-1].set_xlabel("iteration")
    return _save(fig, path)
