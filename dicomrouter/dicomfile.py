"""Reading the few tags the router needs from a file, and making wire values safe for paths."""

from __future__ import annotations

import hashlib
import io
import re
import struct
import unicodedata
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID

from .dimse import IMPLEMENTATION_VERSION
from .dimse import text as dimse_text

# Tags recorded in the state database for every instance: enough to group, route and name files
# without reopening the file. Other keywords are read from the file when a rule or template needs
# them.
INDEX_KEYWORDS = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription", "StudyID",
    "ReferringPhysicianName", "InstitutionName",
    "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality", "BodyPartExamined",
    "StationName", "Manufacturer",
    "SOPInstanceUID", "SOPClassUID", "InstanceNumber",
)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class UnreadableDataset(ValueError):
    """The received bytes are not a dataset we can identify; the sender gets a 0xC000 status."""


def valid_uid(uid: str) -> bool:
    """A DICOM UID: digits and dots, at most 64 characters (it is about to name a file)."""
    return 0 < len(uid) <= 64 and bool(_UID.match(uid))


def text(value: Any) -> str:
    """A tag value as plain text; multi-valued elements are joined with a backslash."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(text(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("latin-1", "replace").strip("\x00 ")
    return str(value).strip()


def read_header(path: str | Path | BinaryIO) -> Dataset:
    """The dataset without pixel data (the rest is read lazily, never the bulk)."""
    return dcmread(path, stop_before_pixels=True)


def identify(path: str | Path | bytes | bytearray) -> tuple[dict[str, str], str]:
    """Index tags and transfer syntax of a received Part 10 file.

    The lean scanner below reads the common cases (Little Endian datasets, ASCII/Latin-1/UTF-8
    text) in a few microseconds; anything else goes through pydicom. Raises UnreadableDataset
    when the file cannot be parsed or lacks valid study/SOP UIDs.
    """
    found = None
    try:
        found = scan_header(path)
    except (ValueError, IndexError, struct.error, UnicodeDecodeError, OSError):
        found = None
    if found is None:
        try:
            src = io.BytesIO(path) if isinstance(path, bytes | bytearray) else path
            ds = dcmread(src, stop_before_pixels=True, specific_tags=list(INDEX_KEYWORDS))
            tags = {kw: text(ds.get(kw)) for kw in INDEX_KEYWORDS}
            tsuid = str(ds.file_meta.TransferSyntaxUID)
        except (InvalidDicomError, ValueError, KeyError, EOFError, OSError, AttributeError,
                TypeError, IndexError, OverflowError, NotImplementedError, RecursionError) as exc:
            raise UnreadableDataset(f"cannot parse dataset: {type(exc).__name__}: "
                                    f"{str(exc)[:200]}") from None
    else:
        tags, tsuid = found
    for kw in ("StudyInstanceUID", "SOPInstanceUID", "SeriesInstanceUID"):
        if not tags[kw]:
            if kw == "SeriesInstanceUID":
                continue
            raise UnreadableDataset(f"dataset has no {kw}")
        if not valid_uid(tags[kw]):
            raise UnreadableDataset(f"{kw} {tags[kw][:80]!r} is not a valid UID")
    return tags, tsuid


# ---- the lean header scanner ---------------------------------------------------------------

_INDEX_TAGS = {int(tag_for_keyword(kw)): kw for kw in INDEX_KEYWORDS}  # type: ignore[arg-type]
_LAST_TAG = max(_INDEX_TAGS)
_CHARSET_TAG = 0x00080005
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT",
             b"UV"}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_EXPLICIT_LE = {"1.2.840.10008.1.2.1"}
_IMPLICIT_LE = "1.2.840.10008.1.2"
_CHARSETS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}
_SCAN_BYTES = 1 << 16


def _element_at(buf: bytes, o: int, implicit: bool) -> tuple[int, int, int]:
    """(tag, header length, value length) of the element starting at ``o``."""
    group, elem = struct.unpack_from("<HH", buf, o)
    tag = (group << 16) | elem
    if implicit or group == 0xFFFE:
        return tag, 8, struct.unpack_from("<I", buf, o + 4)[0]
    vr = buf[o + 4:o + 6]
    if vr in _LONG_VRS:
        return tag, 12, struct.unpack_from("<I", buf, o + 8)[0]
    return tag, 8, struct.unpack_from("<H", buf, o + 6)[0]


def _skip_undefined(buf: bytes, o: int, implicit: bool, depth: int = 0) -> int:
    """Offset after an undefined-length value starting at ``o`` (items up to the delimiter)."""
    if depth > 16:
        raise ValueError("sequences nested too deep")
    while True:
        tag, hdr, length = _element_at(buf, o, True)
        o += hdr
        if tag == _SEQ_END:
            return o
        if tag != _ITEM:
            raise ValueError("expected an item")
        if length != 0xFFFFFFFF:
            o += length
            continue
        while True:  # an undefined-length item: a dataset up to its delimiter
            tag, hdr, length = _element_at(buf, o, implicit)
            o += hdr
            if tag == _ITEM_END:
                break
            o = _skip_undefined(buf, o, implicit, depth + 1) if length == 0xFFFFFFFF \
                else o + length


def scan_header(path: str | Path | bytes | bytearray) -> tuple[dict[str, str], str] | None:
    """The index tags from the start of a Little Endian Part 10 file (or its bytes), or None
    (use pydicom)."""
    if isinstance(path, bytes | bytearray):
        buf = bytes(memoryview(path)[:_SCAN_BYTES])
    else:
        with open(path, "rb") as f:
            buf = f.read(_SCAN_BYTES)
    if buf[128:132] != b"DICM" or buf[132:136] != b"\x02\x00\x00\x00":
        return None
    meta_end = 144 + struct.unpack_from("<I", buf, 140)[0]
    tsuid = ""
    o = 144
    while o < meta_end:
        tag, hdr, length = _element_at(buf, o, False)
        if tag == 0x00020010:
            tsuid = buf[o + hdr:o + hdr + length].rstrip(b"\x00 ").decode("ascii")
        o += hdr + length
    implicit = tsuid == _IMPLICIT_LE
    if not implicit and tsuid not in _EXPLICIT_LE and not UID(tsuid).is_compressed:
        return None  # deflated, big endian, unknown: pydicom
    raw: dict[str, bytes] = {}
    encoding = "ascii"
    o = meta_end
    while o + 8 <= len(buf):
        tag, hdr, length = _element_at(buf, o, implicit)
        if tag > _LAST_TAG:
            break
        o += hdr
        if length == 0xFFFFFFFF:
            o = _skip_undefined(buf, o, implicit)
            continue
        if o + length > len(buf):
            return None  # the header is larger than what we read: pydicom
        if tag == _CHARSET_TAG:
            charset = buf[o:o + length].rstrip(b"\x00 ").decode("ascii")
            if charset not in _CHARSETS:
                return None
            encoding = _CHARSETS[charset]
        elif tag in _INDEX_TAGS:
            raw[_INDEX_TAGS[tag]] = buf[o:o + length]
        o += length
    tags = {kw: raw[kw].decode(encoding).strip("\x00 ") if kw in raw else ""
            for kw in INDEX_KEYWORDS}
    return tags, tsuid


def source_ae(path: str | Path) -> str:
    """The Source Application Entity Title (0002,0016) of the file meta, if any."""
    try:
        meta = read_file_meta_info(path)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return ""
    return text(meta.get("SourceApplicationEntityTitle"))


_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')


def safe_component(value: str, max_bytes: int = 128) -> str:
    """One path component from an untrusted tag value.

    No separators, no control characters, never ``.``/``..`` and never empty (→ ``UNKNOWN``), so a
    PatientID of ``../../etc`` stays a harmless name inside the output folder. At most
    ``max_bytes`` of UTF-8 (file systems allow 255 bytes a name, and the folder destination adds
    a temporary prefix and suffix): a longer value is cut at a character boundary and gets
    ``~`` and 8 hex digits of its hash, so two long values that share a beginning stay apart.
    """
    v = unicodedata.normalize("NFC", value)
    v = _UNSAFE.sub("_", v).strip().strip(".")
    raw = v.encode("utf-8", "surrogatepass")
    if len(raw) > max_bytes:
        digest = hashlib.sha1(raw).hexdigest()[:8]
        v = raw[:max_bytes - 9].decode("utf-8", "ignore").strip().rstrip(".") + "~" + digest
    return v.strip() or "UNKNOWN"


_FIELD = re.compile(r"{([^{}]*)}")


def render_template(template: str, lookup: dict[str, str]) -> Path:
    """Fill ``{Keyword}`` fields with sanitised values; each ``/`` of the template is a level."""
    parts = []
    for raw_part in template.split("/"):
        if not raw_part:
            continue
        filled = _FIELD.sub(lambda m: safe_component(lookup.get(m.group(1), "")), raw_part)
        parts.append(safe_component(filled))
    return Path(*parts)


def _meta_element(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sxxI", 2, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", 2, elem, vr, len(value)) + value


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group of a Part 10 file."""
    body = (_meta_element(0x0001, b"OB", b"\x00\x01")
            + _meta_element(0x0002, b"UI", dimse_text(sop_class, b"\x00"))
            + _meta_element(0x0003, b"UI", dimse_text(sop_instance, b"\x00"))
            + _meta_element(0x0010, b"UI", dimse_text(transfer_syntax, b"\x00"))
            + _meta_element(0x0012, b"UI", dimse_text(PYNETDICOM_IMPLEMENTATION_UID, b"\x00"))
            + _meta_element(0x0013, b"SH", dimse_text(IMPLEMENTATION_VERSION, b" ")))
    if source_ae:
        body += _meta_element(0x0016, b"AE", dimse_text(source_ae, b" "))
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body
