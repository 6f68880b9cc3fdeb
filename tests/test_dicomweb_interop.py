"""STOW-RS into a real Orthanc with its DICOMweb plugin and HTTP basic auth switched on, and
into the tests' own STOW-RS server for what Orthanc cannot be made to do on demand (hold
requests until several are in flight, answer 503 to one of them)."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

from peers import Orthanc, run_storescu
from pydicom import dcmread
from router_fixtures import Router, dataset_bytes, dicomrouter, tags_of
from stow_server import StowServer

from dicomrouter.sample import generate

USERS = {"router": "s3cret-Pa55"}
REFUSE_LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.PatientID == 'REFUSEME' then error('this patient is refused here') end
  return true
end
"""


def stow_router(tmp_path: Path, pacs: Orthanc, **options: object) -> Router:
    return Router(tmp_path / "router", {
        "destinations": {"cloud": {"type": "dicomweb", "url": f"{pacs.url}/dicom-web",
                                   "username": "router", "password_env": "STOW_PASSWORD",
                                   **options}},
        "routes": [{"to": "cloud"}],
    })


def test_stow_rs_delivers_every_instance_in_bounded_batches(tmp_path: Path, orthanc,
                                                            monkeypatch) -> None:
    monkeypatch.setenv("STOW_PASSWORD", USERS["router"])
    pacs: Orthanc = orthanc(aet="CLOUD", dicomweb=True, users=USERS)
    study = generate(tmp_path / "study", series=2, instances=5, rows=64, cols=64, seed=51)
    size = max(f.stat().st_size for f in study)
    with stow_router(tmp_path, pacs, batch_bytes=3 * size + 100) as router:
        assert run_storescu(study, router.port).returncode == 0
        router.wait_state(tags_of(study[0], "StudyInstanceUID")[0], "delivered", timeout=120)
        expected = {tags_of(f, "SOPInstanceUID")[0] for f in study}
        assert pacs.instance_sop_uids() == expected
        for f in study[:2]:
            got = tmp_path / "got.dcm"
            got.write_bytes(pacs.instance_file(tags_of(f, "SOPInstanceUID")[0]))
            assert dataset_bytes(got) == dataset_bytes(f)
        posts = pacs.log(100000).count("POST /dicom-web/studies")
        assert posts >= 4, f"10 instances of ~{size} B in batches of 3 took {posts} request(s)"
        assert router.status()["ledger"]["resent"] == 0
        log = router.log(5000)
    assert USERS["router"] not in log  # the secret is never logged


def test_wrong_password_fails_the_job_with_401(tmp_path: Path, orthanc, monkeypatch) -> None:
    monkeypatch.setenv("STOW_PASSWORD", "wrong")
    pacs: Orthanc = orthanc(aet="CLOUD", dicomweb=True, users=USERS)
    study = generate(tmp_path / "study", series=1, instances=2, rows=16, cols=16, seed=52)
    with stow_router(tmp_path, pacs, retry={"max_attempts": 1}) as router:
        assert run_storescu(study, router.port).returncode == 0
        router.wait_state(tags_of(study[0], "StudyInstanceUID")[0], "failed", timeout=120)
        dead = router.status()["dead"]
        assert "HTTP 401" in dead[0]["last_error"], dead
        assert pacs.instance_sop_uids() == set()


def test_a_refused_instance_fails_alone_and_the_retry_sends_only_it(
        tmp_path: Path, orthanc, monkeypatch) -> None:
    monkeypatch.setenv("STOW_PASSWORD", USERS["router"])
    lua = tmp_path / "refuse.lua"
    lua.write_text(REFUSE_LUA)
    pacs: Orthanc = orthanc(aet="CLOUD", dicomweb=True, users=USERS, lua_scripts=[lua])
    study = generate(tmp_path / "study", series=1, instances=4, rows=16, cols=16, seed=53)
    bad = dcmread(study[0])
    bad.PatientID = "REFUSEME"
    bad.save_as(study[0], enforce_file_format=True)
    uid = tags_of(study[1], "StudyInstanceUID")[0]
    # Orthanc 1.10's plugin answers a request in which its Lua filter raised with no referenced
    # instance at all: one instance a request isolates the refused one
    with stow_router(tmp_path, pacs, batch_size=1,
                     retry={"initial": "1s", "max_attempts": 2}) as router:
        assert run_storescu(study, router.port).returncode == 0
        router.wait_state(uid, "failed", timeout=120)
        dead = router.status()["dead"][0]["last_error"]
        assert "1 of 1 instance(s) refused" in dead and "STOW-RS" in dead, dead
        good = {tags_of(f, "SOPInstanceUID")[0] for f in study[1:]}
        assert pacs.instance_sop_uids() == good
        ledger = router.status()["ledger"]
        # attempt 1 sent 4, the retry only the refused one: 5 sends, 3 delivered
        assert ledger["sends"] == 5 and ledger["delivered"] == 3, ledger


