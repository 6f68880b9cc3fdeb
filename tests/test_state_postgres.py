"""The PostgreSQL state against a real PostgreSQL (Debian's package, started by the test):
the same contract as SQLite, and what only several nodes need (SKIP LOCKED claims, leases,
per-study exclusion, migrations, reconnection after a restart)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import require_peer, wait_until

from dicomrouter.query import Match, Query
from dicomrouter.state import State, StateUnavailable
from dicomrouter.state.postgres import MIGRATIONS, PostgresState
from dicomrouter.state.sqlite import SQLiteState
from dicomrouter_bench.procs import Postgres

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def _tags(study: str, series: str, sop: str, **extra: str) -> dict[str, str]:
    return {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": sop,
            "SOPClassUID": CT, "PatientID": "PAT1", "PatientName": "Doe^Jane",
            "StudyDate": "20261130", "Modality": "CT", **extra}


def _record(state: State, study: str, n: int, series: str = "1.9.1", start: int = 1) -> None:
    for i in range(start, start + n):
        state.record_instance(_tags(study, series, f"{study}.{i}", InstanceNumber=str(i)),
                              EXPLICIT, f"data/{study}/{study}.{i}.dcm", 1000, "MODALITY",
                              "DICOMROUTER")


@pytest.fixture(params=["sqlite", "postgresql"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[State]:
    """The same tests on both backends."""
    if request.param == "sqlite":
        s: State = SQLiteState(tmp_path / "state.db")
    else:
        s = PostgresState(request.getfixturevalue("pg_dsn"), "node-a", tmp_path, lease=3)
    yield s
    s.close()


def test_receive_route_deliver_settle(state: State) -> None:
    _record(state, "1.2.1", 3)
    seen = state.study("1.2.1")
    assert seen is not None and seen.state == "receiving"
    assert state.due_studies(60.0) == []
    assert state.due_studies(0.0, now=time.time() + 1) == ["1.2.1"]
    assert state.route_study("1.2.1", ["pacs"], ["all"], seen, "matched all")
    assert not state.route_study("1.2.1", ["pacs"], ["all"], seen)  # routed exactly once
    job = state.claim_job("pacs")
    assert job is not None and job.routes == ("all",)
    todo = state.undelivered("1.2.1", "pacs")
    assert [i.sop_uid for i in todo] == ["1.2.1.1", "1.2.1.2", "1.2.1.3"]
    assert todo[0].node == state.node_id
    previous = None
    for inst in todo:
        state.mark_sending(inst.sop_uid, "pacs", "1.2.1", previous)
        previous = inst.sop_uid
    state.mark_delivered([previous], "pacs")
    assert state.finish_job(job, None, 3, 1.0) == "delivered"
    assert state.settle_study("1.2.1")
    assert state.ledger_stats() == {"entries": 3, "sends": 3, "delivered": 3, "resent": 0}
    rows = state.study_rows(study_uid="1.2.1")
    assert rows[0]["instances_in_spool"] == 3 and rows[0]["bytes_in_spool"] == 3000
    assert rows[0]["received_by"] == {state.node_id: 3}
    # a late arrival reopens it (generation 2): only the new instance is undelivered
    _record(state, "1.2.1", 1, start=4)
    again = state.study("1.2.1")
    assert again is not None and again.state == "receiving" and again.generation == 2
    assert [i.sop_uid for i in state.undelivered("1.2.1", "pacs")] == ["1.2.1.4"]
    events = [e for _ts, e in state.history("1.2.1")]
    assert any("reopened by a late arrival" in e for e in events)


def test_delivered_uids_follow_the_ledger(state: State) -> None:
    """What ordered delivery waits on (order: references): the ledger's delivered instances of
    one study at one destination, not another's, not those only being sent."""
    _record(state, "1.2.7", 3)
    _record(state, "1.2.8", 1)
    assert state.delivered_uids("1.2.7", "pacs") == set()
    state.mark_sending("1.2.7.1", "pacs", "1.2.7")
    state.mark_sending("1.2.7.2", "pacs", "1.2.7", "1.2.7.1")  # 1 delivered, 2 on the wire
    state.mark_sending("1.2.8.1", "pacs", "1.2.8")
    state.mark_delivered(["1.2.8.1"], "pacs")
    state.mark_sending("1.2.7.3", "viewer", "1.2.7")
    state.mark_delivered(["1.2.7.3"], "viewer")
    assert state.delivered_uids("1.2.7", "pacs") == {"1.2.7.1"}
    assert state.delivered_uids("1.2.7", "viewer") == {"1.2.7.3"}


