"""
A lock file per directory, so that two processes never write one run (or shard) directory at once.

    with DirectoryLock(out_dir, "training"):   # DIR/.lock; a second holder is refused with LockError
        ...

The file DIR/.lock holds one JSON line naming its holder: {"host", "pid", "slurm_job_id", "what", "since"}; an
empty file is a free lock (release empties the file rather than deleting it, so that every process locks the same
inode). Two mechanisms together:

  - flock on the file: exact exclusion between processes of one host (and across hosts where the filesystem
    supports it); the kernel drops it when its holder dies, even by kill -9.
  - the holder's identity and a heartbeat (a thread touches the file's mtime every `heartbeat_s` seconds): a lock
    left by a process that died on another host, where flock may be local to each host, is recognised as stale.

A lock that names someone else is taken over, with one line on stderr saying whose and why, when its holder is
gone: a dead pid on this host, the same Slurm job (a requeued job resumes on whichever node it gets), or no
heartbeat for `stale_s` seconds. Otherwise LockError names the holder and the file.
"""

import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from errors import UserError

LOCK_NAME = ".lock"


class LockError(UserError):
    """The directory is in use by another live process."""


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # exists under another user, or not a pid we can judge: assume alive
    return True


def _describe(holder) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("since", 0)))
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"{holder.get('what', 'a run')} by pid {holder.get('pid')} on host {holder.get('host')}{job} since {since}"


class DirectoryLock:
    def __init__(self, directory, what="a run", heartbeat_s=30.0, stale_s=300.0):
        self.path = Path(directory) / LOCK_NAME
        self.what, self.heartbeat_s, self.stale_s = what, heartbeat_s, stale_s
        self._fd = None
        self._stop = threading.Event()
        self._thread = None

    def _holder(self):
        os.lseek(self._fd, 0, os.SEEK_SET)
        text = os.read(self._fd, 1 << 16).decode("utf-8", "replace").strip()
        if not text:
            return None
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            return {"what": "an unreadable lock", "host": "?", "pid": None}
        return holder if isinstance(holder, dict) else {"what": "an unreadable lock", "host": "?", "pid": None}

    def _stale_reason(self, holder):
        """Why `holder` is gone (a string), or None while it may still be running."""
        if holder.get("host") == socket.gethostname():
            return None if _pid_alive(holder.get("pid")) else "that process is not running"
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job_id") == job:
            return "this is the same Slurm job, requeued"
        age = time.time() - os.fstat(self._fd).st_mtime
        return f"its heartbeat stopped {age:.0f} s ago" if age > self.stale_s else None

    def acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder() or {}
            self._close()
            raise LockError(f"{self.path.parent} is in use: {_describe(holder)} (lock {self.path})") from None
        holder = self._holder()
        if holder is not None:
            reason = self._stale_reason(holder)
            if reason is None:
                self._close()
                raise LockError(f"{self.path.parent} is in use: {_describe(holder)} (lock {self.path}; delete it "
                                f"only if that process is gone)")
            print(f"taking over the lock {self.path} of {_describe(holder)}: {reason}", file=sys.stderr)
        me = dict(host=socket.gethostname(), pid=os.getpid(), slurm_job_id=os.environ.get("SLURM_JOB_ID"),
                  what=self.what, since=time.time())
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(self._fd)
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self):
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self._fd)
            except OSError:
                pass  # a transient filesystem error; the next beat tries again

    def _close(self):
        if self._fd is not None:
            os.close(self._fd)  # also drops the flock
            self._fd = None

    def release(self):
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        os.ftruncate(self._fd, 0)  # empty = free; the file stays so that every holder locks one inode
        os.fsync(self._fd)
        self._close()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
