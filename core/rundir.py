"""One run, one directory: an exclusive lock on ``<run>/.lock``.

``fcntl.flock`` is held by the open file, so the kernel releases it when the process ends in any
way (SIGKILL included): a killed run leaves no stale lock, and its directory can be resumed at
once. The holder writes its PID into the file so a refused run can say who holds it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import TracebackType

LOCK_FILE = ".lock"


class RunDirBusyError(RuntimeError):
    """Another process is running in this run directory."""


class RunLock:
    """Exclusive, non-blocking lock of a run directory (created if missing).

        with RunLock(run_dir):
            ...  # only this process writes run_dir
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl  # noqa: PLC0415 - POSIX only; elsewhere runs are not locked
        except ImportError:  # pragma: no cover - Windows
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise RunDirBusyError(
                f"{self.run_dir} is in use by another run (PID {holder}): wait for it to finish, stop it, or "
                "choose another name=<run name>"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
