"""De-identification, checked tag by tag against the PS3.15 basic profile table on CT, MR, SR and
RT samples; UIDs remapped consistently; pixel data untouched; dcmdump and a real Orthanc
accept the result."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Any

import pytest
from peers import Orthanc, dcmtk, peer_env, run_storescu, wait_until
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from router_fixtures import Router

from dicomrouter.config import ConfigError, from_dict
from dicomrouter.deid import Deidentifier, from_options
from dicomrouter.deid_table import (
    CLASS_UIDS,
    CODE_MEANING,
    PATIENT_ID,
    PATIENT_NAME,
    STRUCTURAL_TEXT,
    TEXT_VALUE,
    TEXT_VRS,
    action,
    code_meaning,
    is_overlay,
)
from dicomrouter.transforms import Op, transform_file

SAMPLES = {"ct": "CT_small.dcm", "mr": "MR_small.dcm", "sr": "test-SR.dcm", "rt": "rtplan.dcm"}
SECRET = "a-secret-for-tests"


def sample(tmp_path: Path, name: str) -> Path:
    """A test file with identifying attributes, a private tag and an SQ with a UID added."""
    src = get_testdata_file(SAMPLES[name])
    assert src is not None
    ds = dcmread(src)
    ds.InstitutionName = "St Elsewhere"
    ds.ReferringPhysicianName = "Who^Doctor"
    ds.OtherPatientIDs = "OTHER-1"
    ds.StudyDescription = "CHEST for John Doe"
    ds.AccessionNumber = "ACC-77"
    ds.add_new(0x00091010, "LO", "private secret")
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = "1.2.3.4.5.6"
    ds.ReferencedSOPSequence = [ref]  # kept by the profile; its UID is remapped
    out = tmp_path / f"{name}.dcm"
    ds.save_as(out)
    return out


def deidentify(path: Path, dst: Path, **options: Any) -> Dataset:
    deid = from_options({"uid_secret_env": "DEID_SECRET", **options})
    with open(path, "rb") as f:
        transform_file(f, [Op("deidentify", 0, deid=deid)], str(dst))
    return dcmread(dst)


@pytest.fixture(autouse=True)
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEID_SECRET", SECRET)


def check_item(src: Dataset, out: Dataset, d: Deidentifier, where: str = "") -> int:
    """Every element of ``src`` against the rule it falls under (PS3.15 Table E.1-1 for the
    attributes it lists, the safe defaults of docs/security.md for the others), into
    sequences; returns how many elements were checked."""
    checked = 0
    for elem in src:
        tag, vr = int(elem.tag), elem.VR
        name = f"{where}{elem.keyword or elem.tag}"
        got = out.get(tag)
        checked += 1
        if elem.tag.is_private or is_overlay(tag):
            assert got is None, f"{name}: private or overlay kept"
            continue
        if tag in (PATIENT_ID, PATIENT_NAME):
            assert got is None or not got.value or str(got.value) != str(elem.value) or \
                not elem.value, f"{name} kept"
            continue
        act = action(tag)
        if act == "X":
            assert got is None, f"{name} (X) not removed"
        elif act == "Z":
            assert got is None or got.value in (None, "", b"", []), f"{name} (Z) not emptied"
        elif vr == "SQ":  # D, U*, not listed: kept, its items cleaned by the same rules
            assert got is not None and len(got.value) == len(elem.value), name
            for i, (a, b) in enumerate(zip(elem.value, got.value, strict=True)):
                checked += check_item(a, b, d, f"{name}[{i}].")
        elif vr == "UI":
            values = elem.value if isinstance(elem.value, list | tuple) or \
                type(elem.value).__name__ == "MultiValue" else [elem.value]
            want = [str(v) if not v or str(v).startswith("1.2.840.10008.") or
                    act is None and tag in CLASS_UIDS else d.uid(str(v)) for v in values]
            have = got.value if isinstance(got.value, list | tuple) or \
                type(got.value).__name__ == "MultiValue" else [got.value]
            assert [str(v) for v in have] == want, f"{name}: UID not remapped as it should be"
        elif act is not None:  # D: a dummy
            assert got is not None and (got.value != elem.value or not elem.value), \
                f"{name} (D) not replaced"
        elif vr in TEXT_VRS:
            if tag in STRUCTURAL_TEXT:
                assert got is not None and got.value == elem.value, f"{name} changed"
            elif tag == CODE_MEANING:  # the coding scheme's own meaning, or a dummy
                want = code_meaning(src.get("CodingSchemeDesignator"), src.get("CodeValue"))
                assert got is not None and got.value == (want or "ANONYMIZED"), name
            elif tag == TEXT_VALUE:
                assert got is not None and got.value == "ANONYMIZED", name
            else:
                assert got is None or not got.value, f"{name} (text, not listed) kept"
        elif vr in ("DA", "DT", "TM"):
            assert got is None or not got.value, f"{name} (date, not listed) kept"
        elif vr == "UN":
            assert got is None, name
        else:  # CS, numbers, binary: unchanged
            assert got is not None and got.value == elem.value, f"{name} changed"
    return checked


@pytest.mark.parametrize("name", list(SAMPLES))
def test_basic_profile_tag_by_tag(tmp_path: Path, name: str) -> None:
    src_path = sample(tmp_path, name)
    src = dcmread(src_path)
    out = deidentify(src_path, tmp_path / "out.dcm")
    d = Deidentifier(SECRET.encode())
    assert check_item(src, out, d) > 10
    for kw in ("InstitutionName", "ReferringPhysicianName", "OtherPatientIDs",
               "StudyDescription"):
        assert not str(out.get(kw, "") or ""), kw  # identifying: removed or emptied
    assert out.PatientID.startswith("ANON-") and out.PatientID != src.PatientID
    assert str(out.PatientName).startswith("ANON^")
    assert out.PatientIdentityRemoved == "YES"
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == d.uid("1.2.3.4.5.6")
    if "PixelData" in src:
        assert out.PixelData == src.PixelData
    r = subprocess.run([dcmtk("dcmdump"), "-q", str(tmp_path / "out.dcm")], capture_output=True,
                       text=True, errors="replace", env=peer_env(), timeout=60)
    assert r.returncode == 0 and "E:" not in r.stderr, r.stderr


def test_uids_are_consistent_across_sends_and_keyed_by_the_secret(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = sample(tmp_path, "ct")
    a = deidentify(src, tmp_path / "a.dcm")
    b = deidentify(src, tmp_path / "b.dcm")
    assert (a.SOPInstanceUID, a.StudyInstanceUID, a.PatientID) == \
        (b.SOPInstanceUID, b.StudyInstanceUID, b.PatientID)
    monkeypatch.setenv("DEID_SECRET", "another secret")
    c = deidentify(src, tmp_path / "c.dcm")
    assert c.SOPInstanceUID != a.SOPInstanceUID and c.PatientID != a.PatientID


def test_retain_options_and_date_shift(tmp_path: Path) -> None:
    src_path = sample(tmp_path, "ct")
    src = dcmread(src_path)
    kept = deidentify(src_path, tmp_path / "k.dcm", retain=["dates", "device",
                                                             "patient_characteristics"])
    assert kept.StudyDate == src.StudyDate and kept.StationName == src.StationName
    assert kept.PatientSex == src.PatientSex
    shifted = deidentify(src_path, tmp_path / "s.dcm", shift_dates=True)
    import datetime as dt

    days = (dt.datetime.strptime(src.StudyDate, "%Y%m%d")
            - dt.datetime.strptime(shifted.StudyDate, "%Y%m%d")).days
    assert 1 <= days <= 365
    assert (dt.datetime.strptime(src.SeriesDate, "%Y%m%d")
            - dt.datetime.strptime(shifted.SeriesDate, "%Y%m%d")).days == days
    templated = deidentify(src_path, tmp_path / "t.dcm", patient_id="STUDY42-{hash:6}")
    assert len(templated.PatientID) == len("STUDY42-") + 6


def test_burned_in_annotations_are_refused_unless_allowed(tmp_path: Path) -> None:
    from dicomrouter.transforms import TransformError

    ds = dcmread(sample(tmp_path, "ct"))
    ds.BurnedInAnnotation = "YES"
    ds.save_as(tmp_path / "burned.dcm")
    with pytest.raises(TransformError, match="Burned In Annotation"):
        deidentify(tmp_path / "burned.dcm", tmp_path / "o.dcm")
    assert deidentify(tmp_path / "burned.dcm", tmp_path / "o.dcm", burned_in="allow")


def test_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def load(entry: Any) -> None:
        from_dict({"destinations": {"a": {"type": "folder", "path": "x"}},
                   "routes": [{"to": "a", "transforms": [{"deidentify": entry}]}]}, tmp_path,
                  "t")
    with pytest.raises(ConfigError, match=r"routes\[0\].transforms\[0\].deidentify.retain"):
        load({"retain": ["everything"]})
    with pytest.raises(ConfigError, match="either retain dates or shift them"):
        load({"retain": ["dates"], "shift_dates": True})
    with pytest.raises(ConfigError, match=r"deidentify.keep\[1\]: 'PatientNmae' is not a DICOM"):
        load({"keep": ["PatientAge", "PatientNmae"]})
    with pytest.raises(ConfigError, match=r"keep\[0\]: '\(0009,1001\)' is a private tag"):
        load({"keep": ["(0009,1001)"]})
    with pytest.raises(ConfigError, match=r"keep\[0\]: 'TransferSyntaxUID': the file meta"):
        load({"keep": ["TransferSyntaxUID"]})
    with pytest.raises(ConfigError, match=r"deidentify.kep: unknown key \(did you mean 'keep'"):
        load({"kep": ["PatientAge"]})
    monkeypatch.delenv("DEID_SECRET")
    with pytest.raises(ConfigError, match="environment variable DEID_SECRET is not set"):
        load(None)


def test_deidentified_study_through_the_router_into_orthanc(tmp_path: Path, orthanc) -> None:
    pacs: Orthanc = orthanc(aet="RESEARCH")
    files = [sample(tmp_path, n) for n in ("ct", "mr")]
    d = Deidentifier(SECRET.encode())
    with Router(tmp_path / "router", {
        "destinations": {"research": {"type": "dicom", "ae_title": "RESEARCH",
                                      "host": "127.0.0.1", "port": pacs.dicom_port},
                         "zip": {"type": "folder", "path": str(tmp_path / "zips"), "zip": True}},
        "routes": [{"name": "research", "to": ["research", "zip"],
                    "transforms": [{"deidentify": {"patient_id": "ANON-{hash:8}"}}]}],
    }) as router:
        for f in files:
            assert run_storescu([f], router.port).returncode == 0
        expected = {d.uid(str(dcmread(f).SOPInstanceUID)) for f in files}
        wait_until(lambda: pacs.instance_sop_uids() == expected, timeout=90,
                   what="the de-identified instances in Orthanc")
        for f in files:
            router.wait_state(str(dcmread(f).StudyInstanceUID), "delivered", timeout=90)
        log = router.log(5000)
    for f in files:
        original = dcmread(f)
        tags = pacs.get(f"/instances/{pacs.instance_id(d.uid(str(original.SOPInstanceUID)))}"
                        "/simplified-tags")
        assert tags["PatientID"].startswith("ANON-") and len(tags["PatientID"]) == 13
        assert tags["StudyInstanceUID"] == d.uid(str(original.StudyInstanceUID))
        assert "InstitutionName" not in tags or not tags["InstitutionName"]
    assert "Traceback" not in log
    import sqlite3
    import zipfile

    db = sqlite3.connect(f"file:{router.spool / 'state.db'}?mode=ro", uri=True)
    sent = dict(db.execute("SELECT sop_uid, sent_uid FROM ledger WHERE destination='research'"))
    db.close()
    assert sent == {str(dcmread(f).SOPInstanceUID): d.uid(str(dcmread(f).SOPInstanceUID))
                    for f in files}  # the ledger keeps the UID sent beside the original

    names = [n for z in (tmp_path / "zips").rglob("*.zip") for n in zipfile.ZipFile(z).namelist()]
    assert names and not any(str(dcmread(files[0]).SOPInstanceUID) in n for n in names)
    zips = [str(p.relative_to(tmp_path / "zips")) for p in (tmp_path / "zips").rglob("*.zip")]
    assert all(p.startswith("ANON-") for p in zips), zips  # named by the pseudonym
    for z in (tmp_path / "zips").rglob("*.zip"):
        with zipfile.ZipFile(z) as zf:
            for n in zf.namelist():
                if n.endswith(".dcm"):
                    ds = dcmread(io.BytesIO(zf.read(n)))
                    assert ds.PatientIdentityRemoved == "YES"


def test_pseudonyms_from_a_lookup_csv(tmp_path: Path) -> None:
    src = sample(tmp_path, "mr")
    original = str(dcmread(src).PatientID)
    table = tmp_path / "map.csv"
    table.write_text(f"{original},RESEARCH-0007\nsomebody else,RESEARCH-0008\n")
    out = deidentify(src, tmp_path / "o.dcm", patient_map=str(table),
                     patient_name="{hash:4}")
    assert out.PatientID == "RESEARCH-0007" and str(out.PatientName) == "RESEARCH-0007"
    other = deidentify(sample(tmp_path, "ct"), tmp_path / "p.dcm", patient_map=str(table))
    assert other.PatientID.startswith("ANON-")  # not in the table: the template


def test_deidentified_copies_through_stow_rs_are_confirmed(tmp_path: Path, orthanc) -> None:
    """STOW-RS confirms the new SOP Instance UIDs: the ledger maps them back (no false
    'not confirmed', no re-send)."""
    pacs: Orthanc = orthanc(aet="CLOUD", dicomweb=True)
    files = [sample(tmp_path, "ct")]
    d = Deidentifier(SECRET.encode())
    with Router(tmp_path / "router", {
        "destinations": {"cloud": {"type": "dicomweb", "url": f"{pacs.url}/dicom-web"}},
        "routes": [{"to": "cloud", "transforms": [{"deidentify": None}]}],
    }) as router:
        assert run_storescu(files, router.port).returncode == 0
        uid = str(dcmread(files[0]).StudyInstanceUID)
        router.wait_state(uid, "delivered", timeout=90)
        assert router.status()["ledger"]["resent"] == 0
    assert pacs.instance_sop_uids() == {d.uid(str(dcmread(files[0]).SOPInstanceUID))}
