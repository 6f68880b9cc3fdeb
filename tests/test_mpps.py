"""MPPS (issue 27 item 4) end to end: pynetdicom as the modality (MPPS SCU and storage SCU),
DCMTK storescp as the destination, a pynetdicom SCP recording what the router forwards (MPPS)
and notifies (IAN). The router runs as ``dicomrouter serve``."""

from __future__ import annotations

import json
import struct
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from mpps_peers import MPPS, Modality, RecordingSCP, create_attributes, final_attributes
from peers import StoreSCP, wait_until
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from router_fixtures import Router, dicomrouter, tags_of
from webhook_server import WebhookServer

from dicomrouter.sample import generate
from dicomrouter_bench.procs import free_port

pytestmark = pytest.mark.usefixtures("dcmtk_available")

LONG = "1h"  # a stable age no test waits for


def _study(tmp_path: Path, seed: int, instances: int = 4,
           series: int = 2) -> tuple[list[Path], str]:
    files = generate(tmp_path / f"study{seed}", series=series, instances=instances // series,
                     rows=16, cols=16, seed=seed)
    return files, tags_of(files[0], "StudyInstanceUID")[0]


def _router(tmp_path: Path, scp: StoreSCP, **extra: Any) -> Router:
    return Router(tmp_path / "router", {
        "destinations": {"pacs": {"type": "dicom", "ae_title": scp.aet, "host": "127.0.0.1",
                                  "port": scp.port}},
        "routes": [{"name": "all", "to": "pacs"}], **extra})


def _study_status(router: Router, uid: str) -> str:
    r = dicomrouter("status", "--study", uid, "--config", str(router.config_path))
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("order", ["mpps_first", "images_first"])
def test_completed_mpps_completes_the_study_without_the_stable_age(
        tmp_path: Path, storescp: StoreSCP, order: str) -> None:
    files, uid = _study(tmp_path, 2701)
    mpps_uid = generate_uid()
    with _router(tmp_path, storescp, stable_age=LONG) as router:
        modality = Modality(router.port)
        if order == "images_first":
            modality.store(files)
        assert modality.create(create_attributes(uid), mpps_uid) == 0x0000
        assert modality.set(final_attributes(files), mpps_uid) == 0x0000
        if order == "mpps_first":
            modality.store(files[:-1])
            # all but one in: the study waits (its stable age is an hour)
            wait_until(lambda: "3/4 instances" in _study_status(router, uid), timeout=30,
                       what="the MPPS to be seen with 3 of 4 instances")
            assert router.study_state(uid) == "receiving"
            assert storescp.sop_uids() == set()
            last = time.monotonic()
            modality.store(files[-1:])
        else:
            last = time.monotonic()
        router.wait_state(uid, "delivered", timeout=60)
        took = time.monotonic() - last
        text = _study_status(router, uid)
        explained = dicomrouter("explain", "--study", uid, "--config", str(router.config_path))
        log = router.log(3000)
    assert took < 30, took  # seconds, not the hour of the stable age
    assert storescp.sop_uids() == {tags_of(f, "SOPInstanceUID")[0] for f in files}
    assert f"MPPS {mpps_uid} COMPLETED: 4/4 instances" in text, text
    assert "completed without waiting for the stable age" in text, text
    assert f"MPPS {mpps_uid} COMPLETED: 4/4 instances" in explained.stdout, explained
    assert "Traceback" not in log


