"""Files a team can read: outputs follow the umask, as ``save_pretrained`` does.

Every output is written to a temporary path and renamed into place (no partial
file), but ``tempfile.mkstemp``/``mkdtemp`` create their paths 0600/0700 and a
rename keeps the mode, so a finished output would stay private to its writer.
:func:`follow_umask` gives such a path the mode a plain ``open``/``mkdir`` would
have had.
"""

from __future__ import annotations

import os
import tempfile
import threading

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


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """``text`` to ``path`` atomically (a temporary file in the same folder, then a
    rename), with the umask's mode, not mkstemp's 0600."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".lora_da_", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