def test_the_spool_total_follows_every_change_of_the_instances(state: State) -> None:
    """The spool's byte total is kept on the study rows (so /metrics need not sum a million
    instance rows): it must equal the sum over the instances after receptions, a re-sent
    instance of another size, a move to another study, a deletion after delivery, a purge."""

    def summed() -> int:
        return sum(i.size for uid in ("1.3.1", "1.3.2") for i in state.instances(uid))

    _record(state, "1.3.1", 3)
    _record(state, "1.3.2", 2)
    assert state.spool_bytes() == summed() == 5000
    state.record_instance(_tags("1.3.1", "1.9.1", "1.3.1.1"), EXPLICIT,
                          "data/1.3.1/1.3.1.1.dcm", 2500, "MODALITY", "DICOMROUTER")  # re-sent
    assert state.spool_bytes() == summed() == 6500
    state.record_instance(_tags("1.3.2", "1.9.2", "1.3.1.2"), EXPLICIT,
                          "data/1.3.2/1.3.1.2.dcm", 1200, "MODALITY", "DICOMROUTER")  # moved
    assert state.spool_bytes() == summed() == 6700
    assert [(r["bytes_in_spool"], r["instances_in_spool"])
            for r in state.study_rows(study_uid="1.3.2")] == [(3200, 3)]
    seen = state.study("1.3.1")
    assert seen is not None and state.route_study("1.3.1", ["pacs"], ["all"], seen)
    job = state.claim_job("pacs")
    assert job is not None
    state.mark_delivered([i.sop_uid for i in state.undelivered("1.3.1", "pacs")], "pacs")
    assert state.finish_job(job, None, 3, 1.0) == "delivered"
    assert state.settle_study("1.3.1")
    assert state.forget_delivered("1.3.1", "delivered everywhere") is not None
    assert state.spool_bytes() == summed() == 3200
    assert [r["study_uid"] for r in state.study_rows(limit=1)] == ["1.3.2"]  # the newest
    assert [r["study_uid"] for r in state.study_rows(with_done=True, limit=2)] == \
        ["1.3.1", "1.3.2"]  # the newest N, listed oldest first
    assert state.study_counts() == {"studies": 1, "receiving": 1}  # 1.3.1 is done with
    assert state.study_counts(with_done=True) == {"studies": 2, "receiving": 1}
    state.purge("1.3.2")
    assert state.spool_bytes() == 0


def test_failure_retry_dead_and_requeue(state: State) -> None:
    _record(state, "1.2.2", 1)
    seen = state.study("1.2.2")
    assert seen is not None
    state.route_study("1.2.2", ["pacs"], ["all"], seen)
    job = state.claim_job("pacs")
    assert job is not None
    assert state.finish_job(job, "refused", 2, 60.0) == "failed"
    assert state.claim_job("pacs") is None  # not due for a minute
    assert state.next_due("pacs") is not None
    job = state.claim_job("pacs", now=time.time() + 61)
    assert job is not None
    assert state.finish_job(job, "refused again", 2, 60.0) == "dead"
    assert state.summary()["dead"][0]["last_error"] == "refused again"
    assert state.requeue(True, None, None) == 1
    assert state.claim_job("pacs") is not None


