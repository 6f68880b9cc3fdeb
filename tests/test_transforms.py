"""Tag morphing on the way out: checked tag by tag on the delivered copies (folder tree and a
real Orthanc), pixel data bytes untouched, the spool original unchanged, dcmdump parses it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from peers import SAMPLE_DIR, Orthanc, dcmtk, peer_env, run_storescu
from pydicom import dcmread
from router_fixtures import Router

from dicomrouter.config import ConfigError, from_dict

ROUTE_TRANSFORMS = [
    {"set": {"InstitutionName": "Research", "ClinicalTrialProtocolID": "P-{StudyDate}"}},
    {"delete": ["OtherPatientIDs"]},
    {"copy": {"StudyID": "AccessionNumber"}},
]
DEST_TRANSFORMS = [{"regex-replace": {"AccessionNumber": {"pattern": "^", "replace": "EXT-"}}}]


def sources(tmp_path: Path) -> list[Path]:
    """Explicit LE, RLE (encapsulated pixel data) and Deflated (read whole) samples, with an
    accession number and other patient IDs to change."""
    out = []
    for name in ("ct_explicit/study1/series1/instance1.dcm", "mr_rle/study1/series1/instance1.dcm",
                 "mr_deflated/study1/series1/instance1.dcm"):
        dst = tmp_path / "src" / name.replace("/", "_")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLE_DIR / name, dst)
        ds = dcmread(dst)
        ds.AccessionNumber = f"ACC{len(out)}"
        ds.OtherPatientIDs = "OLD-ID"
        ds.InstitutionName = "St Elsewhere"
        ds.save_as(dst)
        out.append(dst)
    return out


def check_copy(got: Path, src: Path) -> None:
    a, b = dcmread(got), dcmread(src)
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.StudyInstanceUID == b.StudyInstanceUID
    assert a.InstitutionName == "Research"
    assert a.ClinicalTrialProtocolID == f"P-{b.StudyDate}"
    assert "OtherPatientIDs" not in a
    assert a.StudyID == b.AccessionNumber  # copied from the value before the transforms
    assert a.AccessionNumber == f"EXT-{b.AccessionNumber}"
    assert a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID
    assert a.PixelData == b.PixelData  # the same bytes (encapsulated ones included)
    for elem in b:  # everything else is as it was
        if elem.keyword not in ("InstitutionName", "OtherPatientIDs", "StudyID",
                                "AccessionNumber", "ClinicalTrialProtocolID", "PixelData"):
            assert a[elem.tag] == elem, elem.keyword
    r = subprocess.run([dcmtk("dcmdump"), "-q", str(got)], capture_output=True, text=True,
                       errors="replace", env=peer_env(), timeout=60)
    assert r.returncode == 0 and "E:" not in r.stderr, r.stderr


def test_transforms_on_copies_to_a_folder_and_orthanc(tmp_path: Path, orthanc) -> None:
    pacs: Orthanc = orthanc(aet="RESEARCH")
    files = sources(tmp_path)
    with Router(tmp_path / "router", {
        "keep_after_delivery": True,
        "destinations": {
            "tree": {"type": "folder", "path": str(tmp_path / "tree"),
                     "transforms": DEST_TRANSFORMS},
            "pacs": {"type": "dicom", "ae_title": "RESEARCH", "host": "127.0.0.1",
                     "port": pacs.dicom_port, "transforms": DEST_TRANSFORMS},
        },
        "routes": [{"name": "research", "to": ["tree", "pacs"],
                    "transforms": ROUTE_TRANSFORMS}],
    }) as router:
        for f in files:  # three studies (the samples are separate studies)
            assert run_storescu([f], router.port).returncode == 0
        uids = {str(dcmread(f).StudyInstanceUID) for f in files}
        for uid in uids:
            router.wait_state(uid, "delivered", timeout=120)
        spooled = {str(dcmread(p).SOPInstanceUID): p
                   for p in (router.spool / "data").rglob("*.dcm")}
        log = router.log(5000)
    assert "Traceback" not in log
    got = {str(dcmread(p).SOPInstanceUID): p for p in (tmp_path / "tree").rglob("*.dcm")}
    for f in files:
        sop = str(dcmread(f).SOPInstanceUID)
        check_copy(got[sop], f)
        assert dcmread(spooled[sop]).InstitutionName == "St Elsewhere"  # the original stays
        tags = pacs.get(f"/instances/{pacs.instance_id(sop)}/simplified-tags")
        assert tags["InstitutionName"] == "Research"
        assert tags["AccessionNumber"] == f"EXT-{dcmread(f).AccessionNumber}"
        assert "OtherPatientIDs" not in tags
    assert not list((router.spool / "transforms").glob("*"))  # copies removed after sending


@pytest.mark.parametrize(("transforms", "message"), [
    ([{"set": {"SOPInstanceUID": "1.2.3"}}], "[0].set.SOPInstanceUID: 'SOPInstanceUID' is a UID"),
    ([{"delete": ["PixelData"]}], "[0].delete: 'PixelData': the file meta"),
    ([{"rename": {"A": "B"}}], "[0].rename: unknown operation"),
    ([{"set": {"InstitutionName": "{NoSuchTag}"}}], "[0].set.InstitutionName: {NoSuchTag} is"),
    ([{"regex-replace": {"AccessionNumber": {"pattern": "("}}}],
     "[0].regex-replace.AccessionNumber: expected {pattern"),
    ([{"deidentify": {"retain": ["dates"], "shift_dates": True}}],
     "[0].deidentify.uid_secret_env: environment variable NO_SUCH_SECRET"),
    ({"set": {}}, "expected a list of operations"),
])
def test_bad_transforms_name_the_entry(tmp_path: Path, transforms: Any, message: str) -> None:
    for entry in transforms if isinstance(transforms, list) else []:
        if "deidentify" in entry:
            entry["deidentify"]["uid_secret_env"] = "NO_SUCH_SECRET"
    with pytest.raises(ConfigError) as err:
        from_dict({"destinations": {"a": {"type": "folder", "path": "x"}},
                   "routes": [{"to": "a", "transforms": transforms}]}, tmp_path, "t")
    assert f"routes[0].transforms{message}" in str(err.value) or \
        str(err.value).startswith(f"routes[0].transforms: {message}"), str(err.value)
