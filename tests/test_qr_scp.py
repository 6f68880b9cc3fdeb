"""The router as a Query/Retrieve SCP, queried by real DCMTK findscu/movescu/getscu and Orthanc.

One router holds three studies (kept after delivery); every query's answers are read back as
DICOM files (``findscu -X``) and compared with what was sent.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
from collections.abc import Iterator
from io import BytesIO
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
from pynetdicom.dsutils import decode
from rawdicom import RawAssociation, associate_rq, context, recv_pdu
from router_fixtures import Router

from dicomrouter.dimse import PDV_HEADER, encode_command, parse_command, pdata, text
from dicomrouter.sample import generate

STUDIES = {  # name → (patient name, patient id, study date, modality, character set)
    "a": ("DOE^JOHN", "QR1", "20240105", "CT", ""),
    "b": ("DOE^JANE", "QR2", "20240220", "MR", ""),
    "c": ("ROE^RICHARD", "QR3", "20230711", "CT", ""),
    "d": ("Müller^Jürgen", "QR4", "20250303", "OT", "ISO_IR 192"),
    "e": ("Ström^Åsa", "QR5", "20250404", "US", "ISO_IR 100"),
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
        for name, (patient, pid, date, modality, charset) in STUDIES.items():
            files = generate(self.root / f"study_{name}", series=2, instances=2, rows=8, cols=8,
                             modality=modality, patient_id=pid, seed=len(name) + ord(name))
            for f in files:
                ds = dcmread(f)
                if charset:  # the name is written in this character set
                    ds.SpecificCharacterSet = charset
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
    assert {d.PatientID for d in patients} == {"QR1", "QR2", "QR3", "QR4", "QR5"}
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
        got = tmp_path / "get"  # C-GET through the router's own C-GET service class
        got.mkdir()
        r = subprocess.run([dcmtk("getscu"), "-S", "-aec", "DICOMROUTER", "-od", str(got),
                            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}",
                            "127.0.0.1", str(router.port)],
                           capture_output=True, text=True, env=peer_env(), timeout=60)
        assert r.returncode == 0, r.stderr
        by_uid = {str(dcmread(p).SOPInstanceUID): p for p in got.iterdir()}
        assert set(by_uid) == sop_uids(study)
        for f in study:
            assert dcmread(by_uid[str(dcmread(f).SOPInstanceUID)]).PixelData == \
                dcmread(f).PixelData


# ---- conformance details (issue 21, item 7) -------------------------------------------------


def _dcmtk(site: Site, tool: str, *args: str | bytes) -> str:
    """Run a DCMTK Q/R tool (debug output) against the router; its output."""
    assert site.router is not None
    r = subprocess.run([dcmtk(tool), "-d", *args, "127.0.0.1", str(site.router.port)],
                       capture_output=True, env=peer_env(), timeout=120)
    return (r.stdout + r.stderr).decode("utf-8", "replace")


def _final_status(out: str, marker: str) -> int:
    final = out[out.rindex(marker):]
    m = re.search(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", final)
    assert m, final
    return int(m.group(1), 16)


@pytest.mark.parametrize("keys", [
    ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"],
    ["QueryRetrieveLevel=NOSUCHLEVEL", "StudyInstanceUID=1.2.3"],
    ["QueryRetrieveLevel=PATIENT", "PatientID=QR1"],
    ["QueryRetrieveLevel=STUDY", "StudyDate=20200101-20210101-20220101"],
    ["QueryRetrieveLevel=STUDY", "StudyDate=notadate"],
], ids=["no-key-value", "unknown-level", "patient-level-in-study-root", "three-ended-range",
        "notadate"])
def test_refused_move_and_get_answer_a900_with_no_suboperations(site: Site, tmp_path: Path,
                                                                keys: list[str]) -> None:
    """What the information model does not allow is 0xA900 for C-MOVE (pynetdicom's own path
    answered 0xC515) and C-GET, with no sub-operation counted (C-GET reported 1 failed)."""
    before = site.storescp.sop_uids()
    k = [arg for key in keys for arg in ("-k", key)]
    out = _dcmtk(site, "movescu", "-S", "-aet", "MOVESCU", "-aec", "DICOMROUTER",
                 "-aem", "STORESCP", *k)
    assert _final_status(out, "Received Final Move Response") == 0xA900, out
    final = out[out.rindex("Received Final Move Response"):]
    for kind in ("Completed", "Failed", "Warning"):  # counts absent: none was attempted
        assert re.search(rf"{kind} Suboperations\s*:\s*none", final), final
    out = _dcmtk(site, "getscu", "-S", "-aet", "GETSCU", "-aec", "DICOMROUTER",
                 "-od", str(tmp_path), *k)
    assert re.search(r"DIMSE Status\s*:\s*0xa900", out, re.IGNORECASE), out
    assert re.search(r"Number of Failed Suboperations\s*:\s*(none|0)\b", out), out
    assert not re.search(r"Number of Failed Suboperations\s*:\s*[1-9]", out), out
    assert list(tmp_path.iterdir()) == []
    assert site.storescp.sop_uids() == before
    out = _dcmtk(site, "findscu", "-S", "-aet", "FINDSCU", "-aec", "DICOMROUTER", *k)
    if keys[0].endswith("STUDY") and "=" not in keys[1]:  # a query may have no key value
        assert _final_status(out, "Received Final Find Response") == 0x0000, out
    else:
        assert _final_status(out, "Received Final Find Response") == 0xA900, out
    assert site.router is not None
    assert "0xC515" not in site.router.log(5000)


@pytest.mark.parametrize(("charset", "pattern", "expected"), [
    ("ISO_IR 192", "MÜLLER*".encode(), "d"),
    ("ISO_IR 192", "MÜLLER^JÜRGEN".encode(), "d"),
    ("ISO_IR 100", "STRÖM*".encode("latin-1"), "e"),
    ("ISO_IR 100", "STRÖM^ÅSA".encode("latin-1"), "e"),
    ("ISO_IR 192", "STRÖM*".encode(), "e"),
    ("", b"MULLER*", None),  # no umlaut: another name
], ids=["utf8-wildcard", "utf8-single", "latin1-wildcard", "latin1-single",
        "utf8-query-latin1-data", "ascii-is-not-u-umlaut"])
def test_person_names_match_case_insensitively_beyond_ascii(
        site: Site, tmp_path: Path, charset: str, pattern: bytes, expected: str | None) -> None:
    """The query is decoded with its Specific Character Set, the stored names with theirs, and
    both folded with Unicode rules."""
    assert site.router is not None
    args: list[str | bytes] = [dcmtk("findscu"), "-S", "-aec", "DICOMROUTER", "-X", "-od",
                               str(tmp_path), "-k", "QueryRetrieveLevel=STUDY",
                               "-k", "StudyInstanceUID", "-k", b"PatientName=" + pattern]
    if charset:
        args += ["-k", f"SpecificCharacterSet={charset}"]
    r = subprocess.run([*args, "127.0.0.1", str(site.router.port)], capture_output=True,
                       env=peer_env(), timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    found = [dcmread(p) for p in sorted(tmp_path.glob("rsp*.dcm"))]
    assert [str(d.StudyInstanceUID) for d in found] == \
        ([site.uid[expected]] if expected else [])
    if expected:
        assert str(found[0].PatientName) == STUDIES[expected][0]  # decoded as stored


def test_unsupported_optional_keys_answer_ff01(site: Site) -> None:
    """A key the router does not support: each match is Pending 0xFF01 and the key comes back
    empty; with supported keys only, 0xFF00."""
    out = _dcmtk(site, "findscu", "-S", "-aec", "DICOMROUTER", "-k", "QueryRetrieveLevel=STUDY",
                 "-k", f"StudyInstanceUID={site.uid['a']}", "-k", "PatientComments",
                 "-k", "EthnicGroup")
    pending = re.findall(r"Received Find Response \d+.*?DIMSE Status\s*:\s*0x([0-9a-f]{4})",
                         out, re.S | re.I)
    assert pending == ["ff01"], out
    assert "(0010,4000) LT (no value available)" in out, out  # PatientComments, returned empty
    out = _dcmtk(site, "findscu", "-S", "-aec", "DICOMROUTER", "-k", "QueryRetrieveLevel=STUDY",
                 "-k", f"StudyInstanceUID={site.uid['a']}", "-k", "PatientName")
    pending = re.findall(r"Received Find Response \d+.*?DIMSE Status\s*:\s*0x([0-9a-f]{4})",
                         out, re.S | re.I)
    assert pending == ["ff00"], out


STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
IMPLICIT = "1.2.840.10008.1.2"


def _element(group: int, elem: int, value: bytes, length: int | None = None) -> bytes:
    """One Implicit VR Little Endian element; ``length`` declares another length than the
    value's."""
    return struct.pack("<HHI", group, elem, len(value) if length is None else length) + value


