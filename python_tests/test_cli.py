"""The easier-ext command line: the whole job on the embedded digits with a tiny model, its parts,
and clear errors for bad input."""

import json
import re
import subprocess
import sys

import pytest

from easier_ext.cli import main

TINY_MODEL = '''
from torch import nn

def tiny(num_classes):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )
'''


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "tiny_model.py"
    path.write_text(TINY_MODEL)
    return f"{path}:tiny"


def run_args(model_file, run_dir, *extra):
    return ["run", "--model", model_file, "--dataset", "digits", "--image-size", "8", "--pretrain-epochs", "2",
            "--epochs", "1", "--lr", "0.05", "--max-iterations", "2", "--budget", "50", "--no-latency", "--quiet",
            "--run-dir", str(run_dir), *extra]


def test_run_writes_a_complete_run_directory(model_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(run_args(model_file, run_dir)) == 0
    out = capsys.readouterr().out
    assert "dense top-1" in out and "sites removed" in out and "depth" in out
    for name in ("config.json", "summary.json", "final_folded.pt", "final_linearized.pt", "report.md", "iterations/000.json",
                 "iterations/002.json", "checkpoints/002.pt"):
        assert (run_dir / name).exists(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["removed"]) >= 2 and summary["after"]["depth"] <= summary["before"]["depth"]
    assert summary["finetune_epochs"] == 2  # --epochs 1, --max-iterations 2
    assert list((run_dir / "plots").glob("*.png"))
    # the folded model loads and runs without easier_ext
    code = (
        "import sys, torch; sys.modules['easier_ext'] = None\n"
        f"m = torch.load({str(run_dir / 'final_folded.pt')!r}, weights_only=False)\n"
        "print(tuple(m(torch.randn(2, 3, 8, 8)).shape))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "(2, 10)", done.stderr
    # the same command on the same directory is refused; --resume continues (nothing left to do here)
    assert main(run_args(model_file, run_dir)) == 2
    assert "already holds" in capsys.readouterr().err
    assert main(run_args(model_file, run_dir, "--resume")) == 0


def test_measure_and_fold_and_report(model_file, tmp_path, capsys):
    assert main(["measure", "--model", model_file, "--image-size", "8", "--measure-batches", "2", "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["site", "entropy"] and len(out) == 1 + 3
    run_dir = tmp_path / "run"
    assert main(run_args(model_file, run_dir)) == 0
    capsys.readouterr()
    assert main(["fold", str(run_dir / "checkpoints" / "001.pt"), "--input-shape", "1", "3", "8", "8"]) == 0
    assert (run_dir / "checkpoints" / "001_folded.pt").exists()
    assert "depth" in capsys.readouterr().out
    assert main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip().endswith("report.md")


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--model", "no_such_net", "--quiet"], "unknown model 'no_such_net'"),
        (["run", "--dataset", "mnist", "--quiet"], "unknown dataset"),
        (["run", "--budget", "150", "--quiet"], r"--budget must be in \[0, 100\]"),
        (["run", "--pretrain-lr", "0", "--quiet"], "--pretrain-lr must be a finite number > 0"),
        (["run", "--dataset", "cifar10", "--data-root", "/nonexistent/cifar", "--quiet"], "/nonexistent/cifar"),
        (["fold", "/nonexistent/ckpt.pt"], "does not exist"),
        (["run", "--model", "vgg11", "--image-size", "8", "--quiet"], r"cannot run on \(3, 8, 8\) inputs of digits .*--image-size"),
    ],
)
def test_bad_input_gives_a_clear_error(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"easier-ext {args[0]}: error:")
    assert re.search(message, err), err


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for sub in ("run", "measure", "fold", "report"):
        assert sub in out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for flag in ("--method", "--budget", "--zeta", "--allocation", "--layer-cap", "--temperature", "--patience", "--fold-aware",
                 "--fold-tolerance", "--pretrain-lr", "--resume", "--run-dir"):
        assert flag in out, flag


@pytest.mark.parametrize(
    "extra, pretrain_lr",
    [(["--optimizer", "adamw", "--lr", "0.0005", "--pretrain-lr", "0.003"], 0.003),  # given
     (["--lr", "0.05"], 0.25),  # SGD's default: 5x the finetune lr
     (["--optimizer", "adamw", "--lr", "0.0005"], 0.0005)],  # AdamW's default: the finetune lr
)
def test_pretraining_learning_rate(model_file, tmp_path, monkeypatch, extra, pretrain_lr):
    import easier_ext.train

    recipes = []
    real = easier_ext.train.finetune

    def recording(model, loader, recipe, **kwargs):
        recipes.append(recipe)
        return real(model, loader, recipe, **kwargs)

    monkeypatch.setattr(easier_ext.train, "finetune", recording)
    run_dir = tmp_path / "run"
    # the case's --lr comes after run_args' own (0.05), and the last one given counts
    assert main(run_args(model_file, run_dir, "--max-iterations", "1", *extra)) == 0
    pretraining = recipes[0]  # the CLI's dense pretraining comes first
    assert pretraining.lr == pytest.approx(pretrain_lr) and pretraining.schedule == "cosine" and pretraining.epochs == 2
    config = json.loads((run_dir / "config.json").read_text())
    assert config.get("pretrain_lr") == (0.003 if "--pretrain-lr" in extra else None)

