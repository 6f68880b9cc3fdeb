"""The lean header scanner agrees with pydicom, and falls back to it where it should."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from dicomrouter.dicomfile import INDEX_KEYWORDS, UnreadableDataset, identify, scan_header, text
from dicomrouter.sample import generate


def reference(path: Path) -> dict[str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return {kw: text(ds.get(kw)) for kw in INDEX_KEYWORDS}


def nested(undefined: bool) -> Sequence:
    inner = Dataset()
    inner.CodeValue = "X1"
    inner.CodeMeaning = "inner"
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.3"
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    item.ConceptNameCodeSequence = Sequence([inner])
    seq = Sequence([item, Dataset()])
    if undefined:
        seq.is_undefined_length = True
        for it in seq:
            it.is_undefined_length_sequence_item = True
        item.ConceptNameCodeSequence.is_undefined_length = True
        inner.is_undefined_length_sequence_item = True
    return seq


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless])
@pytest.mark.parametrize("undefined", [False, True])
def test_scanner_matches_pydicom_with_sequences(tmp_path: Path, syntax: str,
                                                undefined: bool) -> None:
    f = generate(tmp_path, series=1, instances=1, rows=8, cols=8, transfer_syntax=syntax,
                 seed=1)[0]
    ds = dcmread(f)
    ds.ReferencedStudySequence = nested(undefined)  # (0008,1110): before the study tags
    ds.ReferencedImageSequence = nested(undefined)
    ds.PatientName = "Müller^Jörg"
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SeriesDescription = "AX T1\\COR"
    out = tmp_path / "x.dcm"
    ds.save_as(out)
    got = scan_header(out)
    assert got is not None
    assert got[0] == reference(out)
    assert got[1] == str(syntax)


@pytest.mark.parametrize("syntax", [DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_other_syntaxes_go_through_pydicom(tmp_path: Path, syntax: str) -> None:
    f = generate(tmp_path, series=1, instances=1, rows=8, cols=8, seed=2)[0]
    ds = dcmread(f)
    out = tmp_path / "x.dcm"
    if syntax == ExplicitVRBigEndian:
        del ds.PixelData
        ds.file_meta.TransferSyntaxUID = syntax
        dcmwrite(out, ds, implicit_vr=False, little_endian=False, force_encoding=True)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(out)
    assert scan_header(out) is None
    tags, ts = identify(out)
    assert tags == reference(out) and ts == str(syntax)


def test_unsupported_charset_goes_through_pydicom(tmp_path: Path) -> None:
    f = generate(tmp_path, series=1, instances=1, rows=8, cols=8, seed=3)[0]
    ds = dcmread(f)
    ds.SpecificCharacterSet = "ISO_IR 144"
    ds.PatientName = "Иванов^Иван"
    out = tmp_path / "x.dcm"
    ds.save_as(out)
    assert scan_header(out) is None
    assert identify(out)[0]["PatientName"] == "Иванов^Иван"


def test_garbage_and_missing_uids_are_unreadable(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00\xff\xff\xff\x7f")
    with pytest.raises(UnreadableDataset):
        identify(junk)
    f = generate(tmp_path, series=1, instances=1, rows=8, cols=8, seed=4)[0]
    ds = dcmread(f)
    del ds.StudyInstanceUID
    out = tmp_path / "nostudy.dcm"
    ds.save_as(out)
    with pytest.raises(UnreadableDataset, match="no StudyInstanceUID"):
        identify(out)


@pytest.mark.parametrize("value", ["患" * 120, "😀" * 100, "a" * 300, "é" * 200])
def test_long_values_are_cut_by_utf8_bytes_and_stay_unique(value: str) -> None:
    from dicomrouter.dicomfile import safe_component

    name = safe_component(value)
    assert len(name.encode()) <= 128
    assert name.startswith(value[:10]) and "~" in name
    other = safe_component(value + "x")
    assert other != name  # same beginning, different values: different names
    assert len(safe_component("short")) == 5 and safe_component("short") == "short"


def test_long_patient_ids_reach_the_folder_tree(tmp_path: Path) -> None:
    """A 120-character CJK PatientID (360 bytes) is delivered, under a name the file system
    takes, instead of being dead-lettered with 'File name too long'."""
    from dicomrouter.config import from_dict
    from dicomrouter.destinations import Context
    from dicomrouter.destinations.folder import FolderDestination
    from dicomrouter.spool import Spool
    from dicomrouter.state import open_state

    f = generate(tmp_path / "g", series=1, instances=1, rows=8, cols=8, seed=1)[0]
    ds = dcmread(f)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID = "患" * 120
    ds.save_as(f, enforce_file_format=True)
    cfg = from_dict({"destinations": {"out": {"type": "folder", "path": str(tmp_path / "out")}},
                     "routes": [{"to": "out"}]}, tmp_path, "test")
    state = open_state(tmp_path / "state.db")
    spool = Spool(tmp_path / "spool", state)
    from dicomrouter.dicomfile import identify

    tags, ts = identify(f)
    spool._place(str(f), tags, ts, "TEST", "ROUTER")
    inst = state.instances(tags["StudyInstanceUID"])[0]
    with FolderDestination(cfg.destinations["out"], Context()).open([inst]) as session, \
            spool.open(inst) as data:
        assert session.send(inst, data)
    files = list((tmp_path / "out").rglob("*.dcm"))
    assert len(files) == 1
    assert files[0].relative_to(tmp_path / "out").parts[0].startswith("患" * 10)
    assert dcmread(files[0]).PatientID == "患" * 120
