"""What a reception is written into, and what an accepted one is.

``ReceiveFile``: a receive slot (slots.py), synced with its completion marker before the answer.
``LogReceiveFile``: memory, for a receive log record (recvlog.py), or a slot past the record
limit. ``Accepted``: a received instance that may be acknowledged.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .note import PREAMBLE, overlay
from .recvlog import Record
from .slots import Checksum, SlotPool


class SpoolFull(OSError):
    """The spool quota or the disk is full: the sender gets 0xA700 (out of resources)."""


class DatasetMismatch(ValueError):
    """The dataset's SOP Class/Instance UID is not the C-STORE command's: 0xA900, not stored."""


class ReceiveFile:
    """Stands in for the NamedTemporaryFile pynetdicom writes a chunked C-STORE dataset to.

    It is a receive slot (slots.py) in the spool's own tmp directory, so its name is already
    durable and the final rename never crosses file systems. A write error such as ENOSPC does not
    escape into pynetdicom's reader thread (which would abort the association): it is remembered,
    later writes are dropped, and the handler answers 0xA700 for this one instance while the
    association goes on.
    """

    def __init__(self, path: str | Path, room: int | None = None, note: bytes = b"") -> None:
        self.name = str(path)
        self.error: OSError | None = None
        #: bytes this reception may take (spool quota and min_free_disk, when it started): past
        #: it the rest is dropped as it arrives and the instance is refused with 0xA700
        self.room = room
        self.file = _GuardedWriter(open(path, "wb", buffering=1 << 20), self,  # noqa: SIM115
                                   note)

    def write(self, data: bytes | memoryview) -> int:
        return self.file.write(data)

    def readable_now(self) -> str:
        """Hand what was written so far to the OS (not to the disk), so that the file can be
        read by name before it is accepted; its name."""
        if self.error is None:
            with contextlib.suppress(OSError):
                self.file._raw.flush()
        return self.name

    def close(self) -> None:
        self.file.close()


class _GuardedWriter:
    """The ``.file`` pynetdicom flushes after every fragment; errors are caught, not raised."""

    def __init__(self, raw: Any, owner: ReceiveFile, note: bytes = b"") -> None:
        self._raw = raw
        self._owner = owner
        self._sum = Checksum()
        self._note = note  # written into the preamble as it passes (note.py)

    def write(self, data: bytes | memoryview) -> int:
        owner = self._owner
        if self._note and self._sum.length < PREAMBLE:
            data = overlay(data, self._sum.length, self._note)
        if owner.error is None:
            try:
                if owner.room is not None and self._sum.length + len(data) > owner.room:
                    raise SpoolFull(errno.ENOSPC, "spool quota (max_spool_size) or "
                                    f"min_free_disk reached: {owner.room} bytes were left for "
                                    "this instance")
                self._raw.write(data)
                self._sum.update(data)
            except OSError as exc:
                owner.error = exc
                with contextlib.suppress(OSError):  # give the space back while the rest drains
                    self._raw.truncate(0)
        return len(data)

    def flush(self) -> None:
        """pynetdicom flushes after every fragment; we flush once, in sync()."""

    def sync(self) -> None:
        """Mark the file complete (in its preamble) and fsync it: one sync makes it durable."""
        if self._owner.error is None:
            try:
                self._raw.flush()
                os.pwrite(self._raw.fileno(), self._sum.marker(), 0)
                os.fsync(self._raw.fileno())
            except OSError as exc:
                self._owner.error = exc

    def drop_cache(self) -> None:
        """Give the file's page-cache pages back now that they are on disk (after sync()).

        The spool is written once and read back later, if at all (delivery comes after the
        stable age). Keeping every received byte cached made each new instance take never-used
        pages, which on this VM cost ~12 µs a page (1.4 ms of a 526 kB CT instance, more than the
        fsync); freed pages are reused at once. Delivery re-reads the file from disk (~1 GB/s).
        """
        if self._owner.error is None:
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._raw.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        try:
            self._raw.close()
        except OSError as exc:
            if self._owner.error is None:
                self._owner.error = exc


class LogReceiveFile:
    """A dataset received for the receive log: held in memory (its preamble left for the
    completion marker), or, past ``limit`` bytes (receive_log_max_record), spilled into a
    receive slot (``slot``) and received on the slot path from there on. Write errors (the
    quota) are remembered as ReceiveFile's are, never raised into the association."""

    def __init__(self, slots: SlotPool, limit: int, room: int | None) -> None:
        self.name = ""  # no file (yet): the association's clean-up unlinks nothing
        self.error: OSError | None = None
        self.room = room
        self.buf: bytearray | None = bytearray()
        self.slot: ReceiveFile | None = None
        self._slots = slots
        self._limit = limit

    def write(self, data: bytes | memoryview) -> int:
        if self.slot is not None:
            return self.slot.write(data)
        buf = self.buf
        assert buf is not None
        if len(buf) + len(data) > self._limit:  # too large for a record: a receive slot
            self.slot = ReceiveFile(self._slots.take(), self.room)
            self.name = self.slot.name
            self.slot.write(buf)
            self.buf = None
            return self.slot.write(data)
        if self.error is None:
            if self.room is not None and len(buf) + len(data) > self.room:
                self.error = SpoolFull(errno.ENOSPC, "spool quota (max_spool_size) or "
                                       f"min_free_disk reached: {self.room} bytes were left "
                                       "for this instance")
                self.buf = buf = bytearray()
            else:
                buf += data
        return len(data)

    def close(self) -> None:
        if self.slot is not None:
            self.slot.close()


@dataclass(frozen=True, slots=True)
class Accepted:
    """A received instance, durable in its receive slot (or its receive log record), not yet in
    the spool's tree."""

    path: str
    tags: dict[str, str]
    tsuid: str
    size: int
    calling_ae: str
    called_ae: str
    key: str = ""  # cluster mode: its object key in the shared store (one per reception)
    shared: bool = True  # ... and whether it is there already (ack_after: shared)
    # receive log: the file's bytes, written to ``path`` after the answer (None once written)
    data: bytearray | None = None
    record: Record | None = None  # its log record (the flusher syncs the file)


#: what a received dataset must carry: a C-STORE's (Affected SOP Class UID, Affected SOP
#: Instance UID), or index keywords → values (a STOW-RS request's study UID in its path)
Expected = tuple[str, str] | dict[str, str]


def match_command(tags: dict[str, str], command: Expected) -> None:
    """DatasetMismatch (0xA900) unless the dataset carries what the request says."""
    if isinstance(command, dict):
        pairs, whose = list(command.items()), "request's"
    else:
        sop_class, sop_instance = command
        pairs, whose = [("SOPInstanceUID", sop_instance), ("SOPClassUID", sop_class)], \
            "command's"
    for kw, expected in pairs:
        if tags.get(kw, "") != expected:
            raise DatasetMismatch(f"dataset {kw} {tags.get(kw, '')[:64]!r} is not the "
                                  f"{whose} {expected[:64]!r}")


def spool_name(tags: dict[str, str]) -> str:
    return f"data/{tags['StudyInstanceUID']}/{tags['SOPInstanceUID']}.dcm"


def write_file(path: str, data: bytes | bytearray, sync: bool = False,
               mtime_ns: int | None = None) -> None:
    """Write a whole file (``sync``: and fsync it; ``mtime_ns``: with that mtime)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if mtime_ns is not None:
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
