"""An instance moved to another study (a PACS reconciliation re-sends SOP Instance UID S under a
new StudyInstanceUID and PatientID): the newer reception supersedes the older one in the spool,
the state and the Q/R index, the histories say what happened and who had the old version, and
no restart (clean or kill -9) ever brings the old version back or delivers it again."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from peers import Orthanc, dcmtk, peer_env, run_storescu, wait_until
from pydicom import dcmread
from pydicom.uid import generate_uid
from router_fixtures import Router, dataset_bytes, dicomrouter

from dicomrouter.query import Match, Query
from dicomrouter.sample import generate
from dicomrouter.spool import Spool
from dicomrouter.state import State
from dicomrouter.state.sqlite import SQLiteState
from dicomrouter_bench.procs import free_port

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


# ---- the state, on both backends -------------------------------------------------------------

def _tags(study: str, sop: str, patient: str) -> dict[str, str]:
    return {"StudyInstanceUID": study, "SeriesInstanceUID": study + ".1", "SOPInstanceUID": sop,
            "SOPClassUID": CT, "PatientID": patient, "PatientName": "Doe^Jane",
            "StudyDate": "20260101", "Modality": "CT", "InstanceNumber": "1"}


def _record(state: State, study: str, sop: str, patient: str = "OLD1"):  # type: ignore[no-untyped-def]
    return state.record_instance(_tags(study, sop, patient), EXPLICIT,
                                 f"data/{study}/{sop}.dcm", 1000, "PACS", "DICOMROUTER")


def _deliver(state: State, study: str, destination: str) -> None:
    seen = state.study(study)
    assert seen is not None
    assert state.route_study(study, [destination], ["all"], seen)
    job = state.claim_job(destination)
    assert job is not None and job.study_uid == study
    for inst in state.undelivered(study, destination):
        state.mark_sending(inst.sop_uid, destination, study)
        state.mark_delivered([inst.sop_uid], destination)
    assert state.finish_job(job, None, 3, 1.0) == "delivered"
    assert state.settle_study(study)


def test_a_move_supersedes_the_old_reception_in_the_state(state: State) -> None:
    for sop in ("1.5.1.1", "1.5.1.2", "1.5.1.3"):
        _record(state, "1.5.1", sop)
    _deliver(state, "1.5.1", "pacs")
    rec = _record(state, "1.5.2", "1.5.1.1", patient="NEW2")
    assert rec.replaced and rec.moved_from == "1.5.1"
    assert rec.superseded == "data/1.5.1/1.5.1.1.dcm"  # the caller deletes that file
    assert [i.sop_uid for i in state.instances("1.5.1", present_only=False)] == \
        ["1.5.1.2", "1.5.1.3"]
    assert [i.sop_uid for i in state.instances("1.5.2")] == ["1.5.1.1"]
    found = state.reception("1.5.1.1")
    assert found is not None and (found.study_uid, found.key) == ("1.5.2",
                                                                   "data/1.5.2/1.5.1.1.dcm")
    # the new study delivers it (its ledger under the old study is gone) ...
    assert [i.sop_uid for i in state.undelivered("1.5.2", "pacs")] == ["1.5.1.1"]
    # ... the old study's job counts only what is still its own
    (job,) = state.jobs(study_uids=["1.5.1"])
    assert (job["delivered"], job["total"]) == (2, 2)
    old = "\n".join(e for _, e in state.history("1.5.1"))
    assert "instance 1.5.1.1 moved to study 1.5.2 (patient OLD1 → NEW2) on 20" in old, old
    assert "destinations that received it under this study: pacs (they keep that version" \
        in old, old
    new = "\n".join(e for _, e in state.history("1.5.2"))
    assert "instance 1.5.1.1 moved here from study 1.5.1 (patient OLD1 → NEW2)" in new, new
    (row,) = state.study_rows(study_uid="1.5.1")
    assert (row["moved_out"], row["moved_in"]) == (1, 0)
    (row,) = state.study_rows(study_uid="1.5.2")
    assert (row["moved_out"], row["moved_in"]) == (0, 1)
    (move,) = state.moves("1.5.2")  # type: ignore[attr-defined]
    assert move["delivered_to"] == ["pacs"] and move["from_patient"] == "OLD1"
    # Q/R at IMAGE level by SOP Instance UID: the new study only
    rows = state.qr_rows(Query("IMAGE", (Match("SOPInstanceUID", "single", ("1.5.1.1",)),),
                               ("StudyInstanceUID", "PatientID")))
    assert [(r["StudyInstanceUID"], r["PatientID"]) for r in rows] == [("1.5.2", "NEW2")]


def test_a_study_whose_every_instance_moved_is_moved(state: State) -> None:
    _record(state, "1.6.1", "1.6.1.1")
    seen = state.study("1.6.1")
    assert seen is not None and state.route_study("1.6.1", ["pacs"], ["all"], seen)
    _record(state, "1.6.2", "1.6.1.1", patient="NEW2")  # before the delivery ran
    moved = state.study("1.6.1")
    assert moved is not None and moved.state == "moved" and not moved.in_spool
    assert state.jobs(study_uids=["1.6.1"]) == []  # nothing left to deliver there
    assert state.claim_job("pacs") is None
    text = "\n".join(e for _, e in state.history("1.6.1"))
    assert "every instance moved to other studies (the last, 1.6.1.1, to 1.6.2): nothing " \
        "left to deliver; deliveries dropped: pacs" in text, text
    assert "1.6.1" not in {r["study_uid"] for r in state.study_rows()}  # status: only --all
    _record(state, "1.6.1", "1.6.1.9")  # the study receives again: it reopens as usual
    again = state.study("1.6.1")
    assert again is not None and again.state == "receiving" and again.in_spool


# ---- the spool and its recovery --------------------------------------------------------------

def _moved_copy(src: Path, out: Path, study: str, patient: str) -> Path:
    ds = dcmread(src)
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient
    ds.PatientName = "NEW^PATIENT"
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out)
    return out


def _receive(spool: Spool, f: Path, place: bool = True):  # type: ignore[no-untyped-def]
    rx = spool.new_receive_file()
    rx.write(f.read_bytes())
    accepted = spool.accept(rx, "PACS", "DICOMROUTER")
    rx.close()
    if place:
        spool.place(accepted)
    return accepted


def test_the_old_file_goes_and_recovery_never_brings_it_back(tmp_path: Path) -> None:
    x_files = generate(tmp_path / "x", series=1, instances=2, rows=8, cols=8, seed=501,
                       patient_id="OLD1")
    s_old = x_files[0]
    x = str(dcmread(s_old).StudyInstanceUID)
    sop = str(dcmread(s_old).SOPInstanceUID)
    y = generate_uid()
    s_new = _moved_copy(s_old, tmp_path / "y" / "s.dcm", y, "NEW2")
    root = tmp_path / "spool"
    spool = Spool(root, SQLiteState(root / "state.db"))
    for f in x_files:
        _receive(spool, f)
    old_path = root / "data" / x / f"{sop}.dcm"
    kept = shutil.copy2(old_path, tmp_path / "old-copy.dcm")  # the old version, its mtime too
    stale_slot = _receive(spool, s_old, place=False)  # an older reception left unplaced
    time.sleep(0.05)  # the move is a later reception
    _receive(spool, s_new)
    new_path = root / "data" / y / f"{sop}.dcm"
    assert not old_path.exists() and dataset_bytes(new_path) == dataset_bytes(s_new)
    files = list((root / "data").rglob("*.dcm"))
    assert spool.used_bytes == sum(p.stat().st_size for p in files)
    spool.state.close()

    # a crash between the record and the unlink leaves the old file behind: put it back
    shutil.copy2(kept, old_path)
    again = Spool(root, SQLiteState(root / "state.db"))
    assert again.recover_slots() == (0, 1)  # the stale slot: removed, not placed
    assert not Path(stale_slot.path).exists()
    assert again.adopt_orphans() == 0
    assert not old_path.exists() and new_path.exists()
    found = again.state.reception(sop)
    assert found is not None and found.study_uid == y
    assert sop not in {i.sop_uid for i in again.state.instances(x, present_only=False)}
    assert "reopened" not in "\n".join(e for _, e in again.state.history(x))

    # a file newer than its row is a reception whose commit was lost: recorded (moved back)
    shutil.copy2(kept, old_path)
    os.utime(old_path, (time.time() + 5, time.time() + 5))
    assert again.adopt_orphans() == 1
    found = again.state.reception(sop)
    assert found is not None and found.study_uid == x
    assert not new_path.exists()  # and it superseded the newer-recorded one in turn
    again.state.close()


def test_cluster_spool_drops_superseded_copies_and_objects(tmp_path: Path, moto_s3,
                                                           pg_dsn: str,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """Shared spool (S3 via moto, PostgreSQL): keys are per reception, so every re-send leaves
    the earlier object behind. The shared-orphan scan deletes such an object instead of
    adopting it as an unrecorded instance (which brought the old version back before), and a
    move removes the node's local copy under the old study at once."""
    from dicomrouter.config.models import SharedSpoolModel
    from dicomrouter.spool import ClusterSpool, SharedStore
    from dicomrouter.state.postgres import PostgresState

    monkeypatch.setenv("BENCH_S3_KEY", "bench")
    s3 = moto_s3.client()
    s3.create_bucket(Bucket="moves")
    (s_old,) = generate(tmp_path / "x", series=1, instances=1, rows=8, cols=8, seed=531,
                        patient_id="OLD1")
    x, sop = (str(dcmread(s_old).get(k)) for k in ("StudyInstanceUID", "SOPInstanceUID"))
    y = generate_uid()
    s_new = _moved_copy(s_old, tmp_path / "y" / "s.dcm", y, "NEW2")
    state = PostgresState(pg_dsn, "node1", tmp_path / "spool", lease=3)
    store = SharedStore(SharedSpoolModel.model_validate({
        "type": "s3",
        "bucket": "moves",
        "prefix": "c",
        "endpoint_url": moto_s3.endpoint_url,
        "region": "us-east-1",
        "access_key_env": "BENCH_S3_KEY",
        "secret_key_env": "BENCH_S3_KEY",
        "timeout": 10.0,
        "verify_tls": True}))
    spool = ClusterSpool(tmp_path / "spool", state, store, "shared", "node1")

    def objects() -> set[str]:
        listed = s3.list_objects_v2(Bucket="moves", Prefix="c/data/").get("Contents", [])
        return {o["Key"][len("c/"):] for o in listed}

    try:
        _receive(spool, s_old)
        first = state.reception(sop)
        assert first is not None and first.key in objects()
        time.sleep(0.05)
        _receive(spool, s_new)
        moved = state.reception(sop)
        assert moved is not None and moved.study_uid == y
        assert not (tmp_path / "spool" / "data" / x / f"{sop}.dcm").exists()
        assert (tmp_path / "spool" / "data" / y / f"{sop}.dcm").exists()
        assert objects() == {first.key, moved.key}  # the old object: garbage for now
        assert spool.adopt_shared_orphans(min_age=0) == 0
        assert objects() == {moved.key}
        time.sleep(0.05)
        _receive(spool, s_new)  # the same instance sent again: a new key again
        again = state.reception(sop)
        assert again is not None and again.key != moved.key
        assert spool.adopt_shared_orphans(min_age=0) == 0
        assert objects() == {again.key}
        assert [i.sop_uid for i in state.instances(y)] == [sop]
        assert state.instances(x, present_only=False) == []
        assert "reopened" not in "\n".join(e for _, e in state.history(x))
    finally:
        state.close()


