"""Report of a run directory: PNG plots and a Markdown summary.

A run directory (see :class:`easier_ext.methods.rundir.RunDir`) holds ``config.json``, one
``iterations/NNN.json`` log per iteration and, once the run has finished, ``summary.json``.
:func:`write_report` renders everything applicable into ``plots/*.png`` and ``report.md``; the
``plot_*`` functions and the pure helpers (:func:`load_run`, :func:`entropy_matrix`,
:func:`sparsity_matrix`) can be used on their own, e.g. in a notebook.

Plotting uses :class:`matplotlib.figure.Figure` directly, never pyplot: no backend is selected,
no global figure registry grows, so it is safe in headless jobs and in threads.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from easier_ext.surgery.costs import LatencyComparison, format_seconds
from easier_ext.core.files import atomic_write

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

PathLike = str | os.PathLike[str]
Run = dict[str, Any]

_DPI = 120
# cost quantities in the order the plot and the tables show them: (label, key in the logs)
_COSTS = (("MACs", "macs"), ("params", "params"), ("depth", "depth"), ("latency", "latency_s"))
# above this many cells the per-cell numbers of a heatmap are unreadable; colour alone then
_ANNOTATE_MAX_CELLS = 400


# -- loading ------------------------------------------------------------------------------------


def load_run(run_dir: PathLike) -> Run:
    """Reads a run directory's configuration, iteration logs and summary.

    Checkpoints are not read, and an iteration log counts even if its checkpoint was deleted
    (to save space, say): the report needs only the logs.

    Args:
        run_dir: the run directory.

    Returns:
        dict with ``"path"`` (the directory as a :class:`~pathlib.Path`), ``"config"`` (dict),
        ``"iterations"`` (the logs, sorted by iteration number) and ``"summary"`` (dict, or
        ``None`` when the run has not finished: interrupted, or still running).

    Raises:
        FileNotFoundError: ``run_dir`` does not exist, or has no ``config.json`` or no iteration
            log, i.e. is not a run directory.
        ValueError: a file of the run is not valid JSON.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a run directory: no such directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a run directory: it has no config.json")
    # only NNN.json: atomic writes leave dot-prefixed temporary files beside them
    files = [p for p in (path / "iterations").glob("*.json") if p.stem.isdigit()] if (path / "iterations").is_dir() else []
    if not files:
        raise FileNotFoundError(f"{path} is not a run directory: it has no iterations/NNN.json logs")
    iterations = []
    for file in files:
        log = _read_json(file)
        log.setdefault("iteration", int(file.stem))
        iterations.append(log)
    summary_path = path / "summary.json"
    return {
        "path": path,
        "config": _read_json(path / "config.json"),
        "iterations": sorted(iterations, key=lambda log: log["iteration"]),
        "summary": _read_json(summary_path) if summary_path.is_file() else None,
    }


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _as_run(run: Run | PathLike) -> Run:
    return run if isinstance(run, dict) else load_run(run)


# -- pure helpers ---------------------------------------------------------------------------------


def _site_order(run: Run) -> list[str]:
    """Every site, in execution order (the configuration's), then any the logs name beyond it."""
    order = list(run["config"].get("sites") or [])
    seen = set(order)
    for log in run["iterations"]:
        for name in [*(log.get("entropies") or {}), *(log.get("removed") or []), *(log.get("linearized") or [])]:
            if name not in seen:
                order.append(name)
                seen.add(name)
    return order


def entropy_matrix(run: Run | PathLike) -> tuple[list[str], list[int], np.ndarray]:
    """The entropies the heatmap shows: one row per site, one column per iteration from 1.

    Iteration 0 (the dense model) is left out: nothing is measured before it.

    Args:
        run: what :func:`load_run` returns, or a run directory.

    Returns:
        ``(sites, iterations, matrix)``: the site names in execution order, the iteration
        numbers, and a float array of shape ``(len(sites), len(iterations))`` with each site's
        entropy (bits) measured at the start of each iteration, NaN where it was not measured
        (the site was already linearized).

    Raises:
        FileNotFoundError: ``run`` is a path that is not a run directory.
    """
    run = _as_run(run)
    sites = _site_order(run)
    row = {name: i for i, name in enumerate(sites)}
    logs = [log for log in run["iterations"] if log["iteration"] >= 1]
    matrix = np.full((len(sites), len(logs)), np.nan)
    for j, log in enumerate(logs):
        for name, h in (log.get("entropies") or {}).items():
            if h is not None:
                matrix[row[name], j] = float(h)
    return sites, [log["iteration"] for log in logs], matrix


