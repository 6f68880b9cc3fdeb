"""``forward: immediate`` (issue 25, P2): instances go to the destination while the study is
still arriving, and the stable-age completion, late arrivals and retries send nothing twice.

Real peers: DCMTK ``storescu`` sends, DCMTK ``storescp`` (verbose, so every C-STORE it took is
in its log, a duplicate included) receives; the bytes that arrived are compared with the
sources, and the router's ledger counts what went on the wire.
"""

from __future__ import annotations

import json
from pathlib import Path

from peers import StoreSCP, free_port, run_storescu, sop_uids, wait_until
from pydicom import dcmread
from router_fixtures import Router, dataset_bytes, dicomrouter

from dicomrouter.sample import generate


def _route(port: int, **extra: object) -> dict[str, object]:
    return {"destinations": {"pacs": {"type": "dicom", "ae_title": "STORESCP",
                                      "host": "127.0.0.1", "port": port,
                                      "retry": {"initial": "1s", "max_delay": "1s"}}},
            "routes": [{"name": "ct now", "when": {"Modality": "CT"}, "to": "pacs",
                        "forward": "immediate"}], **extra}


def _stores(scp: StoreSCP) -> int:
    """C-STORE requests storescp received (a re-sent instance counts twice)."""
    return scp.log(100_000).count("Received Store Request")


