"""Files written whole or not at all: an interrupted write leaves the old file (or none) and a
temporary file that :func:`remove_temporary_files` recognises."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "remove_temporary_files"]

# atomic_write's temporary files: ".NAME.tmp-XXXXXXXX" next to NAME (".NAME.XXXXXXXX" before 0.1.0's
# lock), NAME being one of the files a run writes
_TMP_INFIX = ".tmp-"
_TEMPORARY = re.compile(r"^\..+\.(json|pt|md|png|csv)\.(tmp-)?[A-Za-z0-9_]{8}$")


def atomic_write(path: Path, write) -> None:
    """Writes a file so that it is either the old one or the complete new one, never half of it.

    Args:
        path: the destination.
        write: called with a binary file object opened in the destination's folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_TMP_INFIX}", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600; a plain open would honour the umask
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # checked before the partial file goes, since deleting it frees space again
        full = isinstance(e, Exception) and not isinstance(e, OSError) and _disk_full(path.parent)
        if os.path.exists(tmp):
            os.unlink(tmp)
        if full:  # torch.save reports a failed write as a RuntimeError ("file write failed")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        if isinstance(e, OSError) and e.filename is None:  # fsync/flush name no file
            e.filename = str(path)
        raise


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (setting it to read it
    back would race with threads creating files meanwhile)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _disk_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def remove_temporary_files(folder: Path) -> list[Path]:
    """Deletes what interrupted :func:`atomic_write` calls left in ``folder`` and its subfolders.
    Only call it while no other process writes there (holding the run directory's lock).

    Returns:
        the files removed.
    """
    removed = [p for p in Path(folder).rglob(".*") if p.is_file() and _TEMPORARY.match(p.name)]
    for p in removed:
        p.unlink()
    return removed