def sparsity_matrix(run: Run | PathLike) -> tuple[list[str], list[int], np.ndarray, np.ndarray] | None:
    """Per-layer and global sparsity over the iterations of a NEPENTHE run.

    Args:
        run: what :func:`load_run` returns, or a run directory.

    Returns:
        ``None`` when no log holds ``"sparsity"`` or ``"layer_sparsity"`` (an EASIER run);
        otherwise ``(layers, iterations, per_layer, overall)``: layer names in the order the
        logs first name them, every iteration number, a float array of shape
        ``(len(layers), len(iterations))`` and one of shape ``(len(iterations),)``, NaN where a
        log has no value.

    Raises:
        FileNotFoundError: ``run`` is a path that is not a run directory.
    """
    run = _as_run(run)
    logs = run["iterations"]
    if not any("sparsity" in log or "layer_sparsity" in log for log in logs):
        return None
    layers: list[str] = []
    for log in logs:
        layers += [name for name in (log.get("layer_sparsity") or {}) if name not in layers]
    row = {name: i for i, name in enumerate(layers)}
    per_layer = np.full((len(layers), len(logs)), np.nan)
    overall = np.full(len(logs), np.nan)
    for j, log in enumerate(logs):
        for name, s in (log.get("layer_sparsity") or {}).items():
            if s is not None:
                per_layer[row[name], j] = float(s)
        if log.get("sparsity") is not None:
            overall[j] = float(log["sparsity"])
    return layers, [log["iteration"] for log in logs], per_layer, overall


def _chosen_log(run: Run) -> dict | None:
    """The iteration the summary reports (its cumulative removals equal the summary's), if any."""
    summary = run["summary"]
    if summary is None:
        return None
    removed: list[str] = []
    for log in run["iterations"]:
        if log["iteration"] >= 1:
            removed = removed + list(log.get("removed") or [])
        if removed == list(summary.get("removed") or []):
            return log
    return None


def _dense_accuracy(run: Run) -> float:
    if run["summary"] is not None and "dense_accuracy" in run["summary"]:
        return float(run["summary"]["dense_accuracy"])
    return float(run["iterations"][0]["val_accuracy"])


def _final(run: Run) -> tuple[float, list[str]]:
    """The reported accuracy and removed sites: the summary's, else the latest iteration's."""
    if run["summary"] is not None:
        return float(run["summary"]["accuracy"]), list(run["summary"].get("removed") or [])
    last = run["iterations"][-1]
    return float(last["val_accuracy"]), list(last.get("linearized") or [])


def _before_after(run: Run) -> tuple[dict, dict]:
    """Costs of the dense and the reported model: the summary's, else the first and latest logs'."""
    summary = run["summary"]
    if summary is not None and "before" in summary and "after" in summary:
        return summary["before"], summary["after"]
    first, last = run["iterations"][0], run["iterations"][-1]
    return {k: first.get(k) for _, k in _COSTS}, {k: last.get(k) for _, k in _COSTS}


def _example(run: Run) -> str:
    """What the costs were measured on: the schedule's example input (the CLI's is 2 images)."""
    images = (run["summary"] or {}).get("example_images")
    return f"({images} image{'s' * (images != 1)})" if images else "(example input)"


def _budget(run: Run) -> float | None:
    budget = run["config"].get("budget")
    return float(budget) if isinstance(budget, (int, float)) and not isinstance(budget, bool) else None


def _method(run: Run) -> str:
    return str(run["config"].get("method") or "easier").upper()


# -- formatting ----------------------------------------------------------------------------------


def _count(n: float | None) -> str:
    """``11173962`` is ``"11.17 M"``, ``557`` is ``"557"``."""
    if n is None:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}"
    return f"{n:g}"