def test_query_retrieve_matching(state: State) -> None:
    state.record_instance(_tags("1.3.1", "1.3.1.1", "1.3.1.1.1", InstanceNumber="10",
                                AccessionNumber="ACC_1"), EXPLICIT, "k1", 10, "A", "B")
    state.record_instance(_tags("1.3.1", "1.3.1.2", "1.3.1.2.1", InstanceNumber="x",
                                Modality="MR"), EXPLICIT, "k2", 10, "A", "B")
    state.record_instance(_tags("1.3.2", "1.3.2.1", "1.3.2.1.1", PatientName="Roe^John",
                                StudyDate="20250101", AccessionNumber="ACC%2"),
                          EXPLICIT, "k3", 10, "A", "B")

    def find(level: str, *matches: Match) -> list[dict[str, str]]:
        return state.qr_rows(Query(level, tuple(matches), ()))

    studies = find("STUDY", Match("PatientName", "wildcard", ("doe*",)))
    assert [r["StudyInstanceUID"] for r in studies] == ["1.3.1"]
    assert studies[0]["NumberOfStudyRelatedInstances"] == "2"
    assert sorted(studies[0]["ModalitiesInStudy"].split("\\")) == ["CT", "MR"]
    # wildcard characters of the database's own (%, _) are literal in DICOM
    assert [r["StudyInstanceUID"] for r in find("STUDY", Match("AccessionNumber", "wildcard",
                                                               ("ACC%*",)))] == ["1.3.2"]
    assert [r["StudyInstanceUID"] for r in find("STUDY", Match("AccessionNumber", "wildcard",
                                                               ("ACC?1",)))] == ["1.3.1"]
    ranged = find("STUDY", Match("StudyDate", "range", ("20260101", "")))
    assert [r["StudyInstanceUID"] for r in ranged] == ["1.3.1"]
    listed = find("SERIES", Match("SeriesInstanceUID", "list", ("1.3.1.2", "1.3.2.1")))
    assert sorted(r["SeriesInstanceUID"] for r in listed) == ["1.3.1.2", "1.3.2.1"]
    images = state.qr_instances(Query("IMAGE", (Match("StudyInstanceUID", "single",
                                                      ("1.3.1",)),), ()))
    assert [i.sop_uid for i in images] == ["1.3.1.1.1", "1.3.1.2.1"]  # "x" is no number
    # QIDO-RS paging: limit and offset over one order, on the unique key at the end
    every = [r["SOPInstanceUID"] for r in find("IMAGE")]
    assert len(every) == 3
    assert [r["SOPInstanceUID"] for r in state.qr_rows(Query("IMAGE", (), ()), 2, 1)] == \
        every[1:]
    assert [r["SOPInstanceUID"] for r in state.qr_rows(Query("IMAGE", (), ()), 0, 2)] == \
        every[2:]
    studies = [r["StudyInstanceUID"] for r in find("STUDY")]
    assert [r["StudyInstanceUID"] for r in state.qr_rows(Query("STUDY", (), ()), 1, 1)] == \
        studies[1:]


def test_nodes_heartbeat(state: State) -> None:
    state.heartbeat({"host": "h1", "pid": 1})
    (node,) = state.nodes()
    assert node["node_id"] == state.node_id and node["alive"] and node["info"]["host"] == "h1"


def test_the_qr_proxy_cache_clock(state: State) -> None:
    """``proxy_cache`` (issue 28): a study's last use moves on, the unused ones are found
    oldest first, forgotten ones are gone."""
    state.proxy_used("1.2.1", 100.0)
    state.proxy_used("1.2.2", 150.0)
    state.proxy_used("1.2.1", 200.0)  # retrieved again: its clock starts again
    assert state.proxy_unused_since(180.0) == ["1.2.2"]
    assert state.proxy_unused_since(300.0) == ["1.2.2", "1.2.1"]
    state.proxy_forget("1.2.2")
    assert state.proxy_unused_since(300.0) == ["1.2.1"]


# ---- only PostgreSQL: several nodes on one database -------------------------------------------


@pytest.fixture
def two_nodes(pg_dsn: str, tmp_path: Path) -> Iterator[tuple[PostgresState, PostgresState]]:
    a = PostgresState(pg_dsn, "node-a", tmp_path / "a", lease=3)
    b = PostgresState(pg_dsn, "node-b", tmp_path / "b", lease=3)
    yield a, b
    a.close()
    b.close()


def test_nodes_claim_different_jobs_and_a_dead_nodes_job_resumes(
        two_nodes: tuple[PostgresState, PostgresState]) -> None:
    a, b = two_nodes
    for study in ("1.4.1", "1.4.2"):
        _record(a, study, 2)
        seen = a.study(study)
        assert seen is not None and a.route_study(study, ["pacs"], ["all"], seen)
    ja, jb = a.claim_job("pacs"), b.claim_job("pacs")
    assert ja is not None and jb is not None and ja.study_uid != jb.study_uid
    assert a.claim_job("pacs") is None and b.claim_job("pacs") is None
    # node a stops renewing its lease (killed); b heartbeats and takes a's job over
    deadline = time.time() + 3.5
    while time.time() < deadline:
        b.heartbeat()
        time.sleep(0.5)
    taken = wait_until(lambda: b.claim_job("pacs"), timeout=10, what="the expired job")
    assert taken.study_uid == ja.study_uid
    assert any("resumed on node node-b" in e for _t, e in b.history(ja.study_uid))
    assert {n["node_id"]: n["alive"] for n in b.nodes()} == {"node-b": True}
    # a comes back and finishes its old run: that does not close b's run
    assert a.finish_job(ja, None, 3, 1.0) == ""
    assert b.finish_job(taken, None, 3, 1.0) == "delivered"