def _raw_find(assoc: RawAssociation, identifier: bytes, message_id: int
              ) -> list[tuple[int, bytes]]:
    """One C-FIND with the identifier's bytes as given: (status, response identifier bytes)
    of every response, up to the final one."""
    cmd = encode_command([(0x0002, text(STUDY_FIND, b"\x00")),
                          (0x0100, struct.pack("<H", 0x0020)),
                          (0x0110, struct.pack("<H", message_id)),
                          (0x0700, struct.pack("<H", 0)),
                          (0x0800, struct.pack("<H", 0x0001))])
    assoc.sock.sendmsg(pdata(1, 0x03, cmd))
    assoc.sock.sendmsg(pdata(1, 0x02, identifier))
    responses: list[tuple[int, bytes]] = []
    command, data = b"", b""
    while True:
        kind, body = recv_pdu(assoc.sock)
        assert kind == 0x04, f"PDU type {kind} instead of P-DATA"
        at = 0
        while at < len(body):
            length, _cx, control = PDV_HEADER.unpack_from(body, at)
            fragment = body[at + 6:at + 4 + length]
            at += 4 + length
            if control & 0x01:
                command += fragment
                if not control & 0x02:
                    continue
                parsed = parse_command(command)
                status = int.from_bytes(parsed[0x0900], "little")
                if int.from_bytes(parsed[0x0800], "little") == 0x0101:  # no identifier
                    responses.append((status, b""))
                    if status not in (0xFF00, 0xFF01):
                        return responses
                    command = b""
            else:
                data += fragment
                if control & 0x02:
                    responses.append((status, data))
                    command, data = b"", b""


