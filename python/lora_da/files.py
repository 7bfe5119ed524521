"""Files written whole, that a team can read.

Every output of lora-da is made by :func:`write_atomic`: written into a temporary
path in the destination's folder, flushed to disk, then renamed into place, so a
reader sees the old file or the complete new one, never a part, and a failed writer
leaves nothing behind. ``tempfile.mkstemp``/``mkdtemp`` create their paths
0600/0700 and a rename keeps the mode, so the helper gives the result the mode a
plain ``open``/``mkdir`` would have had under the umask, as ``save_pretrained`` does
(:func:`follow_umask`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable

_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask. Linux shows it in /proc (no change, so no race with other
    threads creating files); elsewhere it is set and restored under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_mode(directory: bool) -> int:
    """What ``open(path, "w")`` (0666) or ``os.mkdir`` (0777) would create under the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def follow_umask(path: str | os.PathLike) -> None:
    """Give a path made by ``mkstemp``/``mkdtemp`` the mode of a plainly created one."""
    os.chmod(path, default_mode(os.path.isdir(path)))


def temp_file_beside(path: str | os.PathLike, suffix: str = ".tmp") -> tuple[int, str]:
    """A new empty temporary file in ``path``'s folder (a rename from there is atomic):
    its open descriptor and its name, hidden and named after ``path``."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    return tempfile.mkstemp(prefix=f".{name}.tmp-", suffix=suffix, dir=folder or ".")


def install(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give the finished temporary ``tmp`` the umask's mode and rename it onto ``path``
    (replacing a file there in one step)."""
    follow_umask(tmp)
    os.replace(tmp, path)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a written file (or every file under a folder) to disk, so that the rename
    that follows never installs a name whose data a crash could still lose."""
    paths = [os.fspath(path)]
    if os.path.isdir(path):
        paths = [os.path.join(d, f) for d, _, files in os.walk(path) for f in files]
    for p in paths:
        fd = os.open(p, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[str], object], *, directory: bool = False,
                 suffix: str = ".tmp") -> None:
    """Make ``path`` whole or not at all: ``write(tmp)`` fills a new temporary file
    (with ``directory``, a new temporary folder) beside ``path``; it is flushed to disk,
    given the umask's mode and renamed onto ``path``. If ``write`` or anything after it
    fails, the temporary is removed and ``path`` is as it was.

    ``suffix`` ends the temporary file's name, for writers that choose the format by
    it (matplotlib's ``savefig``). A folder replacing an existing folder is swapped in
    through a hidden one beside it, and the old folder is put back if that fails.
    """
    path = os.fspath(path)
    if directory:
        folder, name = os.path.split(path)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=folder or ".")
    else:
        fd, tmp = temp_file_beside(path, suffix)
        os.close(fd)
    try:
        write(tmp)
        fsync_path(tmp)
        if directory:
            follow_umask(tmp)
            _replace_folder(tmp, path)
        else:
            install(tmp, path)
    except BaseException:
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def _replace_folder(tmp: str, path: str) -> None:
    """Rename the folder ``tmp`` onto ``path``; an existing folder there (a rename cannot
    replace a non-empty one) is first moved into a hidden folder beside it, and moved
    back if the rename fails, not stranded there."""
    if not (os.path.isdir(path) and not os.path.islink(path)):
        os.replace(tmp, path)
        return
    folder, name = os.path.split(path)
    old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=folder or ".")
    try:
        os.replace(path, os.path.join(old, "x"))
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(os.path.join(old, "x"), path)
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """``text`` (UTF-8) to ``path`` by :func:`write_atomic`."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomic(path, write)
