"""A run directory: its configuration, a lock, atomic writes, per-iteration logs and checkpoints."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import socket
import weakref
from pathlib import Path
from typing import Any, Optional

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not protected from each other there
    fcntl = None

import numpy as np
import torch
import torch.distributed as dist

from easier_ext.core.files import atomic_write, remove_temporary_files
from easier_ext.core.runtime import is_main_process

__all__ = [
    "RunDir", "RunDirError", "RunLock", "rng_state", "seed_everything",
    "set_rng_state",
]


class RunDirError(ValueError):
    """The run directory cannot be used for this run (another configuration, not resumable,
    taken by another process, or too little free space)."""


LOCK_NAME = ".lock"


class RunLock:
    """An exclusive advisory lock (``lockf``) on ``FOLDER/.lock`` that names its holder.

    The kernel releases it when the holding process exits, however it exits, so a lock left by a
    killed run is never in the way; a ``lockf`` lock belongs to the process, so forked data-loader
    workers do not keep it after their parent is killed (``flock`` would). One process may open it
    again (the same lock, counted).

    Args:
        folder: the run directory (created when missing).

    Raises:
        RunDirError: another process holds it; the message names that process.
    """

    _held: dict[Path, list] = {}  # folder -> [file object, references]

    def __init__(self, folder) -> None:
        self.folder = Path(folder).resolve()
        held = self._held.get(self.folder)
        if held is None:
            held = [self._acquire(self.folder), 0]
            self._held[self.folder] = held
        held[1] += 1
        self._release = weakref.finalize(self, RunLock._drop, self.folder)

    def release(self) -> None:
        """Gives the lock up (once per :class:`RunLock`; the last one releases it)."""
        self._release()

    @classmethod
    def _drop(cls, folder: Path) -> None:
        held = cls._held.get(folder)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del cls._held[folder]
            held[0].close()  # closing the file releases the lock

    @staticmethod
    def _acquire(folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        f = open(folder / LOCK_NAME, "a+")
        if fcntl is None:
            return f
        try:
            fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                f.close()
                raise
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirError(f"{folder} is in use by {holder}; wait for that run to end, or use another run directory") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        return f


def rng_state() -> dict:
    """Every random generator a run draws from, so that a resumed run draws the same numbers."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_everything(seed: int) -> None:
    """Seeds torch (all devices), Python's and NumPy's generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RunDir:
    """``config.json``, ``iterations/NNN.json`` (one log per iteration), ``checkpoints/NNN.pt``.

    Opening one takes the folder's lock (:class:`RunLock`, rank 0 only) and writes
    ``config.json`` before anything else, so that a run killed at any later point can be resumed;
    it also deletes the temporary files of writes a kill interrupted. :meth:`close` (or the end of
    the process) releases the lock.

    Args:
        path: the folder (created when missing).
        config: what identifies the run (JSON-able). A folder holding another configuration is
            refused, so one run never overwrites another's results.
        resume: continue the run the folder holds (a new or empty folder starts one); without it,
            a folder that holds more than its configuration is refused.

    Raises:
        RunDirError: see ``config`` and ``resume``; another process holds the folder.
    """

    def __init__(self, path, config: dict, *, resume: bool = False) -> None:
        self.path = Path(path)
        self.config = json.loads(json.dumps(config))  # what it will read back as
        self._lock = None
        error = None
        if is_main_process():
            fresh = not (self.path / LOCK_NAME).exists()
            self._lock = RunLock(self.path)
            try:
                self._open(resume)
            except Exception as e:
                error = e
                self.close()
                if fresh and not (self.path / "config.json").exists():
                    (self.path / LOCK_NAME).unlink(missing_ok=True)  # leave a folder we refused as it was
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # rank 0 alone reads and writes the folder; every rank fails together or goes on together
            shared = [None if error is None else str(error)]
            dist.broadcast_object_list(shared, src=0)
            if shared[0] is not None and error is None:
                raise RunDirError(shared[0])
        if error is not None:
            raise error

    def _open(self, resume: bool) -> None:
        saved = self.path / "config.json"
        if saved.exists():
            try:
                theirs = json.loads(saved.read_text())
            except ValueError:
                raise RunDirError(f"{saved} is not valid JSON (a file not written by easier_ext?); use another run directory") from None
            contents = self._contents()
            if theirs != self.config and contents:
                diff = sorted(k for k in set(theirs) | set(self.config) if theirs.get(k) != self.config.get(k))
                raise RunDirError(
                    f"{self.path} holds a run with another configuration (differs in: {', '.join(diff)}); "
                    "use another run directory, or the same settings to resume it"
                )
            if not resume and contents:
                raise RunDirError(
                    f"{self.path} already holds this run ({', '.join(contents)}); pass resume (--resume) "
                    "to continue it, or use another directory"
                )
            # holding only a configuration (a run that failed before its first result), it takes this one
        elif self.path.exists():
            files = sorted(p.name for p in self.path.iterdir() if not p.name.startswith("."))
            # a run of easier_ext < 0.1.0 killed while pretraining left its weights without a configuration
            if files and not (resume and files == ["dense.pt"]):
                raise RunDirError(f"{self.path} holds files but no config.json, so it is not a run directory; use a new or empty one")
        remove_temporary_files(self.path)
        atomic_write(saved, lambda f: f.write(json.dumps(self.config, indent=2, sort_keys=True).encode()))

    def _contents(self) -> list[str]:
        """What the folder holds besides its configuration, in words."""
        done = len(self.iterations())
        files = sorted(p.name for p in self.path.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != "config.json")
        return files + ([f"{done} iterations"] if done else [])

    def close(self) -> None:
        """Releases the folder's lock (idempotent)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_space(self, nbytes: int) -> None:
        """Raises :class:`RunDirError` when the folder's file system has less than ``nbytes`` free."""
        free = shutil.disk_usage(self.path).free
        if free < nbytes:
            raise RunDirError(
                f"no space for the run's checkpoints in {self.path}: about {nbytes / 2**20:.0f} MiB needed, "
                f"{free / 2**20:.0f} MiB free; free some space or use another run directory"
            )

    def iterations(self) -> list[dict]:
        """The logs of the completed iterations, in order."""
        folder = self.path / "iterations"
        if not folder.exists():
            return []
        logs = [json.loads(p.read_text()) for p in sorted(folder.glob("[0-9][0-9][0-9].json"))]
        # an iteration is complete when its checkpoint is there too (the log is written after it)
        return [log for log in logs if self.checkpoint_path(log["iteration"]).exists()]

    def checkpoint_path(self, iteration: int) -> Path:
        return self.path / "checkpoints" / f"{iteration:03d}.pt"

    def save_iteration(self, log: dict, checkpoint: dict) -> None:
        """The checkpoint, then the log that marks the iteration complete (rank 0 only)."""
        if not is_main_process():
            return
        atomic_write(self.checkpoint_path(log["iteration"]), lambda f: torch.save(checkpoint, f))
        atomic_write(self.path / "iterations" / f"{log['iteration']:03d}.json", lambda f: f.write(json.dumps(log, indent=2).encode()))

    def load_checkpoint(self, iteration: int) -> dict[str, Any]:
        return torch.load(self.checkpoint_path(iteration), weights_only=False)

    def write_json(self, name: str, data: Any) -> None:
        if is_main_process():
            atomic_write(self.path / name, lambda f: f.write(json.dumps(data, indent=2).encode()))

    def save_state_dict(self, name: str, state: dict) -> None:
        """Writes a state_dict (e.g. the pretrained dense weights), rank 0 only."""
        if is_main_process():
            atomic_write(self.path / name, lambda f: torch.save(state, f))

    def save_model(self, name: str, model: torch.nn.Module) -> Optional[Path]:
        if not is_main_process():
            return None
        path = self.path / name
        atomic_write(path, lambda f: torch.save(model, f))
        return path
