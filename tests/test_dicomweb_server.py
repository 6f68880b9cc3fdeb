"""The router as a DICOMweb server over its spool (issue 28, item 2): QIDO-RS and WADO-RS,
asked by dicomweb-client the way a library user calls it and by Orthanc's DICOMweb plugin with
the router in ``DicomWeb.Servers``. What comes back is compared with the files that were sent:
tags, the bytes as stored, decoded pixels, frames one by one.

Data built to break it: Person Names with ``^`` and non-ASCII letters (matched case-folded), a
wildcard one letter away from a name that must not match, a date range whose ends are the
studies' own dates with a study one day past it, more matches than ``max_query_results``.
"""

from __future__ import annotations

import io
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from peers import Orthanc, find_dcmtk, find_orthanc, require_peer, run_storescu, wait_until
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
)
from router_fixtures import Router, dataset_bytes

from dicomrouter.sample import generate
from dicomrouter_bench.procs import find_dicomweb_plugin, free_port

STUDIES = {  # name → (patient name, patient id, study date, modality, charset, frames, syntax)
    "a": ("DOE^JOHN", "DW1", "20240105", "CT", "", 1, ""),
    "b": ("Müller^Jürgen", "DW2", "20240131", "MR", "ISO_IR 192", 1, ""),
    "c": ("DOE^JOHNNY", "DW3", "20240201", "CT", "", 1, ""),
    "d": ("DOE^JOAN", "DW4", "20240104", "CT", "", 1, ""),
    "jls": ("ROE^RICHARD", "DW5", "20230711", "OT", "", 3, JPEGLSLossless),
    "j2k": ("Ström^Åsa", "DW6", "20230712", "OT", "ISO_IR 100", 1, JPEG2000Lossless),
    "mf": ("ROE^MULTI", "DW7", "20230713", "OT", "", 4, ""),
    "cut": ("CUT^SHORT", "DW9", "20220101", "OT", "", 1, ""),
    "defl": ("DEFLATED^DORA", "DW11", "20220102", "OT", "", 3, "deflated"),
}
MANY = 130  # instances of one series: more than max_query_results (100)
ANY_SYNTAX = (("application/dicom", "*"),)
BIG_FRAMES = 100  # one 50 MiB instance: streamed, never whole in the router's memory
ROWS, COLS = 48, 64  # JPEG 2000 needs room for its resolutions


class Site:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, list[Path]] = {}
        self.uid: dict[str, str] = {}
        self.router: Router | None = None
        self.base = ""

    def start(self) -> None:
        web_port = free_port()
        self.router = Router(self.root / "router", {
            "keep_after_delivery": True,
            "max_query_results": 100,
            "web": {"port": web_port},
            "destinations": {"archive": {"type": "folder", "path": str(self.root / "out")}},
            "routes": [{"to": "archive"}],
        })
        self.router.start()
        self.base = f"http://127.0.0.1:{web_port}/dicom-web"
        for name, (patient, pid, date, modality, charset, frames, syntax) in STUDIES.items():
            files = generate(self.root / f"study_{name}", series=2 if name == "a" else 1,
                             instances=2, rows=ROWS, cols=COLS, frames=frames, modality=modality,
                             patient_id=pid, seed=len(name) + ord(name[0]),
                             transfer_syntax=syntax if syntax == "deflated" else "explicit")
            for f in files:
                ds = dcmread(f)
                if charset:
                    ds.SpecificCharacterSet = charset
                ds.PatientName, ds.StudyDate = patient, date
                if syntax and syntax != "deflated":
                    ds.compress(syntax, generate_instance_uid=False)
                ds.save_as(f, enforce_file_format=True)
            self.files[name] = files
        self.files["big"] = generate(self.root / "study_big", series=1, instances=1,
                                     rows=512, cols=512, frames=BIG_FRAMES, patient_id="DW10",
                                     seed=10)
        self.files["many"] = generate(self.root / "study_many", series=1, instances=MANY,
                                      rows=2, cols=2, patient_id="DW8", seed=8)
        for name, files in self.files.items():
            self.uid[name] = str(dcmread(files[0]).StudyInstanceUID)
            r = run_storescu(files, self.router.port)
            assert r.returncode == 0, r.stderr
        for uid in self.uid.values():
            self.router.wait_state(uid, "delivered")

    def client(self) -> Any:
        from dicomweb_client.api import DICOMwebClient

        return DICOMwebClient(url=self.base)

    def source(self, sop_uid: str) -> Path:
        return next(f for files in self.files.values() for f in files
                    if str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) == sop_uid)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_peer("DCMTK storescu", find_dcmtk("storescu") is not None, "dcmtk")
    s = Site(tmp_path_factory.mktemp("dicomweb_server"))
    try:
        s.start()
        yield s
        assert s.router is not None
        assert "Traceback" not in s.router.log(100_000), "a traceback in the router's log"
    finally:
        if s.router is not None:
            s.router.stop()


