"""The contracts delivery is written against: sessions that deliver at commit, spool-relative
keys (a moved spool is the same spool), idle workers that do not write."""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from peers import StoreSCP, free_port, run_storescu, wait_until
from router_fixtures import Router, tags_of

from dicomrouter.config import from_dict
from dicomrouter.delivery import DeliveryWorkers
from dicomrouter.destinations.base import Context, DeliveryError, Destination, Session
from dicomrouter.dicomfile import identify
from dicomrouter.sample import generate
from dicomrouter.spool import Spool
from dicomrouter.state import Instance, open_state


class CommitStyle(Destination):
    """Buffers every instance and delivers them all at commit (like one zip per study)."""

    def __init__(self, cfg, fail_commit: bool) -> None:  # type: ignore[no-untyped-def]
        super().__init__(cfg, Context())
        self.fail_commit = fail_commit
        self.delivered: list[str] = []
        self.received: list[bytes] = []

    def open(self, instances: Sequence[Instance], routes: Sequence[str] = ()) -> Session:
        return _CommitSession(self)


class _CommitSession(Session):
    def __init__(self, dest: CommitStyle) -> None:
        self.dest = dest
        self.buffer: list[tuple[str, bytes]] = []

    def send(self, inst: Instance, data: BinaryIO) -> bool:
        self.buffer.append((inst.sop_uid, data.read()))
        return False

    def commit(self) -> Sequence[str]:
        if self.dest.fail_commit:
            raise DeliveryError("the upload of the study failed")
        self.dest.received += [b for _u, b in self.buffer]
        self.dest.delivered += [u for u, _b in self.buffer]
        return [u for u, _b in self.buffer]


def _setup(tmp_path: Path, destinations: list[str], n: int = 3):  # type: ignore[no-untyped-def]
    cfg = from_dict({"destinations": {d: {"type": "folder", "path": str(tmp_path / d)}
                                      for d in destinations},
                     "routes": [{"to": destinations}]}, tmp_path, "test")
    state = open_state(tmp_path / "spool" / "state.db")
    spool = Spool(tmp_path / "spool", state)
    files = generate(tmp_path / "study", series=1, instances=n, rows=8, cols=8, seed=31)
    for f in files:
        tags, ts = identify(f)
        copy = tmp_path / "copy.dcm"
        shutil.copy(f, copy)
        spool._place(str(copy), tags, ts, "TEST", "ROUTER")
    study = tags["StudyInstanceUID"]
    assert state.route_study(study, destinations, ["all"], state.study(study))
    return cfg, state, spool, study, files


def test_commit_style_destination_marks_only_what_commit_confirms(tmp_path: Path) -> None:
    cfg, state, spool, study, files = _setup(tmp_path, ["zip"])
    dest = CommitStyle(cfg.destinations["zip"], fail_commit=True)
    workers = DeliveryWorkers(cfg, state, spool, {"zip": dest}, lambda job, outcome: None)

    job = state.claim_job("zip")
    assert workers.run(job, dest) == "failed"
    assert state.undelivered(study, "zip") and len(state.undelivered(study, "zip")) == 3
    assert state.ledger_stats("zip") == {"entries": 3, "sends": 3, "delivered": 0, "resent": 0}
    assert dest.delivered == []

    dest.fail_commit = False
    state.requeue(False, study, "zip")
    job = state.claim_job("zip")
    assert workers.run(job, dest) == "delivered"
    assert state.undelivered(study, "zip") == []
    assert state.ledger_stats("zip") == {"entries": 3, "sends": 6, "delivered": 3, "resent": 3}
    assert sorted(dest.delivered) == sorted(tags_of(f, "SOPInstanceUID")[0] for f in files)
    # the bytes the destination read are the received file, the spool's marker hidden
    assert sorted(dest.received) == sorted(f.read_bytes() for f in files)


def test_an_idle_destination_does_no_write_transactions(tmp_path: Path) -> None:
    """A backlog for 'busy' (its workers not running) must not make the idle destination's
    worker write: it reads, and sleeps until woken or its own job comes due."""
    cfg, state, spool, _study, _files = _setup(tmp_path, ["busy"])
    cfg2 = from_dict({"destinations": {d: {"type": "folder", "path": str(tmp_path / d)}
                                       for d in ("busy", "idle")},
                      "routes": [{"to": ["busy"]}]}, tmp_path, "test")
    idle = CommitStyle(cfg2.destinations["idle"], fail_commit=False)  # it has no jobs
    workers = DeliveryWorkers(cfg2, state, spool, {"idle": idle}, lambda job, outcome: None)
    workers.start()
    try:
        before = state.write_transactions
        time.sleep(2.5)  # counting what an idle worker does over a window, not awaiting it
        assert state.write_transactions - before == 0
        assert state.next_due("busy") == 0
    finally:
        workers.stop()


