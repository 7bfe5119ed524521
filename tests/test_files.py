"""lora_da.files.write_atomic, the one way lora-da writes a file or a folder: whole or not at
all, flushed before it is renamed into place, with the mode the umask gives a plain file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lora_da import files
from lora_da.files import write_atomic, write_text_atomic


@pytest.fixture(params=[0o022, 0o027, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_the_file_appears_only_complete(tmp_path):
    out = tmp_path / "out.bin"
    seen = []

    def write(tmp):
        with open(tmp, "wb") as f:
            for i in range(4):
                f.write(bytes([i]) * 1000)
                f.flush()
                seen.append(out.exists())  # the destination, while the data is being written
        assert Path(tmp).parent == out.parent and Path(tmp).name != out.name

    write_atomic(out, write)
    assert seen == [False] * 4
    assert out.read_bytes() == b"".join(bytes([i]) * 1000 for i in range(4))
    assert _listing(tmp_path) == ["out.bin"]


def test_a_replaced_file_is_old_or_new_never_a_part(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("old")
    seen = []

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("new, ")
            f.flush()
            seen.append(out.read_text())
            f.write("longer")

    write_atomic(out, write)
    assert seen == ["old"] and out.read_text() == "new, longer"


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt(), ValueError("bad")])
def test_a_failing_writer_leaves_no_file_and_no_temporary(tmp_path, existing, error):
    out = tmp_path / "out.bin"
    if existing:
        out.write_bytes(b"the old contents")
        os.chmod(out, 0o600)
        before = out.stat()

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise error

    with pytest.raises(type(error)):
        write_atomic(out, write)
    if existing:
        after = out.stat()
        assert out.read_bytes() == b"the old contents"
        assert (after.st_ino, after.st_mtime_ns, _mode(out)) == (before.st_ino, before.st_mtime_ns, 0o600)
        assert _listing(tmp_path) == ["out.bin"]
    else:
        assert _listing(tmp_path) == []


def test_a_failed_rename_leaves_no_temporary(tmp_path, monkeypatch):
    out = tmp_path / "out.txt"
    out.write_text("old")

    def no_rename(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError):
        write_text_atomic(out, "new")
    assert out.read_text() == "old" and _listing(tmp_path) == ["out.txt"]


def test_the_mode_follows_the_umask(tmp_path, umask):
    write_text_atomic(tmp_path / "a.txt", "x")  # mkstemp alone would leave 0600
    assert _mode(tmp_path / "a.txt") == 0o666 & ~umask
    (tmp_path / "b.txt").write_text("old")
    os.chmod(tmp_path / "b.txt", 0o600)
    write_atomic(tmp_path / "b.txt", lambda tmp: Path(tmp).write_text("new"))  # a replaced file too
    assert _mode(tmp_path / "b.txt") == 0o666 & ~umask

    def folder(tmp):
        (Path(tmp) / "f").write_text("x")

    write_atomic(tmp_path / "d", folder, directory=True)  # mkdtemp alone would leave 0700
    assert _mode(tmp_path / "d") == 0o777 & ~umask and _mode(tmp_path / "d" / "f") == 0o666 & ~umask


def test_the_data_is_flushed_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_text_atomic(tmp_path / "a.txt", "x")
    assert [e[0] for e in events] == ["fsync", "replace"] and events[0][1] == events[1][1]
    events.clear()

    def folder(tmp):
        (Path(tmp) / "f").write_text("x")
        (Path(tmp) / "g").write_text("y")

    write_atomic(tmp_path / "d", folder, directory=True)
    assert [e[0] for e in events] == ["fsync", "fsync", "replace"]
    assert {Path(e[1]).name for e in events[:2]} == {"f", "g"}


def test_a_folder_replaces_a_folder_and_a_failure_keeps_the_old_one(tmp_path, monkeypatch):
    out = tmp_path / "adapter"

    def folder_of(text):
        def write(tmp):
            (Path(tmp) / "w").write_text(text)

        return write

    write_atomic(out, folder_of("one"), directory=True)
    write_atomic(out, folder_of("two"), directory=True)
    assert (out / "w").read_text() == "two" and _listing(tmp_path) == ["adapter", "adapter/w"]

    def broken(tmp):
        (Path(tmp) / "w").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(out, broken, directory=True)
    assert (out / "w").read_text() == "two" and _listing(tmp_path) == ["adapter", "adapter/w"]

    real = os.replace

    def install_fails(src, dst):  # the new folder's rename fails, after the old one was set aside
        if Path(dst) == out and ".tmp-" in str(src):
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", install_fails)
    with pytest.raises(OSError):
        write_atomic(out, folder_of("three"), directory=True)
    assert (out / "w").read_text() == "two" and _listing(tmp_path) == ["adapter", "adapter/w"]


def test_a_statistics_file_follows_the_umask(tmp_path, umask):
    """Statistics.save went through mkstemp and a rename without a chmod: every statistics
    file was 0600, unreadable by the rest of a team, whatever the umask."""
    from helpers import TARGETS, batches, data, tiny_llama

    import lora_da

    ids, mask = data(n=2)
    stats = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 2), TARGETS, progress=False)
    stats.save(tmp_path / "s.safetensors")
    assert _mode(tmp_path / "s.safetensors") == 0o666 & ~umask
    assert _listing(tmp_path) == ["s.safetensors"]
    back = lora_da.Statistics.load(tmp_path / "s.safetensors")
    assert back.n_samples == stats.n_samples == 2


def test_the_text_writer_is_the_general_one(tmp_path, monkeypatch):
    calls = []
    real = files.write_atomic
    monkeypatch.setattr(files, "write_atomic", lambda *a, **k: (calls.append(a[0]), real(*a, **k)))
    write_text_atomic(tmp_path / "a.txt", "ü")
    assert calls == [tmp_path / "a.txt"] and (tmp_path / "a.txt").read_bytes() == "ü".encode()
