"""A late arrival that makes a new route match: three CT instances are delivered, then an SR
arrives for the same study and a route ``when: {ModalitiesInStudy: SR}`` now sends the study
to a reporting system (a real Orthanc). Retained in the spool, the study goes there whole;
deleted after its first delivery, the job delivers the SR and stays *partial* with the missing
count, in status (text and --json), the REST API's job rows, /metrics and the history."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peers import Orthanc, run_storescu, wait_until
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from router_fixtures import Router, dicomrouter
from test_web import http, metric

from dicomrouter.sample import generate
from dicomrouter.state import State
from dicomrouter_bench.procs import free_port


class LateReport:
    """Three CT instances of one study, and an SR for the same study and patient."""

    def __init__(self, root: Path, seed: int) -> None:
        self.ct = generate(root / "ct", series=1, instances=3, rows=8, cols=8, seed=seed,
                           patient_id="LATE1")
        first = dcmread(self.ct[0])
        self.uid = str(first.StudyInstanceUID)
        src = get_testdata_file("test-SR.dcm")
        assert src is not None
        sr = dcmread(src)
        sr.StudyInstanceUID = self.uid
        sr.SeriesInstanceUID = generate_uid()
        sr.SOPInstanceUID = generate_uid()
        sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
        sr.PatientID, sr.PatientName = first.PatientID, first.PatientName
        self.sr = root / "sr" / "report.dcm"
        self.sr.parent.mkdir(parents=True)
        sr.save_as(self.sr)
        self.sops = {str(dcmread(f).SOPInstanceUID) for f in [*self.ct, self.sr]}


def _record(state: State, sop: str, modality: str) -> None:
    state.record_instance({"StudyInstanceUID": "1.7.1", "SeriesInstanceUID": f"1.7.1.{modality}",
                           "SOPInstanceUID": sop, "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
                           "PatientID": "P", "Modality": modality}, "1.2.840.10008.1.2.1",
                          f"data/1.7.1/{sop}.dcm", 100, "PACS", "DICOMROUTER")


def _run(state: State, destination: str) -> None:
    job = state.claim_job(destination)
    assert job is not None
    for inst in state.undelivered(job.study_uid, destination):
        state.mark_sending(inst.sop_uid, destination, job.study_uid)
        state.mark_delivered([inst.sop_uid], destination)
    state.finish_job(job, None, 3, 1.0)


def test_partial_jobs_in_the_state(state: State) -> None:
    for i in range(3):
        _record(state, f"1.7.1.{i}", "CT")
    seen = state.study("1.7.1")
    assert seen is not None and state.route_study("1.7.1", ["archive"], ["images"], seen)
    _run(state, "archive")
    assert state.settle_study("1.7.1")
    state.forget_spool("1.7.1", "delivered")
    _record(state, "1.7.1.9", "SR")  # generation 2
    seen = state.study("1.7.1")
    assert seen is not None and seen.generation == 2
    assert state.route_study("1.7.1", ["archive", "reports"], ["images", "reports"], seen)
    assert [(j["destination"], j["missing"]) for j in state.partial_jobs("1.7.1")] == \
        [("reports", 3)]
    assert [i.sop_uid for i in state.undelivered("1.7.1", "reports")] == ["1.7.1.9"]
    _run(state, "archive")
    _run(state, "reports")
    assert state.settle_study("1.7.1")
    rows = {j["destination"]: j for j in state.jobs(study_uids=["1.7.1"])}
    assert (rows["reports"]["delivered"], rows["reports"]["total"],
            rows["reports"]["missing"], rows["reports"]["partial"]) == (1, 4, 3, True)
    assert (rows["archive"]["missing"], rows["archive"]["partial"]) == (0, False)
    assert state.summary()["partial"] == {"reports": {"jobs": 1, "missing": 3}}
    events = [e for _, e in state.history("1.7.1")]
    assert events[-1] == "delivered to every destination, partially to reports (1 of 4 " \
        "instance(s): 3 deleted from the spool before the study was routed there)"
    assert sum("reports: 3 of 4 instance(s) were deleted" in e for e in events) == 1
    # the whole study sent again: the destination gets what it lacked, nothing is partial
    for i in range(3):
        _record(state, f"1.7.1.{i}", "CT")
    seen = state.study("1.7.1")
    assert seen is not None
    assert state.route_study("1.7.1", ["archive", "reports"], ["images", "reports"], seen)
    assert state.partial_jobs("1.7.1") == []


def _config(tmp_path: Path, reports: Orthanc, **extra: Any) -> dict[str, Any]:
    return {
        "destinations": {
            "archive": {"type": "folder", "path": str(tmp_path / "archive")},
            "reports": {"type": "dicom", "ae_title": reports.aet, "host": "127.0.0.1",
                        "port": reports.dicom_port}},
        "routes": [{"name": "images", "when": {"ModalitiesInStudy": "CT"}, "to": "archive"},
                   {"name": "reports", "when": {"ModalitiesInStudy": "SR"}, "to": "reports"}],
        **extra}


def _history(router: Router, uid: str) -> str:
    r = dicomrouter("status", "--study", uid, "--config", str(router.config_path))
    assert r.returncode == 0, r.stderr
    return r.stdout


def _jobs(router: Router, uid: str) -> dict[str, dict[str, Any]]:
    r = dicomrouter("status", "--study", uid, "--json", "--config", str(router.config_path))
    assert r.returncode == 0, r.stderr
    return {j["destination"]: j for j in json.loads(r.stdout)["jobs"]}


def _in_spool(router: Router, uid: str) -> bool:
    return any(s["study_uid"] == uid and s["in_spool"] for s in router.status()["studies"])


def test_a_retained_study_goes_whole_where_a_late_arrival_routes_it(tmp_path: Path,
                                                                      orthanc) -> None:
    m = LateReport(tmp_path, 601)
    reports: Orthanc = orthanc(aet="REPORTS")
    with Router(tmp_path / "r", _config(tmp_path, reports, retention="1h")) as router:
        assert run_storescu(m.ct, router.port).returncode == 0
        router.wait_state(m.uid, "delivered")
        assert reports.instance_sop_uids() == set()  # no SR yet: not routed there
        assert run_storescu([m.sr], router.port).returncode == 0
        reports.wait_for_instances(m.sops)
        router.wait_state(m.uid, "delivered")
        jobs = _jobs(router, m.uid)
        text = _history(router, m.uid)
        status = router.status()
    assert reports.instance_sop_uids() == m.sops  # the whole study, 4 of 4
    assert len(list((tmp_path / "archive").rglob("*.dcm"))) == 4  # the SR as a late arrival
    assert (jobs["reports"]["delivered"], jobs["reports"]["total"]) == (4, 4)
    assert not jobs["reports"]["partial"] and jobs["reports"]["missing"] == 0
    assert status["partial"] == {}
    assert "partial" not in text and "delivered to every destination" in text, text
    assert status["ledger"]["resent"] == 0


def test_a_deleted_study_is_reported_partial_where_a_late_arrival_routes_it(
        tmp_path: Path, orthanc) -> None:
    m = LateReport(tmp_path, 611)
    reports: Orthanc = orthanc(aet="REPORTS")
    web_port = free_port()
    cfg = _config(tmp_path, reports, web={"port": web_port})
    with Router(tmp_path / "r", cfg) as router:
        base = f"http://127.0.0.1:{web_port}"
        assert run_storescu(m.ct, router.port).returncode == 0
        router.wait_state(m.uid, "delivered")
        wait_until(lambda: not _in_spool(router, m.uid), timeout=30,
                   what="the CT instances deleted from the spool")
        assert run_storescu([m.sr], router.port).returncode == 0
        sr_sop = str(dcmread(m.sr).SOPInstanceUID)
        reports.wait_for_instances({sr_sop})
        router.wait_state(m.uid, "delivered")
        # status --json: the job row and the per-destination summary
        jobs = _jobs(router, m.uid)
        assert (jobs["reports"]["state"], jobs["reports"]["delivered"],
                jobs["reports"]["total"], jobs["reports"]["missing"]) == ("delivered", 1, 4, 3)
        assert jobs["reports"]["partial"] is True
        assert not jobs["archive"]["partial"] and jobs["archive"]["delivered"] == 4
        assert router.status()["partial"] == {"reports": {"jobs": 1, "missing": 3}}
        # status text
        text = dicomrouter("status", "--all", "--config", str(router.config_path)).stdout
        assert "reports: delivered 1 of 4, partial: 3 instance(s) missing" in text, text
        assert "(1 partial: 3 instance(s) missing)" in text, text
        history = _history(router, m.uid)
        # the web API's job rows
        _, study = http(f"{base}/api/studies/{m.uid}")
        rows = {j["destination"]: j for j in study["jobs"]}
        assert (rows["reports"]["missing"], rows["reports"]["partial"]) == (3, True)
        assert rows["archive"]["partial"] is False
        _, listed = http(f"{base}/api/jobs")
        assert [(j["destination"], j["missing"]) for j in listed["jobs"] if j["partial"]] == \
            [("reports", 3)]
        _, page = http(f"{base}/")
        assert "partial: 3 missing" in page
        # /metrics
        exposition = http(f"{base}/metrics")[1]
        assert metric(exposition, "dicomrouter_jobs_partial", destination="reports") == 1
        assert metric(exposition, "dicomrouter_instances_missing", destination="reports") == 3
        assert metric(exposition, "dicomrouter_jobs_partial", destination="archive") == 0
        log = router.log(100_000)
    assert reports.instance_sop_uids() == {sr_sop}  # what the spool still held, nothing else
    assert "reports: 3 of 4 instance(s) were deleted from the spool (after their delivery " \
        "elsewhere) before the study was routed there: it gets only the 1 still held" \
        in history, history
    assert "delivered to every destination, partially to reports (1 of 4 instance(s): 3 " \
        "deleted from the spool before the study was routed there)" in history, history
    assert "delivered to every destination, partially to reports (3 missing)" in log
