"""Checking that a received dataset is whole before it is acknowledged: a walk over its elements.

Why hand-written: the check runs for every instance before the C-STORE response, and it only
needs lengths. pydicom would decode values (and recurse in Python for nested sequences, which a
hostile dataset turns into a RecursionError); DCMTK is not in-process. The walk reads element
headers only (in 64 kB windows, seeking over values), follows sequences and items of defined and
undefined length, and fails when

* an element declares more bytes than remain (a dataset truncated inside an element),
* an item or sequence misses its delimiter, or an element crosses the end of its item,
* sequences nest deeper than ``max_depth``,
* an explicit VR is not a DICOM VR,

so every acknowledged instance parses to its end in pydicom and DCMTK alike. Deflated datasets are
inflated as they are walked (memory stays one window).
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import BinaryIO

from pydicom.datadict import DicomDictionary

UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                      b"UR", b"UT", b"UV"})
SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS",
                       b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL",
                       b"US"})
# Implicit VR: the data dictionary says which tags are sequences (pydicom parses those nested).
SEQUENCE_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")
WINDOW = 1 << 16


class Malformed(ValueError):
    """The dataset does not end where its elements say it does (or nests too deep)."""


class MemoryFile(io.RawIOBase):
    """A read-only file over bytes in memory without copying them (``io.BytesIO`` copies a
    bytearray: half a megabyte per CT instance on the receive log's path)."""

    def __init__(self, data: bytes | bytearray) -> None:
        super().__init__()
        self._data = memoryview(data)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, len(self._data))[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        end = len(self._data) if n is None or n < 0 else min(len(self._data), self._pos + n)
        out = bytes(self._data[self._pos:end])
        self._pos = max(self._pos, end)
        return out

    def close(self) -> None:
        self._data.release()
        super().close()


class _FileSource:
    """Reads a byte range of a file through a 64 kB window; skipping a value is a seek."""

    def __init__(self, f: BinaryIO, start: int, size: int) -> None:
        self.f = f
        self.pos = start
        self.size = size
        self._buf = b""
        self._buf_start = start

    def read(self, n: int) -> bytes:
        if self.pos + n > self.size:
            raise Malformed(f"needs {n} bytes at offset {self.pos}, the file ends at {self.size}")
        off = self.pos - self._buf_start
        if off < 0 or off + n > len(self._buf):
            self.f.seek(self.pos)
            self._buf = self.f.read(max(n, WINDOW))
            self._buf_start, off = self.pos, 0
        self.pos += n
        return self._buf[off:off + n]

    def skip(self, n: int) -> None:
        if self.pos + n > self.size:
            raise Malformed(f"a value of {n} bytes at offset {self.pos} goes past the end of the "
                            f"dataset ({self.size - self.pos} bytes remain)")
        self.pos += n

    def at_end(self) -> bool:
        return self.pos >= self.size


class _InflateSource:
    """The same over a deflated dataset, inflated window by window as it is walked."""

    def __init__(self, f: BinaryIO, start: int) -> None:
        f.seek(start)
        self.f = f
        self.pos = 0
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf = bytearray()
        self._eof = False

    def _fill(self, n: int) -> None:
        """Inflate until ``n`` bytes are buffered or the stream ends.

        Output is capped per call (``max_length``) so memory stays one window; what zlib could
        not consume then waits in ``unconsumed_tail`` and must be fed again *before* any new input
        from the file (feeding new bytes first loses the tail: "inconsistent stream state").
        """
        z = self._z
        while len(self._buf) < n and not self._eof:
            try:
                if z.unconsumed_tail:
                    self._buf += z.decompress(z.unconsumed_tail, WINDOW)
                else:
                    raw = self.f.read(WINDOW)
                    if not raw:
                        self._buf += z.flush()
                        self._eof = True
                        break
                    self._buf += z.decompress(raw, WINDOW)
            except zlib.error as exc:
                raise Malformed(f"the deflated dataset does not inflate: {exc}") from None
            if z.eof:
                self._eof = True

    def read(self, n: int) -> bytes:
        self._fill(n)
        if len(self._buf) < n:
            raise Malformed(f"needs {n} bytes at inflated offset {self.pos}; the dataset ends")
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self.pos += n
        return out

    def skip(self, n: int) -> None:
        while n > 0:
            self._fill(min(n, WINDOW))
            if not self._buf:
                raise Malformed(f"a value goes past the end of the dataset (inflated offset "
                                f"{self.pos})")
            step = min(n, len(self._buf))
            del self._buf[:step]
            self.pos += step
            n -= step

    def at_end(self) -> bool:
        self._fill(1)
        return not self._buf


class _Walker:
    def __init__(self, src: _FileSource | _InflateSource, little: bool, max_depth: int) -> None:
        self.src = src
        self.max_depth = max_depth
        self._tag = struct.Struct("<HHI" if little else ">HHI")
        self._explicit = struct.Struct("<HH2sH" if little else ">HH2sH")
        self._long = struct.Struct("<I" if little else ">I")

    def dataset(self, end: int | None, implicit: bool, depth: int, top: bool = False) -> None:
        """Elements up to ``end`` (defined length), or up to the item delimiter (None)."""
        src = self.src
        while True:
            if end is not None and src.pos == end:
                return
            if top and src.at_end():
                return
            raw = src.read(8)
            group, elem, length = self._tag.unpack(raw)
            tag = group << 16 | elem
            if tag == ITEM_END:
                if end is None and not top:
                    return
                raise Malformed(f"item delimiter where none belongs (offset {src.pos - 8})")
            if group == 0xFFFE:
                raise Malformed(f"item tag ({group:04X},{elem:04X}) outside a sequence "
                                f"(offset {src.pos - 8})")
            vr = b""
            if not implicit:
                _g, _e, vr, length = self._explicit.unpack(raw)
                if vr in LONG_VRS:
                    length = self._long.unpack(src.read(4))[0]
                elif vr not in SHORT_VRS:
                    raise Malformed(f"({group:04X},{elem:04X}) has no valid VR ({vr!r})")
            is_sq = vr == b"SQ" or (implicit and tag in SEQUENCE_TAGS)
            if length == UNDEFINED:
                if tag == PIXEL_DATA and vr != b"SQ":
                    self.fragments()
                elif is_sq or vr == b"UN" or implicit:
                    # UN of undefined length is a sequence in Implicit VR Little Endian
                    self.sequence(None, implicit or vr == b"UN", depth + 1)
                else:
                    raise Malformed(f"({group:04X},{elem:04X}) {vr.decode('ascii', 'replace')} "
                                    "cannot have an undefined length")
            elif is_sq:
                self.sequence(src.pos + length, implicit, depth + 1)
            else:
                src.skip(length)
            if end is not None and src.pos > end:
                raise Malformed(f"({group:04X},{elem:04X}) crosses the end of its item")

    def sequence(self, end: int | None, implicit: bool, depth: int) -> None:
        if depth > self.max_depth:
            raise Malformed(f"sequences nested more than {self.max_depth} deep "
                            "(max_sequence_depth)")
        src = self.src
        while True:
            if end is not None and src.pos == end:
                return
            group, elem, length = self._tag.unpack(src.read(8))
            tag = group << 16 | elem
            if tag == SEQ_END and end is None:
                return
            if tag != ITEM:
                raise Malformed(f"expected an item in a sequence, found ({group:04X},{elem:04X}) "
                                f"at offset {src.pos - 8}")
            self.dataset(None if length == UNDEFINED else src.pos + length, implicit, depth)
            if end is not None and src.pos > end:
                raise Malformed("an item crosses the end of its sequence")

    def fragments(self) -> None:
        """Encapsulated Pixel Data: items of defined length up to the sequence delimiter."""
        src = self.src
        while True:
            group, elem, length = self._tag.unpack(src.read(8))
            tag = group << 16 | elem
            if tag == SEQ_END:
                return
            if tag != ITEM or length == UNDEFINED:
                raise Malformed(f"encapsulated Pixel Data: expected a fragment, found "
                                f"({group:04X},{elem:04X}) at offset {src.pos - 8}")
            src.skip(length)


def meta_end_and_syntax(f: BinaryIO) -> tuple[int, str]:
    """Offset where the dataset starts and its transfer syntax, from a Part 10 file's File Meta
    group (which must start with its group length, as every file the receivers write does)."""
    head = f.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise Malformed("not a Part 10 file with a File Meta group length")
    meta_end = 144 + struct.unpack_from("<I", head, 140)[0]
    meta = head[144:] + f.read(max(0, meta_end - 144 - len(head[144:])))
    o, ts = 0, ""
    while o + 8 <= len(meta):
        group, elem = struct.unpack_from("<HH", meta, o)
        vr = meta[o + 4:o + 6]
        if vr in LONG_VRS:
            length, hdr = struct.unpack_from("<I", meta, o + 8)[0], 12
        else:
            length, hdr = struct.unpack_from("<H", meta, o + 6)[0], 8
        if group != 2:
            raise Malformed("the File Meta group length is wrong")
        if elem == 0x0010:
            ts = meta[o + hdr:o + hdr + length].rstrip(b"\x00 ").decode("ascii", "replace")
        o += hdr + length
    if o != len(meta) or not ts:
        raise Malformed("the File Meta group is malformed or has no Transfer Syntax UID")
    return meta_end, ts


def check_file(path: str | bytes | bytearray, max_depth: int = 32) -> None:
    """Raise Malformed unless the dataset of the Part 10 file at ``path`` (or the file's bytes,
    held in memory by the receive log) ends exactly at the end of the file, every element, item
    and sequence whole."""
    opened = MemoryFile(path) if isinstance(path, bytes | bytearray) else \
        open(path, "rb")  # noqa: SIM115
    with opened as f:
        meta_end, ts = meta_end_and_syntax(f)
        size = f.seek(0, 2)
        src: _FileSource | _InflateSource
        src = _InflateSource(f, meta_end) if ts in DEFLATED else _FileSource(f, meta_end, size)
        if src.at_end():
            raise Malformed("the dataset is empty")
        _Walker(src, ts != EXPLICIT_BE, max_depth).dataset(
            None if ts in DEFLATED else size, ts == IMPLICIT_LE, 0, top=True)


def check_bytes(data: bytes, syntax: str, max_depth: int = 32) -> None:
    """Raise Malformed unless ``data``, a dataset in ``syntax`` (not deflated: a Q/R identifier
    on an Implicit or Explicit VR context), ends exactly where its elements say it does. pydicom
    reads a value whose declared length runs past the data as if it were whole."""
    if syntax in DEFLATED:
        raise Malformed("a deflated dataset is not expected here")
    src = _FileSource(io.BytesIO(data), 0, len(data))
    _Walker(src, syntax != EXPLICIT_BE, max_depth).dataset(len(data), syntax == IMPLICIT_LE, 0,
                                                            top=True)