def test_malformed_identifiers_are_refused_and_file_meta_is_never_echoed(site: Site) -> None:
    """An element whose declared length runs past the data: 0xC000 (pydicom reads it as if it
    were whole), and the association goes on; a File Meta element in an identifier is not
    a key: not echoed, answered 0xFF01."""
    assert site.router is not None
    level = _element(0x0008, 0x0052, b"STUDY ")
    uid = site.uid["a"].encode()
    uid += b"\x00" * (len(uid) % 2)
    rq = associate_rq(calling=b"RAWFIND", contexts=[context(1, STUDY_FIND, [IMPLICIT])])
    assoc = RawAssociation(site.router.port, rq)
    try:
        cut = level + _element(0x0010, 0x0010, b"DOE^J*", length=100)
        assert _raw_find(assoc, cut, 1) == [(0xC000, b"")]
        meta = _element(0x0002, 0x0010, b"1.2.840.10008.1.2\x00")
        answers = _raw_find(assoc, meta + level + _element(0x0020, 0x000D, uid), 2)
    finally:
        assoc.release()
    assert [status for status, _ in answers] == [0xFF01, 0x0000]
    found = decode(BytesIO(answers[0][1]), True, True, False)
    assert str(found.StudyInstanceUID) == site.uid["a"]
    assert [e.tag for e in found if e.tag.group == 0x0002] == []
    assert "the identifier is malformed" in site.router.log(5000)


def test_more_matches_than_max_query_results(tmp_path: Path) -> None:
    """C-FIND has no warning status (PS3.4 C.4.1.1.4): past the limit the first matches are
    sent, then 0xA700 with a comment, never Success (which says every match was sent)."""
    studies = [generate(tmp_path / f"s{i}", series=1, instances=1, rows=8, cols=8, seed=40 + i)
               for i in range(2)]
    with Router(tmp_path / "router", {"destinations": {}, "routes": [],
                                      "max_query_results": 1}) as router:
        for files in studies:
            assert run_storescu(files, router.port).returncode == 0
        for files in studies:
            router.wait_state(str(dcmread(files[0]).StudyInstanceUID), "unrouted")
        r = subprocess.run([dcmtk("findscu"), "-d", "-S", "-aec", "DICOMROUTER",
                            "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
                            "127.0.0.1", str(router.port)],
                           capture_output=True, text=True, env=peer_env(), timeout=60)
        out = r.stdout + r.stderr
        assert len(re.findall(r"Received Find Response \d+", out)) == 1, out
        assert _final_status(out, "Received Final Find Response") == 0xA700, out
        assert "over max_query_results: only the first 1 were sent" in out, out
        from router_fixtures import dicomrouter

        r2 = dicomrouter("find", "--port", str(router.port), "--aet", "DICOMROUTER")
        assert r2.returncode != 0 and "0xA700" in r2.stderr, r2.stdout + r2.stderr
        assert "Traceback" not in r2.stderr
        assert "unknown" not in router.log(5000).lower()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_person_name_folding_in_both_state_databases(request: pytest.FixtureRequest,
                                                     tmp_path: Path, backend: str) -> None:
    """The state's own matching folds every letter (SQLite's upper() knows ASCII only)."""
    from dicomrouter.query import Match, Query
    from dicomrouter.state import State
    from dicomrouter.state.postgres import PostgresState
    from dicomrouter.state.sqlite import SQLiteState

    state: State = SQLiteState(tmp_path / "state.db") if backend == "sqlite" else \
        PostgresState(request.getfixturevalue("pg_dsn"), "node-a", tmp_path, lease=3)
    try:
        for n, name in enumerate(("Müller^Jürgen", "Ström^Åsa", "MULLER^JURGEN"), 1):
            state.record_instance(
                {"StudyInstanceUID": f"1.5.{n}", "SeriesInstanceUID": f"1.5.{n}.1",
                 "SOPInstanceUID": f"1.5.{n}.1.1", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
                 "PatientID": f"P{n}", "PatientName": name, "Modality": "CT"},
                "1.2.840.10008.1.2.1", f"k{n}", 10, "A", "B")

        def studies(kind: str, *values: str) -> list[str]:
            match = Match("PatientName", kind, values)
            return sorted(r["StudyInstanceUID"] for r in
                          state.qr_rows(Query("STUDY", (match,), ())))

        assert studies("wildcard", "MÜLLER*") == ["1.5.1"]
        assert studies("single", "STRÖM^ÅSA") == ["1.5.2"]
        assert studies("list", "müller^jürgen", "ström^åsa") == ["1.5.1", "1.5.2"]
        assert studies("wildcard", "m?ller*") == ["1.5.1", "1.5.3"]
    finally:
        state.close()
