"""One run at a time per output directory: :func:`lock_directory` (collective)."""

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import warnings
from collections.abc import Iterator

from torchrec_compress.checkpoint import from_rank0

LOCK = "LOCK"


class DirectoryInUseError(RuntimeError):
    """Another live process holds the lock of a directory (see :func:`lock_directory`)."""


def _lock_holder(lock_path: str) -> str:
    """Who holds a lock, as its file says (written right after the lock is taken)."""
    try:
        with open(lock_path) as f:
            holder = json.load(f)
        return (
            f"pid {holder['pid']} on host {holder['host']} (started {holder['started']}: "
            f"{holder['command']})"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def _take_lock(directory: str) -> tuple[int | None, str | None]:
    """Lock ``DIRECTORY/LOCK`` without waiting: its open descriptor, or why not."""
    os.makedirs(directory, exist_ok=True)
    lock_path = os.path.join(directory, LOCK)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None, (
            f"{directory!r} is in use by another run: {lock_path!r} is held by "
            f"{_lock_holder(lock_path)}. Wait for that run to end, end it (kill that pid on "
            "that host), or write somewhere else. The kernel releases the lock when its "
            "process exits, so a crashed or killed run never holds it."
        )
    except OSError as e:  # a file system without locks: warn, and go on unprotected
        os.close(fd)
        warnings.warn(
            f"cannot lock {lock_path!r} ({e}): a second run could write there too", stacklevel=3
        )
        return None, None
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    return fd, None


@contextlib.contextmanager
def lock_directory(directory: str) -> Iterator[None]:
    """Hold ``DIRECTORY/LOCK`` for the block, so that one run at a time writes there (collective).

    Rank 0 takes an exclusive ``flock`` on the file and writes who holds it (host, pid, start
    time, command).  A second run that enters the block while it is held is refused, naming the
    holder.  The kernel releases the lock when the holding process exits, however it exits, so
    a killed run never leaves a stale lock; the file itself stays.

    Args:
        directory: the directory to hold (created if missing).

    Raises:
        DirectoryInUseError: another live process holds it (on every process).

    Example::

        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> with lock_directory(out):
        ...     with lock_directory(out):  # doctest: +ELLIPSIS
        ...         pass
        Traceback (most recent call last):
        ...
        torchrec_compress.locking.DirectoryInUseError: '...' is in use by another run: ...
        >>> with lock_directory(out):  # released when the block ends
        ...     pass
    """
    held: list[int] = []

    def take() -> str | None:
        fd, error = _take_lock(directory)
        held.extend([] if fd is None else [fd])
        return error

    try:
        error = from_rank0(take)
        if error is not None:
            raise DirectoryInUseError(error)
        yield
    finally:
        for fd in held:
            os.close(fd)  # releases the lock
