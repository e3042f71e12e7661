"""RunLock: one live run per directory, checked with real processes; a SIGKILLed holder frees it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jumplora.lock import RunLock, RunLockedError

LOCK_NAME = ".jumplora.lock"  # where docs/RELIABILITY.md and run/directory.py say the lock is

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from jumplora.lock import RunLock
    lock = RunLock(Path(sys.argv[1])).acquire()
    print("locked", flush=True)
    time.sleep(120)
    """
)


@pytest.fixture
def holder(tmp_path: Path):
    """A child process that takes the lock on tmp_path/'run' and sleeps; killed at teardown."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield out, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()


def test_second_process_is_refused_until_the_holder_is_killed(holder) -> None:
    out, proc = holder
    with pytest.raises(RunLockedError) as info:
        RunLock(out).acquire()
    message = str(info.value)
    assert message.startswith(f"{out} is in use by process {proc.pid}") and "\n" not in message
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert (out / LOCK_NAME).exists()  # the stale file stays, but the kernel released the lock
    with RunLock(out) as lock:
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
        assert lock.path == out / LOCK_NAME


def test_lock_in_one_process_released_on_exit(tmp_path: Path) -> None:
    out = tmp_path / "run"
    lock = RunLock(out)
    assert not out.exists()  # nothing is created before acquire (i.e. before validation has passed)
    with lock, pytest.raises(RunLockedError, match=f"in use by process {os.getpid()}"):
        RunLock(out).acquire()  # flock is per open file: even the same process is refused
    with RunLock(out):
        pass


def test_unwritable_parent_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunLockedError, match=r"file/run: cannot create the run lock"):
        RunLock(tmp_path / "file" / "run").acquire()
