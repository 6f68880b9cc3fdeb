"""The frames of a stored instance's Pixel Data, read from the Part 10 stream without decoding.

WADO-RS ``/frames/{n}`` answers with a frame's bytes as stored: for a native (uncompressed)
syntax the slice of Pixel Data the frame occupies (``Rows × Columns × SamplesPerPixel ×
BitsAllocated / 8`` bytes each), for an encapsulated one the frame's fragment(s) joined, as
pydicom's ``encaps`` finds them (Basic or Extended Offset Table, else one fragment per frame or
the JPEG end-of-image markers). Nothing is decoded, so this runs in the router process, where
the pixel codecs are never imported (``common/nocodecs.py``). Only the header up to Pixel Data
and the frames asked for are read; a multi-frame instance is never held whole in memory (except
Deflated, whose body cannot be read at an offset).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

#: The media type of a frame of each compressed syntax (PS3.18 Table 8.7.3-2; what is not
#: listed has no single-frame media type the router serves).
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "image/jpeg",  # JPEG Extended
    "1.2.840.10008.1.2.4.57": "image/jpeg",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": "image/jpeg",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "image/jls",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "image/jls",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "image/jp2",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "image/jp2",  # JPEG 2000
    "1.2.840.10008.1.2.4.92": "image/jpx",  # JPEG 2000 Part 2 Lossless
    "1.2.840.10008.1.2.4.93": "image/jpx",  # JPEG 2000 Part 2
    "1.2.840.10008.1.2.4.201": "image/jphc",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": "image/jphc",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": "image/jphc",  # HTJ2K
    "1.2.840.10008.1.2.5": "image/dicom-rle",  # RLE Lossless
}
NATIVE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"})
_CHUNK = 1 << 20


class FrameError(ValueError):
    """The frames asked for cannot be given: ``status`` 400 (no such frame), 404 (no pixel
    data) or 406 (a syntax or pixel layout the router serves no frames of)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Frames:
    """Where an instance's frames are: ``number`` of them, native or encapsulated."""

    transfer_syntax: str
    number: int
    native: bool
    start: int  # file offset of the Pixel Data value (native) or of its first item
    frame_size: int  # bytes per native frame
    extended: tuple[bytes, bytes] | None  # Extended Offset Table and its lengths
    inline: bytes | None = None  # the Pixel Data itself, when it had to be read (Deflated)


def media_type(transfer_syntax: str) -> str:
    """The media type of one frame in ``transfer_syntax``; FrameError 406 if there is none."""
    if transfer_syntax in NATIVE:
        return "application/octet-stream"
    found = FRAME_MEDIA_TYPES.get(transfer_syntax)
    if found is None:
        raise FrameError(406, f"no frames are served for {UID(transfer_syntax).name}")
    return found


def locate(f: BinaryIO, transfer_syntax: str) -> Frames:
    """Read the header of the Part 10 stream ``f`` up to Pixel Data and find the frames."""
    if transfer_syntax == ExplicitVRBigEndian:
        raise FrameError(406, "frames of Big Endian instances are not served")
    media_type(transfer_syntax)
    if transfer_syntax == DeflatedExplicitVRLittleEndian:  # no offsets in a deflated body
        ds = dcmread(f, force=True)
        data = ds.get("PixelData")
        if data is None:
            raise FrameError(404, "the instance has no Pixel Data")
        return _native(ds, 0, len(data), transfer_syntax, bytes(data))
    ds = dcmread(f, stop_before_pixels=True, force=True)
    pos = f.tell()
    head = f.read(8)
    if len(head) < 8 or struct.unpack("<HH", head[:4]) != (0x7FE0, 0x0010):
        raise FrameError(404, "the instance has no Pixel Data")
    if transfer_syntax == ImplicitVRLittleEndian:
        length, start = struct.unpack("<I", head[4:8])[0], pos + 8
    else:
        length, start = struct.unpack("<I", f.read(4))[0], pos + 12
    if transfer_syntax in NATIVE:
        return _native(ds, start, length, transfer_syntax)
    if length != 0xFFFFFFFF:
        raise FrameError(406, "the Pixel Data of a compressed syntax is not encapsulated")
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (bytes(ds.ExtendedOffsetTable), bytes(ds.ExtendedOffsetTableLengths))
    number = int(ds.get("NumberOfFrames", 1) or 1)
    return Frames(transfer_syntax, number, False, start, 0, extended)


def _native(ds: Dataset, start: int, length: int, ts: str, inline: bytes | None = None
            ) -> Frames:
    get = ds.get
    rows, cols = int(get("Rows", 0) or 0), int(get("Columns", 0) or 0)
    samples, bits = int(get("SamplesPerPixel", 1) or 1), int(get("BitsAllocated", 0) or 0)
    number = int(get("NumberOfFrames", 1) or 1)
    if bits == 1 and number > 1:
        raise FrameError(406, "frames of multi-frame 1-bit Pixel Data are not served")
    size = (rows * cols * samples * bits + 7) // 8
    if size <= 0 or length < size * number:
        raise FrameError(404, f"the Pixel Data ({length} bytes) does not hold {number} "
                         f"frame(s) of {size} bytes")
    return Frames(ts, number, True, start, size, None, inline)


def check(frames: Frames, numbers: list[int]) -> None:
    """FrameError 400 for a frame number the instance does not have."""
    bad = [n for n in numbers if not 1 <= n <= frames.number]
    if bad:
        raise FrameError(400, f"frame {bad[0]} does not exist: the instance has "
                         f"{frames.number} frame(s)")


def read_frame(f: BinaryIO, frames: Frames, number: int) -> Iterator[bytes]:
    """Frame ``number`` (1-based) as stored, in chunks (native) or whole (encapsulated)."""
    if frames.inline is not None:
        f = io.BytesIO(frames.inline)
    if frames.native:
        f.seek(frames.start + (number - 1) * frames.frame_size)
        left = frames.frame_size
        while left:
            chunk = f.read(min(left, _CHUNK))
            if not chunk:
                raise FrameError(404, "the Pixel Data ends before the frame")
            left -= len(chunk)
            yield chunk
        return
    f.seek(frames.start)
    yield get_frame(f, number - 1, number_of_frames=frames.number,
                    extended_offsets=frames.extended)
