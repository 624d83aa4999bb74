"""The easier-ext command line: the whole job on the embedded digits with a tiny model, its parts,
and clear errors for bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from easier_ext.app.cli import main

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
    # the summary says each change one way round (before -> after), once
    assert "after/before" not in out and out.count("x fewer") == 2 and re.search(r"latency \(2 images\) +not measured", out)
    # MACs per image: half of what the summary.json's costs of the 2-image example input say
    macs = re.search(r"MACs/image +([0-9.]+) M -> ([0-9.]+) M", out)
    assert macs and float(macs.group(1)) == pytest.approx(summary["before"]["macs"] / 2 / 1e6, abs=0.05)
    assert summary["example_images"] == 2 and "| MACs (2 images) |" in (run_dir / "report.md").read_text()
    # the same command on the same directory is refused; --resume continues (nothing left to do here)
    assert main(run_args(model_file, run_dir)) == 2
    assert "already holds" in capsys.readouterr().err
    assert main(run_args(model_file, run_dir, "--resume")) == 0
    capsys.readouterr()
    # another model on this run is refused before its weights are loaded (the dense.pt of another architecture)
    other = tmp_path / "other_model.py"
    other.write_text(TINY_MODEL.replace("nn.Conv2d(8, 16, 1)", "nn.Conv2d(8, 16, 3, padding=1)"))
    assert main(run_args(f"{other}:tiny", run_dir, "--resume")) == 2
    assert re.search(r"another configuration \(differs in: model\b", capsys.readouterr().err)


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


UNTRACEABLE_MODEL = '''
import torch
from torch import nn

class Branchy(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, num_classes)

    def forward(self, x):
        h = self.conv(x)
        if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            h = torch.relu(h)
        return self.fc(h.mean((2, 3)))

def branchy(num_classes):
    return Branchy(num_classes)

def broken(num_classes):
    raise RuntimeError("factory failed on purpose")
'''


def cli_errors(tmp_path, model_file):
    """(arguments, expected message, exit status) of every CLI error path the run can meet."""
    models = tmp_path / "models.py"
    models.write_text(UNTRACEABLE_MODEL)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    no_cuda = [] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA GPU is available here", 2)]
    return [
        (["--max-iterations", "0"], r"--max-iterations must be an int >= 1 \(omit it for no cap\), got 0", 2),
        (["--patience", "-1"], "--patience must be an int >= 0", 2),
        (["--sites-per-step", "0"], "--sites-per-step must be an int >= 1 or 'auto', got 0", 2),
        (["--sites-per-step", "many"], "--sites-per-step must be an int >= 1 or 'auto', got 'many'", 2),
        (["--method", "nepenthe", "--sites-per-step", "2"], "--sites-per-step applies to --method easier only", 2),
        (["--method", "nepenthe", "--probe"], "--probe applies to --method easier only", 2),
        (["--early-stop", "-1"], r"--early-stop must be an int >= 0 \(batches between checks; 0: off\), got -1", 2),
        (["--max-finetune-epochs", "0"], r"--max-finetune-epochs must be a finite number > 0 \(omit it for no cap\), got 0\.0", 2),
        (["--image-size", "0"], "--image-size must be >= 1", 2),
        (["--measure-batches", "0"], r"--measure-batches must be an int >= 1 \(omit it to measure every batch\)", 2),
        (["--measure-batches", "-2"], "--measure-batches must be an int >= 1", 2),
        (["--batch-size", "0"], "--batch-size must be >= 1", 2),
        (["--protect", "nosuchsite"], r"cannot protect unknown sites \['nosuchsite'\]", 2),
        (["--device", "gpu7"], "--device gpu7 is not a device; expected cpu, cuda or cuda:N", 2),
        *no_cuda,
        (["--weights", str(corrupt)], f"--weights {corrupt} is not a state_dict torch.load can read", 2),
        (["--weights", str(wrong)], f"--weights {wrong} does not fit --model .*: keys .* missing", 2),
        (["--model", f"{models}:broken"], r"broken\(num_classes=10\) raised RuntimeError: factory failed on purpose", 2),
        (["--model", f"{models}:branchy"], "Branchy", 1),
        (["--pretrain-lr", "1e30"], "pretraining failed: non-finite training loss", 1),
        # a run directory that cannot be written (read-only, or under a file) fails before pretraining
        (["--run-dir", str(corrupt / "run")], f"Not a directory: {corrupt / 'run'}", 1),
    ]


@pytest.mark.parametrize("case", range(21))
def test_every_run_error_is_one_line_before_any_work(case, model_file, tmp_path, capsys):
    cases = cli_errors(tmp_path, model_file)
    if case >= len(cases):
        pytest.skip("no such case on this machine (CUDA is available)")
    extra, message, status = cases[case]
    run_dir = tmp_path / "run"
    assert main(run_args(model_file, run_dir, *extra)) == status
    err = capsys.readouterr().err
    assert err.startswith("easier-ext run: error:") and err.count("\n") == 1, err
    assert re.search(message, err), err
    # nothing but the configuration (a run that failed later is resumable): no weights, no checkpoint
    written = sorted(p.name for p in run_dir.rglob("*") if not p.name.startswith(".")) if run_dir.exists() else []
    assert written in ([], ["config.json"]), written
    if "pretraining" not in message:  # found before any work: not even the configuration is written
        assert written == []


SLOW_MODEL = TINY_MODEL.replace("from torch import nn", """import os, time
from torch import nn