def test_stow_response_is_read_instance_by_instance() -> None:
    """A PS3.18 response with referenced and failed instances (as a PACS sends it)."""
    import json

    import requests

    from dicomrouter.destinations.dicomweb import _parse

    rsp = requests.Response()
    rsp.status_code = 202
    rsp._content = json.dumps({
        "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3"]}}]},
        "00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.4"]},
                                            "00081197": {"vr": "US", "Value": [0xA900]}}]},
    }).encode()
    delivered, failed = _parse(rsp)
    assert delivered == {"1.2.3"}
    assert failed == {"1.2.4": "HTTP 202: STOW-RS failure reason 0xA900 (data set does not "
                                "match SOP class)"}


def test_parallel_requests_into_orthanc_deliver_each_instance_once(
        tmp_path: Path, orthanc, monkeypatch) -> None:
    """``parallel_requests: 4``: the study goes in 4 parts of 10, each its own session of two
    batches; Orthanc ends up with every instance, as sent, each sent once (verified by QIDO)."""
    monkeypatch.setenv("STOW_PASSWORD", USERS["router"])
    pacs: Orthanc = orthanc(aet="CLOUD", dicomweb=True, users=USERS)
    study = generate(tmp_path / "study", series=2, instances=20, rows=32, cols=32, seed=54)
    with stow_router(tmp_path, pacs, parallel_requests=4, batch_size=5,
                     verify="qido") as router:
        assert run_storescu(study, router.port).returncode == 0
        router.wait_state(tags_of(study[0], "StudyInstanceUID")[0], "delivered", timeout=180)
        uids = {tags_of(f, "SOPInstanceUID")[0]: f for f in study}
        assert pacs.instance_sop_uids() == set(uids)
        for uid, f in uids.items():
            got = tmp_path / "got.dcm"
            got.write_bytes(pacs.instance_file(uid))
            assert dataset_bytes(got) == dataset_bytes(f), uid
        assert pacs.log(100000).count("POST /dicom-web/studies") == 8  # 4 parts × 2 batches
        ledger = router.status()["ledger"]
        assert (ledger["sends"], ledger["delivered"], ledger["resent"]) == (40, 40, 0), ledger
        assert "4 requests in flight per study" in router.log(5000)


FAST_RETRY = {"initial": "1s", "max_delay": "2s", "max_attempts": 6}


def _own_server_router(tmp_path: Path, server: StowServer, **options: Any) -> Router:
    return Router(tmp_path / "router", {
        "destinations": {"cloud": {"type": "dicomweb", "url": server.url, "batch_size": 8,
                                   "parallel_requests": 4, "retry": FAST_RETRY, **options}},
        "routes": [{"to": "cloud"}],
    })


def _send_study(tmp_path: Path, router: Router, seed: int) -> tuple[dict[str, Path], str]:
    """32 instances (4 parts of 8: one request each) sent to the router; (SOP UID → file,
    Study Instance UID)."""
    files = generate(tmp_path / "study", series=2, instances=16, rows=8, cols=8, seed=seed)
    r = dicomrouter("send", str(tmp_path / "study"), "--port", str(router.port))
    assert r.returncode == 0, r.stderr
    return {tags_of(f, "SOPInstanceUID")[0]: f for f in files}, \
        tags_of(files[0], "StudyInstanceUID")[0]


def test_parallel_requests_are_in_flight_at_once(tmp_path: Path) -> None:
    """The server holds each request until 4 are in flight (it would give up after a minute
    and see only one): 4 requests overlap, never more, and each part arrives once, as sent."""
    with StowServer(gate=4) as server, \
            _own_server_router(tmp_path, server, verify="qido") as router:
        files, study_uid = _send_study(tmp_path, router, seed=55)
        router.wait_state(study_uid, "delivered", timeout=180)
        assert server.max_in_flight == 4 and server.posts == 4
        assert sorted(server.received) == sorted(files), "each instance sent exactly once"
        for uid, f in files.items():
            sent = tmp_path / "sent.dcm"
            sent.write_bytes(server.parts[uid])
            assert dataset_bytes(sent) == dataset_bytes(f), uid
        ledger = router.status()["ledger"]
        assert (ledger["sends"], ledger["delivered"], ledger["resent"]) == (32, 32, 0), ledger


def test_one_failed_parallel_request_keeps_the_others_delivered(tmp_path: Path) -> None:
    """Of 4 requests in flight, the second answers 503: the job fails with the 24 the others
    confirmed recorded, and its retry sends only that request's 8 instances."""
    with StowServer(lambda n: "503" if n == 2 else "ok", gate=4) as server, \
            _own_server_router(tmp_path, server) as router:
        files, study_uid = _send_study(tmp_path, router, seed=56)
        router.wait_state(study_uid, "delivered", timeout=180)
        assert server.max_in_flight == 4
        assert set(server.stored) == set(files)
        times = collections.Counter(server.received)
        assert sorted(times.values()) == [1] * 24 + [2] * 8, "only the refused batch twice"
        assert server.posts == 5, "4 at once, then the retry's one request"
        ledger = router.status()["ledger"]
        assert (ledger["sends"], ledger["delivered"], ledger["resent"]) == (40, 32, 8), ledger
        assert "failed after 24 delivered" in router.log(5000)