def get(url: str, accept: str | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url)
    if accept is not None:
        req.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def parts(headers: dict[str, str], body: bytes) -> list[tuple[str, bytes]]:
    """(Content-Type, bytes) of each part of a multipart/related body."""
    mark = re.search(r"boundary=\"?([^\";]+)", headers["content-type"]).group(1)  # type: ignore[union-attr]
    out = []
    for chunk in body.split(b"--" + mark.encode())[1:-1]:
        head, _, data = chunk.partition(b"\r\n\r\n")
        kind = re.search(rb"Content-Type: *([^\r\n]+)", head, re.I).group(1).decode()  # type: ignore[union-attr]
        out.append((kind, data[:-2]))
    return out


def study_uids(answers: list[dict[str, Any]]) -> set[str]:
    return {a["0020000D"]["Value"][0] for a in answers}


# ---- QIDO-RS --------------------------------------------------------------------------------

def test_qido_studies_match_like_cfind(site: Site) -> None:
    client = site.client()
    u = site.uid
    find = client.search_for_studies
    assert study_uids(find(search_filters={"PatientName": "DOE^J?HN"})) == {u["a"]}
    assert study_uids(find(search_filters={"PatientName": "DOE^JO*"})) == \
        {u["a"], u["c"], u["d"]}
    assert study_uids(find(search_filters={"PatientName": "müller^jürgen"})) == {u["b"]}
    assert study_uids(find(search_filters={"PatientName": "STRÖM*"})) == {u["j2k"]}
    # a range whose ends are a and b's own dates; d one day before, c one day after
    assert study_uids(find(search_filters={"StudyDate": "20240105-20240131"})) == \
        {u["a"], u["b"]}
    assert study_uids(find(search_filters={"StudyDate": "-20240104"})) >= {u["d"]}
    assert u["a"] not in study_uids(find(search_filters={"StudyDate": "-20240104"}))
    assert study_uids(find(search_filters={"StudyInstanceUID": f"{u['a']},{u['c']}"})) == \
        {u["a"], u["c"]}
    assert find(search_filters={"PatientID": "NOBODY"}) == []
    [a] = find(search_filters={"PatientID": "DW1"})
    ds = Dataset.from_json(a)
    assert (str(ds.PatientName), ds.StudyDate, ds.NumberOfStudyRelatedSeries,
            ds.NumberOfStudyRelatedInstances, ds.ModalitiesInStudy) == \
        ("DOE^JOHN", "20240105", 2, 4, "CT")
    # built from the Host header, which dicomweb-client sends without the port
    assert ds.RetrieveURL.endswith(f"/dicom-web/studies/{u['a']}")
    status, _, body = get(f"{site.base}/studies?PatientID=DW1")
    assert status == 200 and json.loads(body)[0]["00081190"]["Value"] == \
        [f"{site.base}/studies/{u['a']}"]
    assert "00080052" not in a  # no QueryRetrieveLevel in QIDO
    [b] = find(search_filters={"PatientID": "DW2"})
    assert str(Dataset.from_json(b).PatientName) == "Müller^Jürgen"


