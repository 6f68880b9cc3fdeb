"""The spool: received instances as files on disk, made durable before they are acknowledged.

Layout under the spool directory::

    state.db            the state database (see state.py)
    tmp/                datasets being received (pynetdicom's chunked-receive files)
    data/<Study UID>/<SOP Instance UID>.dcm

A file in ``data/`` is a DICOM Part 10 file whose dataset bytes are exactly those received.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..dicomfile import UnreadableDataset, identify, source_ae
from ..state import Instance, Reception, State, StateUnavailable, StudyState
from ..walk import Malformed, check_file
from . import recvlog
from .faults import POWERCUT, crash_point
from .slots import MAGIC, MARKER, MARKER_SIZE, Checksum, SlotPool, fsync_dir, is_complete

log = logging.getLogger("dicomrouter.spool")


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

    def __init__(self, path: str | Path, room: int | None = None) -> None:
        self.name = str(path)
        self.error: OSError | None = None
        #: bytes this reception may take (spool quota and min_free_disk, when it started): past
        #: it the rest is dropped as it arrives and the instance is refused with 0xA700
        self.room = room
        self.file = _GuardedWriter(open(path, "wb", buffering=1 << 20), self)  # noqa: SIM115

    def write(self, data: bytes | memoryview) -> int:
        return self.file.write(data)

    def close(self) -> None:
        self.file.close()


class _GuardedWriter:
    """The ``.file`` pynetdicom flushes after every fragment; errors are caught, not raised."""

    def __init__(self, raw: Any, owner: ReceiveFile) -> None:
        self._raw = raw
        self._owner = owner
        self._sum = Checksum()

    def write(self, data: bytes | memoryview) -> int:
        owner = self._owner
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

    def __init__(self, spool: Spool, limit: int, room: int | None) -> None:
        self.name = ""  # no file (yet): the association's clean-up unlinks nothing
        self.error: OSError | None = None
        self.room = room
        self.buf: bytearray | None = bytearray()
        self.slot: ReceiveFile | None = None
        self._spool = spool
        self._limit = limit

    def write(self, data: bytes | memoryview) -> int:
        if self.slot is not None:
            return self.slot.write(data)
        buf = self.buf
        assert buf is not None
        if len(buf) + len(data) > self._limit:  # too large for a record: a receive slot
            self.slot = ReceiveFile(self._spool.slots.take(), self.room)
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
    record: recvlog.Record | None = None  # its log record (the flusher syncs the file)


class Spool:
    """Puts received files in place durably and records them in the state database."""

    def __init__(self, root: Path, state: State, max_bytes: int = 0,
                 shared: bool = False, max_depth: int = 32, min_free: int = 0,
                 receive_log: bool = False, log_size: int = 256 << 20,
                 log_max_record: int = 4 << 20, log_wait: float = 10.0) -> None:
        self.root = root
        self._root = str(root)
        self.max_depth = max_depth
        self.min_free = min_free
        self.tmp = root / "tmp"
        self.data = root / "data"
        self._data_dir = str(self.data)
        self.state = state
        self.max_bytes = max_bytes
        for d in (self.root, self.tmp, self.data):
            d.mkdir(parents=True, exist_ok=True)
        self._bytes_lock = threading.Lock()
        self._bytes = state.spool_bytes()
        self.slots = SlotPool(self.tmp)
        self.shared = shared
        self._bytes_read_at = time.monotonic()
        self._unplaced: list[Accepted] = []
        self.receive_log = receive_log
        self.log_dir = root / recvlog.LOG_DIR
        self._log_size = log_size
        self._log_max_record = log_max_record
        self._log_wait = log_wait
        self.rxlog: recvlog.ReceiveLog | None = None

    def start(self) -> None:
        """Start preparing receive slots in the background; with the receive log, claim a log
        file of this process's own (replaying what an earlier run left in it first)."""
        self.slots.start()
        if self.receive_log:
            rxlog = recvlog.ReceiveLog.claim(self.log_dir, self._log_size, self._log_wait)
            try:
                replayed = self._replay_log(rxlog.path)
            except BaseException:
                rxlog.close()
                raise
            try:
                rxlog.reset(replayed)
            except OSError as exc:  # e.g. no room for it on the disk: the slot path
                with contextlib.suppress(OSError):
                    os.ftruncate(rxlog.fd, 0)  # (its records were replayed just now)
                rxlog.close()
                log.error("receive log %s cannot be prepared (%s); receptions take the "
                          "receive slots", rxlog.path, exc)
                return
            if POWERCUT is not None:
                with contextlib.suppress(ValueError):  # not the main thread: no power cuts
                    POWERCUT.install()
            rxlog.start()
            self.rxlog = rxlog
            log.info("receive log %s: %d MB, records up to %d bytes, checkpoint %d",
                     rxlog.path, rxlog.size >> 20, self._log_max_record, rxlog.checkpoint)

    def stop(self) -> None:
        self.slots.stop()
        if self.rxlog is not None:
            self.retry_placements()
            self.rxlog.stop()
            self.rxlog = None

    def study_lock(self, study_uid: str) -> AbstractContextManager[None]:
        """Ingest and deletion of the same study never interleave (a late arrival must not land
        in a directory being removed); the state provides it across processes."""
        return self.state.study_lock(study_uid)

    def recover_slots(self) -> tuple[int, int]:
        """Start-up: slots holding a complete, acknowledged instance go into the spool, oldest
        first; partial ones (receptions cut short, never acknowledged), spare empty ones and
        ones a later reception of the same SOP Instance UID superseded are removed.
        Returns (adopted, removed)."""
        adopted = removed = 0
        for p in sorted(self.tmp.iterdir(), key=_mtime):
            try:
                if p.stat().st_size and is_complete(p):
                    tags, tsuid = identify(p)
                    try:
                        superseded = self._superseded(p, tags)
                    except StateUnavailable as exc:  # keep the slot: the next start decides
                        log.error("receive slot %s kept: %s", p, exc)
                        continue
                    if superseded is None:
                        self._place(p, tags, tsuid, source_ae(p), "")
                        adopted += 1
                        continue
            except (OSError, UnreadableDataset) as exc:
                log.error("receive slot %s cannot be adopted: %s", p, exc)
            with contextlib.suppress(OSError):
                if p.stat().st_size:
                    removed += 1
                p.unlink()
        return adopted + self.replay_receive_logs(), removed

    # ---- the receive log's recovery --------------------------------------------------------

    def replay_receive_logs(self) -> int:
        """Start-up: replay the receive log files no running process holds (every process
        replays the one it claims as well); returns how many instances came back."""
        total = 0
        for path in recvlog.log_files(self.log_dir):
            held = recvlog.ReceiveLog.lock(path)
            if held is None:
                log.info("receive log %s is in use by another process: not replayed here", path)
                continue
            try:
                replayed, upto = self._replay_records(path)
                held.reset(upto, prepare=False)
            finally:
                held.close()
            if replayed:
                log.info("receive log %s: %d acknowledged instance(s) replayed", path, replayed)
            total += replayed
        return total

    def _replay_log(self, path: Path) -> int:
        """Replay a log file this process claimed; returns the sequence number replayed to."""
        replayed, upto = self._replay_records(path)
        if replayed:
            log.info("receive log %s: %d acknowledged instance(s) replayed", path, replayed)
        return upto

    def _replay_records(self, path: Path) -> tuple[int, int]:
        """Every valid record newer than the checkpoint whose spool file is missing or not
        whole goes into the spool like an adopted receive slot; the files it writes are synced
        (files and directories) before the caller moves the checkpoint past them.
        Returns (instances replayed, last sequence number seen)."""
        checkpoint, found = recvlog.scan(path)
        upto, replayed = checkpoint, 0
        dirs: set[str] = set()
        for rec in found:
            data = recvlog.read(path, rec)
            try:
                where = self._replay_one(rec, data)
            except (OSError, UnreadableDataset, StateUnavailable) as exc:
                aside = self.root / f"unreplayed-{path.stem}-{rec.seq}.dcm"
                write_file(str(aside), data, sync=True)
                fsync_dir(self.root)
                log.error("receive log %s: record %d (%s) cannot be replayed (%s: %s); its "
                          "instance is kept as %s", path, rec.seq, rec.name, type(exc).__name__,
                          exc, aside)
                where = None
            if where is not None:
                dirs.add(where)
                replayed += 1
            upto = rec.seq
        for d in dirs:
            with contextlib.suppress(FileNotFoundError):
                fsync_dir(Path(d))
        return replayed, upto

    def _replay_one(self, rec: recvlog.Found, data: bytes) -> str | None:
        """Put one record's instance in the spool unless its spool file is whole, or a newer
        reception of it exists; returns the directory it went to (None: nothing to do)."""
        final = self.path(rec.name)
        with contextlib.suppress(FileNotFoundError):
            newer = os.stat(final).st_mtime_ns > rec.time_ns
            if is_complete(Path(final)):
                with open(final, "rb") as f:
                    if f.read(MARKER_SIZE) == data[:MARKER_SIZE] or newer:
                        return None  # whole: this reception, or a newer one
        tags, tsuid = identify(data)
        found = self.state.reception(tags["SOPInstanceUID"])
        if found is not None and found.received_at * 1e9 > rec.time_ns and \
                not (found.present and found.key == rec.name):
            log.info("receive log record %d (%s) not replayed: instance received again since "
                     "(study %s%s)", rec.seq, rec.name, found.study_uid,
                     "" if found.present else ", delivered and deleted")
            return None
        tmp = os.path.join(self.tmp, f"rl-replay-{os.getpid()}-{rec.seq}.dcm")
        write_file(tmp, data, sync=True, mtime_ns=rec.time_ns)
        self._place(tmp, tags, tsuid, source_ae(tmp), "")
        return os.path.dirname(final)

    def adopt_orphans(self) -> int:
        """Record spool files that have no row (the index lost its last transactions in a power
        cut, or the process died between the rename and the commit). A file that a later
        reception of its SOP Instance UID superseded (moved to another study, or delivered
        and deleted) is removed instead: recovery never resurrects an older version.
        Returns how many were recorded."""
        adopted = 0
        for path in self._unknown_files():
            if not path.exists():
                continue  # (gone: an adoption before it superseded it)
            try:
                tags, tsuid = identify(path)
            except UnreadableDataset as exc:
                log.error("spool file %s cannot be read (%s); moved aside", path, exc)
                os.replace(path, self.root / f"unreadable-{path.name}")
                continue
            if path != self.data / tags["StudyInstanceUID"] / f"{tags['SOPInstanceUID']}.dcm":
                continue  # not a name the spool gives: leave it alone
            if self._superseded(path, tags) is not None:  # an older version: removed
                with self.study_lock(tags["StudyInstanceUID"]):
                    unlink_quietly(path)
                    with contextlib.suppress(OSError):  # its study's last file
                        path.parent.rmdir()
                continue
            self._place(path, tags, tsuid, source_ae(path), "")  # already in place: records it
            adopted += 1
        return adopted

    def _unknown_files(self) -> Iterator[Path]:
        """Spool files no row knows, study folder by study folder (the rows of one study at a
        time: memory stays flat however many instances the spool holds)."""
        for folder in sorted(self.data.iterdir()) if self.data.is_dir() else ():
            files = sorted(folder.glob("*.dcm")) if folder.is_dir() else []
            if not files:
                continue
            known = self.state.known_keys(folder.name)
            yield from (p for p in files if f"data/{folder.name}/{p.name}" not in known)

    def _superseded(self, path: str | Path, tags: dict[str, str]) -> Reception | None:
        """The recorded reception of this file's SOP Instance UID if it was made after the
        file was written (its mtime: the slot's completion marker): the file is then that
        reception's own file or an older version (moved to another study since, or delivered
        and deleted), never to be recorded again. None: no such reception (a file newer than
        the row is a reception whose commit was lost: it is recorded)."""
        found = self.state.reception(tags["SOPInstanceUID"])
        try:
            if found is None or os.stat(path).st_mtime > found.received_at:
                return None
        except FileNotFoundError:
            return None
        where = f"in study {found.study_uid}" if found.present else \
            f"of study {found.study_uid}, since delivered and deleted from the spool"
        log.warning("%s (study %s) is not newer than the reception of instance %s recorded at "
                    "%s %s: not recorded again", path, tags.get("StudyInstanceUID"),
                    tags["SOPInstanceUID"],
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(found.received_at)), where)
        return found

    def new_receive_file(self, logged: bool = False) -> ReceiveFile | LogReceiveFile:
        """Where a dataset is received: a receive slot, or (``logged``, the lean receiver, with
        the receive log on and usable) memory, for a receive log record."""
        rxlog = self.rxlog
        if logged and rxlog is not None and not rxlog.broken:
            return LogReceiveFile(self, self._log_max_record, self.room())
        return ReceiveFile(self.slots.take(), self.room())

    def free_disk(self) -> int:
        """Bytes available to us on the spool's file system."""
        st = os.statvfs(self.tmp)
        return st.f_bavail * st.f_frsize

    def disk_low(self) -> bool:
        """Below ``min_free_disk``: new associations are refused (and instances answered 0xA700)."""
        return bool(self.min_free) and self.free_disk() < self.min_free

    def room(self) -> int | None:
        """Bytes one more reception may take now (None: no limit)."""
        limits = []
        if self.max_bytes:
            if self.max_bytes - self._bytes < max(64 << 20, self.max_bytes // 10):
                self._refresh_bytes()  # near the quota: `purge` may have freed space
            limits.append(self.max_bytes - self._bytes)
        if self.min_free:
            limits.append(self.free_disk() - self.min_free)
        return max(0, min(limits)) if limits else None

    def _refresh_bytes(self, every: float = 1.0) -> None:
        """Re-read the spool's total from the state database, at most every ``every`` s."""
        if time.monotonic() - self._bytes_read_at > every:
            with self._bytes_lock:
                self._bytes = self.state.spool_bytes()
                self._bytes_read_at = time.monotonic()

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def over_quota(self) -> bool:
        return bool(self.max_bytes) and self._bytes >= self.max_bytes

    def accept(self, rx: ReceiveFile | LogReceiveFile, calling_ae: str, called_ae: str,
               command: tuple[str, str] | None = None) -> Accepted:
        """Make a received file durable in its slot, check it is whole, read its index tags.

        From here on the instance may be acknowledged: start-up adopts a slot with a valid
        marker, so ``place`` (rename and record) can follow the response instead of delaying it.
        ``command`` is the C-STORE's (Affected SOP Class UID, Affected SOP Instance UID).
        Raises SpoolFull (→ 0xA700), dicomfile.UnreadableDataset (→ 0xC000) or DatasetMismatch
        (→ 0xA900); the receive slot is then removed.
        """
        if isinstance(rx, LogReceiveFile):
            if rx.slot is None:
                return self._accept_logged(rx, calling_ae, called_ae, command)
            log.debug("instance over receive_log_max_record (%d bytes): received into a "
                      "receive slot", self._log_max_record)
            rx = rx.slot  # larger than a log record: the slot path
        src = rx.name  # plain strings on this path: pathlib was a third of its interpreter time
        try:
            rx.file.sync()
            if rx.error is not None:
                raise SpoolFull(rx.error.errno or errno.ENOSPC, f"write failed: {rx.error}")
            size = os.stat(src).st_size
            self._check_room(size)
            try:
                check_file(src, self.max_depth)
            except Malformed as exc:
                raise UnreadableDataset(f"malformed dataset: {exc}") from None
            tags, tsuid = identify(src)
            if command is not None:
                _match_command(tags, command)
            rx.file.drop_cache()
        except BaseException:
            unlink_quietly(src)
            raise
        return Accepted(src, tags, tsuid, size, calling_ae, called_ae)

    def _check_room(self, size: int) -> None:
        """Raise SpoolFull if ``size`` more bytes would pass the quota or min_free_disk."""
        if self.shared and self.max_bytes:
            self._refresh_bytes()  # other receiver processes fill the same spool
        if self.min_free and self.free_disk() < self.min_free:
            raise SpoolFull(errno.ENOSPC, f"less than min_free_disk ({self.min_free} bytes) "
                            "free on the spool's disk")
        if self.max_bytes and self._bytes + size > self.max_bytes:
            # The counter may be stale: `dicomrouter purge` frees space from another process.
            with self._bytes_lock:
                self._bytes = self.state.spool_bytes()
            if self._bytes + size > self.max_bytes:
                raise SpoolFull(errno.ENOSPC, f"spool quota of {self.max_bytes} bytes "
                                f"reached ({self._bytes} used)")

    def _accept_logged(self, rx: LogReceiveFile, calling_ae: str, called_ae: str,
                       command: tuple[str, str] | None) -> Accepted:
        """``accept`` on the receive log: checked and identified in memory (the header is read
        from the received bytes, no file read at all), then one log record, synced (shared with
        the other associations' records), makes it durable. Its spool file is written by
        ``place``, after the answer."""
        data = rx.buf
        rx.buf = None
        if rx.error is not None:
            raise SpoolFull(rx.error.errno or errno.ENOSPC, f"write failed: {rx.error}")
        assert data is not None
        size = len(data)
        self._check_room(size)
        try:
            check_file(data, self.max_depth)
        except Malformed as exc:
            raise UnreadableDataset(f"malformed dataset: {exc}") from None
        tags, tsuid = identify(data)
        if command is not None:
            _match_command(tags, command)
        checksum = Checksum()
        checksum.update(data)
        data[:MARKER_SIZE] = checksum.marker()
        name = f"data/{tags['StudyInstanceUID']}/{tags['SOPInstanceUID']}.dcm"
        rxlog = self.rxlog
        try:
            if rxlog is None:
                raise recvlog.LogBroken(errno.EIO, "receive log stopped")
            rec = rxlog.append(name, data, time.time_ns())
        except recvlog.LogFull as exc:
            raise SpoolFull(exc.errno or errno.ENOSPC, str(exc)) from None
        except recvlog.LogBroken:  # the slot path, as if the log were off
            path = self.slots.take()
            write_file(path, data, sync=True)
            return Accepted(path, tags, tsuid, size, calling_ae, called_ae)
        path = os.path.join(self.tmp, f"rl-{os.getpid()}-{rec.seq}.dcm")
        return Accepted(path, tags, tsuid, size, calling_ae, called_ae, data=data, record=rec)

    def _write_behind(self, accepted: Accepted) -> Accepted:
        """Write the spool file of an instance the receive log holds (no sync: the flusher)."""
        assert accepted.data is not None and accepted.record is not None
        when = accepted.record.time_ns  # mtime = reception time, as a slot's (_superseded)
        if POWERCUT is None:
            write_file(accepted.path, accepted.data, mtime_ns=when)
        else:  # the crash tests: what a power cut would lose is known
            with POWERCUT.lock:
                POWERCUT.written(accepted.path, self.path(_spool_name(accepted.tags)))
                write_file(accepted.path, accepted.data, mtime_ns=when)
        return replace(accepted, data=None)

    def place(self, accepted: Accepted) -> bool:
        """Rename an accepted (already acknowledged) instance into the spool and record it.

        Returns whether it replaced an earlier copy. On failure (a full disk or database) the
        instance stays durable where it is and ``retry_placements`` (housekeeping) tries again;
        the error is logged here.
        """
        rec = accepted.record
        try:
            if accepted.data is not None:
                crash_point("acked")
                accepted = self._write_behind(accepted)
            if POWERCUT is not None and rec is not None:
                with POWERCUT.lock:  # the rename and the record, consistent with a cut
                    return self._place(accepted.path, accepted.tags, accepted.tsuid,
                                       accepted.calling_ae, accepted.called_ae, accepted.size,
                                       accepted.key or None, accepted.shared)
            return self._place(accepted.path, accepted.tags, accepted.tsuid,
                               accepted.calling_ae, accepted.called_ae, accepted.size,
                               accepted.key or None, accepted.shared)
        except Exception as exc:
            log.error("instance %s of study %s is stored (received as %s) but could not be "
                      "moved into the spool or recorded (%s: %s); it is placed again once that "
                      "works", accepted.tags.get("SOPInstanceUID"),
                      accepted.tags.get("StudyInstanceUID"), accepted.path, type(exc).__name__, exc)
            with self._bytes_lock:
                self._unplaced.append(accepted)
            return False
        finally:
            self._written(accepted)

    def _written(self, accepted: Accepted) -> None:
        """Its spool file exists (renamed or not): the log's flusher may make it durable."""
        if accepted.record is not None and accepted.data is None and self.rxlog is not None:
            self.rxlog.placed(accepted.record, accepted.path,
                              self.path(_spool_name(accepted.tags)))
            crash_point("spool-written")

    def describe(self) -> str:
        return f"local spool {self.root}"

    def health(self) -> str:
        """Why the spool cannot take instances now ('' if it can); the disk is checked apart."""
        return ""

    def housekeeping(self, state: State) -> None:
        """The periodic work of the spool itself (every few seconds): placements to retry."""
        self.retry_placements()

    def retry_placements(self) -> int:
        """Place the accepted instances whose placement failed; returns how many now are."""
        with self._bytes_lock:
            todo, self._unplaced = self._unplaced, []
        done = 0
        for accepted in todo:
            if accepted.data is not None:  # its spool file is still to be written
                try:
                    accepted = self._write_behind(accepted)
                except OSError:
                    with self._bytes_lock:
                        self._unplaced.append(accepted)
                    continue
                self._written(accepted)
            if not os.path.exists(accepted.path):  # renamed before the commit failed
                accepted = replace(accepted, path=os.path.join(
                    self._data_dir, accepted.tags["StudyInstanceUID"],
                    accepted.tags["SOPInstanceUID"] + ".dcm"))
            try:
                newer = self._superseded(accepted.path, accepted.tags)
                if newer is not None:  # received again since: nothing to record
                    if self.path(newer.key) != accepted.path:  # not the newer one's file
                        unlink_quietly(accepted.path)
                    continue
                self._place(accepted.path, accepted.tags, accepted.tsuid, accepted.calling_ae,
                            accepted.called_ae, accepted.size, accepted.key or None,
                            accepted.shared)
                done += 1
            except Exception:
                with self._bytes_lock:
                    self._unplaced.append(accepted)
        if done:
            log.info("%d instance(s) placed in the spool after an earlier failure", done)
        return done

    def path(self, key: str) -> str:
        """The file of a spool key (``data/<study>/<sop>.dcm``)."""
        return os.path.join(self._root, key)

    def open(self, inst: Instance) -> SpoolReader:
        """The stored Part 10 bytes of an instance, the receive-slot marker hidden (zeros)."""
        return SpoolReader(self.path(inst.key))

    def _rename(self, src: str | Path, tags: dict[str, str]) -> str:
        """Move ``src`` to its spool name (caller holds the study lock); returns that name."""
        study_dir = os.path.join(self._data_dir, tags["StudyInstanceUID"])
        dest = os.path.join(study_dir, tags["SOPInstanceUID"] + ".dcm")
        try:
            os.replace(src, dest)
        except FileNotFoundError:  # the study's first instance: make its directory
            os.makedirs(study_dir, exist_ok=True)
            os.replace(src, dest)
        return dest

    def _place(self, src: str | Path, tags: dict[str, str], tsuid: str, calling_ae: str,
               called_ae: str, size: int | None = None, key: str | None = None,
               shared: bool = True) -> bool:
        """Rename a durable, complete file to its spool name and record it (under ``key``:
        by default its spool-relative name; in cluster mode its shared object key).

        No sync here: the content and a durable name already exist (the slot); if a crash loses
        the rename, start-up finds the instance in its slot again.
        """
        size = os.stat(src).st_size if size is None else size
        study = tags["StudyInstanceUID"]
        with self.study_lock(study):
            self._rename(src, tags)
            # If recording fails, the file stays: housekeeping (retry_placements) or start-up
            # (adopt_orphans) records it, or the sender's next attempt replaces it.
            key = key or f"data/{study}/{tags['SOPInstanceUID']}.dcm"
            rec = self.state.record_instance(tags, tsuid, key, size, calling_ae, called_ae,
                                             shared)
        with self._bytes_lock:
            self._bytes += size - rec.replaced_size
        if rec.moved_from:
            log.warning("instance %s moved from study %s to study %s (patient %s): the newer "
                        "reception replaces the older one in the spool, state and Q/R; "
                        "destinations that had it under %s keep that version (see its "
                        "history)", tags["SOPInstanceUID"], rec.moved_from, study,
                        tags.get("PatientID") or "?", rec.moved_from)
        if rec.superseded:
            self._drop_superseded(tags["SOPInstanceUID"], rec.moved_from or study, study,
                                  rec.superseded)
        return rec.replaced

    def _drop_superseded(self, sop_uid: str, old_study: str, new_study: str,
                         old_key: str) -> None:
        """Delete the file of an earlier reception that a newer one replaced under another key
        (an instance moved to another study), under the old study's lock, unless the instance
        was received there again meanwhile. A crash before this leaves the file: start-up
        removes it (``adopt_orphans``: older than the recorded reception)."""
        with self.study_lock(old_study):
            now = self.state.reception(sop_uid)
            if now is not None and now.key == old_key:
                return
            unlink_quietly(self.path(old_key))
            with contextlib.suppress(OSError):  # the old study's last file
                os.rmdir(os.path.dirname(self.path(old_key)))

    def delete_delivered(self, study_uid: str, why: str) -> int:
        """Delete the spool files of a study that is still fully delivered; returns bytes freed.

        Checked under the study's lock, so an instance that arrived meanwhile (and reopened the
        study) is never deleted.
        """
        with self.study_lock(study_uid):
            row = self.state.study(study_uid)
            if row is None or row.state != StudyState.DELIVERED or not row.in_spool:
                return 0
            freed = self._unlink([i.key for i in self.state.instances(study_uid)], study_uid)
            self.state.forget_spool(study_uid, why)
        return freed

    def purge(self, study_uid: str) -> int:
        """Remove a study and all its records on purpose; returns bytes freed."""
        with self.study_lock(study_uid):
            return self._unlink(self.state.purge(study_uid), study_uid)

    def _unlink(self, keys: list[str], study_uid: str) -> int:
        freed = 0
        for key in keys:
            try:
                p = self.path(key)
                freed += os.stat(p).st_size
                os.unlink(p)
            except FileNotFoundError:
                pass
        with contextlib.suppress(OSError):  # already gone
            (self.data / study_uid).rmdir()
        with self._bytes_lock:
            self._bytes = max(0, self._bytes - freed)
        return freed


class SpoolReader(io.RawIOBase):
    """A spool file opened for reading, with the receive slot's completion marker (the first
    bytes of the Part 10 preamble, ours to use) read as zeros, as in the file that was sent.
    ``name`` is the file's path, for libraries that insist on one (pynetdicom's chunked send)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self._f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        self.name = path

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        pos = self._f.tell()
        n = self._f.readinto(b)
        if n and pos < MARKER_SIZE:
            end = min(n, MARKER_SIZE - pos)
            memoryview(b)[:end] = bytes(end)
        return n or 0

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def fileno(self) -> int:
        return self._f.fileno()

    def digest(self) -> str | None:
        """The content digest of the instance as received: the CRC-32 and length its receive
        slot's marker holds (computed as it was written, so free to read). None for a file
        without a marker. Compared only to tell an identical re-send from a changed one."""
        head = os.pread(self._f.fileno(), MARKER_SIZE, 0)
        if len(head) < MARKER_SIZE:
            return None
        magic, crc, length = MARKER.unpack(head)
        return f"crc32:{crc:08x}:{length}" if magic == MAGIC else None

    def reopen(self) -> SpoolReader:
        """The same instance opened again: a session that buffers instances keeps this, not
        the open file (delivery closes that when ``send`` returns)."""
        return SpoolReader(self.name)

    def close(self) -> None:
        self._f.close()
        super().close()


def _match_command(tags: dict[str, str], command: tuple[str, str]) -> None:
    sop_class, sop_instance = command
    for kw, expected in (("SOPInstanceUID", sop_instance), ("SOPClassUID", sop_class)):
        if tags.get(kw, "") != expected:
            raise DatasetMismatch(f"dataset {kw} {tags.get(kw, '')[:64]!r} is not the "
                                  f"command's {expected[:64]!r}")


def _spool_name(tags: dict[str, str]) -> str:
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


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def unlink_quietly(p: str | Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(p)
