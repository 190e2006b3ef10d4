"""Tests of durable.py: atomic replacement (old file or complete new one, never a torn one, no temp file left)."""

import os

import pytest

import durable


def test_atomic_write_bytes_replaces_the_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    durable.atomic_write_bytes(path, [b"new ", memoryview(b"content"), b""])
    assert path.read_bytes() == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_failed_write_keeps_the_old_file_and_removes_the_temp_file(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("old")
    seen = []

    def chunks():
        yield b"half of the new "
        seen.extend(p.name for p in tmp_path.iterdir())
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        durable.atomic_write_bytes(path, chunks())
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    staged = [name for name in seen if name != "manifest.json"]
    assert len(staged) == 1 and durable.is_temp_file(staged[0])  # the write went to a hidden sibling


def test_failed_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def refuse(src, dst):
        raise PermissionError(f"cannot rename {src} to {dst}")

    monkeypatch.setattr(durable.os, "replace", refuse)
    with pytest.raises(PermissionError):
        durable.atomic_write_bytes(path, [b"new"])
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_interrupt_during_write_cleans_up_too(tmp_path):
    def chunks():
        yield b"x"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        durable.atomic_write_bytes(tmp_path / "new.bin", chunks())
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_text_round_trips_utf8(tmp_path):
    text = "naïve café, 東京, 🙂\nsecond line\n"
    durable.atomic_write_text(tmp_path / "t.txt", text)
    assert (tmp_path / "t.txt").read_bytes() == text.encode("utf-8")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == text


def test_file_data_and_directory_are_synced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd)
        real_fsync(fd)

    monkeypatch.setattr(durable.os, "fsync", recording_fsync)
    durable.atomic_write_bytes(tmp_path / "a.bin", [b"data"])
    assert len(synced) == 2  # the temporary file's data, then the directory holding the rename
    if os.path.exists("/proc/self/fd"):
        assert durable.is_temp_file(os.path.basename(synced[0])) and synced[1] == os.path.realpath(tmp_path)
    durable.fsync_file(tmp_path / "a.bin")
    durable.fsync_dir(tmp_path)
    assert len(synced) == 4


def test_fsync_dir_skips_what_cannot_be_opened_and_fsync_file_needs_the_file(tmp_path):
    durable.fsync_dir(tmp_path / "missing")  # nothing to sync, nothing better to do: no error
    with pytest.raises(FileNotFoundError):
        durable.fsync_file(tmp_path / "missing.bin")


@pytest.mark.parametrize("name, temp", [
    (".a.bin.tmp-123", True), (".manifest.json.tmp-9", True),
    ("a.bin", False), (".lock", False), ("manifest.json", False), ("x.tmp-1", False),
])
def test_is_temp_file(name, temp):
    assert durable.is_temp_file(name) is temp