def test_qido_series_and_instances(site: Site) -> None:
    client = site.client()
    series = client.search_for_series(site.uid["a"])
    sent = {str(dcmread(f).SeriesInstanceUID) for f in site.files["a"]}
    assert {s["0020000E"]["Value"][0] for s in series} == sent
    assert all(s["00201209"]["Value"] == [2] for s in series)
    for s in sent:
        found = client.search_for_instances(site.uid["a"], s)
        expected = {str(dcmread(f).SOPInstanceUID) for f in site.files["a"]
                    if str(dcmread(f).SeriesInstanceUID) == s}
        assert {i["00080018"]["Value"][0] for i in found} == expected
        assert all(i["00081190"]["Value"][0].endswith(i["00080018"]["Value"][0])
                   for i in found)
    # at the root, filtered by a study attribute, with includefield
    found = client.search_for_series(search_filters={"PatientID": "DW5"},
                                     fields=["StationName", "00081030"])
    assert len(found) == 1 and "00081010" in found[0] and "00081030" in found[0]
    everything = client.search_for_instances(search_filters={"PatientID": "DW5"},
                                             fields=["all"])
    assert len(everything) == 2 and "00181030" not in everything[0]
    assert everything[0]["00100010"]["Value"][0]["Alphabetic"] == "ROE^RICHARD"


@pytest.mark.parametrize("query, why", [
    ("fuzzymatching=true", "fuzzymatching"),
    ("NoSuchAttribute=1", "not a DICOM attribute"),
    ("PatientAge=030Y", "does not match on"),
    ("StudyDate=notadate", "not a valid DA"),
    ("StudyDate=20240101-20230101", "not a valid DA"),
    ("limit=-1", "whole number"),
    ("offset=x", "whole number"),
])
def test_qido_refusals(site: Site, query: str, why: str) -> None:
    status, headers, body = get(f"{site.base}/studies?{query}")
    assert status == 400, body
    assert why in json.loads(body)["detail"]


def test_qido_answers_json_only(site: Site) -> None:
    assert get(f"{site.base}/studies", 'multipart/related; type="application/dicom+xml"'
               )[0] == 406
    assert get(f"{site.base}/studies", "application/json")[0] == 200


def test_qido_paging_past_max_query_results(site: Site) -> None:
    [series] = {str(dcmread(f).SeriesInstanceUID) for f in site.files["many"]}
    url = f"{site.base}/studies/{site.uid['many']}/series/{series}/instances"
    status, headers, body = get(url)
    assert status == 200 and len(json.loads(body)) == 100
    assert headers.get("warning", "").startswith("299 ")
    seen: list[str] = []
    for offset in range(0, MANY + 50, 50):
        status, headers, body = get(f"{url}?limit=50&offset={offset}")
        assert status == 200 and "warning" not in headers
        page = [i["00080018"]["Value"][0] for i in json.loads(body)]
        assert len(page) == max(0, min(50, MANY - offset))
        seen += page
    assert len(seen) == len(set(seen)) == MANY
    assert set(seen) == {str(dcmread(f).SOPInstanceUID) for f in site.files["many"]}


