"""The receive log: one synced write in a preallocated file makes a received instance durable.

A new file needs two syncs to be durable (its data and its directory entry, plus the allocation
metadata); overwriting blocks of a file that already exists, is fully allocated and was written
once needs only ``fdatasync`` of that data (~0.12 ms here vs ~0.41 ms). So each instance is first
written as a *record* into ``<spool>/receive-log/<n>.log`` and synced; then it is acknowledged;
then its spool file is written behind it without a sync of its own. A background flusher makes
those spool files durable in batches (fsync of the files and their directories) and only then
moves the log's *checkpoint* past their records, which frees their space for reuse (a ring).
Start-up replays every valid record newer than the checkpoint whose spool file is missing or
not whole (``Spool.replay_receive_logs``).

File layout (all little endian)::

    0     checkpoint copy A (512 bytes)  magic, file size, checkpoint seq, counter, salt, CRC32
    512   checkpoint copy B              (written alternately: a torn write leaves the other)
    4096  records, each starting on a 4096-byte boundary:
          magic, seq, time_ns, data length, CRC32, name length | name | data (a Part 10 file
          with its completion marker in the preamble, exactly the spool file to be)

A record's CRC32 covers the log's random salt, its header, its name and the data's first 24
bytes: the completion marker, which holds the CRC32 and length of the rest of the data (so the
data is checksummed once, and a record inside a received dataset cannot pass for a real one).
Records are written with one ``pwritev``; concurrent associations share one ``fdatasync``
(group commit) and none is acknowledged before a sync that started after its own write.

Each process (``receivers: N``) claims a log file of its own with ``flock``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import secrets
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .faults import POWERCUT, crash_point
from .slots import MAGIC, MARKER, MARKER_SIZE, fsync_dir

log = logging.getLogger("dicomrouter.spool")

LOG_DIR = "receive-log"
HEADER = 4096
BLOCK = 4096
LOG_MAGIC = b"DRRXLOG1"
REC_MAGIC = b"DRRXREC1"
CKPT = struct.Struct("<8sQQQ16sI")  # magic, size, checkpoint, counter, salt, crc
REC = struct.Struct("<8sQQQIH")  # magic, seq, time_ns, data length, crc, name length
# seconds between the flusher's batches (sooner when the log fills up): small batches keep its
# fsyncs from queueing in front of the log's own syncs (measured: 0.5 s doubled the time to
# accept a CT instance while a batch was written)
# (DICOMROUTER_FLUSH_EVERY: the power-cut test widens the window of files not yet synced)
FLUSH_EVERY = float(os.environ.get("DICOMROUTER_FLUSH_EVERY", "0.1"))


class LogFull(OSError):
    """No room in the receive log within receive_log_wait: the sender gets 0xA700."""


class LogBroken(OSError):
    """The log cannot be used any more (a failed sync): receptions take the slot path."""


@dataclass(eq=False)
class Record:
    seq: int
    offset: int
    size: int  # bytes it takes in the log (a multiple of BLOCK)
    time_ns: int = 0  # when it was received (its spool file's mtime)
    synced: bool = False
    error: OSError | None = None
    paths: tuple[str, ...] = ()  # where its spool file was written (set once it was)
    flushed: bool = False


@dataclass
class Found:
    """A valid record read back at start-up."""

    seq: int
    time_ns: int
    name: str
    offset: int  # of its data in the file
    length: int


def _align(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def _ckpt(size: int, checkpoint: int, counter: int, salt: bytes) -> bytes:
    body = CKPT.pack(LOG_MAGIC, size, checkpoint, counter, salt, 0)
    return CKPT.pack(LOG_MAGIC, size, checkpoint, counter, salt, zlib.crc32(body))


def _read_ckpt(head: bytes) -> tuple[int, int, int, bytes] | None:
    """(size, checkpoint, counter, salt) of the newest valid checkpoint copy."""
    best = None
    for at in (0, 512):
        raw = head[at:at + CKPT.size]
        if len(raw) < CKPT.size:
            continue
        magic, size, checkpoint, counter, salt, crc = CKPT.unpack(raw)
        if magic != LOG_MAGIC or zlib.crc32(CKPT.pack(magic, size, checkpoint, counter, salt,
                                                      0)) != crc:
            continue
        if best is None or counter > best[2]:
            best = (size, checkpoint, counter, salt)
    return best


def _record_crc(salt: bytes, seq: int, time_ns: int, length: int, name: bytes,
                marker: bytes | memoryview) -> int:
    head = REC.pack(REC_MAGIC, seq, time_ns, length, 0, len(name))
    return zlib.crc32(marker, zlib.crc32(name, zlib.crc32(head, zlib.crc32(salt))))


def _data_whole(data: bytes | memoryview) -> bool:
    """The completion marker in the data's preamble matches the rest of the data."""
    if len(data) < MARKER_SIZE:
        return False
    magic, crc, length = MARKER.unpack(bytes(data[:MARKER_SIZE]))
    return magic == MAGIC and length == len(data) and \
        zlib.crc32(memoryview(data)[MARKER_SIZE:]) == crc


