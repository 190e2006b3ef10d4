"""lockfile.DirectoryLock: one holder per directory; a second is refused naming the first; a lock left by a dead
process (this host's pid, the same Slurm job, or a stopped heartbeat) is taken over with a message."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from helpers import REPO, child_env
from lockfile import LOCK_NAME, DirectoryLock, LockError


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_holder(directory, **holder):
    (directory / LOCK_NAME).write_text(json.dumps(dict(what="training", since=0, **holder)) + "\n")


def test_second_holder_is_refused_naming_the_first(tmp_path):
    with DirectoryLock(tmp_path, "training"):
        held = json.loads((tmp_path / LOCK_NAME).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(LockError, match=rf"in use: training by pid {os.getpid()} on host "):
            DirectoryLock(tmp_path, "training").acquire()
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released: empty, the file kept
    with DirectoryLock(tmp_path, "training"):
        pass


def test_dead_pid_on_this_host_is_taken_over(tmp_path, capsys):
    pid = dead_pid()
    write_holder(tmp_path, host=socket.gethostname(), pid=pid)
    with DirectoryLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"taking over the lock {tmp_path / LOCK_NAME} of training by pid {pid}" in err
    assert "that process is not running" in err


def test_live_holder_on_another_host_is_refused_until_its_heartbeat_stops(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    write_holder(tmp_path, host="node-elsewhere", pid=1234)
    with pytest.raises(LockError, match="training by pid 1234 on host node-elsewhere .*only if that process is gone"):
        DirectoryLock(tmp_path, stale_s=300).acquire()
    old = time.time() - 600
    os.utime(tmp_path / LOCK_NAME, (old, old))
    with DirectoryLock(tmp_path, stale_s=300):
        pass
    assert "its heartbeat stopped" in capsys.readouterr().err


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    write_holder(tmp_path, host="node-before-requeue", pid=99, slurm_job_id="4242")
    with DirectoryLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["slurm_job_id"] == "4242"
    assert "same Slurm job" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    write_holder(tmp_path, host="node-before-requeue", pid=99, slurm_job_id="4242")
    with pytest.raises(LockError, match="Slurm job 4242"):
        DirectoryLock(tmp_path).acquire()


def test_heartbeat_touches_the_file(tmp_path):
    lock = DirectoryLock(tmp_path, heartbeat_s=0.05).acquire()
    try:
        old = time.time() - 100
        os.utime(tmp_path / LOCK_NAME, (old, old))
        time.sleep(0.3)
        assert time.time() - (tmp_path / LOCK_NAME).stat().st_mtime < 5
    finally:
        lock.release()


@pytest.mark.slow
def test_a_holder_killed_with_sigkill_leaves_a_lock_the_next_run_takes(tmp_path):
    code = ("import sys, time; from lockfile import DirectoryLock; DirectoryLock(sys.argv[1], 'training').acquire(); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=child_env(), cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=f"pid {proc.pid}"):
            DirectoryLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()
    with DirectoryLock(tmp_path):
        pass