def _same_bytes(sources: list[Path], scp: StoreSCP) -> None:
    arrived = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f
               for f in scp.files()}
    for src in sources:
        uid = str(dcmread(src, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(arrived[uid]) == dataset_bytes(src), f"{src.name} changed"


def test_instances_go_while_the_study_is_still_receiving(tmp_path: Path) -> None:
    """With a stable age of an hour the study never completes during the test: everything
    that arrives at the PACS got there by forwarding, association after association."""
    files = generate(tmp_path / "study", series=2, instances=10, seed=11)
    study = str(dcmread(files[0]).StudyInstanceUID)
    with StoreSCP(tmp_path / "scp") as scp, \
            Router(tmp_path / "router", {**_route(scp.port), "stable_age": "1h"}) as router:
        for part in (files[:7], files[7:14], files[14:]):
            r = run_storescu(part, router.port, aet=router.aet)
            assert r.returncode == 0, r.stdout + r.stderr
            wait_until(lambda part=part: sop_uids(scp.files()) >= sop_uids(part), timeout=60,
                       what="this association's instances forwarded")
            assert router.study_state(study) == "receiving"
        assert sop_uids(scp.files()) == sop_uids(files)
        _same_bytes(files, scp)
        ledger = router.status()["ledger"]
        assert (ledger["sends"], ledger["delivered"], ledger["resent"]) == (20, 20, 0), ledger
        assert _stores(scp) == 20
        log = router.log(5000)
        assert "matched while receiving" in log and "Traceback" not in log


def test_completion_and_a_late_arrival_send_nothing_twice(tmp_path: Path) -> None:
    files = generate(tmp_path / "study", series=1, instances=14, seed=12)
    study = str(dcmread(files[0]).StudyInstanceUID)
    first, late = files[:12], files[12:]
    with StoreSCP(tmp_path / "scp") as scp, \
            Router(tmp_path / "router", {**_route(scp.port), "stable_age": "3s",
                                         "retention": "1h"}) as router:
        assert run_storescu(first, router.port, aet=router.aet).returncode == 0
        router.wait_state(study, "delivered")
        assert _stores(scp) == 12
        log = router.log(5000)
        assert log.index("matched while receiving") < log.index(f"study {study} complete")
        # a late arrival: a new generation, forwarded the same way; nothing sent again
        assert run_storescu(late, router.port, aet=router.aet).returncode == 0
        wait_until(lambda: sop_uids(scp.files()) == sop_uids(files), timeout=60,
                   what="the late instances forwarded")
        router.wait_state(study, "delivered")
        assert _stores(scp) == 14
        _same_bytes(files, scp)
        ledger = router.status()["ledger"]
        assert (ledger["sends"], ledger["delivered"], ledger["resent"]) == (14, 14, 0), ledger
        r = dicomrouter("status", "--study", study, "--json", "--config", str(router.config_path))
        history = [text for _ts, text in json.loads(r.stdout)["history"]]
        assert any("(forward: immediate) sends the study to pacs" in e for e in history)


def test_a_later_instance_that_matches_sends_the_earlier_ones_too(tmp_path: Path) -> None:
    """Conditions hold for the study so far: an SR first (no match), then a CT: both go."""
    files = generate(tmp_path / "study", series=1, instances=4, seed=13)
    sr = tmp_path / "sr.dcm"
    ds = dcmread(files[0])
    ds.Modality = "SR"
    ds.save_as(sr, enforce_file_format=True)
    study = str(ds.StudyInstanceUID)
    with StoreSCP(tmp_path / "scp") as scp, \
            Router(tmp_path / "router", {**_route(scp.port), "stable_age": "1h"}) as router:
        assert run_storescu([sr], router.port, aet=router.aet).returncode == 0
        wait_until(lambda: router.study_state(study) == "receiving", timeout=60,
                   what="the SR received")
        assert run_storescu(files[1:], router.port, aet=router.aet).returncode == 0
        wait_until(lambda: len(sop_uids(scp.files())) == 4, timeout=60,
                   what="the SR and the CTs forwarded")
        assert sop_uids(scp.files()) == sop_uids([sr, *files[1:]])
        assert router.study_state(study) == "receiving"


def test_a_destination_down_gets_everything_once_it_is_back(tmp_path: Path) -> None:
    """The PACS is down while the study arrives: the job fails and is retried as any job;
    once the PACS is up, every instance arrives once, the study still receiving."""
    files = generate(tmp_path / "study", series=1, instances=6, seed=14)
    study = str(dcmread(files[0]).StudyInstanceUID)
    port = free_port()
    with Router(tmp_path / "router", {**_route(port), "stable_age": "1h"}) as router:
        assert run_storescu(files, router.port, aet=router.aet).returncode == 0
        wait_until(lambda: "attempt 1/" in router.log(2000) and "failed" in router.log(2000),
                   timeout=60, what="a failed attempt while the PACS is down")
        with StoreSCP(tmp_path / "scp", port=port) as scp:
            wait_until(lambda: sop_uids(scp.files()) == sop_uids(files), timeout=90,
                       what="the retry delivering the study")
            assert _stores(scp) == 6
            _same_bytes(files, scp)
            assert router.study_state(study) == "receiving"


def test_one_association_stays_open_while_the_study_arrives(tmp_path: Path) -> None:
    """Three sending associations, one forwarding association: it waits for the next arrival
    (``forward_keep_open``) instead of being released after each run."""
    files = generate(tmp_path / "study", series=1, instances=9, seed=15)
    with StoreSCP(tmp_path / "scp") as scp, \
            Router(tmp_path / "router", {**_route(scp.port), "stable_age": "1h",
                                         "forward_keep_open": "60s"}) as router:
        for part in (files[:3], files[3:6], files[6:]):
            assert run_storescu(part, router.port, aet=router.aet).returncode == 0
            wait_until(lambda part=part: sop_uids(scp.files()) >= sop_uids(part), timeout=60,
                       what="this association's instances forwarded")
        assert _stores(scp) == 9
        log = scp.log(100_000)  # (the harness's readiness check is one C-ECHO association)
        assert log.count("Association Received") - log.count("Received Echo Request") == 1, log
        _same_bytes(files, scp)


def test_an_open_forwarding_association_does_not_hold_up_another_study(tmp_path: Path) -> None:
    """The worker keeping an association open for study A lets it go as soon as study B has
    a job due for the same destination (one worker: ``concurrency: 1``)."""
    a = generate(tmp_path / "a", series=1, instances=2, seed=16)
    b = generate(tmp_path / "b", series=1, instances=2, seed=17)
    with StoreSCP(tmp_path / "scp") as scp, \
            Router(tmp_path / "router", {**_route(scp.port), "stable_age": "1h",
                                         "forward_keep_open": "10m"}) as router:
        assert run_storescu(a, router.port, aet=router.aet).returncode == 0
        wait_until(lambda: sop_uids(scp.files()) == sop_uids(a), timeout=60,
                   what="study A forwarded")
        assert run_storescu(b, router.port, aet=router.aet).returncode == 0
        wait_until(lambda: sop_uids(scp.files()) == sop_uids(a + b), timeout=60,
                   what="study B forwarded while A's association was open")
