"""MPPS (issue 27 item 4) end to end: pynetdicom as the modality (MPPS SCU and storage SCU),
DCMTK storescp as the destination, a pynetdicom SCP recording what the router forwards (MPPS)
and notifies (IAN). The router runs as ``dicomrouter serve``."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from mpps_peers import Modality, RecordingSCP, create_attributes, final_attributes
from peers import StoreSCP, wait_until
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from router_fixtures import Router, dicomrouter, tags_of

from dicomrouter.sample import generate
from dicomrouter_bench.procs import free_port

pytestmark = pytest.mark.usefixtures("dcmtk_available")

LONG = "1h"  # a stable age no test waits for


def _study(tmp_path: Path, seed: int, instances: int = 4, series: int = 2) -> tuple[list[Path], str]:
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


def test_ps34_statuses_and_no_traceback(tmp_path: Path, storescp: StoreSCP) -> None:
    _files, uid = _study(tmp_path, 2702)
    with _router(tmp_path, storescp, stable_age=LONG) as router:
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
