"""easier_ext.app.report on hand-written run directories: loading, the heatmap data, the PNGs and the
Markdown (numbers, links, incomplete runs, NEPENTHE sparsity)."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from easier_ext.app.report import (
    entropy_matrix,
    load_run,
    plot_accuracy,
    plot_costs,
    plot_entropy_heatmap,
    plot_sparsity,
    sparsity_matrix,
    write_report,
)

SITES = ["stem.relu", "block1.relu", "block2.relu", "block3.relu", "head.relu"]
BUDGET = 1.0
NAN = float("nan")

# entropies measured at the start of iterations 1..3; keys deliberately not in execution order,
# so the tests see that rows follow config["sites"], not the logs' dict order
ENTROPIES = {
    1: {"head.relu": 0.50, "block3.relu": 0.90, "block2.relu": 0.10, "block1.relu": 0.80, "stem.relu": 0.30},
    2: {"head.relu": 0.0, "block3.relu": 0.85, "block1.relu": 0.70, "stem.relu": 0.0},
    3: {"block3.relu": 0.75, "block1.relu": 0.60},
}
REMOVED = {0: [], 1: ["block2.relu"], 2: ["stem.relu", "head.relu"], 3: ["block1.relu"]}
ACCURACY = {0: 92.50, 1: 92.10, 2: 91.80, 3: 89.90}  # 3 is 2.60 points down: over the budget
MACS = {0: 556_650_000, 1: 500_000_000, 2: 420_000_000, 3: 400_000_000}
DEPTH = {0: 18, 1: 17, 2: 15, 3: 14}
LATENCY = {0: 0.0123, 1: 0.0110, 2: 0.0095, 3: 0.0090}
PARAMS = 11_173_962
CHOSEN = 2  # the most sites removed within the budget
LAYER_SPARSITY = {
    0: {"conv1": 0.0, "conv2": 0.0, "fc": 0.0},
    1: {"conv1": 0.10, "conv2": 0.25, "fc": 0.05},
    2: {"conv1": 0.20, "conv2": 0.40, "fc": 0.10},
    3: {"conv1": 0.30, "conv2": 0.55, "fc": 0.15},
}
SPARSITY = {0: 0.0, 1: 0.15, 2: 0.28, 3: 0.40}


def costs(k: int) -> dict:
    return {"params": PARAMS, "macs": MACS[k], "depth": DEPTH[k], "latency_s": LATENCY[k]}


def iteration_log(k: int, nepenthe: bool) -> dict:
    linearized = [name for i in range(1, k + 1) for name in REMOVED[i]]
    log = {
        "iteration": k, "removed": REMOVED[k], "linearized": linearized, "entropies": ENTROPIES.get(k, {}),
        "finetune": [] if k == 0 else [{"epoch": 0, "lr": 0.01, "loss": 0.5, "train_accuracy": 90.0, "seconds": 1.5}],
        "val_accuracy": ACCURACY[k], **costs(k), "wall_s": 0.0 if k == 0 else 12.0,
    }
    if nepenthe:
        log["sparsity"] = SPARSITY[k]
        log["layer_sparsity"] = LAYER_SPARSITY[k]
    return log


def make_run(path: Path, *, nepenthe: bool = False, finished: bool = True, iterations: int = 4) -> Path:
    """A run directory as EASIER (or NEPENTHE) writes it, JSON by hand; no checkpoints."""
    (path / "iterations").mkdir(parents=True)
    config = {"budget": BUDGET, "sites": SITES, "model": "resnet18", "dataset": "cifar10",
              "method": "nepenthe" if nepenthe else "easier", "aggregate": "easier", "seed": 0,
              "recipe": {"epochs": 1, "lr": 0.01}, "protect": []}
    (path / "config.json").write_text(json.dumps(config))
    for k in range(iterations):
        (path / "iterations" / f"{k:03d}.json").write_text(json.dumps(iteration_log(k, nepenthe)))
    if finished:
        summary = {
            "dense_accuracy": ACCURACY[0], "accuracy": ACCURACY[CHOSEN],
            "removed": [name for i in range(1, CHOSEN + 1) for name in REMOVED[i]],
            "before": costs(0), "after": costs(CHOSEN),
            "stopped": "accuracy 89.90 dropped 2.60 points below dense 92.50 (budget 1.0)",
        }
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_valid_png(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    width, height = png_size(path)
    assert 200 <= width <= 5000 and 150 <= height <= 5000, (width, height)
    assert path.stat().st_size > 2_000  # a blank figure is smaller than any real plot


def image_links(markdown: Path) -> list[Path]:
    return [markdown.parent / link for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown.read_text())]


# -- loading ------------------------------------------------------------------------------------


def test_load_run_sorts_and_ignores_temporary_files(tmp_path):
    run_dir = make_run(tmp_path / "run")
    # a temporary file atomic_write leaves while writing: not a log, and not valid JSON
    (run_dir / "iterations" / ".003.json.tmp1234").write_text("{half a log")
    run = load_run(run_dir)
    assert [log["iteration"] for log in run["iterations"]] == [0, 1, 2, 3]
    assert run["config"]["sites"] == SITES
    assert run["summary"]["accuracy"] == ACCURACY[CHOSEN]
    assert load_run(make_run(tmp_path / "partial", finished=False))["summary"] is None


@pytest.mark.parametrize("layout", ["missing", "empty", "config_only"])
def test_not_a_run_directory(tmp_path, layout):
    path = tmp_path / "not_a_run"
    if layout != "missing":
        path.mkdir()
    if layout == "config_only":
        (path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_run(path)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        write_report(path)


# -- the heatmap data -----------------------------------------------------------------------------


def test_entropy_matrix_matches_hand_built(tmp_path):
    sites, iterations, matrix = entropy_matrix(load_run(make_run(tmp_path / "run")))
    expected = np.array([
        # it 1  it 2  it 3
        [0.30, 0.00, NAN],  # stem.relu: linearized in 2
        [0.80, 0.70, 0.60],  # block1.relu: linearized in 3, measured before it
        [0.10, NAN, NAN],  # block2.relu: linearized in 1
        [0.90, 0.85, 0.75],  # block3.relu: never
        [0.50, 0.00, NAN],  # head.relu: linearized in 2
    ])
    assert sites == SITES
    assert iterations == [1, 2, 3]
    assert matrix.dtype == np.float64
    np.testing.assert_array_equal(matrix, expected)  # NaNs compare equal in place


def test_sparsity_matrix(tmp_path):
    assert sparsity_matrix(load_run(make_run(tmp_path / "easier"))) is None
    layers, iterations, per_layer, overall = sparsity_matrix(load_run(make_run(tmp_path / "nepenthe", nepenthe=True)))
    assert layers == ["conv1", "conv2", "fc"]
    assert iterations == [0, 1, 2, 3]
    np.testing.assert_array_equal(per_layer, [[LAYER_SPARSITY[k][name] for k in range(4)] for name in layers])
    np.testing.assert_array_equal(overall, [SPARSITY[k] for k in range(4)])


# -- plots ---------------------------------------------------------------------------------------


def test_plots_are_pngs(tmp_path):
    run = load_run(make_run(tmp_path / "run", nepenthe=True))
    for plot in (plot_entropy_heatmap, plot_accuracy, plot_costs, plot_sparsity):
        path = tmp_path / "out" / f"{plot.__name__}.png"
        assert plot(run, path) == path
        assert_valid_png(path)


def test_plots_skip_what_does_not_apply(tmp_path):
    run = load_run(make_run(tmp_path / "run"))
    assert plot_sparsity(run, tmp_path / "sparsity.png") is None
    assert not (tmp_path / "sparsity.png").exists()
    dense_only = load_run(make_run(tmp_path / "dense_only", finished=False, iterations=1))
    assert plot_entropy_heatmap(dense_only, tmp_path / "entropy.png") is None
    assert not (tmp_path / "entropy.png").exists()
    # the rest still draws with a single point and no summary
    assert_valid_png(plot_accuracy(dense_only, tmp_path / "accuracy.png"))
    assert_valid_png(plot_costs(dense_only, tmp_path / "costs.png"))


# -- the report ----------------------------------------------------------------------------------


def test_report_of_a_finished_run(tmp_path):
    run_dir = make_run(tmp_path / "run")
    out = write_report(run_dir)
    assert out == run_dir / "report.md"
    text = out.read_text()

    assert text.startswith("# EASIER report: resnet18 on cifar10")
    assert "incomplete" not in text.lower()
    # accuracy: dense, final, the change
    assert "92.50" in text and "91.80" in text and "-0.70 points" in text
    assert "3/5" in text
    for name in ("block2.relu", "stem.relu", "head.relu"):
        assert f"`{name}`" in text
    # cost ratios after/before, computed here from the raw numbers
    for before, after in ((MACS[0], MACS[CHOSEN]), (DEPTH[0], DEPTH[CHOSEN]), (LATENCY[0], LATENCY[CHOSEN]), (PARAMS, PARAMS)):
        assert f"{after / before:.2f}x" in text
    assert f"| depth | {DEPTH[0]} | {DEPTH[CHOSEN]} |" in text
    assert "556.65 M" in text and "420.00 M" in text and "11.17 M" in text
    assert "12.30 ms" in text and "9.50 ms" in text
    assert "budget 1.0" in text  # the stopped reason
    # the per-iteration table: one row per iteration, the chosen and the over-budget one marked
    rows = {int(m.group(1)): m.group(0) for m in re.finditer(r"^\| (\d+) \|.*$", text, flags=re.MULTILINE)}
    assert sorted(rows) == [0, 1, 2, 3]
    for k in range(4):
        assert f"{ACCURACY[k]:.2f}" in rows[k] and f"{len(iteration_log(k, False)['linearized'])}/5" in rows[k]
    assert "chosen" in rows[CHOSEN] and "over budget" in rows[3] and "over budget" not in rows[CHOSEN]
    assert "`block2.relu` (0.100)" in rows[1]
    # plots: the EASIER ones, linked relatively, all there and valid
    links = image_links(out)
    assert {p.name for p in links} == {"accuracy.png", "entropy.png", "costs.png"}
    assert all(not Path(link).is_absolute() for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text))
    for link in links:
        assert link.resolve().parent == (run_dir / "plots").resolve()
        assert_valid_png(link)
    assert not (run_dir / "plots" / "sparsity.png").exists()


def test_report_of_an_incomplete_run(tmp_path):
    run_dir = make_run(tmp_path / "run", finished=False, iterations=3)
    text = write_report(run_dir).read_text()
    assert "incomplete" in text.lower()
    assert "latest (iteration 2)" in text
    assert "3/5" in text and "91.80" in text
    rows = re.findall(r"^\| (\d+) \|", text, flags=re.MULTILINE)
    assert rows == ["0", "1", "2"]
    assert "chosen" not in text
    assert f"{MACS[2] / MACS[0]:.2f}x" in text
    for link in image_links(run_dir / "report.md"):
        assert_valid_png(link)


def test_report_of_a_nepenthe_run(tmp_path):
    run_dir = make_run(tmp_path / "run", nepenthe=True)
    out = write_report(run_dir)
    text = out.read_text()
    assert text.startswith("# NEPENTHE report")
    assert {p.name for p in image_links(out)} == {"accuracy.png", "entropy.png", "costs.png", "sparsity.png"}
    assert_valid_png(run_dir / "plots" / "sparsity.png")
    assert f"{100 * SPARSITY[3]:.1f} %" in text  # the sparsity column


def test_report_elsewhere_links_back_to_the_plots(tmp_path):
    run_dir = make_run(tmp_path / "run")
    out = write_report(run_dir, out=tmp_path / "reports" / "run.md")
    assert out == tmp_path / "reports" / "run.md" and out.is_file()
    assert not (run_dir / "report.md").exists()
    links = image_links(out)
    assert len(links) == 3
    for link in links:
        assert_valid_png(link)