# ---- WADO-RS --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a", "jls", "j2k", "mf", "defl"])
def test_wado_study_as_stored(site: Site, name: str) -> None:
    """transfer-syntax=*: each part is the stored file, its dataset byte for byte."""
    status, headers, body = get(f"{site.base}/studies/{site.uid[name]}",
                                'multipart/related; type="application/dicom"; '
                                'transfer-syntax=*')
    assert status == 200, body
    got = parts(headers, body)
    assert len(got) == len(site.files[name])
    for kind, data in got:
        ds = dcmread(io.BytesIO(data))
        src = site.source(str(ds.SOPInstanceUID))
        stored = str(dcmread(src, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        assert kind == f"application/dicom; transfer-syntax={stored}"
        assert str(ds.file_meta.TransferSyntaxUID) == stored
        assert data.endswith(dataset_bytes(src))
    # the same through dicomweb-client, decoded
    client = site.client()
    for ds in client.retrieve_study(site.uid[name], media_types=ANY_SYNTAX):
        src = dcmread(site.source(str(ds.SOPInstanceUID)))
        assert np.array_equal(ds.pixel_array, src.pixel_array)
        assert (ds.PatientName, ds.StudyDate) == (src.PatientName, src.StudyDate)


def test_wado_default_syntax_is_explicit_little_endian(site: Site) -> None:
    """No transfer-syntax: the standard's default, converted losslessly from JPEG-LS."""
    client = site.client()
    got = client.retrieve_study(site.uid["jls"])
    assert len(got) == 2
    for ds in got:
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        src = dcmread(site.source(str(ds.SOPInstanceUID)))
        assert np.array_equal(ds.pixel_array, src.pixel_array)


def test_wado_accept_negotiation(site: Site) -> None:
    """The first acceptable range wins; the stored syntax named is sent as stored; a lossless
    syntax the router can encode is produced (decoded pixels equal); lossy never."""
    dicom = 'multipart/related; type="application/dicom"; transfer-syntax='
    status, headers, body = get(f"{site.base}/studies/{site.uid['jls']}",
                                f"{dicom}{JPEGBaseline8Bit}, {dicom}{JPEGLSLossless}")
    assert status == 200
    for kind, data in parts(headers, body):
        assert kind.endswith(JPEGLSLossless)
        src = site.source(str(dcmread(io.BytesIO(data)).SOPInstanceUID))
        assert data.endswith(dataset_bytes(src))
    status, headers, body = get(f"{site.base}/studies/{site.uid['a']}",
                                f"{dicom}{JPEG2000Lossless}")
    assert status == 200
    got = parts(headers, body)
    assert len(got) == 4
    for kind, data in got:
        ds = dcmread(io.BytesIO(data))
        assert kind.endswith(JPEG2000Lossless) and ds.file_meta.TransferSyntaxUID == \
            JPEG2000Lossless
        assert np.array_equal(ds.pixel_array,
                              dcmread(site.source(str(ds.SOPInstanceUID))).pixel_array)


def test_wado_series_and_instance(site: Site) -> None:
    client = site.client()
    files = site.files["a"]
    first = dcmread(files[0])
    series = client.retrieve_series(site.uid["a"], str(first.SeriesInstanceUID),
                                    media_types=ANY_SYNTAX)
    assert {str(d.SOPInstanceUID) for d in series} == \
        {str(dcmread(f).SOPInstanceUID) for f in files
         if dcmread(f).SeriesInstanceUID == first.SeriesInstanceUID}
    one = client.retrieve_instance(site.uid["a"], str(first.SeriesInstanceUID),
                                   str(first.SOPInstanceUID), media_types=ANY_SYNTAX)
    assert one.SOPInstanceUID == first.SOPInstanceUID
    assert np.array_equal(one.pixel_array, first.pixel_array)


def test_wado_refusals(site: Site) -> None:
    a = site.uid["a"]
    first = dcmread(site.files["a"][0])
    status, _, body = get(f"{site.base}/studies/{a}",
                          f'multipart/related; type="application/dicom"; '
                          f'transfer-syntax={JPEGBaseline8Bit}')
    assert status == 406, body  # lossy: never produced
    assert get(f"{site.base}/studies/1.2.3.4.5.999")[0] == 404
    assert get(f"{site.base}/studies/{a}/series/{first.SeriesInstanceUID}/instances/"
               "1.2.3.999")[0] == 404
    assert get(f"{site.base}/studies/not-a-uid")[0] == 400
    status, _, body = get(f"{site.base}/studies/{a}", "application/pdf")
    assert status == 406, body


def _frame_url(site: Site, path: Path, frames: str) -> str:
    ds = dcmread(path, stop_before_pixels=True)
    return (f"{site.base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/"
            f"instances/{ds.SOPInstanceUID}/frames/{frames}")


def test_frames_uncompressed(site: Site) -> None:
    src = dcmread(site.files["mf"][0])
    size = ROWS * COLS * 2
    client = site.client()
    got = client.retrieve_instance_frames(
        src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID, [4, 1, 3],
        media_types=("application/octet-stream",))
    assert got == [src.PixelData[(n - 1) * size:n * size] for n in (4, 1, 3)]
    status, headers, body = get(_frame_url(site, site.files["mf"][0], "2"))
    assert status == 200
    [(kind, data)] = parts(headers, body)
    assert kind.startswith("application/octet-stream") and data == src.PixelData[size:2 * size]
    for bad in ("0", "5", "x", "1,,2"):
        assert get(_frame_url(site, site.files["mf"][0], bad))[0] == 400, bad
    # Deflated: the body is inflated to find the frames
    deflated = dcmread(site.files["defl"][0])
    assert deflated.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"
    got = client.retrieve_instance_frames(
        deflated.StudyInstanceUID, deflated.SeriesInstanceUID, deflated.SOPInstanceUID, [3, 1],
        media_types=("application/octet-stream",))
    assert got == [deflated.PixelData[2 * size:3 * size], deflated.PixelData[:size]]


@pytest.mark.parametrize("name, kind", [("jls", "image/jls"), ("j2k", "image/jp2")])
def test_frames_compressed_as_stored(site: Site, name: str, kind: str) -> None:
    """Each frame is its stored codestream; decoded, it is the source's frame."""
    path = site.files[name][0]
    src = dcmread(path)
    count = int(src.get("NumberOfFrames", 1))
    stored = list(generate_frames(src.PixelData, number_of_frames=count))
    wanted = ",".join(str(n) for n in range(count, 0, -1))
    status, headers, body = get(_frame_url(site, path, wanted),
                                f'multipart/related; type="{kind}"')
    assert status == 200, body
    got = parts(headers, body)
    assert [k for k, _ in got] == [f"{kind}; transfer-syntax={src.file_meta.TransferSyntaxUID}"
                                   ] * count
    pixels = src.pixel_array.reshape(count, ROWS, COLS)
    for n, (_, data) in zip(range(count, 0, -1), got, strict=True):
        assert data.rstrip(b"\x00") == stored[n - 1].rstrip(b"\x00")
        one = dcmread(path)
        one.NumberOfFrames = 1
        one.PixelData = encapsulate([data])
        assert np.array_equal(one.pixel_array, pixels[n - 1])
    # only as stored: an uncompressed frame is not produced
    status, _, _ = get(_frame_url(site, path, "1"),
                       'multipart/related; type="application/octet-stream"')
    assert status == 406
    client = site.client()
    via_client = client.retrieve_instance_frames(
        src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID, [1],
        media_types=((kind, str(src.file_meta.TransferSyntaxUID)),))
    assert via_client[0].rstrip(b"\x00") == stored[0].rstrip(b"\x00")
    # dicomweb-client's default (type="*/*"): as stored too
    default = client.retrieve_instance_frames(
        src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID, [count])
    assert default[0].rstrip(b"\x00") == stored[count - 1].rstrip(b"\x00")


def test_metadata(site: Site) -> None:
    client = site.client()
    meta = client.retrieve_study_metadata(site.uid["b"])
    assert len(meta) == 2
    for item in meta:
        assert "7FE00010" not in item
        ds = Dataset.from_json(item)
        src = dcmread(site.source(str(ds.SOPInstanceUID)))
        assert (str(ds.PatientName), ds.Rows, ds.Columns, ds.SOPClassUID) == \
            ("Müller^Jürgen", src.Rows, src.Columns, src.SOPClassUID)
    first = dcmread(site.files["a"][0], stop_before_pixels=True)
    one = client.retrieve_instance_metadata(site.uid["a"], str(first.SeriesInstanceUID),
                                            str(first.SOPInstanceUID))
    assert Dataset.from_json(one).SOPInstanceUID == first.SOPInstanceUID
    series = client.retrieve_series_metadata(site.uid["a"], str(first.SeriesInstanceUID))
    assert len(series) == 2
    assert get(f"{site.base}/studies/1.2.3.999/metadata")[0] == 404


def test_a_large_instance_is_streamed(site: Site) -> None:
    """The router's memory does not grow by the instance while it sends it (sampled after
    every MiB the client reads), and the last frame is cut from it exactly."""
    assert site.router is not None
    path = site.files["big"][0]
    ds = dcmread(path, stop_before_pixels=True)
    req = urllib.request.Request(f"{site.base}/studies/{site.uid['big']}")
    base = site.router.rss_kb() or 0
    peak, total = base, 0
    with urllib.request.urlopen(req, timeout=120) as r:
        while chunk := r.read(1 << 20):
            total += len(chunk)
            peak = max(peak, site.router.rss_kb() or 0)
    assert total > path.stat().st_size
    assert peak - base < 20_000, f"RSS grew by {(peak - base) // 1024} MiB while sending"
    size = 512 * 512 * 2
    status, headers, body = get(_frame_url(site, path, str(BIG_FRAMES)))
    [(_, frame)] = parts(headers, body)
    with open(path, "rb") as f:
        f.seek(path.stat().st_size - size)
        assert frame == f.read(size)
    assert str(ds.NumberOfFrames) == str(BIG_FRAMES)


def test_a_spool_file_gone_mid_answer_cuts_it_short(site: Site) -> None:
    """The status is sent with the first part: a file that cannot be read later ends the body
    without its closing delimiter, with one line in the log and no traceback."""
    assert site.router is not None
    files = sorted(site.files["cut"], key=lambda f: int(dcmread(f).InstanceNumber))
    second = dcmread(files[1], stop_before_pixels=True)
    (site.router.spool / "data" / site.uid["cut"] / f"{second.SOPInstanceUID}.dcm").unlink()
    status, headers, body = get(f"{site.base}/studies/{site.uid['cut']}",
                                'multipart/related; type="application/dicom"; '
                                'transfer-syntax=*')
    assert status == 200
    mark = re.search(r"boundary=([^;]+)", headers["content-type"]).group(1)  # type: ignore[union-attr]
    assert body.endswith(dataset_bytes(files[0]) + b"\r\n")
    assert f"--{mark}--".encode() not in body
    wait_until(lambda: "WADO-RS retrieve cut short" in site.router.log(2000), 30)


# ---- Orthanc as the client ------------------------------------------------------------------

def test_orthanc_queries_and_retrieves_from_the_router(site: Site, tmp_path: Path) -> None:
    require_peer("Orthanc", find_orthanc() is not None, "orthanc")
    require_peer("Orthanc's DICOMweb plugin", find_dicomweb_plugin() is not None, "orthanc")
    orthanc = Orthanc(tmp_path / "orthanc", aet="VIEWER", dicomweb=True, extra_config={
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                     "Servers": {"router": [site.base + "/"]}}})
    orthanc.start()
    try:
        found = orthanc.post("/dicom-web/servers/router/qido",
                             {"Uri": "/studies", "Arguments": {"PatientName": "ROE^R*"}})
        # Orthanc answers in its own JSON flavour: one value, as a string
        assert [f["0020000D"]["Value"] for f in found] == [site.uid["jls"]]
        assert [f["00100010"].get("Value") for f in found] == ["ROE^RICHARD"]
        for name in ("a", "jls", "mf"):
            orthanc.post("/dicom-web/servers/router/retrieve",
                         {"Resources": [{"Study": site.uid[name]}]})
        sent = {str(dcmread(f).SOPInstanceUID): f for n in ("a", "jls", "mf")
                for f in site.files[n]}
        orthanc.wait_for_instances(sent, timeout=90)
        for sop, path in sent.items():
            got = dcmread(io.BytesIO(orthanc.instance_file(sop)))
            src = dcmread(path)
            assert np.array_equal(got.pixel_array, src.pixel_array), sop
            assert (got.PatientName, got.StudyDate, got.SeriesInstanceUID) == \
                (src.PatientName, src.StudyDate, src.SeriesInstanceUID)
    finally:
        orthanc.stop()
