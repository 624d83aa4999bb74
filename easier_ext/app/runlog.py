"""A run directory read back: its logs, and the numbers the report and the plots derive from them.

A run directory (see :class:`easier_ext.methods.rundir.RunDir`) holds ``config.json``, one
``iterations/NNN.json`` log per iteration and, once the run has finished, ``summary.json``.
:func:`load_run` reads it into a plain dict (a :data:`Run`); the other functions are pure
queries on that dict, shared by :mod:`easier_ext.app.report` and :mod:`easier_ext.app.plots`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "COSTS",
    "PathLike",
    "Run",
    "as_run",
    "before_after",
    "budget",
    "chosen_log",
    "dense_accuracy",
    "entropy_matrix",
    "example_label",
    "final_result",
    "load_run",
    "method_label",
    "site_order",
    "sparsity_matrix",
]

PathLike = str | os.PathLike[str]
Run = dict[str, Any]

#: Cost quantities in the order the plot and the tables show them: ``(label, key in the logs)``.
COSTS = (("MACs", "macs"), ("params", "params"), ("depth", "depth"), ("latency", "latency_s"))


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


def as_run(run: Run | PathLike) -> Run:
    """A loaded run as it is, or a run directory loaded, so callers accept either.

    Args:
        run: what :func:`load_run` returns, or a run directory.

    Returns:
        the run, as :func:`load_run` returns it.

    Raises:
        FileNotFoundError: ``run`` is a path that is not a run directory.
    """
    return run if isinstance(run, dict) else load_run(run)


# -- matrices -------------------------------------------------------------------------------------


def site_order(run: Run) -> list[str]:
    """Every site, in execution order (the configuration's), then any the logs name beyond it.

    Args:
        run: what :func:`load_run` returns.

    Returns:
        the site names, each once.
    """
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
    run = as_run(run)
    sites = site_order(run)
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
    run = as_run(run)
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


# -- results ------------------------------------------------------------------------------------


def chosen_log(run: Run) -> dict | None:
    """The iteration the summary reports (its cumulative removals equal the summary's), if any.

    Args:
        run: what :func:`load_run` returns.

    Returns:
        that iteration's log, or ``None`` for an unfinished run or when no iteration matches.
    """
    summary = run["summary"]
    if summary is None:
        return None
    removed: list[str] = []
    for log in run["iterations"]:
        if log["iteration"] >= 1 and not log.get("undone"):  # an undone iteration's sites came back
            removed = removed + list(log.get("removed") or [])
        if removed == list(summary.get("removed") or []):
            return log
    return None


def dense_accuracy(run: Run) -> float:
    """The dense model's validation accuracy: the summary's, else iteration 0's.

    Args:
        run: what :func:`load_run` returns.

    Returns:
        the accuracy in percent.
    """
    if run["summary"] is not None and "dense_accuracy" in run["summary"]:
        return float(run["summary"]["dense_accuracy"])
    return float(run["iterations"][0]["val_accuracy"])


def final_result(run: Run) -> tuple[float, list[str]]:
    """The reported accuracy and removed sites: the summary's, else the latest iteration's.

    Args:
        run: what :func:`load_run` returns.

    Returns:
        ``(accuracy in percent, names of the sites removed)``.
    """
    if run["summary"] is not None:
        return float(run["summary"]["accuracy"]), list(run["summary"].get("removed") or [])
    last = run["iterations"][-1]
    return float(last["val_accuracy"]), list(last.get("linearized") or [])


def before_after(run: Run) -> tuple[dict, dict]:
    """Costs of the dense and the reported model: the summary's, else the first and latest logs'.

    Args:
        run: what :func:`load_run` returns.

    Returns:
        ``(before, after)``: dicts keyed by the log keys of :data:`COSTS`; a value is ``None``
        (or the key is missing) where it was not measured.
    """
    summary = run["summary"]
    if summary is not None and "before" in summary and "after" in summary:
        return summary["before"], summary["after"]
    first, last = run["iterations"][0], run["iterations"][-1]
    return {k: first.get(k) for _, k in COSTS}, {k: last.get(k) for _, k in COSTS}


def example_label(run: Run) -> str:
    """What the costs were measured on: the schedule's example input (the CLI's is 2 images).

    Args:
        run: what :func:`load_run` returns.

    Returns:
        e.g. ``"(2 images)"``, or ``"(example input)"`` when the summary does not say.
    """
    images = (run["summary"] or {}).get("example_images")
    return f"({images} image{'s' * (images != 1)})" if images else "(example input)"


def budget(run: Run) -> float | None:
    """The accuracy budget the run was given.

    Args:
        run: what :func:`load_run` returns.

    Returns:
        the budget in top-1 points, or ``None`` when the configuration has no numeric one.
    """
    value = run["config"].get("budget")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def method_label(run: Run) -> str:
    """The method's name as titles show it.

    Args:
        run: what :func:`load_run` returns.

    Returns:
        e.g. ``"EASIER"`` or ``"NEPENTHE"`` (EASIER when the configuration does not say).
    """
    return str(run["config"].get("method") or "easier").upper()
