"""The ``move`` destination: a real Orthanc holding a study is asked to C-MOVE it to a DCMTK
storescp; a move to an AE title Orthanc does not know fails the job with the reason."""

from __future__ import annotations

from pathlib import Path

from peers import Orthanc, StoreSCP, run_storescu, sop_uids, wait_until
from router_fixtures import Router, dataset_bytes, tags_of

from dicomrouter.sample import generate


def test_move_destination_has_orthanc_send_the_study_to_storescp(
        tmp_path: Path, orthanc, storescp: StoreSCP) -> None:
    pacs: Orthanc = orthanc(aet="PACS", modalities={
        "archive": ["STORESCP", "127.0.0.1", storescp.port],
        "router": ["DICOMROUTER", "127.0.0.1", 104]})  # Orthanc takes C-MOVEs from known AEs
    study = generate(tmp_path / "study", series=2, instances=3, rows=16, cols=16, seed=61)
    for f in study:
        pacs.post("/instances", f.read_bytes())
    source = {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    with Router(tmp_path / "router", {
        "destinations": {
            "archive": {"type": "move", "source": source, "move_destination": "STORESCP"},
            "nowhere": {"type": "move", "source": source, "move_destination": "NOSUCHAE",
                        "retry": {"max_attempts": 1}},
            "stranger": {"type": "move", "source": source, "move_destination": "STORESCP",
                         "calling_ae_title": "STRANGER", "retry": {"max_attempts": 1}},
        },
        "routes": [{"to": ["archive", "nowhere", "stranger"]}],
    }) as router:
        assert run_storescu(study, router.port).returncode == 0  # the PACS's notification copy
        wait_until(lambda: storescp.sop_uids() >= sop_uids(study), timeout=90,
                   what="the study moved by Orthanc into storescp")
        wait_until(lambda: len(router.status()["dead"]) == 2, timeout=90, what="2 dead jobs")
        status = router.status()
        assert status["queues"]["archive"] == {"delivered": 1}, status
        dead = {d["destination"]: d["last_error"] for d in status["dead"]}
        assert "C-MOVE by PACS@" in dead["nowhere"] and "NOSUCHAE" in dead["nowhere"]
        assert "status 0x" in dead["nowhere"], dead
        assert "PACS@" in dead["stranger"] and "aborted the association" in dead["stranger"], dead
        assert "STRANGER" in dead["stranger"]
        assert router.status()["ledger"]["delivered"] == len(study)
        log = router.log(5000)
    assert "Traceback" not in log
    by_uid = {tags_of(p, "SOPInstanceUID")[0]: p for p in storescp.files()}
    for f in study:  # the bytes came from Orthanc, as stored there
        assert dataset_bytes(by_uid[tags_of(f, "SOPInstanceUID")[0]]) == dataset_bytes(f)
    assert uid


def test_move_destination_with_the_source_down_retries(tmp_path: Path) -> None:
    study = generate(tmp_path / "study", series=1, instances=2, rows=8, cols=8, seed=62)
    from dicomrouter_bench.procs import free_port

    source = {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}
    with Router(tmp_path / "router", {
        "destinations": {"archive": {"type": "move", "source": source,
                                     "move_destination": "STORESCP"}},
        "routes": [{"to": "archive"}],
    }) as router:
        assert run_storescu(study, router.port).returncode == 0
        wait_until(lambda: router.status()["retrying"], timeout=90, what="a failed attempt")
        error = router.status()["retrying"][0]["last_error"]
        assert "cannot associate with PACS@" in error and "no connection" in error, error