def scan(path: Path) -> tuple[int, list[Found]]:
    """(checkpoint, valid records newer than it in sequence order) of a log file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < HEADER:
            return 0, []
        head = f.read(1024)
        ck = _read_ckpt(head)
        if ck is None:
            return 0, []
        _size, checkpoint, _counter, salt = ck
        found: dict[int, Found] = {}
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as view:
            off = HEADER
            while off + REC.size <= size:
                if mm[off:off + 8] != REC_MAGIC:
                    off += BLOCK
                    continue
                magic, seq, time_ns, length, crc, nlen = REC.unpack_from(mm, off)
                start = off + REC.size + nlen
                end = start + length
                if seq <= checkpoint or end > size or length < MARKER_SIZE:
                    off += BLOCK
                    continue
                name = mm[off + REC.size:start]
                data = view[start:end]
                good = _record_crc(salt, seq, time_ns, length, name, data[:MARKER_SIZE]) == crc \
                    and _data_whole(data)
                data.release()
                if not good:
                    off += BLOCK
                    continue
                found[seq] = Found(seq, time_ns, name.decode("utf-8", "replace"), start, length)
                off += _align(end - off)
    return checkpoint, [found[s] for s in sorted(found)]


class ReceiveLog:
    """One claimed log file: append (durable on return), write-behind bookkeeping, flusher."""

    def __init__(self, path: Path, fd: int, size: int, checkpoint: int, counter: int,
                 salt: bytes, wait: float) -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.wait = wait
        self.checkpoint = checkpoint
        self._counter = counter
        self._salt = salt
        self._next_seq = checkpoint + 1
        self._cv = threading.Condition()
        self._live: deque[Record] = deque()  # records whose space is not free, oldest first
        self._head = HEADER  # where the next record goes when the log is empty
        self._unsynced: list[Record] = []
        self._syncing = False
        self._broken: OSError | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- opening ---------------------------------------------------------------------------

    @classmethod
    def claim(cls, directory: Path, size: int, wait: float) -> ReceiveLog:
        """Lock the first log file no other process holds (creating it if needed). The caller
        replays it (``scan``) before appending: ``reset`` then starts it afresh."""
        directory.mkdir(parents=True, exist_ok=True)
        for i in range(256):
            path = directory / f"{i}.log"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return cls(path, fd, size, 0, 0, b"", wait)
        raise OSError(errno.EMFILE, f"no free receive log file in {directory}")

    @classmethod
    def lock(cls, path: Path) -> ReceiveLog | None:
        """A log file left by an earlier run, locked for its replay (None: in use)."""
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(path, fd, os.fstat(fd).st_size, 0, 0, b"", 0.0)

    def close(self) -> None:
        os.close(self.fd)

    def reset(self, replayed_up_to: int, prepare: bool = True) -> None:
        """Move the checkpoint past every record already replayed; ``prepare``: also make the
        file ready for appending (preallocated and zero-filled once, when new or resized)."""
        st = os.fstat(self.fd)
        head = os.pread(self.fd, 1024, 0)
        ck = _read_ckpt(head)
        if not prepare:
            if ck is not None and replayed_up_to > ck[1]:
                _size, self.checkpoint, self._counter, self._salt = ck
                self.size = ck[0]
                self._write_checkpoint(replayed_up_to)
            return
        if ck is None or ck[0] != self.size or st.st_size != self.size:
            self._prewrite()
            self._counter, self._salt, self.checkpoint = 0, secrets.token_bytes(16), 0
        else:
            _size, self.checkpoint, self._counter, self._salt = ck
        self._write_checkpoint(max(self.checkpoint, replayed_up_to))
        self._next_seq = self.checkpoint + 1

    def _prewrite(self) -> None:
        """Write every block once and sync: later overwrites need no allocation metadata."""
        started = time.monotonic()
        os.ftruncate(self.fd, 0)
        zeros = bytes(1 << 20)
        off = 0
        while off < self.size:
            n = min(len(zeros), self.size - off)
            os.pwrite(self.fd, zeros[:n], off)
            off += n
        os.fsync(self.fd)
        fsync_dir(self.path.parent)
        log.info("receive log %s: %d MB written and synced once (%.1f s)", self.path,
                 self.size >> 20, time.monotonic() - started)

    def _write_checkpoint(self, checkpoint: int) -> None:
        self._counter += 1
        raw = _ckpt(self.size, checkpoint, self._counter, self._salt)
        self._pwritev([raw], (self._counter % 2) * 512)
        self._datasync()
        self.checkpoint = checkpoint

    # ---- I/O (through the power-cut layer in the crash tests) ------------------------------

    def _pwritev(self, buffers: list[bytes | bytearray | memoryview], offset: int) -> None:
        if POWERCUT is not None:
            POWERCUT.pwritev(self.fd, buffers, offset)
            return
        want = sum(len(b) for b in buffers)
        done = os.pwritev(self.fd, buffers, offset)
        if done != want:  # short write (rare): the rest one buffer at a time
            data = b"".join(bytes(b) for b in buffers)
            while done < want:
                done += os.pwrite(self.fd, data[done:], offset + done)

    def _datasync(self) -> None:
        if POWERCUT is not None:
            POWERCUT.datasync(self.fd)
        else:
            os.fdatasync(self.fd)

    # ---- the receive path ------------------------------------------------------------------

    @property
    def broken(self) -> bool:
        return self._broken is not None

    def max_data(self, name_length: int) -> int:
        return self.size - HEADER - REC.size - name_length

    def append(self, name: str, data: bytearray, time_ns: int) -> Record:
        """Write a record and return once it is synced. ``data`` holds the completion marker.
        Raises LogFull (no room within ``wait``) or LogBroken."""
        raw_name = name.encode("utf-8")
        length = len(data)
        need = _align(REC.size + len(raw_name) + length)
        with self._cv:
            if self._broken is not None:
                raise LogBroken(errno.EIO, f"receive log unusable: {self._broken}")
            deadline = time.monotonic() + self.wait
            while (offset := self._fit(need)) is None:
                self._wake.set()  # ask the flusher for space now
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LogFull(errno.ENOSPC, f"receive log full for {self.wait:g} s "
                                  "(receive_log_wait): spool files not flushed in time")
                self._cv.wait(min(left, 0.05))
            # went round: before the end of the newest record, live or already freed (a
            # flusher that keeps up leaves no live record, and the log still wraps)
            last_end = self._live[-1].offset + self._live[-1].size if self._live else self._head
            wrapped = offset < last_end
            seq = self._next_seq
            self._next_seq += 1
            rec = Record(seq, offset, need, time_ns)
            self._live.append(rec)
            if self._used() > self.size // 2:
                self._wake.set()
        crc = _record_crc(self._salt, seq, time_ns, length, raw_name,
                          memoryview(data)[:MARKER_SIZE])
        head = REC.pack(REC_MAGIC, seq, time_ns, length, crc, len(raw_name)) + raw_name
        try:
            self._pwritev([head, data], offset)
        except OSError as exc:
            self._void(rec)
            raise LogBroken(exc.errno or errno.EIO, f"receive log write failed: {exc}") from exc
        crash_point("record-written")
        if wrapped:
            crash_point("wrap")
        self._sync(rec)
        crash_point("record-synced")
        return rec

    def _used(self) -> int:
        return sum(r.size for r in self._live)

    def _fit(self, need: int) -> int | None:
        """Offset for ``need`` bytes that overwrites no live record (caller holds the lock)."""
        end = self.size
        if not self._live:
            head = self._head if self._head + need <= end else HEADER
            return head if head + need <= end else None
        tail = self._live[0].offset
        last = self._live[-1]
        head = last.offset + last.size
        if tail <= last.offset:  # not wrapped: free space after the head and before the tail
            if head + need <= end:
                return head
            return HEADER if HEADER + need <= tail else None
        return head if head + need <= tail else None

    def _sync(self, rec: Record) -> None:
        """Group commit: one thread syncs for every record written so far."""
        cv = self._cv
        with cv:
            self._unsynced.append(rec)
            while not rec.synced and rec.error is None:
                if self._syncing:
                    cv.wait()
                    continue
                self._syncing = True
                batch, self._unsynced = self._unsynced, []
                error: OSError | None = None
                cv.release()
                try:
                    self._datasync()
                except OSError as exc:
                    error = exc
                finally:
                    cv.acquire()
                    self._syncing = False
                for r in batch:
                    r.synced, r.error = error is None, error
                if error is not None:
                    self._broken = error  # fsync failed: the page cache cannot be trusted
                    log.error("receive log %s: sync failed (%s); receptions take the receive "
                              "slots from now on", self.path, error)
                cv.notify_all()
        if rec.error is not None:
            self._void(rec)
            raise LogBroken(rec.error.errno or errno.EIO, f"receive log sync failed: {rec.error}")

    def _void(self, rec: Record) -> None:
        """A record never acknowledged: nothing to flush for it."""
        with self._cv:
            rec.flushed = True
            rec.paths = ()

    def placed(self, rec: Record, *paths: str) -> None:
        """Its spool file was written (under one of ``paths``): the flusher may sync it."""
        with self._cv:
            rec.paths = paths

    # ---- the flusher -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="receive-log-flusher",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Flush what can be flushed, then release the file (its lock goes with it)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
        with contextlib.suppress(OSError):
            self.flush()
        os.close(self.fd)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(FLUSH_EVERY)
            self._wake.clear()
            try:
                self.flush()
            except OSError as exc:
                # A failed sync may have dropped pages a retry would call synced (fsyncgate):
                # the checkpoint stays where it is (start-up replays what lies past it) and
                # receptions take the receive slots from now on.
                with self._cv:
                    first = self._broken is None
                    self._broken = self._broken or exc
                if first:
                    log.error("receive log %s: syncing the spool files failed (%s); the "
                              "records stay for the next start to replay, receptions take "
                              "the receive slots", self.path, exc)
                self._stop.wait(1.0)

    def flush(self) -> int:
        """Sync the spool files written behind the log, then move the checkpoint past every
        record whose file is durable; returns the new checkpoint."""
        with self._cv:
            todo = [r for r in self._live if r.paths and not r.flushed]
            live = list(self._live)
        if todo:
            paths = self._sync_files(todo)
            if POWERCUT is not None:
                POWERCUT.synced(paths)
            with self._cv:
                for r in todo:
                    r.flushed = True
        upto = self.checkpoint
        for r in live:
            if not r.flushed:
                break
            upto = r.seq
        if upto > self.checkpoint:
            if self._broken is None:  # (receptions go on meanwhile: only this thread writes it)
                self._write_checkpoint(upto)
            with self._cv:
                while self._live and self._live[0].seq <= upto:
                    gone = self._live.popleft()
                    self._head = gone.offset + gone.size
                self._cv.notify_all()
        return upto

    def _sync_files(self, todo: list[Record]) -> list[str]:
        """Make the spool files of ``todo`` durable, names included; returns their paths.

        One ``syncfs`` of the spool's file system when the C library has it: every dirty page
        and the journal, with one cache flush of the device. An fsync per file (and folder)
        costs a device flush each, as many as the receive slots did, and they queue in front
        of the log's own syncs. Then the files' page-cache pages are given back (see
        ReceiveFile's drop_cache: new pages are what a reception pays for)."""
        paths = [p for r in todo for p in r.paths]  # the write-behind name and the spool name
        if _SYNCFS is not None:
            if _SYNCFS(self.fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs: {os.strerror(err)}")
            crash_point("flush")
            found = []
            for p in paths:
                try:
                    fd = os.open(p, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
                found.append(p)
            return found
        dirs: set[str] = set()
        found = []
        for p in paths:
            try:
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError:  # renamed, or deleted since (delivered, superseded)
                continue
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            dirs.add(os.path.dirname(p))
            found.append(p)
        crash_point("flush")
        for d in dirs:
            with contextlib.suppress(FileNotFoundError):  # a study deleted meanwhile
                fsync_dir(Path(d))
        return found

    def pending(self) -> int:
        """Records whose spool files are not durable yet."""
        with self._cv:
            return len(self._live)


def read(path: Path, found: Found) -> bytes:
    """The data of a record ``scan`` found."""
    with open(path, "rb") as f:
        return os.pread(f.fileno(), found.length, found.offset)


def _load_syncfs() -> Callable[[int], int] | None:
    """libc's syncfs(2) (Linux), or None."""
    if os.environ.get("DICOMROUTER_NO_SYNCFS"):  # (to measure the per-file way)
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_SYNCFS = _load_syncfs()


def log_files(directory: Path) -> Iterator[Path]:
    if directory.is_dir():
        yield from sorted(directory.glob("*.log"))