def test_singleton_work_is_leased_to_one_node(
        two_nodes: tuple[PostgresState, PostgresState]) -> None:
    a, b = two_nodes
    assert a.hold_lease("source:pacs", 1.0)
    assert not b.hold_lease("source:pacs", 1.0)  # a holds it
    assert a.hold_lease("source:pacs", 1.0)  # renewed by its holder
    wait_until(lambda: b.hold_lease("source:pacs", 1.0), timeout=10,
               what="the lapsed lease to pass to node b")
    assert not a.hold_lease("source:pacs", 1.0)


def test_a_study_split_over_nodes_is_one_study(
        two_nodes: tuple[PostgresState, PostgresState]) -> None:
    """Two nodes record the instances of one new study at the same time: one study row,
    generation 1, every instance, and it routes once."""
    a, b = two_nodes
    errors: list[BaseException] = []

    def receive(state: PostgresState, series: str) -> None:
        try:
            _record(state, "1.5.1", 40, series=series, start=1 if series.endswith("1") else 100)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=receive, args=(s, f"1.5.1.{n}"))
               for n, s in ((1, a), (2, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    seen = b.study("1.5.1")
    assert seen is not None and seen.generation == 1
    assert len(a.instances("1.5.1")) == 80
    assert a.study_rows(study_uid="1.5.1")[0]["received_by"] == {"node-a": 40, "node-b": 40}
    results = []
    both = [threading.Thread(target=lambda s=s: results.append(
        s.route_study("1.5.1", ["pacs"], ["all"], seen))) for s in (a, b)]
    for t in both:
        t.start()
    for t in both:
        t.join()
    assert sorted(results) == [False, True]
    assert len(a.jobs()) == 1


def test_migrations_are_versioned_and_applied_once(pg_dsn: str, tmp_path: Path) -> None:
    first = PostgresState(pg_dsn, "n1", tmp_path)
    second = PostgresState(pg_dsn, "n2", tmp_path)  # no error: nothing applied twice
    assert first.schema_version() == MIGRATIONS[-1][0]
    rows = first._query("SELECT version FROM schema_migrations ORDER BY version")
    assert [r[0] for r in rows] == [v for v, _ in MIGRATIONS]
    first.close()
    second.close()


def test_unreachable_postgresql_is_a_clear_error() -> None:
    from dicomrouter_bench.procs import free_port

    with pytest.raises(StateUnavailable, match="PostgreSQL is not reachable") as err:
        PostgresState(f"postgresql://x:pw1234@127.0.0.1:{free_port()}/x", "n",
                      connect_timeout=2)
    assert "127.0.0.1" in str(err.value) and "pw1234" not in str(err.value)


def test_a_broken_or_locked_sqlite_state_is_the_same_clear_error(tmp_path: Path) -> None:
    """One backend-neutral error type: SQLite's errors for a file that is not a database, a
    database another process holds locked, or one that is missing, are StateUnavailable (what
    the tracker and the workers catch to log one line and go on), naming the file."""
    broken = tmp_path / "broken" / "state.db"
    broken.parent.mkdir()
    broken.write_bytes(b"not a database " * 512)
    with pytest.raises(StateUnavailable, match="SQLite state .*broken.*not a database"):
        SQLiteState(broken)
    with pytest.raises(StateUnavailable, match="unable to open"):
        SQLiteState(tmp_path / "missing" / "state.db", readonly=True)

    state = SQLiteState(tmp_path / "ok" / "state.db")
    _record(state, "1.7.1", 1)
    state._db.execute("PRAGMA busy_timeout=100")  # not 30 s: the test waits for it
    import sqlite3

    holder = sqlite3.connect(tmp_path / "ok" / "state.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StateUnavailable, match="locked"):
            _record(state, "1.7.1", 1, start=2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    _record(state, "1.7.1", 1, start=3)  # the lock gone, the same state goes on
    assert sorted(i.sop_uid for i in state.instances("1.7.1")) == ["1.7.1.1", "1.7.1.3"]
    state.close()


def test_the_state_reconnects_after_a_postgresql_restart(tmp_path: Path) -> None:
    require_peer("PostgreSQL", Postgres.available(),
                 "postgresql (apt-get install postgresql) and psycopg (pip install)")
    with Postgres(tmp_path / "pg") as pg:
        state = PostgresState(pg.dsn, "n1", tmp_path, lease=3, connect_timeout=5)
        _record(state, "1.6.1", 2)
        pg.stop()
        with pytest.raises(StateUnavailable):
            _record(state, "1.6.1", 1, start=3)
        pg.start()
        _record(state, "1.6.1", 1, start=4)  # the pooled connections were dead: replaced
        assert sorted(i.sop_uid for i in state.instances("1.6.1")) == \
            ["1.6.1.1", "1.6.1.2", "1.6.1.4"]
        state.close()
