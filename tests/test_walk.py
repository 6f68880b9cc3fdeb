"""The dataset walker (walk.py): whole datasets pass, every kind of broken one is caught."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from peers import SAMPLE_DIR
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from dicomrouter.sample import generate
from dicomrouter.walk import Malformed, check_file

SEQ = struct.pack("<HH", 0x0008, 0x1140)  # Referenced Image Sequence


def part10(path: Path, body: bytes, syntax: str = ExplicitVRLittleEndian) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    buf = DicomBytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    path.write_bytes(buf.getvalue() + body)
    return path


def elem(group: int, el: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sxxI", group, el, vr, len(value)) + value
    return struct.pack("<HH2sH", group, el, vr, len(value)) + value


def nested(depth: int, defined: bool) -> bytes:
    """A Referenced Image Sequence nested ``depth`` deep, explicit VR LE."""
    inner = elem(0x0008, 0x1155, b"UI", b"1.2.3\x00")
    for _ in range(depth):
        if defined:
            item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
            inner = SEQ + struct.pack("<2sxxI", b"SQ", len(item)) + item
        else:
            item = (struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner
                    + struct.pack("<HHI", 0xFFFE, 0xE00D, 0))
            inner = (SEQ + struct.pack("<2sxxI", b"SQ", 0xFFFFFFFF) + item
                     + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    return inner


def test_whole_files_pass(tmp_path: Path) -> None:
    files = sorted(SAMPLE_DIR.rglob("*.dcm"))
    files += generate(tmp_path / "g", series=1, instances=2, rows=16, cols=16, seed=1)
    assert len(files) >= 6
    for f in files:
        check_file(str(f))


def test_big_endian_and_implicit_pass(tmp_path: Path) -> None:
    ds = dcmread(generate(tmp_path / "g", series=1, instances=1, rows=8, cols=8, seed=2)[0])
    out = tmp_path / "implicit.dcm"
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(out, enforce_file_format=True)
    check_file(str(out))
    body = (struct.pack(">HH2sH", 0x0008, 0x0018, b"UI", 6) + b"1.2.3\x00"
            + struct.pack(">HH2sxxI", 0x7FE0, 0x0010, b"OW", 4) + b"\x00\x01\x00\x02")
    check_file(str(part10(tmp_path / "be.dcm", body, "1.2.840.10008.1.2.2")))
    truncated = body[:-2]
    with pytest.raises(Malformed):
        check_file(str(part10(tmp_path / "be_cut.dcm", truncated, "1.2.840.10008.1.2.2")))


@pytest.mark.parametrize("cut", [1, 2, 7, 100])
def test_truncated_inside_an_element(tmp_path: Path, cut: int) -> None:
    f = generate(tmp_path / "g", series=1, instances=1, rows=16, cols=16, seed=3)[0]
    raw = f.read_bytes()
    short = tmp_path / "short.dcm"
    short.write_bytes(raw[:-cut])
    with pytest.raises(Malformed, match="past the end|needs"):
        check_file(str(short))


def test_trailing_bytes_fail(tmp_path: Path) -> None:
    f = generate(tmp_path / "g", series=1, instances=1, rows=16, cols=16, seed=4)[0]
    longer = tmp_path / "longer.dcm"
    longer.write_bytes(f.read_bytes() + b"\x00\x00\x00")
    with pytest.raises(Malformed):
        check_file(str(longer))


@pytest.mark.parametrize("defined", [True, False])
def test_nesting_depth(tmp_path: Path, defined: bool) -> None:
    check_file(str(part10(tmp_path / "ok.dcm", nested(10, defined))), max_depth=32)
    deep = part10(tmp_path / "deep.dcm", nested(300, defined))
    with pytest.raises(Malformed, match="nested more than 32"):
        check_file(str(deep), max_depth=32)


def test_implicit_vr_sequences_are_walked_by_the_dictionary(tmp_path: Path) -> None:
    inner = struct.pack("<HHI", 0x0008, 0x1155, 6) + b"1.2.3\x00"
    for _ in range(50):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
        inner = SEQ + struct.pack("<I", len(item)) + item
    f = part10(tmp_path / "implicit_deep.dcm", inner, ImplicitVRLittleEndian)
    with pytest.raises(Malformed, match="nested"):
        check_file(str(f), max_depth=32)


@pytest.mark.parametrize("body, match", [
    (nested(3, False)[:-8], "needs"),  # the sequence delimiter is missing
    (elem(0x0008, 0x0018, b"ZZ", b"1.2.3\x00"), "no valid VR"),
    (struct.pack("<HHI", 0xFFFE, 0xE000, 0), "item tag"),
    (struct.pack("<HH2sH", 0x0010, 0x0010, b"PN", 0xFFFF) + b"x", "past the end"),
    (b"", "empty"),
])
def test_broken_structures(tmp_path: Path, body: bytes, match: str) -> None:
    with pytest.raises(Malformed, match=match):
        check_file(str(part10(tmp_path / "b.dcm", body)))


def test_deflated(tmp_path: Path) -> None:
    body = elem(0x0008, 0x0018, b"UI", b"1.2.3\x00") + nested(5, False)
    z = zlib.compressobj(6, zlib.DEFLATED, -15)
    deflated = z.compress(body) + z.flush()
    check_file(str(part10(tmp_path / "d.dcm", deflated, DeflatedExplicitVRLittleEndian)))
    z = zlib.compressobj(6, zlib.DEFLATED, -15)
    cut = z.compress(body[:-5]) + z.flush()
    with pytest.raises(Malformed):
        check_file(str(part10(tmp_path / "d2.dcm", cut, DeflatedExplicitVRLittleEndian)))
    with pytest.raises(Malformed, match="inflate"):
        check_file(str(part10(tmp_path / "d3.dcm", b"\xff" * 64,
                              DeflatedExplicitVRLittleEndian)))
