"""The exclusive output lock of a run directory: across processes, after SIGKILL and fork, umask, stale records,
unsupported file systems and the opt-out environment variable."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import lock as lock_mod
from core.errors import DinoscopeError
from core.lock import DIR_LOCK_NAME, OutputLock, exclusive_lock, lock_file_for

REPO = Path(__file__).resolve().parents[2]

# A second process trying the same lock; exit 2 with the message on a DinoscopeError, like the CLI. With a second
# argument it holds the lock, says "ready" and sleeps, so the test can SIGKILL it while it holds the lock.
CHILD = """
import sys, time
from core.errors import DinoscopeError
from core.lock import exclusive_lock
try:
    with exclusive_lock(sys.argv[1], what="run directory", is_dir=True) as info:
        print("ready", info.pid, flush=True)
        if len(sys.argv) > 2:
            time.sleep(float(sys.argv[2]))
except DinoscopeError as err:
    print(err, file=sys.stderr)
    sys.exit(2)
"""


def _child(target: Path, *extra: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(lock_mod.NO_LOCK_ENV, None)
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(target), *extra],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def _run_child(target: Path) -> tuple[int, str, str, float]:
    start = time.monotonic()
    proc = _child(target)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err, time.monotonic() - start


@pytest.fixture(autouse=True)
def _lock_enabled(monkeypatch):
    monkeypatch.delenv(lock_mod.NO_LOCK_ENV, raising=False)


# ---------------------------------------------------------------------------------------------------- lock
def test_lock_file_location(tmp_path):
    assert lock_file_for(tmp_path) == tmp_path / DIR_LOCK_NAME
    assert lock_file_for(tmp_path / "pred.tif") == tmp_path / ".pred.tif.lock"
    assert lock_file_for(tmp_path / "new_run") == tmp_path / "new_run" / DIR_LOCK_NAME
    assert lock_file_for(tmp_path / "runs" / "v1.5", is_dir=True) == tmp_path / "runs" / "v1.5" / DIR_LOCK_NAME
    with exclusive_lock(tmp_path / "a" / "b" / "out.zarr", is_dir=False) as info:
        assert info.lock_file == tmp_path / "a" / "b" / ".out.zarr.lock" and info.lock_file.is_file()


def test_second_process_fails_at_once_naming_holder_then_succeeds(tmp_path):
    run = tmp_path / "run"
    with exclusive_lock(run, what="run directory", is_dir=True) as info:
        assert info.locked and info.pid == os.getpid()
        record = json.loads((run / DIR_LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["argv"] == sys.argv and record["started"] and record["user"]
        code, _, err, elapsed = _run_child(run)
        assert code == 2, err
        assert elapsed < 5
        assert f"locked by pid {os.getpid()} on host {socket.gethostname()}" in err
        assert "[run directory]" in err and str(run) in err and "running `" in err
        assert "fix: wait for that run to finish, stop it, or choose another output" in err
    code, out, err, _ = _run_child(run)
    assert code == 0, err
    assert out.startswith("ready")
    assert (run / DIR_LOCK_NAME).exists()  # left in place on release, see OutputLock.release


def test_lock_of_sigkilled_process_is_acquirable(tmp_path):
    run = tmp_path / "run"
    proc = _child(run, "60")
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready"), proc.stderr.read()
        holder_pid = int(line.split()[1])
        with pytest.raises(DinoscopeError, match=f"locked by pid {holder_pid} on host"):
            OutputLock(run, "run directory", is_dir=True).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    # The stale file and record remain; only the flock counted, and the kernel dropped it with the process.
    assert json.loads((run / DIR_LOCK_NAME).read_text())["pid"] == holder_pid
    lock = OutputLock(run, "run directory", is_dir=True)
    info = lock.acquire()
    try:
        assert info.locked and json.loads((run / DIR_LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not lock.held


# Holds the lock, forks a child that calls release() and stays alive, then exits on a line from stdin. Lines go out
# as single os.write calls so that parent and child cannot interleave within a line.
FORKER = """
import os, sys, time
from core.lock import OutputLock
lock = OutputLock(sys.argv[1], is_dir=True)
lock.acquire()
child = os.fork()
if child == 0:
    lock.release()
    os.write(1, b"released\\n")
    time.sleep(60)
    os._exit(0)