def _ratio(before: float | None, after: float | None, run: Run | None = None, key: str = "") -> str:
    if not _positive(before) or after is None:
        return "-"
    paired = (run["summary"] or {}).get("latency") if run is not None and key == "latency_s" else None
    if paired and not LatencyComparison(**paired).measurable:  # the two medians differ by noise only
        return "no measurable change"
    return f"{after / before:.2f}x"


def _positive(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def _format_cost(key: str, value: float | None) -> str:
    if key == "latency_s":
        return format_seconds(value)
    if key == "depth":
        return "-" if value is None else str(value)
    return _count(value)


def _cell(text: Any) -> str:
    # a '|' inside a cell would end it; newlines would end the row
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> list[str]:
    """A Markdown table; ``align`` is one of ``l``/``r`` per column (default: all left)."""
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(_cell(c) for c in line) + " |" for line in (header, rule, *rows)]


# -- plots ---------------------------------------------------------------------------------------


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
        run: what :func:`load_run` returns, or a run directory.
        path: the PNG to write (its folder is created).

    Returns:
        ``path``, or ``None`` (nothing written) when the run has no iteration after the dense one.

    Raises:
        ImportError: matplotlib is not installed.
        FileNotFoundError: ``run`` is a path that is not a run directory.
    """
    run = _as_run(run)
    sites, iterations, matrix = entropy_matrix(run)
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
    ax.set_title(f"{_method(run)}: layer entropy at the start of each iteration")
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
        run: what :func:`load_run` returns, or a run directory.
        path: the PNG to write (its folder is created).

    Returns:
        ``path``.

    Raises:
        ImportError: matplotlib is not installed.
        FileNotFoundError: ``run`` is a path that is not a run directory.
    """
    run = _as_run(run)
    logs = run["iterations"]
    x = [len(log.get("linearized") or []) for log in logs]
    y = [float(log["val_accuracy"]) for log in logs]
    dense, budget = _dense_accuracy(run), _budget(run)
    fig = _figure(6.4, 4.2)
    from matplotlib.ticker import MaxNLocator

    ax = fig.add_subplot()
    ax.plot(x, y, marker="o", color="tab:blue", label="validation top-1")
    ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense ({dense:.2f} %)")
    if budget is not None:
        ax.axhline(dense - budget, color="tab:red", linestyle=":", linewidth=1.2,
                   label=f"budget: dense - {budget:g} ({dense - budget:.2f} %)")
    if run["summary"] is not None:
        chosen = _chosen_log(run)
        accuracy, removed = _final(run)
        point = (len(chosen.get("linearized") or []), float(chosen["val_accuracy"])) if chosen else (len(removed), accuracy)
        ax.scatter(*point, s=180, marker="*", color="tab:orange", edgecolor="black", zorder=5,
                   label=f"chosen: {point[0]} linearized, {point[1]:.2f} %")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("sites linearized")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(f"{_method(run)}: accuracy vs sites linearized" + ("" if run["summary"] else " (run incomplete)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_costs(run: Run | PathLike, path: PathLike) -> Path:
    """Cost of the reported model relative to the dense one: MACs, params, depth, latency.

    Bars are normalized to the dense model (= 1) and annotated with the absolute values. A
    finished run compares the summary's ``before`` and ``after``; an incomplete one the first
    and the latest iteration. Quantities not measured (latency, often) are left out.

    Args:
        run: what :func:`load_run` returns, or a run directory.
        path: the PNG to write (its folder is created).

    Returns:
        ``path``.

    Raises:
        ImportError: matplotlib is not installed.
        FileNotFoundError: ``run`` is a path that is not a run directory.
    """
    run = _as_run(run)
    before, after = _before_after(run)
    shown = [(label, key) for label, key in _COSTS if _positive(before.get(key)) and after.get(key) is not None]
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
            text = _format_cost(key, value) + ("" if name == "before" else f"\n{_ratio(before[key], after[key], run, key)}")
            ax.text(i + dx, height, text, ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(shown)), [label for label, _ in shown])
    ax.set_ylim(0, top * 1.3)
    ax.set_ylabel("relative to dense")
    ax.set_title(f"{_method(run)}: cost before vs {after_label}")
    if shown:
        ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def plot_sparsity(run: Run | PathLike, path: PathLike) -> Path | None:
    """Sparsity over the iterations of a NEPENTHE run: global (line) and per layer (heatmap).

    Args:
        run: what :func:`load_run` returns, or a run directory.
        path: the PNG to write (its folder is created).

    Returns:
        ``path``, or ``None`` (nothing written) when the run logs no sparsity (an EASIER run).

    Raises:
        ImportError: matplotlib is not installed.
        FileNotFoundError: ``run`` is a path that is not a run directory.
    """
    run = _as_run(run)
    data = sparsity_matrix(run)
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
    line.set_title(f"{_method(run)}: sparsity over iterations")
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


# -- the report ----------------------------------------------------------------------------------


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
    lines = [f"# {_method(run)} report: {title}", "", f"Run directory: `{run['path']}`", ""]
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
    dense = _dense_accuracy(run)
    accuracy, removed = _final(run)
    before, after = _before_after(run)
    after_label = "after" if run["summary"] is not None else f"latest (iteration {run['iterations'][-1]['iteration']})"
    rows = [("top-1 accuracy (%)", f"{dense:.2f}", f"{accuracy:.2f}", f"{accuracy - dense:+.2f} points")]
    rows += [(label, _format_cost(key, before.get(key)), _format_cost(key, after.get(key)), _ratio(before.get(key), after.get(key), run, key))
             for label, key in (("depth", "depth"), (f"MACs {_example(run)}", "macs"), ("params", "params"),
                                (f"latency {_example(run)}", "latency_s"))]
    ratio_label = "after / dense" if run["summary"] is not None else "latest / dense"
    lines = _table(("", "dense", after_label, ratio_label), rows, align="lrrr")
    names = ", ".join(f"`{name}`" for name in removed) or "none"
    if run["summary"] is None:
        stopped = "- (run incomplete)"
    else:
        stopped = run["summary"].get("stopped") or "-"
    lines += ["", f"**Sites removed:** {len(removed)}/{len(_site_order(run))}: {names}", "", f"**Stopped:** {stopped}"]
    paired = (run["summary"] or {}).get("latency")
    if paired:  # the latency row's two medians come from these rounds
        lines += ["", f"**Latency, dense against returned model in paired rounds:** {LatencyComparison(**paired)}"]
    wall = sum(float(log.get("wall_s") or 0.0) for log in run["iterations"])
    if wall > 0:
        lines += ["", f"**Wall time (iterations):** {wall / 60:.1f} min"]
    return lines


def _iterations(run: Run) -> list[str]:
    logs, budget, dense = run["iterations"], _budget(run), _dense_accuracy(run)
    chosen = _chosen_log(run)
    total = len(_site_order(run))
    sparse = any(log.get("sparsity") is not None for log in logs)
    header = ["iteration", "removed (entropy, bits)", "linearized", "val top-1 (%)", "depth", f"MACs {_example(run)}",
              f"latency {_example(run)}"]
    header += ["sparsity"] if sparse else []
    rows = []
    for log in logs:
        entropies = log.get("entropies") or {}
        removed = ", ".join(f"`{n}` ({entropies[n]:.3f})" if entropies.get(n) is not None else f"`{n}`"
                            for n in log.get("removed") or []) or "-"
        notes = ["dense"] if log["iteration"] == 0 else []
        notes += ["chosen"] if log is chosen else []
        notes += ["over budget"] if budget is not None and dense - float(log["val_accuracy"]) > budget else []
        row = [log["iteration"], removed, f"{len(log.get('linearized') or [])}/{total}",
               f"{float(log['val_accuracy']):.2f}" + (f" ({', '.join(notes)})" if notes else ""),
               _format_cost("depth", log.get("depth")), _format_cost("macs", log.get("macs")),
               _format_cost("latency_s", log.get("latency_s"))]
        row += [f"{100 * float(log['sparsity']):.1f} %" if log.get("sparsity") is not None else "-"] if sparse else []
        rows.append(row)
    return _table(header, rows, align="rlrrrrr" + ("r" if sparse else ""))
