"""The router as a Query/Retrieve SCP, queried by real DCMTK findscu/movescu/getscu and Orthanc.

One router holds three studies (kept after delivery); every query's answers are read back as
DICOM files (``findscu -X``) and compared with what was sent.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import (
    Orthanc,
    StoreSCP,
    dcmtk,
    find_dcmtk,
    find_orthanc,
    peer_env,
    require_peer,
    run_storescu,
    sop_uids,
    wait_until,
)
from pydicom import dcmread
from router_fixtures import Router

from dicomrouter.sample import generate

STUDIES = {  # name → (patient name, patient id, study date, modality)
    "a": ("DOE^JOHN", "QR1", "20240105", "CT"),
    "b": ("DOE^JANE", "QR2", "20240220", "MR"),
    "c": ("ROE^RICHARD", "QR3", "20230711", "CT"),
}


class Site:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, list[Path]] = {}
        self.uid: dict[str, str] = {}
        self.series: dict[str, list[str]] = {}
        self.storescp = StoreSCP(root / "storescp", aet="STORESCP")
        self.orthanc = Orthanc(root / "orthanc", aet="ORTHANCQR")
        self.router: Router | None = None

    def start(self) -> None:
        self.storescp.start()
        if find_orthanc() is not None:
            self.orthanc.modalities = {"router": ["DICOMROUTER", "127.0.0.1", 0]}
        self.router = Router(self.root / "router", {
            "keep_after_delivery": True,
            "destinations": {"archive": {"type": "folder", "path": str(self.root / "out")}},
            "routes": [{"to": "archive"}],
            "known_aes": {"STORESCP": {"host": "127.0.0.1", "port": self.storescp.port},
                          "ORTHANCQR": {"host": "127.0.0.1", "port": self.orthanc.dicom_port},
                          "NOBODY": {"host": "127.0.0.1", "port": 1}},
        })
        self.router.start()
        if find_orthanc() is not None:
            self.orthanc.modalities = {"router": ["DICOMROUTER", "127.0.0.1", self.router.port]}
            self.orthanc.start()
        for name, (patient, pid, date, modality) in STUDIES.items():
            files = generate(self.root / f"study_{name}", series=2, instances=2, rows=8, cols=8,
                             modality=modality, patient_id=pid, seed=len(name) + ord(name))
            for f in files:
                ds = dcmread(f)
                ds.PatientName = patient
                ds.StudyDate = date
                ds.save_as(f)
            self.files[name] = files
            self.uid[name] = str(dcmread(files[0]).StudyInstanceUID)
            self.series[name] = sorted({str(dcmread(f).SeriesInstanceUID) for f in files})
            r = run_storescu(files, self.router.port)
            assert r.returncode == 0, r.stderr
        for uid in self.uid.values():
            self.router.wait_state(uid, "delivered")

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop()
        self.orthanc.stop()
        self.storescp.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    for tool in ("findscu", "movescu", "getscu", "storescu", "storescp"):
        require_peer(f"DCMTK {tool}", find_dcmtk(tool) is not None, "dcmtk")
    s = Site(tmp_path_factory.mktemp("qr"))
    try:
        s.start()
        yield s
        assert s.router is not None
        assert "Traceback" not in s.router.log(100_000), "a traceback in the router's log"
    finally:
        s.stop()


def findscu(site: Site, out: Path, *keys: str, root: str = "-S") -> list[Any]:
    """The answers of one C-FIND, as datasets (``findscu -X`` writes each to a file)."""
    assert site.router is not None
    out.mkdir(parents=True, exist_ok=True)
    args = [dcmtk("findscu"), "-v", root, "-aet", "FINDSCU", "-aec", "DICOMROUTER", "-X",
            "-od", str(out)]
    for k in keys:
        args += ["-k", k]
    r = subprocess.run([*args, "127.0.0.1", str(site.router.port)], capture_output=True,
                       text=True, env=peer_env(), timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_find_study_level_wildcard_and_return_keys(site: Site, tmp_path: Path) -> None:
    found = findscu(site, tmp_path, "QueryRetrieveLevel=STUDY", "PatientName=DOE*",
                    "StudyInstanceUID", "StudyDate", "ModalitiesInStudy",
                    "NumberOfStudyRelatedInstances", "NumberOfStudyRelatedSeries", "PatientID")
    by_uid = {str(ds.StudyInstanceUID): ds for ds in found}
    assert set(by_uid) == {site.uid["a"], site.uid["b"]}
    a = by_uid[site.uid["a"]]
    assert str(a.PatientName) == "DOE^JOHN" and a.PatientID == "QR1"
    assert a.StudyDate == "20240105" and a.ModalitiesInStudy == "CT"
    assert int(a.NumberOfStudyRelatedInstances) == 4 and int(a.NumberOfStudyRelatedSeries) == 2
    assert a.QueryRetrieveLevel == "STUDY"


def test_find_date_range_uid_list_and_single_value(site: Site, tmp_path: Path) -> None:
    in_2024 = findscu(site, tmp_path / "range", "QueryRetrieveLevel=STUDY",
                      "StudyDate=20240101-20241231", "StudyInstanceUID")
    assert {str(d.StudyInstanceUID) for d in in_2024} == {site.uid["a"], site.uid["b"]}
    before = findscu(site, tmp_path / "open", "QueryRetrieveLevel=STUDY", "StudyDate=-20231231",
                     "StudyInstanceUID")
    assert {str(d.StudyInstanceUID) for d in before} == {site.uid["c"]}
    listed = findscu(site, tmp_path / "list", "QueryRetrieveLevel=STUDY",
                     f"StudyInstanceUID={site.uid['a']}\\{site.uid['c']}")
    assert {str(d.StudyInstanceUID) for d in listed} == {site.uid["a"], site.uid["c"]}
    mr = findscu(site, tmp_path / "mod", "QueryRetrieveLevel=STUDY", "ModalitiesInStudy=MR",
                 "StudyInstanceUID")
    assert {str(d.StudyInstanceUID) for d in mr} == {site.uid["b"]}
    one = findscu(site, tmp_path / "single", "QueryRetrieveLevel=STUDY", "PatientID=QR3",
                  "PatientName")
    assert [str(d.PatientName) for d in one] == ["ROE^RICHARD"]
    none = findscu(site, tmp_path / "none", "QueryRetrieveLevel=STUDY", "PatientID=NOPE")
    assert none == []


def test_find_series_and_image_levels_and_patient_root(site: Site, tmp_path: Path) -> None:
    series = findscu(site, tmp_path / "series", "QueryRetrieveLevel=SERIES",
                     f"StudyInstanceUID={site.uid['b']}", "SeriesInstanceUID", "Modality",
                     "NumberOfSeriesRelatedInstances")
    assert sorted(str(d.SeriesInstanceUID) for d in series) == site.series["b"]
    assert {d.Modality for d in series} == {"MR"}
    assert {int(d.NumberOfSeriesRelatedInstances) for d in series} == {2}
    images = findscu(site, tmp_path / "image", "QueryRetrieveLevel=IMAGE",
                     f"StudyInstanceUID={site.uid['b']}",
                     f"SeriesInstanceUID={site.series['b'][0]}", "SOPInstanceUID",
                     "InstanceNumber")
    expected = {str(dcmread(f).SOPInstanceUID) for f in site.files["b"]
                if str(dcmread(f).SeriesInstanceUID) == site.series["b"][0]}
    assert {str(d.SOPInstanceUID) for d in images} == expected
    patients = findscu(site, tmp_path / "patient", "QueryRetrieveLevel=PATIENT", "PatientID",
                       "PatientName", "NumberOfPatientRelatedStudies", root="-P")
    assert {d.PatientID for d in patients} == {"QR1", "QR2", "QR3"}
    assert {int(d.NumberOfPatientRelatedStudies) for d in patients} == {1}


def _movescu(site: Site, destination: str, study: str) -> subprocess.CompletedProcess[str]:
    assert site.router is not None
    return subprocess.run(
        [dcmtk("movescu"), "-d", "-S", "-aet", "MOVESCU", "-aec", "DICOMROUTER", "-aem",
         destination, "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
         "127.0.0.1", str(site.router.port)],
        capture_output=True, text=True, env=peer_env(), timeout=120)


def test_movescu_retrieves_a_study_into_storescp(site: Site) -> None:
    r = _movescu(site, "STORESCP", site.uid["c"])
    assert r.returncode == 0, r.stdout + r.stderr
    expected = sop_uids(site.files["c"])
    wait_until(lambda: site.storescp.sop_uids() >= expected, timeout=60,
               what="the moved study in storescp")
    out = r.stdout + r.stderr
    final = out[out.index("Received Final Move Response"):]
    assert re.search(r"Completed Suboperations\s*:\s*4\b", final), out
    assert re.search(r"Failed Suboperations\s*:\s*0\b", final), out
    assert "DIMSE Status                  : 0x0000" in final, out


def test_move_to_an_unknown_destination_gets_a801(site: Site) -> None:
    r = _movescu(site, "NOSUCHAE", site.uid["a"])
    out = r.stdout + r.stderr
    assert "0xa801" in out.lower(), out
    assert site.router is not None
    assert "move destination unknown" in site.router.log(200)


def test_move_to_an_unreachable_destination_fails(site: Site) -> None:
    r = _movescu(site, "NOBODY", site.uid["a"])
    assert "0xa801" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr


def test_getscu_retrieves_a_study(site: Site, tmp_path: Path) -> None:
    assert site.router is not None
    out = tmp_path / "get"
    out.mkdir()
    r = subprocess.run(
        [dcmtk("getscu"), "-v", "-S", "-aet", "GETSCU", "-aec", "DICOMROUTER", "-od", str(out),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={site.uid['a']}",
         "127.0.0.1", str(site.router.port)],
        capture_output=True, text=True, env=peer_env(), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    got = {str(dcmread(p).SOPInstanceUID): p for p in out.iterdir()}
    assert set(got) == sop_uids(site.files["a"])
    for f in site.files["a"]:  # the pixels that left are the pixels that came in
        src = dcmread(f)
        assert dcmread(got[str(src.SOPInstanceUID)]).PixelData == src.PixelData


def test_orthanc_queries_and_moves_from_the_router(site: Site) -> None:
    require_peer("Orthanc", find_orthanc() is not None, "orthanc")
    orthanc = site.orthanc
    q = orthanc.post("/modalities/router/query",
                     {"Level": "Study", "Query": {"PatientName": "DOE^J*",
                                                  "StudyDate": "20240201-20240301"}})
    answers = orthanc.get(f"{q['Path']}/answers?expand&simplify")
    assert [a["StudyInstanceUID"] for a in answers] == [site.uid["b"]]
    orthanc.post("/modalities/router/move", {
        "Level": "Study", "Resources": [{"StudyInstanceUID": site.uid["b"]}],
        "TargetAet": "ORTHANCQR"})
    orthanc.wait_for_instances(sop_uids(site.files["b"]), timeout=90)


def test_cli_find_prints_a_table_and_json(site: Site) -> None:
    from router_fixtures import dicomrouter

    assert site.router is not None
    port = str(site.router.port)
    r = dicomrouter("find", "--port", port, "--aet", "DICOMROUTER", "-k", "PatientName=DOE*",
                    "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {row["StudyInstanceUID"] for row in rows} == {site.uid["a"], site.uid["b"]}
    assert {row["NumberOfStudyRelatedInstances"] for row in rows} == {"4"}
    r = dicomrouter("find", "--port", port, "--level", "series",
                    "-k", f"StudyInstanceUID={site.uid['c']}")
    assert r.returncode == 0, r.stderr
    assert "SeriesInstanceUID" in r.stdout and "2 match(es)" in r.stdout, r.stdout
    assert all(s in r.stdout for s in site.series["c"])
    r = dicomrouter("find", "--port", port, "-k", "NotAKeyword=1")
    assert r.returncode == 2 and "not a DICOM keyword" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_move_asks_a_peer_to_move_a_study(site: Site, tmp_path: Path) -> None:
    from router_fixtures import dicomrouter

    assert site.router is not None
    before = site.storescp.sop_uids()
    r = dicomrouter("move", site.uid["a"], "--from", "DICOMROUTER", "--to", "STORESCP",
                    "--host", "127.0.0.1", "--port", str(site.router.port))
    assert r.returncode == 0, r.stderr
    assert "4 completed, 0 failed" in r.stdout, r.stdout
    assert site.storescp.sop_uids() - before >= sop_uids(site.files["a"]) - before
    assert site.storescp.sop_uids() >= sop_uids(site.files["a"])
    r = dicomrouter("move", site.uid["a"], "--from", "DICOMROUTER", "--to", "NOSUCHAE",
                    "--host", "127.0.0.1", "--port", str(site.router.port))
    assert r.returncode == 1 and "0xA801" in r.stderr, r.stderr
    r = dicomrouter("move", site.uid["a"], "--from", "UNKNOWNPACS", "--to", "STORESCP")
    assert r.returncode == 2 and "known_aes" in r.stderr, r.stderr


def test_qr_and_storage_on_the_pynetdicom_receiver_too(tmp_path: Path) -> None:
    """``receiver: pynetdicom`` serves the same Q/R handlers on its AE."""
    study = generate(tmp_path / "study", series=1, instances=2, rows=8, cols=8, seed=91)
    with Router(tmp_path / "router", {"receiver": "pynetdicom", "keep_after_delivery": True,
                                      "destinations": {}, "routes": []}) as router:
        assert run_storescu(study, router.port).returncode == 0
        uid = str(dcmread(study[0]).StudyInstanceUID)
        router.wait_state(uid, "unrouted")
        out = tmp_path / "find"
        out.mkdir()
        r = subprocess.run([dcmtk("findscu"), "-S", "-aec", "DICOMROUTER", "-X", "-od", str(out),
                            "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
                            "-k", "NumberOfStudyRelatedInstances", "127.0.0.1", str(router.port)],
                           capture_output=True, text=True, env=peer_env(), timeout=60)
        assert r.returncode == 0, r.stderr
        found = [dcmread(p) for p in out.glob("rsp*.dcm")]
        assert [(str(d.StudyInstanceUID), int(d.NumberOfStudyRelatedInstances))
                for d in found] == [(uid, 2)]
