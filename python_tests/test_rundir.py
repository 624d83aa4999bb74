"""The run directory: config.json first, a lock that names its holder and dies with it, atomic
writes that honour the umask and leave nothing behind, and a clear error when the disk is full."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from easier_ext import rundir
from easier_ext.core.files import atomic_write
from easier_ext.methods.rundir import RunDir, RunDirError

CONFIG = {"model": "tiny", "budget": 1.0}


def hold_lock_in_subprocess(path, *, then="sleep"):
    """A process that opens the run directory and sleeps (to be killed), or exits at once."""
    code = textwrap.dedent(f"""
        import sys, time
        from easier_ext.methods.rundir import RunDir
        d = RunDir({str(path)!r}, {CONFIG!r}, resume=True)
        print("held", flush=True)
        if {then!r} == "sleep":
            time.sleep(60)
    """)
    # from outside the checkout, whose easier_ext/ source folder has no compiled module
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=path.parent)
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def test_config_json_is_written_first_and_a_new_folder_resumes_as_a_start(tmp_path):
    path = tmp_path / "run"
    with RunDir(path, CONFIG, resume=True) as d:  # an idempotent job script: --resume on a new folder starts
        assert json.loads((path / "config.json").read_text()) == CONFIG
        assert sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) == ["config.json"]
        assert d.iterations() == []
    # holding only its configuration (a run that failed before its first result), the folder is
    # opened again with or without resume, and with corrected settings
    RunDir(path, CONFIG).close()
    RunDir(path, {**CONFIG, "budget": 3.0}).close()
    assert json.loads((path / "config.json").read_text())["budget"] == 3.0
    RunDir(path, CONFIG).close()
    (path / "dense.pt").write_bytes(b"weights")
    with pytest.raises(RunDirError, match=r"already holds this run \(dense.pt\); pass resume"):
        RunDir(path, CONFIG)
    RunDir(path, CONFIG, resume=True).close()
    with pytest.raises(RunDirError, match="another configuration .*differs in: budget"):
        RunDir(path, {**CONFIG, "budget": 2.0}, resume=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="holds files but no config.json"):
        RunDir(other, CONFIG, resume=True)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]  # left as it was
    # an earlier version's run killed while pretraining: its weights, no configuration
    old = tmp_path / "old"
    old.mkdir()
    (old / "dense.pt").write_bytes(b"weights")
    with pytest.raises(RunDirError, match="holds files but no config.json"):
        RunDir(old, CONFIG)
    RunDir(old, CONFIG, resume=True).close()
    assert json.loads((old / "config.json").read_text()) == CONFIG and (old / "dense.pt").read_bytes() == b"weights"
    (old / "config.json").write_text("{not json")
    with pytest.raises(RunDirError, match="config.json is not valid JSON"):
        RunDir(old, CONFIG, resume=True)


def test_the_lock_names_its_holder_and_a_killed_holder_leaves_no_lock(tmp_path):
    path = tmp_path / "run"
    holder = hold_lock_in_subprocess(path)
    try:
        with pytest.raises(RunDirError, match=rf"in use by process {holder.pid} on "):
            RunDir(path, CONFIG, resume=True)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunDir(path, CONFIG, resume=True):  # the kernel released the killed process's lock
        # while this process holds it, another process is refused, and this one may open it again
        RunDir(path, CONFIG, resume=True).close()
        code = f"from easier_ext.methods.rundir import RunDir; RunDir({str(path)!r}, {CONFIG!r}, resume=True)"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode != 0 and f"in use by process {os.getpid()}" in done.stderr
    hold_lock_in_subprocess(path, then="exit").wait()  # released by close(): free again


def test_interrupted_writes_are_cleaned_on_opening_and_files_honour_the_umask(tmp_path):
    path = tmp_path / "run"
    RunDir(path, CONFIG).close()
    (path / "iterations").mkdir()
    # this version's names, and the earlier one's (".NAME.XXXXXXXX")
    leftovers = [path / ".summary.json.tmp-abc12345", path / "iterations" / ".001.json.tmp-x9y8z7w6", path / ".dense.pt.k3j_9a0b"]
    for p in leftovers:
        p.write_text("half")
    (path / ".keep-me").write_text("not ours")
    old = os.umask(0o022)
    try:
        RunDir(path, CONFIG, resume=True).close()
        assert not any(p.exists() for p in leftovers) and (path / ".keep-me").exists()
        assert (path / "config.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        atomic_write(path / "private.json", lambda f: f.write(b"{}"))
        assert (path / "private.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_a_full_disk_is_named_as_such(tmp_path, monkeypatch):
    def save(f):  # torch.save's own error for a failed write is a RuntimeError
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file data/0: file write failed")

    def usage(folder):  # full while the partial file is there, as when the disk filled up writing it
        return _Usage(0 if any(p.name.startswith(".model.pt.tmp-") for p in tmp_path.iterdir()) else 1 << 30)

    monkeypatch.setattr(rundir.shutil, "disk_usage", usage)
    with pytest.raises(OSError) as raised:
        atomic_write(tmp_path / "model.pt", save)
    assert raised.value.errno == errno.ENOSPC and "model.pt" in str(raised.value)
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone too
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: _Usage(0))
    with RunDir(tmp_path / "run", CONFIG) as d, pytest.raises(RunDirError, match=r"no space for the run's checkpoints .* about 2 MiB needed, 0 MiB free"):
        d.check_space(2 << 20)
    # a write that fails for another reason is not called a full disk
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: _Usage(1 << 40))
    with pytest.raises(RuntimeError, match="file write failed"):
        atomic_write(tmp_path / "model.pt", save)


class _Usage:
    def __init__(self, free):
        self.total, self.used, self.free = 1 << 40, 0, free


def test_checkpoints_still_round_trip(tmp_path):
    with RunDir(tmp_path, CONFIG) as d:
        d.save_iteration({"iteration": 0}, {"model": torch.nn.Linear(2, 2), "rng": None})
        assert [log["iteration"] for log in d.iterations()] == [0]
        assert isinstance(d.load_checkpoint(0)["model"], torch.nn.Linear)