# ---- against real peers ----------------------------------------------------------------------

class Move:
    """Study X (3 CT instances, patient OLD1), and study Y: instance S of X re-sent under a
    new StudyInstanceUID and PatientID NEW2, plus one instance of its own."""

    def __init__(self, root: Path, seed: int) -> None:
        self.x_files = generate(root / "x", series=1, instances=3, rows=8, cols=8, seed=seed,
                                patient_id="OLD1")
        self.x = str(dcmread(self.x_files[0]).StudyInstanceUID)
        self.s_old = self.x_files[0]
        self.sop = str(dcmread(self.s_old).SOPInstanceUID)
        self.y = generate_uid()
        self.s_new = _moved_copy(self.s_old, root / "y" / "s.dcm", self.y, "NEW2")
        other = generate(root / "other", series=1, instances=1, rows=8, cols=8, seed=seed + 1)
        self.y_other = _moved_copy(other[0], root / "y" / "other.dcm", self.y, "NEW2")
        # a marker study: once it is delivered, anything recovered at start-up would have been
        self.z_files = generate(root / "z", series=1, instances=1, rows=8, cols=8,
                                seed=seed + 2)
        self.z = str(dcmread(self.z_files[0]).StudyInstanceUID)


def _versions(pacs: Orthanc, sop: str) -> set[tuple[str, str]]:
    """(study, patient) of every instance Orthanc holds with this SOP Instance UID (its
    instance identifier hashes patient, study and series: a moved instance is another one)."""
    found = pacs.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop}})
    out = set()
    for oid in found:
        tags = pacs.get(f"/instances/{oid}/simplified-tags")
        out.add((tags["StudyInstanceUID"], tags["PatientID"]))
    return out


