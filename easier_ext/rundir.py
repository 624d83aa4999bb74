"""A run directory: its configuration, atomic writes, per-iteration logs and checkpoints."""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["RunDir", "RunDirError", "atomic_write", "is_main_process", "rng_state", "seed_everything", "set_rng_state"]


class RunDirError(ValueError):
    """The run directory cannot be used for this run (another configuration, or not resumable)."""


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def atomic_write(path: Path, write) -> None:
    """Writes a file so that it is either the old one or the complete new one, never half of it.

    Args:
        path: the destination.
        write: called with a binary file object opened in the destination's folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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

    Args:
        path: the folder (created when missing).
        config: what identifies the run (JSON-able). A folder holding another configuration is
            refused, so one run never overwrites another's results.
        resume: continue the run the folder holds; without it, a folder that already holds
            iterations is refused.

    Raises:
        RunDirError: see ``config`` and ``resume``.
    """

    def __init__(self, path, config: dict, *, resume: bool = False) -> None:
        self.path = Path(path)
        self.config = json.loads(json.dumps(config))  # what it will read back as
        saved = self.path / "config.json"
        if saved.exists():
            theirs = json.loads(saved.read_text())
            if theirs != self.config:
                diff = sorted(k for k in set(theirs) | set(self.config) if theirs.get(k) != self.config.get(k))
                raise RunDirError(
                    f"{self.path} holds a run with another configuration (differs in: {', '.join(diff)}); "
                    "use another run directory, or the same settings to resume it"
                )
            if self.iterations() and not resume:
                raise RunDirError(f"{self.path} already holds {len(self.iterations())} iterations of this run; pass resume to continue it, or use another directory")
        elif resume and self.path.exists() and any(self.path.iterdir()):
            raise RunDirError(f"{self.path} is not a run directory (no config.json); cannot resume from it")
        if is_main_process():
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write(saved, lambda f: f.write(json.dumps(self.config, indent=2, sort_keys=True).encode()))

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

    def save_model(self, name: str, model: torch.nn.Module) -> Optional[Path]:
        if not is_main_process():
            return None
        path = self.path / name
        atomic_write(path, lambda f: torch.save(model, f))
        return path
