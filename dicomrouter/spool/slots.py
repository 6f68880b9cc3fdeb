"""Receive slots: pre-created files whose names are already durable, and the completion marker.

Making a *new* file durable takes two syncs: the file's, and its directory's (for the name). The
receive path cannot batch them (a single association waits for each C-STORE response), so the
directory half is done ahead of time: a background thread creates empty slot files in batches and
fsyncs the directory once per batch. A received dataset is written into a slot, marked complete
and fsync'd once; from then on it is durable and can be acknowledged, under its slot name.

The marker lives in the first bytes of the 128-byte Part 10 preamble (free for the implementation
to use): magic, CRC32 and length of everything after the marker. At start-up a slot with a valid
marker is an acknowledged instance to adopt; any other non-empty slot is a reception cut short
(never acknowledged) and is dropped. Destinations that write files clear the preamble again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
import zlib
from collections import deque
from pathlib import Path

log = logging.getLogger("dicomrouter.spool")

MAGIC = b"DRTRDONE"
MARKER = struct.Struct("<8sIQ4x")  # magic, crc32, length of the file: 24 bytes
MARKER_SIZE = MARKER.size
SLOT_SUFFIX = ".slot"


def fsync_dir(path: Path) -> None:
    """Make new names (or renames) in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checksum:
    """CRC32 and length of a file as it is written, leaving out the marker region."""

    def __init__(self) -> None:
        self.crc = 0
        self.length = 0

    def update(self, data: bytes | memoryview) -> None:
        start = self.length
        self.length += len(data)
        if self.length <= MARKER_SIZE:
            return
        skip = max(0, MARKER_SIZE - start)
        self.crc = zlib.crc32(memoryview(data)[skip:], self.crc)

    def marker(self) -> bytes:
        return MARKER.pack(MAGIC, self.crc, self.length)


def is_complete(path: Path) -> bool:
    """True if ``path`` carries a valid completion marker for its whole content."""
    try:
        with open(path, "rb") as f:
            head = f.read(MARKER_SIZE)
            if len(head) < MARKER_SIZE:
                return False
            magic, crc, length = MARKER.unpack(head)
            if magic != MAGIC or os.fstat(f.fileno()).st_size != length:
                return False
            actual = 0
            while chunk := f.read(1 << 20):
                actual = zlib.crc32(chunk, actual)
            return actual == crc
    except OSError:
        return False


class SlotPool:
    """Keeps ``low``..``low + batch`` empty slot files ready in ``directory``."""

    def __init__(self, directory: Path, low: int = 256, batch: int = 256) -> None:
        self.directory = directory
        self.low = low
        self.batch = batch
        self._dir = str(directory)
        self._ready: deque[str] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._counter = 0
        self._prefix = f"rx-{os.getpid()}-{id(self):x}-"
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._fill()
        self._thread = threading.Thread(target=self._run, name="slot-pool", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            ready, self._ready = list(self._ready), deque()
        for p in ready:
            with contextlib.suppress(OSError):
                os.unlink(p)

    def take(self) -> str:
        """An empty slot whose name is durable (made on the spot if the pool ran dry)."""
        with self._lock:
            slot = self._ready.popleft() if self._ready else None
            low = len(self._ready) < self.low
        if low:
            self._wake.set()
        if slot is None:
            slot = self._create(1)[0]
            fsync_dir(self.directory)
        return slot

    def _create(self, n: int) -> list[str]:
        made = []
        for _ in range(n):
            with self._lock:
                self._counter += 1
                name = f"{self._prefix}{self._counter}{SLOT_SUFFIX}"
            p = os.path.join(self._dir, name)
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            made.append(p)
        return made

    def _fill(self) -> None:
        try:
            made = self._create(self.batch)
            fsync_dir(self.directory)
        except OSError as exc:  # a full disk: receptions will fail and say so
            log.warning("cannot prepare receive slots in %s: %s", self.directory, exc)
            return
        with self._lock:
            self._ready.extend(made)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            while not self._stop.is_set():
                with self._lock:
                    if len(self._ready) >= self.low:
                        break
                self._fill()