def _forget_old_version(pacs: Orthanc, sop: str, study: str) -> None:
    """The PACS administrator acts on the history: the old version goes."""
    for oid in pacs.post("/tools/find", {"Level": "Instance",
                                         "Query": {"SOPInstanceUID": sop}}):
        if pacs.get(f"/instances/{oid}/simplified-tags")["StudyInstanceUID"] == study:
            pacs.delete(f"/instances/{oid}")


def _tree_copies(tree: Path, sop: str) -> list[Path]:
    return sorted(tree.rglob(f"{sop}.dcm"))


def _history(router: Router, study: str) -> str:
    r = dicomrouter("status", "--study", study, "--config", str(router.config_path))
    assert r.returncode == 0, r.stderr
    return r.stdout


def _findscu_image(router: Router, out: Path, sop: str) -> list[tuple[str, str]]:
    """C-FIND by DCMTK findscu at IMAGE level by SOPInstanceUID: (study, patient) answers."""
    out.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([dcmtk("findscu"), "-S", "-aet", "FINDSCU", "-aec", "DICOMROUTER",
                        "-X", "-od", str(out), "-k", "QueryRetrieveLevel=IMAGE",
                        "-k", f"SOPInstanceUID={sop}", "-k", "StudyInstanceUID",
                        "-k", "PatientID", "127.0.0.1", str(router.port)],
                       capture_output=True, text=True, env=peer_env(), timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return sorted((str(d.StudyInstanceUID), str(d.get("PatientID", "")))
                  for d in (dcmread(p) for p in out.glob("rsp*.dcm")))


def _restart(tmp_path: Path, cfg: dict[str, object]) -> Router:
    """The same router again (same spool and port), with a log of its own: the harness's
    readiness check reads the log."""
    log = tmp_path / "r" / "router.log"
    log.rename(log.with_name(f"router-{time.monotonic_ns()}.log"))
    return Router(tmp_path / "r", cfg)


def _config(tmp_path: Path, pacs: Orthanc, **extra: object) -> dict[str, object]:
    return {"destinations": {
        "pacs": {"type": "dicom", "ae_title": pacs.aet, "host": "127.0.0.1",
                 "port": pacs.dicom_port},
        "tree": {"type": "folder", "path": str(tmp_path / "tree")}},
        "routes": [{"name": "all", "to": ["pacs", "tree"]}], **extra}


def test_moved_instance_delivered_in_its_new_form_and_never_again_in_its_old(
        tmp_path: Path, orthanc) -> None:
    """Kept in the spool (keep_after_delivery): Q/R answers the new study only, before and
    after a restart; Orthanc (which replaces an instance sent again) ends with the new
    version; the folder tree gets the new version and the old one is not written again."""
    m = Move(tmp_path, 511)
    pacs: Orthanc = orthanc(aet="PACS")
    cfg = _config(tmp_path, pacs, keep_after_delivery=True, port=free_port())
    tree = tmp_path / "tree"
    with Router(tmp_path / "r", cfg) as router:
        assert run_storescu(m.x_files, router.port).returncode == 0
        router.wait_state(m.x, "delivered")
        pacs.wait_for_instances({str(dcmread(f).SOPInstanceUID) for f in m.x_files})
        assert _versions(pacs, m.sop) == {(m.x, "OLD1")}
        assert run_storescu([m.s_new, m.y_other], router.port).returncode == 0
        router.wait_state(m.y, "delivered")
        wait_until(lambda: _versions(pacs, m.sop) == {(m.x, "OLD1"), (m.y, "NEW2")},
                   timeout=30, what="Orthanc to hold the new version of S too")
        _forget_old_version(pacs, m.sop, m.x)
        assert _findscu_image(router, tmp_path / "find1", m.sop) == [(m.y, "NEW2")]
        copies = _tree_copies(tree, m.sop)  # PatientID/Study/Series/SOP: both versions
        (old_copy,) = [p for p in copies if m.x in str(p)]
        (new_copy,) = [p for p in copies if m.y in str(p)]
        assert dataset_bytes(new_copy) == dataset_bytes(m.s_new)
        assert dataset_bytes(old_copy) == dataset_bytes(m.s_old)
        old_copy.unlink()  # the destination cleaned up: the old version must not come back
        spooled = sorted((router.spool / "data").rglob(f"{m.sop}.dcm"))
        assert spooled == [router.spool / "data" / m.y / f"{m.sop}.dcm"]
        old = _history(router, m.x)
        new = _history(router, m.y)
    assert f"instance {m.sop} moved to study {m.y} (patient OLD1 → NEW2) on " in old, old
    assert "destinations that received it under this study: pacs, tree" in old, old
    assert f"instance {m.sop} moved here from study {m.x} (patient OLD1 → NEW2)" in new, new

    with _restart(tmp_path, cfg) as router:  # a clean restart
        assert run_storescu(m.z_files, router.port).returncode == 0
        router.wait_state(m.z, "delivered")
        assert _findscu_image(router, tmp_path / "find2", m.sop) == [(m.y, "NEW2")]
        assert _versions(pacs, m.sop) == {(m.y, "NEW2")}
        assert [p for p in _tree_copies(tree, m.sop) if m.x in str(p)] == []
        assert sorted((router.spool / "data").rglob(f"{m.sop}.dcm")) == \
            [router.spool / "data" / m.y / f"{m.sop}.dcm"]
        assert "reopened" not in _history(router, m.x)
        status = router.status()
        by_uid = {s["study_uid"]: s for s in status["studies"]}
        assert (by_uid[m.x]["moved_out"], by_uid[m.x]["instances_in_spool"]) == (1, 2)
        assert (by_uid[m.y]["moved_in"], by_uid[m.y]["instances_in_spool"]) == (1, 2)
        text = dicomrouter("status", "--config", str(router.config_path)).stdout
        assert "1 instance(s) moved to another study" in text, text
        assert "Traceback" not in router.log(100_000)


def test_kill_9_then_restart_never_redelivers_the_old_version(tmp_path: Path,
                                                              orthanc) -> None:
    """The issue's case: studies deleted from the spool once delivered. The router is killed
    (SIGKILL) after the move; the old file is put back where a crash between recording the
    move and deleting it would leave it (as the router before this fix left it for good).
    The restart removes it instead of adopting it as a late arrival of X."""
    m = Move(tmp_path, 521)
    pacs: Orthanc = orthanc(aet="PACS")
    cfg = _config(tmp_path, pacs, port=free_port())
    tree = tmp_path / "tree"
    router = Router(tmp_path / "r", cfg)
    with router:
        assert run_storescu(m.x_files, router.port).returncode == 0
        spooled = router.spool / "data" / m.x / f"{m.sop}.dcm"
        wait_until(spooled.exists, timeout=30, what="S placed in the spool")
        kept = shutil.copy2(spooled, tmp_path / "old-in-spool.dcm")  # with its mtime
        router.wait_state(m.x, "delivered")
        wait_until(lambda: not (router.spool / "data" / m.x).exists(), timeout=30,
                   what="X deleted from the spool")
        assert run_storescu([m.s_new, m.y_other], router.port).returncode == 0
        router.wait_state(m.y, "delivered")
        wait_until(lambda: (m.y, "NEW2") in _versions(pacs, m.sop), timeout=30,
                   what="Orthanc to hold the new version of S")
        wait_until(lambda: not list((router.spool / "data").rglob("*.dcm")), timeout=30,
                   what="Y deleted from the spool too")
        router.kill()
    _forget_old_version(pacs, m.sop, m.x)
    for p in _tree_copies(tree, m.sop):
        if m.x in str(p):
            p.unlink()
    spooled.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(kept, spooled)

    with _restart(tmp_path, cfg) as router:
        assert run_storescu(m.z_files, router.port).returncode == 0
        router.wait_state(m.z, "delivered")
        assert _versions(pacs, m.sop) == {(m.y, "NEW2")}
        assert [p for p in _tree_copies(tree, m.sop) if m.x in str(p)] == []
        assert not spooled.exists()  # removed at start-up, not adopted
        log = router.log(100_000)
        assert f"is not newer than the reception of instance {m.sop}" in log, log
        assert "did not know" not in log  # nothing adopted
        old = _history(router, m.x)
        assert "reopened" not in old and "late arrival" not in old, old
        assert router.study_state(m.x) == "delivered"
        assert not list((router.spool / "data").rglob("*.dcm"))