def test_a_moved_spool_is_the_same_spool(tmp_path: Path) -> None:
    """Move the spool with a delivered (kept) study and an undelivered one, restart on the new
    path: nothing is re-adopted or sent again, the undelivered study is delivered once."""
    first = generate(tmp_path / "first", series=1, instances=3, rows=8, cols=8, seed=32)
    second = generate(tmp_path / "second", series=1, instances=2, rows=8, cols=8, seed=33)
    scp_port = free_port()
    old_spool, new_spool = tmp_path / "old" / "spool", tmp_path / "new" / "spool"
    cfg = {"keep_after_delivery": True, "port": free_port(),
           "destinations": {"pacs": {"type": "dicom", "ae_title": "STORESCP",
                                     "host": "127.0.0.1", "port": scp_port,
                                     "retry": {"initial": "1s", "max_attempts": 100}}},
           "routes": [{"to": "pacs"}]}
    received = tmp_path / "scp"
    with Router(tmp_path / "r1", dict(cfg, spool=str(old_spool))) as router:
        with StoreSCP(received, aet="STORESCP", port=scp_port):
            assert run_storescu(first, router.port).returncode == 0
            router.wait_state(tags_of(first[0], "StudyInstanceUID")[0], "delivered")
        assert run_storescu(second, router.port).returncode == 0  # the destination is down
        wait_until(lambda: router.status()["retrying"], timeout=60, what="a failed delivery")
    # spools from before keys were relative held absolute paths: the move must survive those
    db = sqlite3.connect(old_spool / "state.db")
    db.execute("UPDATE instances SET path=? || '/' || path", (str(old_spool),))
    db.execute("PRAGMA user_version = 0")  # those spools did not count schema versions
    db.commit()
    db.close()
    shutil.move(old_spool, new_spool)
    with StoreSCP(tmp_path / "scp2", aet="STORESCP", port=scp_port) as scp, \
            Router(tmp_path / "r2", dict(cfg, spool=str(new_spool))) as router:
        router.wait_state(tags_of(second[0], "StudyInstanceUID")[0], "delivered")
        log = router.log(5000)
        status = router.status()
        assert "did not know" not in log  # nothing re-adopted
        assert status["ledger"]["sends"] == 5 and status["ledger"]["resent"] == 0, status
        stores = scp.log(100000).count("Received Store Request")
        assert stores == 2, f"storescp got {stores} C-STORE(s) after the move, expected 2"
        assert {f.name.split(".", 1)[1][:-4] for f in scp.files()} == \
            {tags_of(f, "SOPInstanceUID")[0] for f in second}
    rows = sqlite3.connect(new_spool / "state.db").execute("SELECT path FROM instances")
    assert all(r[0].startswith("data/") for r in rows)


def test_a_c_find_association_reaches_a_pynetdicom_handler_on_the_same_port(
        tmp_path: Path, dcmtk_available: dict[str, str]) -> None:
    """The lean listener peeks at the A-ASSOCIATE-RQ: Query/Retrieve goes to pynetdicom's
    handlers (socket and all), storage stays on the lean path; one port for both."""
    import subprocess

    from peers import dcmtk, peer_env
    from pydicom.dataset import Dataset
    from pynetdicom import evt
    from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind

    from dicomrouter.scp.listener import FastStorageSCP

    queries: list[str] = []

    def on_find(event):  # type: ignore[no-untyped-def]
        queries.append(str(event.identifier.QueryRetrieveLevel))
        match = Dataset()
        match.QueryRetrieveLevel = "PATIENT"
        match.PatientName = "HANDOFF^TEST"
        match.PatientID = "HANDOFF1"
        yield 0xFF00, match

    port = free_port()
    cfg = from_dict({"port": port, "bind": "127.0.0.1", "destinations": {}, "routes": []},
                    tmp_path, "test")
    state = open_state(tmp_path / "spool" / "state.db")
    spool = Spool(tmp_path / "spool", state)
    spool.start()
    scp = FastStorageSCP(cfg, spool)
    scp.add_service(PatientRootQueryRetrieveInformationModelFind, evt.EVT_C_FIND, on_find)
    scp.start()
    try:
        r = subprocess.run([dcmtk("findscu"), "-v", "-P", "-aec", cfg.ae_title,
                            "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientName=",
                            "-k", "PatientID=", "127.0.0.1", str(port)],
                           capture_output=True, text=True, env=peer_env(), timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert queries == ["PATIENT"]
        assert "HANDOFF^TEST" in r.stdout + r.stderr
        study = generate(tmp_path / "study", series=1, instances=2, rows=8, cols=8, seed=34)
        assert run_storescu(study, port).returncode == 0  # storage: the lean path, same port
        wait_until(lambda: len(list((tmp_path / "spool" / "data").rglob("*.dcm"))) == 2,
                   timeout=30, what="the instances in the spool")
    finally:
        scp.stop()
        spool.stop()
        state.close()
