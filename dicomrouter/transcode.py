"""Converting a stored instance to another transfer syntax, for a peer that refuses the stored one.

Every conversion is decode → (byte order fixed) → encode with real codecs; nothing is guessed:

* **Big Endian → Little Endian.** pydicom re-encodes the numeric VRs (US, SS, UL, SL, FL, FD, AT,
  ...) itself, but keeps the raw bytes of OW/OF/OL/OD/OV values (Pixel Data, LUT, overlay and
  waveform data) as read; those are swapped here by the width of their VR (Pixel Data by its
  Bits Allocated), in every item of every sequence.
* **Compressed → uncompressed.** pydicom's decoders with the plugins installed with the router
  (GDCM, pylibjpeg + openjpeg + RLE, pyjpegls; pylibjpeg-libjpeg for 12-bit JPEG Extended, see
  docs/architecture.md). The SOP Instance UID is never changed.
* **Lossy stays lossy.** An image that went through a lossy syntax keeps (or gets) Lossy Image
  Compression = 01 when it is written in a lossless or uncompressed syntax.
* **To a compressed syntax** (a destination's ``transfer_syntaxes`` preference): lossless encoders
  only (RLE, JPEG-LS lossless, JPEG 2000 lossless, Deflated); the router never compresses lossily.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

#: Syntaxes whose images are always lossy, and those that may be (JPEG 2000 Part 1, HTJ2K):
#: for the latter an explicit Lossy Image Compression of the source is kept as it is.
ALWAYS_LOSSY = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG Extended
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",  # JPEG-LS near-lossless
}
MAYBE_LOSSY = {
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",  # JPEG 2000
    "1.2.840.10008.1.2.4.93": "ISO_15444_2",  # JPEG 2000 Part 2
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",  # HTJ2K
}
UNCOMPRESSED_TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                        DeflatedExplicitVRLittleEndian)
#: Everything a destination may ask for in ``transfer_syntaxes`` (lossless encodings only).
TARGETS = (*UNCOMPRESSED_TARGETS, RLELossless, JPEGLSLossless, JPEG2000Lossless)

_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


class ConversionError(Exception):
    """The instance cannot be converted to the syntax asked for (the reason says why).

    ``permanent``: the same bytes would fail again (False when the conversion process died or
    timed out, which a retry may not repeat)."""

    def __init__(self, reason: str, permanent: bool = True) -> None:
        super().__init__(reason, permanent)
        self.reason = reason
        self.permanent = permanent

    def __str__(self) -> str:
        return self.reason


def is_lossy(ts: str) -> bool:
    return ts in ALWAYS_LOSSY or ts in MAYBE_LOSSY


def swap_to_little_endian(ds: Dataset) -> None:
    """Swap, in place, the raw OW/OF/OL/OD/OV values of a dataset read as Big Endian.

    Numeric VRs need nothing: pydicom decodes them to numbers and encodes them again in the
    byte order written. Pixel Data is swapped by its Bits Allocated when over 8 (whatever its
    VR says), by 2 when it is OW (8-bit data in OW words are word-swapped in Big Endian).
    """
    import numpy as np  # here: conversions run in their own process (conversion.py)

    bits = int(ds.get("BitsAllocated", 0) or 0)
    for elem in ds:  # iterating converts raw elements with the dataset's own (BE) encoding
        if elem.VR == "SQ":
            for item in elem.value:
                swap_to_little_endian(item)
            continue
        value = elem.value
        if not isinstance(value, bytes | bytearray) or not value:
            continue
        width = _SWAP_WIDTH.get(str(elem.VR), 0)
        if elem.tag == 0x7FE00010:
            width = bits // 8 if bits > 8 else width
        if width <= 1:
            continue
        if len(value) % width:
            raise ConversionError(f"{elem.keyword or elem.tag}: {len(value)} bytes is not a "
                                  f"whole number of {width}-byte values")
        elem.value = np.frombuffer(value, dtype=f">u{width}").astype(f"<u{width}").tobytes()


def mark_lossy(ds: Dataset, source_ts: str) -> None:
    """Record that the pixels went through a lossy syntax (never present lossy as lossless)."""
    if source_ts in ALWAYS_LOSSY:
        method = ALWAYS_LOSSY[source_ts]
    elif source_ts in MAYBE_LOSSY and "LossyImageCompression" not in ds:
        method = MAYBE_LOSSY[source_ts]
    else:
        return
    ds.LossyImageCompression = "01"
    if "LossyImageCompressionMethod" not in ds:
        ds.LossyImageCompressionMethod = method


def convert(path: str | Path | BinaryIO, source_ts: str, target_ts: str) -> Dataset:
    """The stored instance as a dataset ready to be encoded in ``target_ts``.

    Its File Meta carries the target syntax. Raises ConversionError with the reason (no decoder
    installed, a malformed codestream, an encoder that does not take this pixel format...).
    """
    target = UID(target_ts)
    if target not in TARGETS:
        raise ConversionError(f"converting to {target.name} is not supported")
    try:
        ds = dcmread(path)
        source = UID(source_ts)
        if source == ExplicitVRBigEndian:
            swap_to_little_endian(ds)
        elif source.is_compressed and "PixelData" in ds:
            ds.decompress(generate_instance_uid=False)  # a router never changes UIDs
            mark_lossy(ds, source)
        if target.is_compressed:
            ds.compress(target, generate_instance_uid=False)
    except ConversionError:
        raise
    except (RecursionError, MemoryError) as exc:
        raise ConversionError(f"{type(exc).__name__} while decoding") from None
    except Exception as exc:
        what = f"{UID(source_ts).name} → {target.name}"
        raise ConversionError(f"{what}: {type(exc).__name__}: {str(exc)[:300]}") from exc
    ds.file_meta.TransferSyntaxUID = target
    return ds


def encode(ds: Dataset, target_ts: str) -> bytes:
    """The dataset's bytes in ``target_ts`` (as they go into P-DATA, after the File Meta)."""
    target = UID(target_ts)
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = target == ImplicitVRLittleEndian
    write_dataset(buf, ds)
    data = buf.getvalue()
    if target == DeflatedExplicitVRLittleEndian:
        deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = deflater.compress(data) + deflater.flush()
        if len(data) % 2:
            data += b"\x00"
    return data


def convert_to_file(source: str, source_ts: str, target_ts: str, out: str,
                    part10: bool = True) -> None:
    """Convert the file ``source`` and write the result at ``out``: a Part 10 file, or
    (``part10=False``) the dataset's bytes only. Run in a conversion process (conversion.py)."""
    ds = convert(source, source_ts, target_ts)
    try:
        header = part10_header(ds) if part10 else b""
        data = encode(ds, target_ts)
    except Exception as exc:  # a value that cannot be written (e.g. a File Meta missing)
        raise ConversionError(f"encoding: {type(exc).__name__}: {str(exc)[:300]}") from None
    try:
        with open(out, "wb") as f:
            f.write(header)
            f.write(data)
    except OSError as exc:  # a full disk heals: not permanent
        raise ConversionError(f"cannot write the converted file: {exc}",
                              permanent=False) from None


def part10_header(ds: Dataset) -> bytes:
    """Preamble, ``DICM`` and the File Meta group for a converted dataset."""
    buf = DicomBytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, ds.file_meta, enforce_standard=True)
    return buf.getvalue()


def can_decode(ts: str) -> bool:
    """Whether a decoder for ``ts`` is installed (or none is needed)."""
    uid = UID(ts)
    if not uid.is_compressed:
        return True
    from pydicom.pixels import get_decoder

    try:
        return bool(get_decoder(uid).is_available)
    except NotImplementedError:
        return False
