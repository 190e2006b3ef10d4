"""
Durable writes: what every writer of shards, manifests, checkpoints and run files uses so that a crash (kill -9,
power loss, full disk) leaves either the old file or the complete new one, never a torn one.

    atomic_write_bytes(path, chunks)   temp file in the same directory -> write -> fsync -> rename -> fsync dir
    atomic_write_text(path, text)      the same for one UTF-8 string
    fsync_file(path)                   flush one existing file's data to the disk
    fsync_dir(directory)               make the renames and creations inside `directory` durable
    is_temp_file(name)                 whether a file name is one of atomic_write_bytes' temporary files

The temporary file is a hidden sibling, `.{name}.tmp-{pid}`, so it never matches a pattern that selects real files
(shards, checkpoints); one that is still there was left by a crash, and its directory's owner may delete it.

A rename is atomic on POSIX filesystems, but it is only durable once its directory is synced; a file's data is
only durable once the file itself is. Some filesystems cannot open a directory for reading (or fsync it); there the
directory sync is skipped, since nothing better is possible.
"""

import os
from pathlib import Path

_TEMP_MARK = ".tmp-"


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(directory: str | os.PathLike) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, chunks) -> None:
    """Write the byte chunks to `path` via temp file + fsync + rename (readers see the old file or the new one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{_TEMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def is_temp_file(name: str) -> bool:
    return name.startswith(".") and _TEMP_MARK in name


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, [text.encode("utf-8")])
