"""Atomic file writes: a temp file in the target's directory, fsync, rename over the target.

The file is written inside a temp directory ``.<name>.<pid>.<random>.tmp`` next to the target (so
whatever the writer itself creates beside it, e.g. safetensors' own temp file, stays inside). A
process killed mid-write (SIGKILL, power loss) cannot remove its own; the next write to the same
target removes those whose process is gone, so kills leave no litter behind for long. A replaced
file keeps its permission bits; a new one gets the usual ``0o666 & ~umask``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` to fill a temp file next to ``path``, then replace ``path`` with it.

    A failing ``write`` leaves an existing ``path`` untouched (the temp file is removed). The rename
    is made durable where the platform can fsync a directory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    tmp = folder / path.name
    try:
        write(str(tmp))
        os.chmod(tmp, _mode_for(path))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    try:  # make the rename itself durable (best effort: not every platform can open a directory)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def _mode_for(path: Path) -> int:
    """The permission bits the written file gets: the replaced file's, else 0o666 minus the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def temp_files(path: str | os.PathLike) -> list[Path]:
    """Temp directories :func:`atomic_write` may have left next to ``path`` (of any process)."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[^.]+\.tmp")
    if not path.parent.is_dir():
        return []
    return [p for p in path.parent.iterdir() if pattern.fullmatch(p.name)]


def remove_stale_temps(path: str | os.PathLike) -> int:
    """Remove temp files of writes to ``path`` whose process no longer runs; returns how many."""
    removed = 0
    for tmp in temp_files(path):
        pid = int(tmp.name.rsplit(".", 3)[-3])
        if pid != os.getpid() and not _alive(pid):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    except OSError:
        return False
    return True