@pytest.mark.parametrize("receivers", [1, 2])
def test_ps34_statuses_and_no_traceback(tmp_path: Path, storescp: StoreSCP,
                                        receivers: int) -> None:
    """Also with two receiver processes: each association may land on either, the steps are
    in the one state."""
    _files, uid = _study(tmp_path, 2702)
    with _router(tmp_path, storescp, stable_age=LONG, receivers=receivers) as router:
        m = Modality(router.port)
        done = create_attributes(uid, status="COMPLETED")
        assert m.create(done, generate_uid()) == 0x0106  # an N-CREATE must be IN PROGRESS
        no_status = create_attributes(uid)
        del no_status.PerformedProcedureStepStatus
        assert m.create(no_status, generate_uid()) == 0x0120
        step = generate_uid()
        assert m.create(create_attributes(uid), step) == 0x0000
        assert m.create(create_attributes(uid), step) == 0x0111  # duplicate
        assert m.set(final_attributes([]), generate_uid()) == 0x0112  # no such instance
        patient = Dataset()
        patient.PatientID = "OTHER"  # not allowed in an N-SET (PS3.4 table F.7.2-1)
        status = m._n("set", patient, step)[1]
        assert int(status.Status) == 0x0105
        assert int(status.AttributeIdentifierList) == 0x00100020  # PatientID
        bad = Dataset()
        bad.PerformedProcedureStepStatus = "DONE"
        assert m.set(bad, step) == 0x0106
        # an N-SET that keeps it IN PROGRESS is fine; COMPLETED ends it
        assert m.set(final_attributes([], status="IN PROGRESS"), step) == 0x0000
        assert m.set(final_attributes([]), step) == 0x0000
        status = m._n("set", final_attributes([]), step)[1]
        assert int(status.Status) == 0x0110  # may no longer be updated
        assert int(status.ErrorID) == 0xA710
        # no Affected SOP Instance UID: the router assigns one and returns it
        seen: list[str] = []
        assoc = m.associate_mpps()
        assoc.bind(evt.EVT_DIMSE_RECV, lambda event: seen.append(
            str(event.message.command_set.get("AffectedSOPInstanceUID", ""))))
        rsp, _attrs = assoc.send_n_create(create_attributes(uid), "1.2.840.10008.3.1.2.3.3",
                                          None)
        assoc.release()
        assert int(rsp.Status) == 0x0000 and seen and seen[-1], seen
        log = router.log(3000)
    assert f"MPPS N-CREATE {seen[-1]} from MODALITY" in log
    assert "refused with 0x0106" in log and "refused with 0x0110" in log
    assert "Traceback" not in log


@pytest.mark.parametrize("receiver", ["fast", "pynetdicom"])
def test_mpps_false_is_not_negotiated(tmp_path: Path, storescp: StoreSCP,
                                      receiver: str) -> None:
    with _router(tmp_path, storescp, mpps=False, receiver=receiver) as router:
        assoc = Modality(router.port).associate_mpps()
        try:
            accepted = [cx for cx in assoc.accepted_contexts
                        if cx.abstract_syntax == "1.2.840.10008.3.1.2.3.3"] \
                if assoc.is_established else []
        finally:
            if assoc.is_established:
                assoc.release()
    assert accepted == []


