"""Atomic file writes: every file this project saves (aligners, shards, checkpoints' state files, metrics, images)
goes through here."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path


def current_umask() -> int:
    """The process umask: from /proc/self/status where Linux gives it (no side effect), else by setting it and putting
    it back (POSIX has no read-only call; another thread creating a file in that instant would get 022)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's entries') data to the disk, so a rename after it survives a power loss."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # a folder cannot be opened on some systems (Windows): nothing to flush there
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call write(temp_path) in the target folder, flush it to the disk, then rename onto `path`: a crash, a power
    loss or a failed write never leaves a half-written file under the final name, and the temp file is removed on
    failure. A `path` that is a symlink is written through: its target is replaced, the link kept.

    The final file gets the mode an ordinary open() would give it (0666 minus the umask), not mkstemp's 0600, so a
    shared models folder stays readable by the users it was readable by.
    """
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp_name))
        os.chmod(tmp_name, 0o666 & ~current_umask())  # after the write: safetensors' save_file makes its own 0600 file
        fsync_path(tmp_name)
        os.replace(tmp_name, path)
        fsync_path(path.parent)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """write_atomic for a text file (UTF-8)."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def same_file(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Whether two paths name the same file: the same path written another way, a symlink or a hard link."""
    first, second = Path(first), Path(second)
    if first.exists() and second.exists():
        return os.path.samefile(first, second)
    return first.resolve() == second.resolve()


_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # mkstemp's 8 random characters between prefix and suffix


def is_temp_name(name: str) -> bool:
    """Whether `name` is one of write_atomic's temp files (`.NAME.XXXXXXXX.tmp`), left behind only by a killed
    process (a user's own `.notes.tmp` is not one)."""
    return bool(_TEMP_NAME.match(name))


def apply_umask(folder: str | os.PathLike) -> None:
    """Give every file under `folder` the mode open() would (0666 minus the umask): for files libraries write with
    0600 of their own (safetensors' save_file, inside accelerate's checkpoints)."""
    mode = 0o666 & ~current_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file():
            os.chmod(path, mode)
