"""Storage commitment against a real Orthanc 1.10, in both roles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peers import Orthanc, run_storescu, wait_until
from router_fixtures import Router, tags_of

from dicomrouter.sample import generate
from dicomrouter_bench.procs import free_port


def committing_router(tmp_path: Path, pacs: Orthanc, port: int, **dest: Any) -> Router:
    return Router(tmp_path / "router", {
        "port": port,
        "destinations": {"pacs": {"type": "dicom", "ae_title": pacs.aet, "host": "127.0.0.1",
                                  "port": pacs.dicom_port, "storage_commitment": True, **dest}},
        "routes": [{"to": "pacs"}],
    })


def test_delivered_only_after_orthancs_commitment_report(tmp_path: Path, orthanc) -> None:
    port = free_port()
    pacs: Orthanc = orthanc(aet="PACS", modalities={"router": ["DICOMROUTER", "127.0.0.1",
                                                               port]})
    study = generate(tmp_path / "study", series=1, instances=4, rows=16, cols=16, seed=81)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    with committing_router(tmp_path, pacs, port) as router:
        assert run_storescu(study, router.port).returncode == 0
        router.wait_state(uid, "delivered", timeout=120)
        log = router.log(5000)
        assert router.status()["ledger"]["delivered"] == len(study)
    report = log.index("storage commitment report from PACS")
    assert "4 committed, 0 failed" in log[report:report + 300], log[report:report + 300]
    assert report < log.index(f"study {uid} → pacs: delivered 4 instance(s)")
    assert "Traceback" not in log


def test_no_report_within_the_timeout_fails_and_retries(tmp_path: Path, orthanc) -> None:
    port = free_port()
    # Orthanc knows the router, at a port nothing listens on: its report never arrives
    pacs: Orthanc = orthanc(aet="PACS", modalities={"router": ["DICOMROUTER", "127.0.0.1",
                                                               free_port()]})
    study = generate(tmp_path / "study", series=1, instances=2, rows=16, cols=16, seed=82)
    with committing_router(tmp_path, pacs, port, commitment_timeout="2s",
                           retry={"initial": "1s", "max_delay": "1s"}) as router:
        assert run_storescu(study, router.port).returncode == 0
        job = wait_until(lambda: next((j for j in router.status()["retrying"]
                                       if j["attempts"] >= 2), None),
                         timeout=120, what="two failed attempts")
        assert "no storage commitment report from PACS@" in job["last_error"], job
        assert router.status()["ledger"]["delivered"] == 0  # stored there, not committed
        assert pacs.count() == len(study)


def test_router_answers_orthancs_storage_commitment_request(tmp_path: Path, orthanc) -> None:
    port = free_port()
    pacs: Orthanc = orthanc(aet="PACS", modalities={"router": ["DICOMROUTER", "127.0.0.1",
                                                               port]})
    study = generate(tmp_path / "study", series=1, instances=3, rows=16, cols=16, seed=83)
    with Router(tmp_path / "router", {
        "port": port, "destinations": {}, "routes": [],  # kept in the spool, unrouted
        "known_aes": {"PACS": {"host": "127.0.0.1", "port": pacs.dicom_port}},
    }) as router:
        assert run_storescu(study, router.port).returncode == 0
        router.wait_state(tags_of(study[0], "StudyInstanceUID")[0], "unrouted")
        refs = [{"SOPClassUID": c, "SOPInstanceUID": u}
                for c, u in (tags_of(f, "SOPClassUID", "SOPInstanceUID") for f in study)]
        missing = {"SOPClassUID": refs[0]["SOPClassUID"], "SOPInstanceUID": "1.2.3.4.5.6.7"}
        job = pacs.post("/modalities/router/storage-commitment",
                        {"DicomInstances": [*refs, missing], "Timeout": 30})
        result = wait_until(lambda: (r := pacs.get(job["Path"]))["Status"] != "Pending" and r,
                            timeout=60, what="Orthanc's commitment result")
        # the router logs the report once Orthanc answered it (Orthanc may be quicker to show)
        wait_until(lambda: "storage commitment report sent to PACS" in router.log(3000),
                   timeout=30, what="the report's log line")
        log = router.log(3000)
    assert {s["SOPInstanceUID"] for s in result["Success"]} == \
        {r["SOPInstanceUID"] for r in refs}, result
    assert [f["SOPInstanceUID"] for f in result["Failures"]] == ["1.2.3.4.5.6.7"], result
    assert result["Failures"][0]["FailureReason"] == 0x0112, result
    assert "storage commitment report sent to PACS" in log
