"""Test-only fault injection for the receive log's crash tests (tests/test_receive_log.py).

``DICOMROUTER_CRASH_AT=<step>[:<n>]`` kills the process (SIGKILL, no clean-up) the ``n``-th time
(default: the first) the receive path reaches ``<step>`` (see ``STEPS``).

``DICOMROUTER_POWERCUT_IO=1`` routes the receive log's and the write-behind spool files' writes
through ``PowerCutIO``: log writes are held back until the log is synced, spool files written
behind the log are remembered until the flusher made them durable. SIGUSR1 is then a power cut:
every write not yet synced is dropped (held-back log writes discarded, unsynced spool files cut
to half their length) and the process dies at once. Unset, both cost one attribute test.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Sequence

STEPS = ("record-written", "record-synced", "acked", "spool-written", "flush", "wrap")

_spec = os.environ.get("DICOMROUTER_CRASH_AT", "")
_step, _, _nth = _spec.partition(":")
_left = int(_nth or 1)
_count_lock = threading.Lock()


def crash_point(step: str) -> None:
    """Die here (SIGKILL) if the crash tests asked for it."""
    global _left
    if _step != step:
        return
    with _count_lock:
        _left -= 1
        if _left > 0:
            return
    os.kill(os.getpid(), signal.SIGKILL)


class PowerCutIO:
    """What a power cut would leave: only what was synced (see the module docstring)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._held: dict[int, list[tuple[int, bytes]]] = {}
        self._unsynced: set[str] = set()
        self._cut = False

    def install(self) -> None:
        signal.signal(signal.SIGUSR1, lambda *_: self.cut())

    def pwritev(self, fd: int, buffers: Sequence[bytes | bytearray | memoryview],
                offset: int) -> None:
        with self.lock:
            self._check()
            self._held.setdefault(fd, []).append((offset, b"".join(bytes(b) for b in buffers)))

    def datasync(self, fd: int) -> None:
        with self.lock:  # a cut never lands half way through applying the held writes
            self._check()
            for offset, data in self._held.pop(fd, []):
                os.pwrite(fd, data, offset)
            os.fdatasync(fd)

    def written(self, *paths: str) -> None:
        """Spool files written behind the log, not durable yet (caller holds ``lock``)."""
        self._check()
        self._unsynced.update(paths)

    def synced(self, paths: Sequence[str]) -> None:
        with self.lock:
            self._unsynced.difference_update(paths)

    def _check(self) -> None:
        if self._cut:
            threading.Event().wait()  # the process is about to die: never return

    def cut(self) -> None:
        with self.lock:
            self._cut = True
            self._held.clear()
            for p in self._unsynced:
                try:
                    size = os.stat(p).st_size
                    os.truncate(p, size // 2)
                except OSError:
                    pass
            os.kill(os.getpid(), signal.SIGKILL)


POWERCUT: PowerCutIO | None = PowerCutIO() if os.environ.get("DICOMROUTER_POWERCUT_IO") else None