def _metrics(router: Router) -> str:
    port = router.config["web"]["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        return str(r.read().decode())


def _get(router: Router, path: str) -> Any:
    port = router.config["web"]["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
        return json.loads(r.read())


def _page(router: Router) -> str:
    port = router.config["web"]["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as r:
        return str(r.read().decode())


def test_missing_instance_flags_incomplete_and_the_stable_age_routes_it(
        tmp_path: Path, storescp: StoreSCP) -> None:
    files, uid = _study(tmp_path, 2703)
    step = generate_uid()
    stable = 12.0
    with WebhookServer() as hook, _router(
            tmp_path, storescp, stable_age=f"{stable:g}s", mpps_timeout="2s",
            web={"enabled": True, "port": free_port()},
            notifications=[{"name": "ops", "url": hook.url, "events": ["incomplete"]}]
    ) as router:
        m = Modality(router.port)
        assert m.create(create_attributes(uid), step) == 0x0000
        m.store(files[:-1])  # one listed instance never comes
        last = time.monotonic()
        assert m.set(final_attributes(files), step) == 0x0000
        event = wait_until(lambda: next(iter(hook.events("incomplete")), None), timeout=60,
                           what="the incomplete notification")
        flagged = time.monotonic() - last
        assert router.study_state(uid) == "receiving"  # flagged, not routed: stable age
        rows = router.status()["studies"]
        assert "3/4 instances" in next(r["incomplete"] for r in rows if r["study_uid"] == uid)
        assert "incomplete" in _page(router)
        api = _get(router, f"/api/studies/{uid}")
        assert api["mpps"][0]["summary"] == f"MPPS {step} COMPLETED: 3/4 instances (flagged " \
            "incomplete)", api["mpps"]
        assert api["summary"][0]["incomplete"].startswith(f"MPPS {step} COMPLETED: 3/4"), api
        assert "dicomrouter_studies_incomplete_total 1.0" in _metrics(router)
        router.wait_state(uid, "delivered", timeout=90)
        routed = time.monotonic() - last
        text = _study_status(router, uid)
        assert storescp.sop_uids() == {tags_of(f, "SOPInstanceUID")[0] for f in files[:-1]}
        # the missing instance comes after all: the flag goes, no stable age to wait for
        late = time.monotonic()
        m.store(files[-1:])
        wait_until(lambda: len(storescp.sop_uids()) == 4, timeout=60, what="the late one")
        late = time.monotonic() - late
        router.wait_state(uid, "delivered", timeout=30)
        later = _study_status(router, uid)
        log = router.log(3000)
    assert flagged < stable, flagged  # the timeout, before the stable age
    assert routed >= stable - 1, routed  # the route fired at the stable age, not before
    assert late < stable - 1, late
    assert event["study_instance_uid"] == uid and event["mpps"] == step, event
    assert event["listed"] == 4 and event["arrived"] == 3 and event["missing"] == 1, event
    assert "INCOMPLETE" in text and tags_of(files[-1], "SOPInstanceUID")[0] in text, text
    assert f"MPPS {step} COMPLETED: 3/4 instances (flagged incomplete)" in text, text
    assert "INCOMPLETE" not in later and "no longer incomplete" in later, later
    assert f"MPPS {step} COMPLETED: 4/4 instances" in later, later
    assert "Traceback" not in log


def test_discontinued_marks_the_study(tmp_path: Path, storescp: StoreSCP) -> None:
    files, uid = _study(tmp_path, 2704)
    step = generate_uid()
    with _router(tmp_path, storescp, stable_age="3s") as router:
        m = Modality(router.port)
        assert m.create(create_attributes(uid), step) == 0x0000
        m.store(files[:2])
        assert m.set(final_attributes(files[:2], status="DISCONTINUED"), step) == 0x0000
        router.wait_state(uid, "delivered", timeout=60)
        wait_until(lambda: "DISCONTINUED: 2/2" in _study_status(router, uid), timeout=30,
                   what="the history to say DISCONTINUED")
        text = _study_status(router, uid)
    assert "reason: Incorrect worklist entry selected" in text, text
    assert f"MPPS {step} DISCONTINUED: 2/2 instances" in text, text
    assert storescp.sop_uids() == {tags_of(f, "SOPInstanceUID")[0] for f in files[:2]}


def test_forwarded_in_order_to_a_peer_that_comes_up_later(tmp_path: Path,
                                                          storescp: StoreSCP) -> None:
    files, uid = _study(tmp_path, 2705)
    pacs_port = free_port()
    steps = [generate_uid(), generate_uid()]
    with _router(tmp_path, storescp, stable_age=LONG, forward_mpps=["RIS"],
                 retry={"initial": "1s", "max_delay": "2s"},
                 known_aes={"RIS": {"host": "127.0.0.1", "port": pacs_port}}) as router:
        m = Modality(router.port)
        for step in steps:
            assert m.create(create_attributes(uid), step) == 0x0000
        assert m.set(final_attributes(files[:2], status="IN PROGRESS"), steps[0]) == 0x0000
        assert m.set(final_attributes(files[2:], status="DISCONTINUED"), steps[1]) == 0x0000
        assert m.set(final_attributes(files[:2]), steps[0]) == 0x0000
        # the peer is down: everything waits, in order, visibly
        waiting = wait_until(lambda: router.status()["dimse_outbox_waiting"], timeout=60,
                             what="a failed attempt to forward")
        assert waiting[0]["what"] == f"MPPS {steps[0]} N-CREATE (IN PROGRESS)", waiting
        assert router.status()["dimse_outbox"]["RIS"] == {"pending": 5}
        with RecordingSCP(pacs_port, "RIS") as ris:
            wait_until(lambda: len(ris.snapshot()) == 5, timeout=60, what="5 messages")
            got = [(op, u, str(ds.get("PerformedProcedureStepStatus", "")))
                   for op, _c, u, ds in ris.snapshot()]
            wait_until(lambda: router.status()["dimse_outbox"]["RIS"] == {"sent": 5},
                       timeout=30, what="the outbox to say sent")
            created = ris.snapshot()[0][3]
    assert got == [("N-CREATE", steps[0], "IN PROGRESS"), ("N-CREATE", steps[1], "IN PROGRESS"),
                   ("N-SET", steps[0], "IN PROGRESS"), ("N-SET", steps[1], "DISCONTINUED"),
                   ("N-SET", steps[0], "COMPLETED")], got
    assert created.PatientID == "MPPS1"
    assert created.ScheduledStepAttributesSequence[0].StudyInstanceUID == uid


def test_kill_after_n_create_keeps_the_step(tmp_path: Path, storescp: StoreSCP) -> None:
    files, uid = _study(tmp_path, 2706)
    step = generate_uid()
    router = _router(tmp_path, storescp, stable_age=LONG)
    with router:
        assert Modality(router.port).create(create_attributes(uid), step) == 0x0000
        router.kill()  # SIGKILL right after the response
        router.start()
        m = Modality(router.port)
        assert m.create(create_attributes(uid), step) == 0x0111  # it is there
        m.store(files)
        assert m.set(final_attributes(files), step) == 0x0000
        router.wait_state(uid, "delivered", timeout=60)
        text = _study_status(router, uid)
    assert f"MPPS {step} COMPLETED: 4/4 instances" in text, text
    assert storescp.sop_uids() == {tags_of(f, "SOPInstanceUID")[0] for f in files}


def test_instance_availability_notification(tmp_path: Path, storescp: StoreSCP) -> None:
    files, uid = _study(tmp_path, 2707)
    step = generate_uid()
    port = free_port()
    with RecordingSCP(port, "IANSCP") as ian, _router(
            tmp_path, storescp, stable_age=LONG, ian=["IANSCP"],
            known_aes={"IANSCP": {"host": "127.0.0.1", "port": port}}) as router:
        m = Modality(router.port)
        assert m.create(create_attributes(uid), step) == 0x0000
        m.store(files)
        assert m.set(final_attributes(files), step) == 0x0000
        wait_until(lambda: ian.snapshot(), timeout=60, what="the IAN")
        got = ian.snapshot()
    assert len(got) == 1
    op, sop_class, _uid, ds = got[0]
    assert (op, sop_class) == ("N-CREATE", "1.2.840.10008.5.1.4.33")
    assert ds.StudyInstanceUID == uid
    assert [r.ReferencedSOPInstanceUID for r in ds.ReferencedPerformedProcedureStepSequence] == \
        [step]
    listed = {i.ReferencedSOPInstanceUID: (i.InstanceAvailability, i.RetrieveAETitle)
              for s in ds.ReferencedSeriesSequence for i in s.ReferencedSOPSequence}
    assert listed == {tags_of(f, "SOPInstanceUID")[0]: ("ONLINE", "DICOMROUTER")
                      for f in files}


def test_a_malformed_attribute_list_is_refused_without_a_traceback(
        tmp_path: Path, storescp: StoreSCP, monkeypatch: pytest.MonkeyPatch) -> None:
    _files, uid = _study(tmp_path, 2708)
    bodies = [
        # Performed Procedure Step Status claiming 256 bytes, 11 there
        struct.pack("<HHI", 0x0040, 0x0252, 256) + b"IN PROGRESS",
        # a sequence item whose length runs past the data
        struct.pack("<HHI", 0x0040, 0x0270, 0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 4000) + b"\x00" * 8]
    with _router(tmp_path, storescp, stable_age=LONG) as router:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(MPPS, ImplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", router.port, ae_title="DICOMROUTER")
        assert assoc.is_established
        statuses = []
        with monkeypatch.context() as patch:  # the modality's encoder sends these bytes
            for body in bodies:
                patch.setattr("pynetdicom.association.encode", lambda *_a, b=body: b)
                status, _ = assoc.send_n_create(Dataset(), MPPS, generate_uid())
                statuses.append(int(status.Status))
        # the association goes on: a well-formed N-CREATE after them succeeds
        status, _ = assoc.send_n_create(create_attributes(uid), MPPS, generate_uid())
        assoc.release()
        log = router.log(3000)
    assert statuses == [0x0110, 0x0110], statuses
    assert int(status.Status) == 0x0000
    assert log.count("refused with 0x0110: cannot read") == 2, log
    assert "Traceback" not in log


def test_on_a_postgresql_state(tmp_path: Path, storescp: StoreSCP, pg_dsn: str) -> None:
    """The steps, their completion and the incomplete flag with the cluster's state."""
    files, uid = _study(tmp_path, 2709)
    other, other_uid = _study(tmp_path, 2710)
    dsn_file = tmp_path / "pg.dsn"
    dsn_file.write_text(pg_dsn + "\n")
    steps = [generate_uid(), generate_uid()]
    with _router(tmp_path, storescp, stable_age=LONG, mpps_timeout="1s",
                 state={"type": "postgresql", "dsn_file": str(dsn_file)}) as router:
        m = Modality(router.port)
        m.store(files)
        m.store(other[:1])
        for step, study in zip(steps, (uid, other_uid), strict=True):
            assert m.create(create_attributes(study), step) == 0x0000
        assert m.set(final_attributes(files), steps[0]) == 0x0000
        assert m.set(final_attributes(other), steps[1]) == 0x0000
        router.wait_state(uid, "delivered", timeout=60)
        wait_until(lambda: "INCOMPLETE" in _study_status(router, other_uid), timeout=60,
                   what="the other study flagged incomplete")
        text = _study_status(router, uid)
        assert router.study_state(other_uid) == "receiving"  # the stable age is an hour
    assert f"MPPS {steps[0]} COMPLETED: 4/4 instances" in text, text


def test_one_association_for_mpps_and_images_with_the_pynetdicom_receiver(
        tmp_path: Path, storescp: StoreSCP) -> None:
    """``receiver: pynetdicom`` serves storage and MPPS on one association (the fast receiver
    hands an association to pynetdicom only when it proposes no storage class)."""
    files, uid = _study(tmp_path, 2711)
    step = generate_uid()
    with _router(tmp_path, storescp, stable_age=LONG, receiver="pynetdicom") as router:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(MPPS)
        datasets = [dcmread(f) for f in files]
        ae.add_requested_context(datasets[0].SOPClassUID,
                                 datasets[0].file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", router.port, ae_title="DICOMROUTER")
        assert assoc.is_established
        status, _ = assoc.send_n_create(create_attributes(uid), MPPS, step)
        assert int(status.Status) == 0x0000
        for ds in datasets:
            assert int(assoc.send_c_store(ds).Status) == 0x0000
        status, _ = assoc.send_n_set(final_attributes(files), MPPS, step)
        assert int(status.Status) == 0x0000
        assoc.release()
        router.wait_state(uid, "delivered", timeout=60)
    assert storescp.sop_uids() == {str(d.SOPInstanceUID) for d in datasets}
