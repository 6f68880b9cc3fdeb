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
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..dicomfile import UnreadableDataset, identify
from ..state import Instance, Reception, State, StateUnavailable, StudyState
from ..values import RESULT_TAG
from ..walk import Malformed, check_file
from .faults import POWERCUT, crash_point
from .kept_tags import Kept, is_kept_tags, load_kept, remove_kept, write_kept
from .logged import ReceiveLogSpool
from .note import PREAMBLE, recorded_as
from .receive import (
    Accepted,
    Expected,
    LogReceiveFile,
    ReceiveFile,
    SpoolFull,
    match_command,
)
from .recvlog import LOG_DIR, ReceiveLog
from .slots import MAGIC, MARKER, MARKER_SIZE, SlotPool, is_complete

log = logging.getLogger("dicomrouter.spool")


class Spool(ReceiveLogSpool):
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
        #: SOP Instance UID -> tags the router adds, kept on disk until recorded (kept_tags.py)
        self._kept: dict[str, Kept] = {}
        self.receive_log = receive_log
        self.log_dir = root / LOG_DIR
        self._log_size = log_size
        self._log_max_record = log_max_record
        self._log_wait = log_wait
        self.rxlog: ReceiveLog | None = None

    def start(self) -> None:
        """Start preparing receive slots in the background; with the receive log, claim a log
        file of this process's own (replaying what an earlier run left in it first)."""
        self.slots.start()
        if self.receive_log:
            self.start_receive_log()

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
        self._kept.update(load_kept(self.tmp))
        for p in sorted(self.tmp.iterdir(), key=_mtime):
            if is_kept_tags(p.name):
                continue
            try:
                if p.stat().st_size and is_complete(p):
                    tags, tsuid = identify(p)
                    try:
                        superseded = self._superseded(p, tags)
                    except StateUnavailable as exc:  # keep the slot: the next start decides
                        log.error("receive slot %s kept: %s", p, exc)
                        continue
                    if superseded is None:
                        tags, calling, called = recorded_as(p, tags)  # with its note
                        self._place(p, tags, tsuid, calling, called)
                        adopted += 1
                        continue
            except (OSError, UnreadableDataset) as exc:
                log.error("receive slot %s cannot be adopted: %s", p, exc)
            with contextlib.suppress(OSError):
                if p.stat().st_size:
                    removed += 1
                p.unlink()
        return adopted + self.replay_receive_logs(), removed

    def keep_tags(self, rx: ReceiveFile, tags: dict[str, str], calling_ae: str = "",
                  called_ae: str = "") -> str | None:
        """Before ``accept``: ``tags`` (the router's own, not in the file) stay with the
        instance being received into ``rx`` even if the process dies before it is recorded
        (``kept_tags``). Nothing is kept for a file whose SOP Instance UID cannot be read:
        ``accept`` refuses it. Returns the SOP Instance UID they are kept for."""
        try:
            sop = identify(rx.readable_now())[0]["SOPInstanceUID"]
        except (OSError, UnreadableDataset):
            return None
        kept = Kept(dict(tags), calling_ae, called_ae)
        write_kept(self.tmp, sop, kept)
        self._kept[sop] = kept
        return sop

    def forget_kept_tags(self, sop_uid: str | None = None) -> None:
        """Drop kept tags: of ``sop_uid`` (its ingest was refused), or, after start-up's
        recovery, every set no adopted instance used (kept before a crash that came after the
        record: a later reception of that SOP Instance UID must not take them)."""
        for sop in [sop_uid] if sop_uid is not None else list(self._kept):
            self._kept.pop(sop, None)
            remove_kept(self.tmp, sop)

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
            tags, calling, called = recorded_as(path, tags)
            self._place(path, tags, tsuid, calling, called)  # already in place: records it
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

    def new_receive_file(self, logged: bool = False, note: bytes = b""
                         ) -> ReceiveFile | LogReceiveFile:
        """Where a dataset is received: a receive slot, or (``logged``, the lean receiver, with
        the receive log on and usable) memory, for a receive log record. ``note``: the
        reception note a slot's preamble gets as the file is written (``note.py``; the lean
        receiver writes it into the header it makes)."""
        rxlog = self.rxlog
        if logged and rxlog is not None and not rxlog.broken:
            return LogReceiveFile(self.slots, self._log_max_record, self.room())
        return ReceiveFile(self.slots.take(), self.room(), note)

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
               command: Expected | None = None) -> Accepted:
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
            size = os.stat(src).st_size
            tags, tsuid = self._check(src, size, rx.error, command)
            rx.file.drop_cache()
        except BaseException:
            unlink_quietly(src)
            raise
        return Accepted(src, tags, tsuid, size, calling_ae, called_ae)

    def _check(self, source: str | bytearray, size: int, error: OSError | None,
               command: Expected | None) -> tuple[dict[str, str], str]:
        """What every reception passes before its answer, from a file or from memory (the
        receive log): written whole, room in the spool, a well-formed dataset that carries
        what the request says. Its index tags and transfer syntax."""
        if error is not None:
            raise SpoolFull(error.errno or errno.ENOSPC, f"write failed: {error}")
        self._check_room(size)
        try:
            check_file(source, self.max_depth)
        except Malformed as exc:
            raise UnreadableDataset(f"malformed dataset: {exc}") from None
        tags, tsuid = identify(source)
        if command is not None:
            match_command(tags, command)
        return tags, tsuid

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
        kept = self._kept.get(tags["SOPInstanceUID"]) if self._kept else None
        if kept is not None:
            tags = {**tags, **kept.tags}
            calling_ae, called_ae = calling_ae or kept.calling_ae, called_ae or kept.called_ae
        with self.study_lock(study):
            self._rename(src, tags)
            # If recording fails, the file stays: housekeeping (retry_placements) or start-up
            # (adopt_orphans) records it, or the sender's next attempt replaces it.
            key = key or f"data/{study}/{tags['SOPInstanceUID']}.dcm"
            rec = self.state.record_instance(tags, tsuid, key, size, calling_ae, called_ae,
                                             shared)
        if kept is not None:
            self.forget_kept_tags(tags["SOPInstanceUID"])
        with self._bytes_lock:
            self._bytes += size - rec.replaced_size
        if rec.moved_from:
            # a processing result re-identified into its origin study moves there on purpose:
            # not worth a warning
            log.log(logging.INFO if tags.get(RESULT_TAG) else logging.WARNING,
                    "instance %s moved from study %s to study %s (patient %s): the newer "
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
    """A spool file opened for reading, with its Part 10 preamble read as zeros: the router
    uses it for the receive slot's completion marker and the reception note (``note.py``: the
    sender's address among others), and a preamble from a sender may carry anything.
    ``name`` is the file's path, for libraries that insist on one (pynetdicom's chunked send)."""

    def __init__(self, path: str, hide: int = PREAMBLE) -> None:
        super().__init__()
        self._f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        self.name = path
        self._hide = hide  # bytes read as zeros: the preamble (MARKER_SIZE: the marker only)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        pos = self._f.tell()
        n = self._f.readinto(b)
        if n and pos < self._hide:
            end = min(n, self._hide - pos)
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
        return SpoolReader(self.name, self._hide)

    def close(self) -> None:
        self._f.close()
        super().close()


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def unlink_quietly(p: str | Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(p)
