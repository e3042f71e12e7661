"""One run per directory: an exclusive OS lock on `--out`, held for the whole run.

`fcntl.flock` locks belong to the open file, so the kernel drops the lock when the process dies,
however it dies: a `kill -9` leaves the lock file behind but never a held lock, and `--resume`
simply takes it again. Two runs, or a run and a live `--resume`, on one folder cannot both proceed.

Take the lock only after every input has been validated, right before the first write: creating
the lock file creates `out/`, and bad input must leave nothing behind. Under Accelerate take it on
the main process only (the other ranks would be refused by their own main process's lock). POSIX
only (Linux, macOS); on network file systems flock may not be enforced across machines.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path
from types import TracebackType

from jumplora.run.directory import lock_file


class RunLockedError(ValueError):
    """Another live process holds the run directory."""


class RunLock:
    """`with RunLock(out): ...` holds an exclusive, non-blocking lock on `out/.jumplora.lock`.

    The lock file records the holder's PID for the error message; it is left in place on release
    (deleting it would let a third process lock a different inode than a waiting one).
    """

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = lock_file(self.out)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: a symlinked lock would have its target (a user's file) overwritten with the PID.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if self.path.is_symlink():
                raise RunLockedError(f"{self.path}: the run lock is a symlink; remove it (its target is left as it "
                                     "is)") from None  # fmt: skip
            raise RunLockedError(f"{self.out}: cannot create the run lock {self.path.name}: {exc.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RunLockedError(f"{self.path}: the run lock is not a regular file; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_pid(fd)
            os.close(fd)
            by = f"process {holder}" if holder else "another process"
            raise RunLockedError(
                f"{self.out} is in use by {by} (a run or a --resume is live there); wait for it to end "
                "or use another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    """The PID the holder wrote, if it has written it yet."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
