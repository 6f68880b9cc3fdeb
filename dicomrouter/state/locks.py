"""The per-study exclusion a node's processes share: a thread lock, then the same stripe as a
byte-range lock on ``<spool>/locks`` (the SQLite backend; PostgreSQL adds its advisory lock)."""

from __future__ import annotations

import fcntl
import threading


class StudyLock:
    """One stripe: a thread lock, then the same stripe as a byte-range lock (other processes)."""

    __slots__ = ("_thread_lock", "_fd", "_index")

    def __init__(self, thread_lock: threading.Lock, fd: int, index: int) -> None:
        self._thread_lock = thread_lock
        self._fd = fd
        self._index = index

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        try:
            if self._fd >= 0:
                fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, self._index)
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            if self._fd >= 0:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, self._index)
        finally:
            self._thread_lock.release()