os.write(1, b"child %d\\n" % child)
sys.stdin.readline()
os._exit(0)
"""


def test_forked_child_neither_unlocks_nor_keeps_the_lock(tmp_path):
    # What data-loader workers do: the child's release() must not unlock the parent, and a child outliving the
    # parent must not keep the lock held.
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", FORKER, str(run)],
        cwd=REPO,
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    child = None
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        child = int(next(line for line in lines if line.startswith("child")).split()[1])
        assert any(line.startswith("released") for line in lines), lines
        with pytest.raises(DinoscopeError, match=f"locked by pid {proc.pid} "):
            OutputLock(run, is_dir=True).acquire()
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=30)
        os.kill(child, 0)  # still alive
        with exclusive_lock(run, is_dir=True) as info:
            assert info.locked
    finally:
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        proc.kill()
        proc.wait(timeout=30)
        proc.stdin.close()
        proc.stdout.close()


def test_lock_file_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with exclusive_lock(tmp_path / "run", is_dir=True) as info:
            assert info.lock_file.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


def test_reacquiring_in_same_process_is_a_programming_error(tmp_path):
    with exclusive_lock(tmp_path):
        with pytest.raises(RuntimeError, match="already locked by this process"), exclusive_lock(tmp_path):
            pass
        lock = OutputLock(tmp_path)
        with pytest.raises(RuntimeError):
            lock.acquire()
        assert not lock.held
    with exclusive_lock(tmp_path) as info:  # released properly: usable again
        assert info.locked


def test_dead_pid_record_while_locked_is_reported(tmp_path):
    # Hold the flock through a descriptor of our own but leave a record naming a finished process: what a child
    # that inherited the lock file would produce.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid = int(dead.stdout)
    lock_file = tmp_path / DIR_LOCK_NAME
    lock_file.write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname(), "argv": ["x"]}))
    fd = os.open(lock_file, os.O_RDWR)
    try:
        lock_mod.fcntl.flock(fd, lock_mod.fcntl.LOCK_EX | lock_mod.fcntl.LOCK_NB)
        with pytest.raises(DinoscopeError, match=f"pid {dead_pid} no longer exists on this host"):
            OutputLock(tmp_path).acquire()
        lock_file.write_text('{"pid": 12')  # a holder caught mid-write
        with pytest.raises(DinoscopeError, match="record is empty or incomplete"):
            OutputLock(tmp_path).acquire()
    finally:
        os.close(fd)


def _no_flock(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")


def test_unsupported_file_system_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_mod.fcntl, "flock", _no_flock)
    with pytest.raises(DinoscopeError) as err, exclusive_lock(tmp_path / "run", what="run directory"):
        pass
    assert "does not support locks" in err.value.message
    assert err.value.path == str(tmp_path / "run") and err.value.field == "run directory"
    assert "DINOSCOPE_NO_LOCK=1" in err.value.fix
    # The failed attempt left nothing registered: a later attempt fails the same way, not as a re-entry.
    with pytest.raises(DinoscopeError, match="does not support locks"):
        OutputLock(tmp_path / "run").acquire()


def test_no_lock_env_proceeds_with_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(lock_mod.fcntl, "flock", _no_flock)
    monkeypatch.setenv(lock_mod.NO_LOCK_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="core.lock"), exclusive_lock(tmp_path / "run") as info:
        assert not info.locked and info.pid == os.getpid()
    assert any("without a lock" in r.getMessage() for r in caplog.records)


def test_the_lock_holder_removes_temporaries_of_a_crashed_writer(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    stale = [run / ".metrics.json.tmp-abc", run / "checkpoints" / ".step_1.tmp-def"]
    for path in stale:
        path.write_text("partial")
    (run / "metrics.json").write_text("{}")
    single = tmp_path / "chm.tif"
    stale_file = tmp_path / ".chm.tif.tmp-xyz.tif"
    stale_file.write_text("partial")
    other = tmp_path / ".other.tif.tmp-1.tif"
    other.write_text("someone else's")
    with exclusive_lock(run, is_dir=True), exclusive_lock(single, is_dir=False):
        assert not any(p.exists() for p in [*stale, stale_file])
        assert (run / "metrics.json").exists() and other.exists()
