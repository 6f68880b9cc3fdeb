"""The receive log's side of the spool (``receive_log: true``, recvlog.py): accepting an
instance with a log record, writing its spool file behind the answer, replaying the records of
an earlier run. ``ReceiveLogSpool`` is a base of ``local.Spool``, whose state it uses.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..dicomfile import UnreadableDataset, identify
from ..state import State, StateUnavailable
from .faults import POWERCUT, crash_point
from .note import recorded_as
from .receive import (
    Accepted,
    Expected,
    LogReceiveFile,
    SpoolFull,
    spool_name,
    write_file,
)
from .recvlog import (
    Found,
    LogBroken,
    LogFull,
    ReceiveLog,
    log_files,
    read,
    scan,
)
from .slots import MARKER_SIZE, Checksum, SlotPool, fsync_dir, is_complete

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("dicomrouter.spool")


class ReceiveLogSpool:
    """The receive log's methods of the spool (the attributes are ``local.Spool``'s)."""

    root: Path
    tmp: Path
    state: State
    slots: SlotPool
    max_depth: int
    receive_log: bool
    log_dir: Path
    rxlog: ReceiveLog | None
    _log_size: int
    _log_max_record: int
    _log_wait: float
    path: Callable[[str], str]
    _check_room: Callable[[int], None]
    _place: Callable[..., bool]

    def start_receive_log(self) -> None:
        """Claim a log file of this process's own, replaying what an earlier run left in it."""
        rxlog = ReceiveLog.claim(self.log_dir, self._log_size, self._log_wait)
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

    def _accept_logged(self, rx: LogReceiveFile, calling_ae: str, called_ae: str,
                       command: Expected | None) -> Accepted:
        """``accept`` on the receive log: checked and identified in memory (the header is read
        from the received bytes, no file read at all), then one log record, synced (shared with
        the other associations' records), makes it durable. Its spool file is written by
        ``place``, after the answer."""
        data = rx.buf if rx.buf is not None else bytearray()
        rx.buf = None
        size = len(data)
        tags, tsuid = self._check(data, size, rx.error, command)
        checksum = Checksum()
        checksum.update(data)
        data[:MARKER_SIZE] = checksum.marker()
        name = f"data/{tags['StudyInstanceUID']}/{tags['SOPInstanceUID']}.dcm"
        rxlog = self.rxlog
        try:
            if rxlog is None:
                raise LogBroken(errno.EIO, "receive log stopped")
            rec = rxlog.append(name, data, time.time_ns())
        except LogFull as exc:
            raise SpoolFull(exc.errno or errno.ENOSPC, str(exc)) from None
        except LogBroken:  # the slot path, as if the log were off
            path = self.slots.take()
            write_file(path, data, sync=True)
            return Accepted(path, tags, tsuid, size, calling_ae, called_ae)
        # its spool file goes into a pre-created slot: no file creation after the answer either
        path = self.slots.take()
        return Accepted(path, tags, tsuid, size, calling_ae, called_ae, data=data, record=rec)

    def _write_behind(self, accepted: Accepted) -> Accepted:
        """Write the spool file of an instance the receive log holds (no sync: the flusher)."""
        assert accepted.data is not None and accepted.record is not None
        when = accepted.record.time_ns  # mtime = reception time, as a slot's (_superseded)
        if POWERCUT is None:
            write_file(accepted.path, accepted.data, mtime_ns=when)
        else:  # the crash tests: what a power cut would lose is known
            with POWERCUT.lock:
                POWERCUT.written(accepted.path, self.path(spool_name(accepted.tags)))
                write_file(accepted.path, accepted.data, mtime_ns=when)
        return replace(accepted, data=None)

    def _written(self, accepted: Accepted) -> None:
        """Its spool file exists (renamed or not): the log's flusher may make it durable."""
        if accepted.record is not None and accepted.data is None and self.rxlog is not None:
            self.rxlog.placed(accepted.record, accepted.path,
                              self.path(spool_name(accepted.tags)))
            crash_point("spool-written")

    def replay_receive_logs(self) -> int:
        """Start-up: replay the receive log files no running process holds (every process
        replays the one it claims as well); returns how many instances came back."""
        total = 0
        for path in log_files(self.log_dir):
            held = ReceiveLog.lock(path)
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
        checkpoint, found = scan(path)
        upto, replayed = checkpoint, 0
        dirs: set[str] = set()
        for rec in found:
            data = read(path, rec)
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

    def _replay_one(self, rec: Found, data: bytes) -> str | None:
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
        tags, calling, called = recorded_as(tmp, tags, data)  # with its note
        self._place(tmp, tags, tsuid, calling, called)
        return os.path.dirname(final)
