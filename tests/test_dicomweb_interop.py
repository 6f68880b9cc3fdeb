"""STOW-RS into a real Orthanc with its DICOMweb plugin and HTTP basic auth switched on."""

from __future__ import annotations

from pathlib import Path

from peers import Orthanc, run_storescu
from pydicom import dcmread
from router_fixtures import Router, dataset_bytes, tags_of

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
