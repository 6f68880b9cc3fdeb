"""STOW-RS in (issue 28, item 1): the router as a DICOMweb server. Real peers: dicomweb-client as
a library user calls it, Orthanc's DICOMweb plugin pushing to the router as one of its
``DicomWeb.Servers``, DCMTK storescp as the destination a route delivers to; raw multipart
requests built to break the ingest (a part that is not DICOM, a study UID that is not the
path's, a truncated instance); kill -9 in the middle of requests."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from peers import StoreSCP, free_port, wait_until
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from router_fixtures import Router, dataset_bytes, tags_of
from test_receive_log import LogRouter, check_recovered, folder_config, sop_files

from dicomrouter.config import ConfigError, load
from dicomrouter.config.dicomweb import DEFAULT_ENDPOINT
from dicomrouter.config.models import from_dict
from dicomrouter.sample import generate
from dicomrouter.spool.faults import STEPS
from dicomrouter.state import state_for

TOKEN = "stow-T0ken-9f2"
PASSWORD = "pa55-Wörd"


def multipart(parts: list[tuple[bytes, str]]) -> tuple[bytes, str]:
    """A multipart/related body of (bytes, part content type) and its Content-Type."""
    boundary = uuid.uuid4().hex
    body = b"".join(b"--" + boundary.encode() + f"\r\nContent-Type: {ctype}\r\n\r\n".encode()
                    + data + b"\r\n" for data, ctype in parts) + b"--" + boundary.encode() + b"--"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def post(url: str, files: list[Path] | list[bytes], **headers: str) -> requests.Response:
    body, ctype = multipart([(f if isinstance(f, bytes) else f.read_bytes(), "application/dicom")
                             for f in files])
    return requests.post(url, data=body, headers={"Content-Type": ctype, **headers}, timeout=120)


def seq(response: requests.Response, tag: str) -> list[dict[str, Any]]:
    return list(response.json().get(tag, {}).get("Value", []))


def referenced(response: requests.Response) -> set[str]:
    """SOP Instance UIDs the response lists as stored."""
    return {i["00081155"]["Value"][0] for i in seq(response, "00081199")}


def failed(response: requests.Response) -> dict[str, int]:
    """SOP Instance UID ('' when the part had none) → FailureReason."""
    return {(i["00081155"].get("Value") or [""])[0]: i["00081197"]["Value"][0]
            for i in seq(response, "00081198")}


def sop(f: Path) -> str:
    return tags_of(f, "SOPInstanceUID")[0]


def study_of(f: Path) -> str:
    return tags_of(f, "StudyInstanceUID")[0]


def spooled(router: Router, f: Path) -> Path:
    return router.spool / "data" / study_of(f) / f"{sop(f)}.dcm"


def syntax_variants(files: list[Path], out: Path) -> list[Path]:
    """The study's instances in four transfer syntaxes: as generated (explicit VR LE), implicit
    VR LE, deflated and RLE lossless (a mixed-syntax study)."""
    out.mkdir()
    result = [files[0]]
    for f, ts in zip(files[1:], (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                                 RLELossless), strict=False):
        ds = dcmread(f)
        if ts == RLELossless:
            ds.compress(RLELossless)
        else:
            ds.file_meta.TransferSyntaxUID = ts
        path = out / f.name
        ds.save_as(path, enforce_file_format=True)
        result.append(path)
    return result


def calling_ae(router: Router, study_uid: str) -> str:
    """Where the state says the study came from (status, history and routes read it)."""
    state = state_for(load(router.config_path, secrets=False), readonly=True)
    try:
        row = state.study(study_uid)
        assert row is not None, f"no study {study_uid}"
        return row.calling_ae
    finally:
        state.close()


def stow_router(tmp_path: Path, **config: Any) -> Router:
    port = free_port()
    router = Router(tmp_path / "router", {"stable_age": "1h", **config,
                                          "dicomweb": {"port": port,
                                                       **config.get("dicomweb", {})}})
    router.dicomweb_url = f"http://127.0.0.1:{port}/dicom-web"  # type: ignore[attr-defined]
    return router


def test_dicomweb_client_stores_and_an_endpoint_route_delivers_to_storescp(
        tmp_path: Path, storescp: StoreSCP) -> None:
    from dicomweb_client.api import DICOMwebClient

    partner = generate(tmp_path / "a", series=2, instances=3, rows=32, cols=32, seed=281)
    other = generate(tmp_path / "b", series=1, instances=2, rows=32, cols=32, seed=282)
    cfg = {"stable_age": "1s", "dicomweb": {"endpoints": ["partner-a", "partner-b"]},
           "destinations": {"pacs": {"type": "dicom", "ae_title": storescp.aet,
                                     "host": "127.0.0.1", "port": storescp.port}},
           "routes": [{"name": "partner a", "when": {"Endpoint": "partner-a"}, "to": ["pacs"]}]}
    with stow_router(tmp_path, **cfg) as router:
        url = router.dicomweb_url  # type: ignore[attr-defined]
        stored = DICOMwebClient(f"{url}/partner-a").store_instances(
            [dcmread(f) for f in partner])
        assert {i.ReferencedSOPInstanceUID for i in stored.ReferencedSOPSequence} == \
            {sop(f) for f in partner}
        assert "FailedSOPSequence" not in stored
        DICOMwebClient(url).store_instances([dcmread(f) for f in other])
        wait_until(lambda: storescp.sop_uids() == {sop(f) for f in partner}, timeout=90,
                   what="partner-a's study at storescp")
        for f in partner:  # what the destination got is what was posted
            got = next(p for p in storescp.files() if tags_of(p, "SOPInstanceUID")[0] == sop(f))
            assert dataset_bytes(got) == dataset_bytes(f)
        router.wait_state(study_of(other[0]), "unrouted")  # the default endpoint: no route
        for f in other:
            assert dataset_bytes(spooled(router, f)) == dataset_bytes(f)
        assert calling_ae(router, study_of(partner[0])) == "STOW-RS:partner-a"
        assert calling_ae(router, study_of(other[0])) == "STOW-RS"
        assert storescp.sop_uids() == {sop(f) for f in partner}  # nothing of the other study
        log = router.log(5000)
    assert "STOW-RS from 127.0.0.1 (endpoint partner-a): 6 stored, 0 failed" in log
    assert "Traceback" not in log


@pytest.mark.parametrize("receive_log", [True, False], ids=["receive-log", "slots"])
def test_each_part_gets_its_own_failure_reason(tmp_path: Path, receive_log: bool) -> None:
    study = syntax_variants(generate(tmp_path / "a", series=1, instances=4, rows=32, cols=32,
                                     seed=283), tmp_path / "mixed")
    stranger = generate(tmp_path / "b", series=1, instances=1, rows=16, cols=16, seed=284)[0]
    whole = study[0].read_bytes()
    uid = study_of(study[0])
    with stow_router(tmp_path, receive_log=receive_log) as router:
        url = router.dicomweb_url  # type: ignore[attr-defined]
        body, ctype = multipart([
            (study[0].read_bytes(), "application/dicom"),
            (b"this is not DICOM at all" * 50, "application/dicom"),
            (study[1].read_bytes(), "application/dicom"),
            (stranger.read_bytes(), "application/dicom"),  # another study: 0xA900
            (study[2].read_bytes(), "application/dicom"),
            (whole[:len(whole) // 2], "application/dicom"),  # truncated: 0xC000
            (b'{"00100020": {"vr": "LO", "Value": ["X"]}}', "application/dicom+json"),
            (study[3].read_bytes(), "application/dicom"),
        ])
        r = requests.post(f"{url}/studies/{uid}", data=body, headers={"Content-Type": ctype},
                          timeout=120)
        assert r.status_code == 202, r.text
        assert r.headers["content-type"].startswith("application/dicom+json")
        assert referenced(r) == {sop(f) for f in study}
        reasons = [i["00081197"]["Value"][0] for i in seq(r, "00081198")]
        assert reasons == [0xC000, 0xA900, 0xC000, 0xC000]
        assert failed(r)[sop(stranger)] == 0xA900  # named by its own UIDs
        assert r.json()["00081190"]["Value"][0].endswith(f"/dicom-web/studies/{uid}")
        for item in seq(r, "00081199"):
            assert item["00081190"]["Value"][0].endswith(
                f"/instances/{item['00081155']['Value'][0]}")
        for f in study:  # every syntax stored as it was sent
            assert dataset_bytes(spooled(router, f)) == dataset_bytes(f)
        assert not spooled(router, stranger).exists()
        assert not (router.spool / "data" / study_of(stranger)).exists()

        r = post(f"{url}/studies/{uid}", [stranger, b"\0" * 300])  # nothing storable: 409
        assert r.status_code == 409, r.text
        assert not referenced(r) and failed(r)[sop(stranger)] == 0xA900
        r = post(f"{url}/studies", [stranger])  # no study in the path: stored, 200
        assert r.status_code == 200 and referenced(r) == {sop(stranger)}
        assert "00081198" not in r.json()
        assert dataset_bytes(spooled(router, stranger)) == dataset_bytes(stranger)

        json_ctype = 'multipart/related; type="application/dicom+json"; boundary=x'
        r = requests.post(f"{url}/studies", data=b"--x--", headers={"Content-Type": json_ctype},
                          timeout=30)
        assert r.status_code == 415
        r = requests.post(f"{url}/studies", data=study[0].read_bytes(),
                          headers={"Content-Type": "application/dicom"}, timeout=30)
        assert r.status_code == 415
        body, ctype = multipart([(study[0].read_bytes(), "application/dicom")])
        r = requests.post(f"{url}/studies", data=body[:-200], headers={"Content-Type": ctype},
                          timeout=30)  # the body breaks off inside the only part
        assert r.status_code == 400 and not referenced(r)
        wait_until(lambda: not router.partial_receptions(), timeout=10,
                   what="no refused reception left in a receive slot")
        log = router.log(5000)
    assert "refused with 0xA900" in log and "refused with 0xC000" in log
    assert "Traceback" not in log


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_credentials_are_required_when_configured(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("STOW_TOKEN", TOKEN)
    monkeypatch.setenv("STOW_PASSWORD", PASSWORD)
    files = generate(tmp_path / "a", series=1, instances=4, rows=16, cols=16, seed=285)
    auth = {"token_env": "STOW_TOKEN", "user": "partner", "password_env": "STOW_PASSWORD"}
    with stow_router(tmp_path, dicomweb={"auth": auth}) as router:
        url = f"{router.dicomweb_url}/studies"  # type: ignore[attr-defined]
        for headers in ({}, {"Authorization": "Bearer wrong"},
                        {"Authorization": f"Bearer {TOKEN}x"},
                        {"Authorization": basic("partner", "wrong")},
                        {"Authorization": basic("other", PASSWORD)},
                        {"Authorization": basic("partner", TOKEN)},
                        {"Authorization": f"Token {TOKEN}"}):
            r = post(url, files[:1], **headers)
            assert r.status_code == 401, (headers, r.text)
            assert "WWW-Authenticate" in r.headers
        assert not (router.spool / "data").exists() or \
            not any((router.spool / "data").rglob("*.dcm"))
        assert post(url, files[:2], Authorization=f"Bearer {TOKEN}").status_code == 200
        assert post(url, files[2:], Authorization=basic("partner", PASSWORD)).status_code == 200
        for f in files:
            assert dataset_bytes(spooled(router, f)) == dataset_bytes(f)
        log = router.log(5000)
    assert TOKEN not in log and PASSWORD not in log


def test_web_port_serves_stow_with_the_web_token_off_loopback(tmp_path: Path,
                                                              monkeypatch) -> None:
    """On the web port, bound off loopback without dicomweb.auth: the web token is asked."""
    monkeypatch.setenv("WEB_TOKEN", TOKEN)
    files = generate(tmp_path / "a", series=1, instances=2, rows=16, cols=16, seed=286)
    web_port = free_port()
    with Router(tmp_path / "router", {"stable_age": "1h", "web": {
            "enabled": True, "bind": "0.0.0.0", "port": web_port, "token_env": "WEB_TOKEN"}}
                ) as router:
        url = f"http://127.0.0.1:{web_port}/dicom-web/studies"
        wait_until(lambda: requests.get(f"http://127.0.0.1:{web_port}/health",
                                        timeout=5).ok, timeout=30, what="the web port",
                   ignore=(OSError,))
        assert post(url, files).status_code == 401
        assert post(url, files, Authorization="Bearer nope").status_code == 401
        r = post(url, files, Authorization=f"Bearer {TOKEN}")
        assert r.status_code == 200 and referenced(r) == {sop(f) for f in files}
        assert dataset_bytes(spooled(router, files[0])) == dataset_bytes(files[0])


def test_every_dicomweb_path_needs_credentials_on_both_servers(tmp_path: Path,
                                                                monkeypatch) -> None:
    """Both servers bound off loopback, dicomweb.auth set: on the web port and on the own
    listener (at its root and a named endpoint's, which serves QIDO-RS and WADO-RS as well)
    every QIDO-RS and WADO-RS GET, not only STOW-RS, is 401 without dicomweb.auth's
    token, with a wrong one or with the web token (that one opens the status page only); with
    it the data comes back."""
    monkeypatch.setenv("WEB_TOKEN", TOKEN)
    monkeypatch.setenv("DW_TOKEN", TOKEN + "-dw")
    files = generate(tmp_path / "a", series=1, instances=2, rows=16, cols=16, seed=287)
    web_port, dw_port = free_port(), free_port()
    study, series = study_of(files[0]), tags_of(files[0], "SeriesInstanceUID")[0]
    paths = ["/studies", "/series", "/instances", f"/studies?StudyInstanceUID={study}",
             f"/studies/{study}/series", f"/studies/{study}/instances",
             f"/studies/{study}/series/{series}/instances", f"/studies/{study}",
             f"/studies/{study}/metadata", f"/studies/{study}/series/{series}",
             f"/studies/{study}/series/{series}/metadata",
             f"/studies/{study}/series/{series}/instances/{sop(files[0])}",
             f"/studies/{study}/series/{series}/instances/{sop(files[0])}/metadata",
             f"/studies/{study}/series/{series}/instances/{sop(files[0])}/frames/1"]
    with Router(tmp_path / "router", {
            "stable_age": "1h",
            "web": {"enabled": True, "bind": "0.0.0.0", "port": web_port,
                    "token_env": "WEB_TOKEN"},
            "dicomweb": {"bind": "0.0.0.0", "port": dw_port, "endpoints": ["partner-a"],
                         "auth": {"token_env": "DW_TOKEN"}}}):
        servers = [f"http://127.0.0.1:{web_port}/dicom-web",
                   f"http://127.0.0.1:{dw_port}/dicom-web",
                   f"http://127.0.0.1:{dw_port}/dicom-web/partner-a"]  # a whole service root
        token = TOKEN + "-dw"
        for base in servers:
            wait_until(lambda base=base: requests.get(base + "/studies", timeout=5)
                       .status_code == 401, timeout=30, what=f"{base} answering",
                       ignore=(OSError,))
        assert post(servers[1] + "/studies", files,
                    Authorization=f"Bearer {token}").status_code == 200
        for base in servers:
            for path in paths:
                for headers in ({}, {"Authorization": f"Bearer {TOKEN}"},
                                {"Authorization": basic("any", TOKEN)},
                                {"Authorization": f"Bearer {token}x"}):
                    r = requests.get(base + path, headers=headers, timeout=30)
                    assert r.status_code == 401, (base, path, headers, r.status_code)
                    assert "WWW-Authenticate" in r.headers
                r = requests.get(base + path, headers={"Authorization": f"Bearer {token}"},
                                 timeout=60)
                assert r.status_code == 200, (base, path, r.status_code, r.text[:300])
            r = requests.get(f"{base}/studies/{study}", timeout=60, headers={
                "Authorization": f"Bearer {token}",
                "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
            assert all(dataset_bytes(f) in r.content for f in files)
            assert post(base + "/studies", files).status_code == 401
            found = requests.get(base + "/studies", timeout=30,
                                 headers={"Authorization": f"Bearer {token}"}).json()
            assert found[0]["00081190"]["Value"] == [f"{base}/studies/{study}"]


def test_configuration_of_the_dicomweb_server(tmp_path: Path) -> None:
    def parse(**cfg: Any) -> Any:
        return from_dict(cfg, tmp_path, "test")

    with pytest.raises(ConfigError, match=r"dicomweb\.auth: required with dicomweb\.bind"):
        parse(dicomweb={"port": free_port(), "bind": "0.0.0.0"})
    with pytest.raises(ConfigError, match=r"routes\[0\]\.when\.Endpoint: unknown DICOMweb "
                       r"endpoint 'partner-b'"):
        parse(dicomweb={"endpoints": ["partner-a"]},
             destinations={"d": {"type": "folder", "path": str(tmp_path)}},
             routes=[{"when": {"Endpoint": "partner-b"}, "to": ["d"]}])
    with pytest.raises(ConfigError, match=r"dicomweb\.endpoints: 'studies' is not"):
        parse(dicomweb={"endpoints": ["studies"]})
    with pytest.raises(ConfigError, match=r"dicomweb\.port: 8080 is already used by web\.port"):
        parse(dicomweb={"port": 8080})
    with pytest.raises(ConfigError, match=r"dicomweb\.max_request_size"):
        parse(dicomweb={"max_request_size": "0"})
    with pytest.raises(ConfigError, match=r"dicomweb\.auth\.password_env: basic auth needs"):
        parse(dicomweb={"auth": {"user": "partner"}})
    cfg = parse(dicomweb={"endpoints": ["partner-a"]},
               destinations={"d": {"type": "folder", "path": str(tmp_path)}},
               routes=[{"when": {"Endpoint": ["partner-a", "default"]}, "to": ["d"]}])
    assert cfg.dicomweb.enabled and cfg.dicomweb.port is None


# ---- kill -9 ---------------------------------------------------------------------------------

def stow_requests(url: str, files: list[Path], per_request: int, acked: list[str]) -> None:
    """POST ``files`` in requests of ``per_request`` instances, one after the other, noting the
    SOP Instance UIDs each answered request lists as stored; stops once the router is gone."""
    for i in range(0, len(files), per_request):
        try:
            r = post(url, files[i:i + per_request])
        except requests.RequestException:
            return
        acked += referenced(r)
        if r.status_code != 200:
            return


#: the routing keys a STOW-RS request to the default endpoint gives each instance, and its
#: calling AE (checked on every instance after a crash: spool/note.py)
STOW_KEYS = ({"_SourceHost": "127.0.0.1", "_Endpoint": DEFAULT_ENDPOINT}, "STOW-RS")


@pytest.mark.parametrize("step", [s for s in STEPS if s not in ("flush", "wrap")])
def test_kill_during_stow_loses_nothing_acknowledged(tmp_path: Path, step: str) -> None:
    files = generate(tmp_path / "study", series=1, instances=40, rows=64, cols=64, seed=287)
    out = tmp_path / "out"
    port = free_port()
    cfg = folder_config(out, receive_log_size="512KiB", receive_log_max_record="64KiB",
                        dicomweb={"port": port})
    router = LogRouter(tmp_path / "r", {**cfg, "stable_age": "1h"},
                       DICOMROUTER_CRASH_AT=f"{step}:14")
    acked: list[str] = []
    with router:
        stow_requests(f"http://127.0.0.1:{port}/dicom-web/studies", files, 4, acked)
        wait_until(router.died, timeout=60, what=f"the router killed at {step}")
    assert 4 <= len(acked) < len(files)
    check_recovered(tmp_path, {**cfg, "port": router.port}, acked, sop_files(files), out,
                    STOW_KEYS)


def test_kill_in_the_middle_of_a_streamed_request(tmp_path: Path) -> None:
    """SIGKILL from outside while a request's body is still arriving: every instance of the
    answered requests survives; the cut request's instances are stored or not, never half."""
    files = generate(tmp_path / "study", series=1, instances=24, rows=64, cols=64, seed=288)
    out = tmp_path / "out"
    port = free_port()
    cfg = folder_config(out, dicomweb={"port": port})
    router = LogRouter(tmp_path / "r", {**cfg, "stable_age": "1h"})
    acked: list[str] = []
    url = f"http://127.0.0.1:{port}/dicom-web/studies"
    with router:
        stow_requests(url, files[:12], 4, acked)
        assert len(acked) == 12
        half_sent = threading.Event()
        body, ctype = multipart([(f.read_bytes(), "application/dicom") for f in files[12:]])

        def slow() -> Iterator[bytes]:
            yield body[:len(body) // 2]
            half_sent.set()
            threading.Event().wait(30)  # the router dies meanwhile
            yield body[len(body) // 2:]

        def send() -> None:
            with contextlib.suppress(requests.RequestException):
                requests.post(url, data=slow(), headers={"Content-Type": ctype}, timeout=60)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        assert half_sent.wait(30)
        wait_until(lambda: len(list((router.spool / "data").rglob("*.dcm"))) > 12, timeout=30,
                   what="some of the cut request's instances placed")
        os.kill(router.pid, signal.SIGKILL)
        wait_until(router.died, timeout=30, what="the router gone")
    log = check_recovered(tmp_path, {**cfg, "port": router.port}, acked, sop_files(files), out,
                          STOW_KEYS)
    assert "Traceback" not in log
    for p in out.rglob("*.dcm"):  # whatever of the cut request came through is whole
        assert dataset_bytes(p) == dataset_bytes(sop_files(files)[p.stem])


def test_orthanc_pushes_a_study_to_the_router_over_dicomweb(tmp_path: Path, orthanc,
                                                            storescp: StoreSCP,
                                                            monkeypatch) -> None:
    """Orthanc's DICOMweb plugin with the router as one of its ``DicomWeb.Servers`` (basic auth):
    ``POST /dicom-web/servers/router/stow`` pushes a mixed-syntax study, which a route delivers
    to storescp byte for byte."""
    monkeypatch.setenv("STOW_PASSWORD", PASSWORD)
    study = syntax_variants(generate(tmp_path / "a", series=1, instances=4, rows=32, cols=32,
                                     seed=289), tmp_path / "mixed")
    port = free_port()
    pacs = orthanc(aet="PUSHER", dicomweb=True, extra_config={"DicomWeb": {
        "Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
        "Host": "127.0.0.1", "Ssl": False,
        "Servers": {"router": {"Url": f"http://127.0.0.1:{port}/dicom-web/partner-a/",
                               "Username": "orthanc", "Password": PASSWORD}}}})
    ids = {pacs.post("/instances", f.read_bytes())["ParentStudy"] for f in study}
    assert len(ids) == 1
    cfg = {"stable_age": "1s", "keep_after_delivery": True,
           "dicomweb": {"port": port, "endpoints": ["partner-a"],
                        "auth": {"user": "orthanc", "password_env": "STOW_PASSWORD"}},
           "destinations": {"pacs": {"type": "dicom", "ae_title": storescp.aet,
                                     "host": "127.0.0.1", "port": storescp.port}},
           "routes": [{"when": {"Endpoint": "partner-a"}, "to": ["pacs"]}]}
    with Router(tmp_path / "router", cfg) as router:
        pacs.post("/dicom-web/servers/router/stow", {"Resources": sorted(ids)})
        wait_until(lambda: storescp.sop_uids() == {sop(f) for f in study}, timeout=90,
                   what="Orthanc's study delivered to storescp")
        for f in study:
            assert dataset_bytes(spooled(router, f)) == dataset_bytes(f)  # as Orthanc had it
            got = next(p for p in storescp.files() if tags_of(p, "SOPInstanceUID")[0] == sop(f))
            assert dcmread(got) == dcmread(f)  # every element (storescp re-deflates)
        assert calling_ae(router, study_of(study[0])) == "STOW-RS:partner-a"
        log = router.log(5000)
    assert "(endpoint partner-a): 4 stored, 0 failed" in log


def test_orthanc_pushes_queries_and_retrieves_through_one_server_entry(
        tmp_path: Path, orthanc, monkeypatch) -> None:
    """Issue 28's "Done when": ONE Orthanc with the router as ``DicomWeb.Servers.router`` (basic
    auth, the router's own listener bound off loopback) stores a mixed-syntax study there
    (``/stow``), finds it and a study the router got by C-STORE (``/qido``), and, after
    deleting its own copy, retrieves both (``/retrieve``): tags and decoded pixels equal the
    sources'. The same Orthanc with a wrong password gets nothing."""
    import urllib.error

    import numpy as np
    from peers import run_storescu

    monkeypatch.setenv("DW_PASSWORD", PASSWORD)
    pushed = syntax_variants(generate(tmp_path / "a", series=1, instances=4, rows=32, cols=32,
                                      patient_id="ORTH1", seed=293), tmp_path / "mixed")
    stored = generate(tmp_path / "b", series=2, instances=2, rows=24, cols=24,
                      patient_id="ORTH2", seed=294)
    port, dw_port = free_port(), free_port()
    root = f"http://127.0.0.1:{dw_port}/dicom-web/"
    viewer = orthanc(aet="VIEWER", dicomweb=True, extra_config={"DicomWeb": {
        "Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
        "Servers": {"router": {"Url": root, "Username": "orthanc", "Password": PASSWORD},
                    "wrong": {"Url": root, "Username": "orthanc", "Password": "nope"}}}})
    ids = {viewer.post("/instances", f.read_bytes())["ParentStudy"] for f in pushed}
    with Router(tmp_path / "router", {
            "port": port, "keep_after_delivery": True,
            "dicomweb": {"bind": "0.0.0.0", "port": dw_port,
                         "auth": {"user": "orthanc", "password_env": "DW_PASSWORD"}},
            "destinations": {"archive": {"type": "folder", "path": str(tmp_path / "out")}},
            "routes": [{"to": "archive"}]}) as router:
        assert run_storescu(stored, router.port).returncode == 0
        viewer.post("/dicom-web/servers/router/stow", {"Resources": sorted(ids)})
        for study_id in ids:
            viewer.delete(f"/studies/{study_id}")
        assert viewer.count() == 0
        found = viewer.post("/dicom-web/servers/router/qido",
                            {"Uri": "/studies", "Arguments": {"PatientID": "ORTH*"}})
        # (Orthanc's flavour of JSON drops the counts, which the router sends as numbers)
        assert sorted((f["00100020"]["Value"], f["0020000D"]["Value"], f["00100010"]["Value"],
                       f["00080020"]["Value"], f["00080061"]["Value"]) for f in found) == \
            sorted(tags_of(f, "PatientID", "StudyInstanceUID", "PatientName", "StudyDate",
                           "Modality") for f in (pushed[0], stored[0]))
        with pytest.raises(urllib.error.HTTPError):
            viewer.post("/dicom-web/servers/wrong/qido", {"Uri": "/studies"})
        for f in (pushed[0], stored[0]):
            viewer.post("/dicom-web/servers/router/retrieve",
                        {"Resources": [{"Study": study_of(f)}]})
        sources = {sop(f): f for f in pushed + stored}
        viewer.wait_for_instances(sources, timeout=90)
        for uid, path in sources.items():
            got, src = dcmread(io.BytesIO(viewer.instance_file(uid))), dcmread(path)
            assert np.array_equal(got.pixel_array, src.pixel_array), uid
            for kw in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                       "SOPClassUID", "Rows", "Columns", "StudyDate"):
                assert got.get(kw) == src.get(kw), (uid, kw)
        assert calling_ae(router, study_of(pushed[0])) == "STOW-RS"
        log = router.log(20_000)
    assert PASSWORD not in log and "Traceback" not in log


def test_a_large_request_is_streamed_within_the_memory_bound(tmp_path: Path) -> None:
    """A few hundred MB in one request (150 instances of 2 MB, sent as generated, never held
    whole by the client either): the router's peak RSS stays under P4's 200 MB bound and every
    instance is stored whole."""
    template = generate(tmp_path / "t", series=1, instances=1, rows=1024, cols=1024,
                        seed=290)[0].read_bytes()
    base = tags_of(next((tmp_path / "t").rglob("*.dcm")), "SOPInstanceUID")[0]
    count, boundary = 150, uuid.uuid4().hex.encode()

    def sop_uid(i: int) -> str:
        return f"{base[:-6]}{100000 + i:06d}"  # same length: the file's lengths stay right

    def body() -> Iterator[bytes]:
        for i in range(count):
            data = template.replace(base.encode(), sop_uid(i).encode())
            yield b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n"
            for j in range(0, len(data), 1 << 20):
                yield data[j:j + (1 << 20)]
            yield b"\r\n"
        yield b"--" + boundary + b"--"

    with stow_router(tmp_path, receive_log_size="64MiB") as router:
        rss_idle = router.rss_kb()
        url = router.dicomweb_url  # type: ignore[attr-defined]
        r = requests.post(f"{url}/studies", data=body(),
                          headers={"Content-Type": 'multipart/related; type="application/dicom"; '
                                   f"boundary={boundary.decode()}"}, timeout=600)
        assert r.status_code == 200, r.text
        assert referenced(r) == {sop_uid(i) for i in range(count)}
        peak = router.peak_rss_kb()
        study = tags_of(next((tmp_path / "t").rglob("*.dcm")), "StudyInstanceUID")[0]
        stored = list((router.spool / "data" / study).glob("*.dcm"))
        assert len(stored) == count
        assert all(p.stat().st_size == len(template) for p in stored)
        last = router.spool / "data" / study / f"{sop_uid(count - 1)}.dcm"
        assert dataset_bytes(last)[-4096:] == template[-4096:]
    total_mb = count * len(template) / 1e6
    assert total_mb > 250
    assert peak is not None and peak < 200 * 1024, \
        f"peak RSS {peak // 1024} MB (idle {rss_idle} kB) for a {total_mb:.0f} MB request"


def test_own_listener_over_https(tmp_path: Path, monkeypatch) -> None:
    """``dicomweb.tls``: the own listener speaks HTTPS only, with the configured certificate."""
    from dicomrouter_bench.tlscerts import make_certs

    monkeypatch.setenv("STOW_TOKEN", TOKEN)
    certs = make_certs(tmp_path / "certs")
    files = generate(tmp_path / "a", series=1, instances=2, rows=16, cols=16, seed=291)
    with stow_router(tmp_path, dicomweb={
            "tls": {"cert": str(certs.server.cert), "key": str(certs.server.key)},
            "auth": {"token_env": "STOW_TOKEN"}}) as router:
        https = router.dicomweb_url.replace("http://", "https://")  # type: ignore[attr-defined]
        wait_until(lambda: requests.get(https, verify=str(certs.ca), timeout=5) is not None,
                   timeout=30, what="the HTTPS listener", ignore=(requests.ConnectionError,))
        body, ctype = multipart([(f.read_bytes(), "application/dicom") for f in files])
        r = requests.post(f"{https}/studies", data=body, verify=str(certs.ca), timeout=60,
                          headers={"Content-Type": ctype, "Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and referenced(r) == {sop(f) for f in files}
        assert r.json()["00081199"]["Value"][0]["00081190"]["Value"][0].startswith("https://")
        with pytest.raises(requests.exceptions.SSLError):  # our CA, not the system's
            requests.post(f"{https}/studies", data=body, timeout=60,
                          headers={"Content-Type": ctype, "Authorization": f"Bearer {TOKEN}"})
        with pytest.raises(requests.ConnectionError):  # plain HTTP is not served there
            post(f"{router.dicomweb_url}/studies", files,  # type: ignore[attr-defined]
                 Authorization=f"Bearer {TOKEN}")
        for f in files:
            assert dataset_bytes(spooled(router, f)) == dataset_bytes(f)


def test_limits_refuse_what_is_too_large(tmp_path: Path) -> None:
    """``max_instance_size``: that part fails with 0xA700, the others are stored;
    ``max_request_size``: 413, declared up front or found while streaming (what was stored
    before is listed)."""
    small = generate(tmp_path / "s", series=1, instances=3, rows=16, cols=16, seed=292)
    big = generate(tmp_path / "b", series=1, instances=1, rows=256, cols=256, seed=293)[0]
    limit = 40_000
    assert max(f.stat().st_size for f in small) < limit < big.stat().st_size
    with stow_router(tmp_path, dicomweb={"max_instance_size": limit,
                                         "max_request_size": 200_000}) as router:
        url = f"{router.dicomweb_url}/studies"  # type: ignore[attr-defined]
        r = post(url, [small[0], big, small[1]])
        assert r.status_code == 202, r.text
        assert referenced(r) == {sop(small[0]), sop(small[1])}
        assert failed(r) == {sop(big): 0xA700}
        assert not spooled(router, big).exists()

        body, ctype = multipart([(f.read_bytes(), "application/dicom")
                                 for f in [small[2], *[big] * 4]])
        assert len(body) > 200_000
        r = requests.post(url, data=body, headers={"Content-Type": ctype}, timeout=60)
        assert r.status_code == 413 and not referenced(r)  # Content-Length: refused at once
        assert not spooled(router, small[2]).exists()

        def chunked() -> Iterator[bytes]:
            for i in range(0, len(body), 8192):
                yield body[i:i + 8192]

        r = requests.post(url, data=chunked(), headers={"Content-Type": ctype}, timeout=60)
        assert r.status_code == 413, r.text
        assert referenced(r) == {sop(small[2])}  # stored before the limit was reached
        assert dataset_bytes(spooled(router, small[2])) == dataset_bytes(small[2])
        wait_until(lambda: not router.partial_receptions(), timeout=10,
                   what="no refused reception left in a receive slot")
        log = router.log(5000)
    assert "more than dicomweb.max_instance_size" in log
    assert "larger than dicomweb.max_request_size" in log
    assert "Traceback" not in log


def test_more_dicomweb_routes_share_the_router_and_its_auth(tmp_path: Path) -> None:
    """QIDO-RS/WADO-RS plug into ``dicomweb_router`` as ``add(api, router_view, auth)``: their
    routes sit under /dicom-web on both servers, behind ``require_dicomweb_auth``."""
    from fastapi import APIRouter

    from dicomrouter.web.dicomweb import dicomweb_app, dicomweb_router, require_dicomweb_auth

    seen: list[Any] = []

    def add(api: APIRouter, view: Any, auth: Any) -> None:
        seen.append((view, auth))
        api.add_api_route("/studies/{study_uid}/metadata", lambda study_uid: {}, methods=["GET"])

    view = type("View", (), {"cfg": from_dict({"dicomweb": {"endpoints": ["partner-a"]}},
                                              tmp_path, "test"), "spool": None})()
    dicomweb_app(view, add)  # the own listener's server builds with it
    api = dicomweb_router(view, add)
    assert seen == [(view, require_dicomweb_auth)] * 4  # two servers: root and partner-a
    routes = {r.path: r for r in api.routes if hasattr(r, "dependant")}
    assert {"/dicom-web/studies", "/dicom-web/studies/{study_uid}",
            "/dicom-web/partner-a/studies", "/dicom-web/partner-a/studies/{study_uid}",
            "/dicom-web/studies/{study_uid}/metadata",
            "/dicom-web/partner-a/studies/{study_uid}/metadata"} <= set(routes)
    for route in routes.values():
        assert require_dicomweb_auth in [d.call for d in route.dependant.dependencies]
