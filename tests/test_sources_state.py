"""What pull sources keep in the state, on SQLite and PostgreSQL: a study counted once however
often deltas are pulled, instances counted from the pull's baseline (so an interrupted pull's
count is not lost), what move semantics may delete, and the migrations of older databases."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomrouter.state import State
from dicomrouter.state import postgres as pg_state
from dicomrouter.state.postgres import PostgresState
from dicomrouter.state.sqlite import SQLiteState

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def _record(state: State, study: str, sops: range, series: str = "1.9.1",
            calling: str = "PACS") -> None:
    for i in sops:
        state.record_instance({"StudyInstanceUID": study, "SeriesInstanceUID": series,
                               "SOPInstanceUID": f"{study}.{i}", "SOPClassUID": CT,
                               "PatientID": "P1", "Modality": "CT"},
                              EXPLICIT, f"data/{study}/{study}.{i}.dcm", 100, calling,
                              "DICOMROUTER")


def _open(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> State:
    if kind == "sqlite":
        return SQLiteState(tmp_path / "state.db")
    if not hasattr(request, "_dsn"):
        request._dsn = request.getfixturevalue("pg_dsn")  # type: ignore[attr-defined]
    return PostgresState(request._dsn, "node-a", tmp_path)  # type: ignore[attr-defined]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, State]]:
    s = _open(request.param, tmp_path, request)
    yield request.param, s
    s.close()


def _source(state: State) -> dict[str, object]:
    (row,) = [r for r in state.source_rows() if r["name"] == "pacs"]
    return row


def test_a_delta_is_no_new_study_and_an_interrupted_pull_still_counts(
        backend: tuple[str, State], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    kind, state = backend
    study = "1.2.3"
    _record(state, study, range(2), calling="MODALITY")  # pushed before: not the source's
    state.source_pull_started("pacs", study, study)
    _record(state, study, range(2, 10))
    assert state.source_pulled("pacs", study, study, 10, False) == (True, 8)
    row = state.source_studies("pacs", [study, "9.9"])
    assert list(row) == [study] and row[study].source_instances == 10
    assert row[study].instances == 8 and row[study].pulled_at is not None
    assert state.source_held(study) == {f"{study}.{i}": "1.9.1" for i in range(10)}
    # a delta: 3 more; then a pull interrupted (a kill -9) after 40 of 60 instances
    state.source_pull_started("pacs", study, study)
    _record(state, study, range(10, 13), series="1.9.2")
    assert state.source_pulled("pacs", study, study, 13, False) == (False, 3)
    state.source_pull_started("pacs", study, study)
    _record(state, study, range(13, 53))
    state.close()
    state = _open(kind, tmp_path, request)  # the restart
    try:
        assert state.source_studies("pacs", [study])[study].instances == 11
        state.source_pull_started("pacs", study, study)  # keeps the interrupted baseline
        _record(state, study, range(53, 73))
        assert state.source_pulled("pacs", study, study, None, False) == (False, 60)
        src = _source(state)
        assert (src["studies_pulled"], src["instances_pulled"]) == (1, 71)
        assert state.source_studies("pacs", [study])[study].source_instances is None
        history = [e for _ts, e in state.history(study)]
        assert "pulled 8 instance(s) from source pacs" in history
        assert "pulled 3 more instance(s) from source pacs" in history
        assert any(e.startswith("pulled 60 more instance(s)") and "did not finish" in e
                   for e in history), history
        # a pull that brought nothing (the router held it all) counts nothing
        state.source_pull_started("pacs", "4.5.6", "4.5.6")
        assert state.source_pulled("pacs", "4.5.6", "4.5.6", 0, False) == (False, 0)
        assert _source(state)["studies_pulled"] == 1
    finally:
        state.close()


def test_only_instances_delivered_everywhere_may_be_deleted(backend: tuple[str, State]) -> None:
    _kind, state = backend
    study = "2.2.2"
    _record(state, study, range(3))
    assert state.source_delivered(study) == set()  # no job: delivered nowhere
    seen = state.study(study)
    assert seen is not None and state.route_study(study, ["a", "b"], ["r"], seen, "all")
    for dest in ("a", "b"):
        job = state.claim_job(dest)
        assert job is not None
        sops = [f"{study}.0", f"{study}.1"] if dest == "a" else [f"{study}.0"]
        for sop in sops:
            state.mark_sending(sop, dest, study, None)
        state.mark_delivered(sops, dest)
    assert state.source_delivered(study) == {f"{study}.0"}
    state.source_deleted("pacs", study, study, 1, 2)
    state.source_deleted("pacs", study, study, 0, 2)
    assert [e for _ts, e in state.history(study) if "at source" in e] == [
        "1 instance(s) deleted at source pacs (delivered everywhere); 2 instance(s) there not "
        "delivered yet stay for the next pull",
        "nothing deleted at source pacs: 2 instance(s) there not delivered yet stay for the "
        "next pull"]


def test_sqlite_spools_from_before_deltas_are_migrated(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    state = SQLiteState(db)
    _record(state, "7.7", range(4))
    state.close()
    con = sqlite3.connect(db)  # the table as it was before, with a study pulled then
    con.executescript(
        "DROP TABLE source_studies; CREATE TABLE source_studies (source TEXT NOT NULL,"
        " study_key TEXT NOT NULL, study_uid TEXT, pulled_at REAL, delete_after INTEGER NOT"
        " NULL DEFAULT 0, deleted_at REAL, PRIMARY KEY (source, study_key));"
        " INSERT INTO source_studies VALUES ('pacs', '7.7', '7.7', 1.0, 0, NULL);"
        " PRAGMA user_version = 0;")  # spools of then did not count schema versions
    con.close()
    state = SQLiteState(db)
    try:
        # what it holds counts as pulled (a delta is no new study); checked once for a delta
        row = state.source_studies("pacs", ["7.7"])["7.7"]
        assert row.instances == 4 and row.source_instances is None
        state.source_pull_started("pacs", "7.7", "7.7")
        _record(state, "7.7", range(4, 6))
        assert state.source_pulled("pacs", "7.7", "7.7", 6, False) == (False, 2)
    finally:
        state.close()


def test_postgresql_databases_from_before_deltas_are_migrated(
        pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deltas = next(v for v, sql in pg_state.MIGRATIONS if "source_instances" in sql)
    monkeypatch.setattr(pg_state, "MIGRATIONS", [m for m in pg_state.MIGRATIONS
                                                 if m[0] < deltas])
    old = PostgresState(pg_dsn, "n1", tmp_path)
    assert old.schema_version() == deltas - 1
    _record(old, "8.8", range(5))
    with old._tx() as db:
        db.execute("INSERT INTO source_studies(source, study_key, study_uid, pulled_at)"
                   " VALUES ('pacs', '8.8', '8.8', 1.0)")
    old.close()
    monkeypatch.undo()
    new = PostgresState(pg_dsn, "n1", tmp_path)
    try:
        assert new.schema_version() >= deltas
        row = new.source_studies("pacs", ["8.8"])["8.8"]
        assert row.instances == 5 and row.source_instances is None
        new.source_pull_started("pacs", "8.8", "8.8")
        _record(new, "8.8", range(5, 7))
        assert new.source_pulled("pacs", "8.8", "8.8", 7, False) == (False, 2)
    finally:
        new.close()