class Sleep(nn.Module):  # makes the first run slow enough to be killed mid-pretraining
    def forward(self, x):
        time.sleep(float(os.environ.get("EASIER_EXT_TEST_SLEEP", 0)))
        return x
""").replace("nn.Sequential(", "nn.Sequential(Sleep(), ")


def test_kill_during_pretraining_then_resume_and_the_lock(tmp_path, capsys):
    model = tmp_path / "slow_model.py"
    model.write_text(SLOW_MODEL)
    run_dir = tmp_path / "run"
    args = run_args(f"{model}:tiny", run_dir, "--max-iterations", "1")
    code = f"import sys; from easier_ext.app.cli import main; sys.exit(main({args!r}))"
    env = {**os.environ, "EASIER_EXT_TEST_SLEEP": "1.0"}  # 46 s of pretraining: it is killed long before
    first = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "config.json").exists():  # written before pretraining starts
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.1)
        # a second run on the directory is refused while the first one holds it, and writes nothing
        assert main(args + ["--resume"]) == 2
        err = capsys.readouterr().err
        assert f"is in use by process {first.pid} on " in err and err.count("\n") == 1, err
        assert first.poll() is None and not (run_dir / "dense.pt").exists()  # still pretraining
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    leftover = run_dir / ".dense.pt.tmp-k1lled00"
    leftover.write_bytes(b"half")
    # the killed run resumes (its pretraining starts again) and its temporary files go
    assert main(args + ["--resume"]) == 0
    assert not leftover.exists() and (run_dir / "dense.pt").exists() and (run_dir / "summary.json").exists()
    assert json.loads((run_dir / "iterations" / "001.json").read_text())["iteration"] == 1


def test_fold_errors_are_one_line(model_file, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    assert main(["fold", str(junk)]) == 2
    err = capsys.readouterr().err
    assert f"{junk} is not a file torch.load can read" in err and err.count("\n") == 1
    run_dir = tmp_path / "run"
    assert main(run_args(model_file, run_dir, "--max-iterations", "1")) == 0
    capsys.readouterr()
    assert main(["fold", str(run_dir / "checkpoints" / "001.pt"), "--input-shape", "1", "5", "8", "8"]) == 2
    err = capsys.readouterr().err
    assert "the model cannot run on --input-shape 1 5 8 8" in err and err.count("\n") == 1, err


def test_debug_shows_the_traceback(model_file, tmp_path, monkeypatch, capsys):
    bad = run_args(model_file, tmp_path / "run", "--max-iterations", "0")
    with pytest.raises(ValueError, match="--max-iterations must be an int >= 1"):
        main(bad + ["--debug"])
    monkeypatch.setenv("EASIER_EXT_DEBUG", "1")
    with pytest.raises(ValueError, match="--max-iterations must be an int >= 1"):
        main(bad)
    monkeypatch.setenv("EASIER_EXT_DEBUG", "0")
    assert main(bad) == 2 and capsys.readouterr().err.count("\n") == 1


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["run", "--budget", "x"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err == "easier-ext run: error: argument --budget: invalid float value: 'x' (see easier-ext run --help)\n"


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for sub in ("run", "measure", "fold", "export", "report"):
        assert sub in out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for flag in ("--method", "--budget", "--zeta", "--allocation", "--layer-cap", "--temperature", "--patience", "--fold-aware",
                 "--fold-tolerance", "--pretrain-lr", "--resume", "--run-dir", "--debug"):
        assert flag in out, flag
    # a default is shown only where there is one, and once
    assert "(default: None)" not in out and "(default: False)" not in out
    for entry in re.split(r"\n  (?=-)", out):
        assert entry.count("default") <= 1, entry
    flat = " ".join(out.split())
    assert "(default: resnet18)" in flat and "later finetune may recover) (default: 0)" in flat


def test_schedule_flags_are_made_from_the_options(capsys):
    from dataclasses import fields

    from easier_ext.methods.easier import EasierOptions
    from easier_ext.methods.nepenthe import NepentheOptions

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    packed = "".join(capsys.readouterr().out.split())  # argparse wraps lines, at hyphens too
    for options in (EasierOptions, NepentheOptions):
        for f in fields(options):
            if f.metadata["cli"]:
                flag = "--" + f.name.replace("_", "-")
                assert flag in packed and "".join(f.metadata["help"].split()) in packed, flag
                if f.metadata["choices"]:
                    assert f"{flag}{{{','.join(f.metadata['choices'])}}}" in packed, flag
    assert "(default:easierwith--methodeasier,nepenthewith--methodnepenthe)" in packed  # the aggregate's, per method


@pytest.mark.parametrize(
    "extra, pretrain_lr",
    [(["--optimizer", "adamw", "--lr", "0.0005", "--pretrain-lr", "0.003"], 0.003),  # given
     (["--lr", "0.05"], 0.25),  # SGD's default: 5x the finetune lr
     (["--optimizer", "adamw", "--lr", "0.0005"], 0.0005)],  # AdamW's default: the finetune lr
)
def test_pretraining_learning_rate(model_file, tmp_path, monkeypatch, extra, pretrain_lr):
    import easier_ext.methods.train

    recipes = []
    real = easier_ext.methods.train.finetune

    def recording(model, loader, recipe, **kwargs):
        recipes.append(recipe)
        return real(model, loader, recipe, **kwargs)

    monkeypatch.setattr(easier_ext.methods.train, "finetune", recording)
    run_dir = tmp_path / "run"
    # the case's --lr comes after run_args' own (0.05), and the last one given counts
    assert main(run_args(model_file, run_dir, "--max-iterations", "1", *extra)) == 0
    pretraining = recipes[0]  # the CLI's dense pretraining comes first
    assert pretraining.lr == pytest.approx(pretrain_lr) and pretraining.schedule == "cosine" and pretraining.epochs == 2
    config = json.loads((run_dir / "config.json").read_text())
    assert config.get("pretrain_lr") == (0.003 if "--pretrain-lr" in extra else None)



def test_a_full_disk_is_one_line_before_any_work(model_file, tmp_path, monkeypatch, capsys):
    from easier_ext import rundir

    class Full:
        total, used, free = 1 << 40, 1 << 40, 0

    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda folder: Full)
    run_dir = tmp_path / "run"
    assert main(run_args(model_file, run_dir)) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"easier-ext run: error: no space for the run's checkpoints in \S+: about \d+ MiB needed, 0 MiB free; "
                        r"free some space or use another run directory\n", err), err
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == ["config.json"]  # resumable, nothing else
