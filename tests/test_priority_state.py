"""Priorities and held jobs in the state (issue 26, items 1 and 5), on SQLite and on a real
PostgreSQL: claims by priority then age, the yield test a running job makes, release and
reject with their audit, and what status reads."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from router_fixtures import dicomrouter

from dicomrouter.config import ConfigError, from_dict
from dicomrouter.metrics import StateCollector
from dicomrouter.priority import placement
from dicomrouter.sample import generate
from dicomrouter.state import Placement, State
from dicomrouter.state.postgres import PostgresState
from dicomrouter.state.sqlite import SQLiteState

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
STAT, HIGH, ROUTINE, LOW = range(4)


@pytest.fixture(params=["sqlite", "postgresql"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[State]:
    if request.param == "sqlite":
        s: State = SQLiteState(tmp_path / "state.db")
    else:
        s = PostgresState(request.getfixturevalue("pg_dsn"), "node-a", tmp_path, lease=30)
    yield s
    s.close()


def _routed(state: State, study: str, dests: list[str], placement: Placement | None = None,
            n: int = 2) -> None:
    for i in range(n):
        state.record_instance({"StudyInstanceUID": study, "SeriesInstanceUID": f"{study}.1",
                               "SOPInstanceUID": f"{study}.1.{i}", "SOPClassUID": CT,
                               "PatientID": "P1", "Modality": "CT"}, EXPLICIT,
                              f"data/{study}/{study}.1.{i}.dcm", 100, "MOD", "ROUTER")
    seen = state.study(study)
    assert seen is not None
    assert state.route_study(study, dests, ["r"], seen, "test", placement)


def test_claims_take_the_most_urgent_then_the_oldest(state: State) -> None:
    _routed(state, "1.1", ["pacs"])  # routine, oldest
    _routed(state, "1.2", ["pacs"], Placement({"pacs": LOW}))
    _routed(state, "1.3", ["pacs"], Placement({"pacs": HIGH}))
    _routed(state, "1.4", ["pacs"], Placement({"pacs": STAT}))
    _routed(state, "1.5", ["pacs"], Placement({"pacs": STAT}))
    order = []
    while (job := state.claim_job("pacs")) is not None:
        order.append((job.study_uid, job.priority))
        state.finish_job(job, None, 3, 1.0)
    assert order == [("1.4", STAT), ("1.5", STAT), ("1.3", HIGH), ("1.1", ROUTINE),
                     ("1.2", LOW)]


def test_a_running_job_sees_a_more_urgent_one_and_resumes_after_it(state: State) -> None:
    _routed(state, "2.1", ["pacs"])
    running = state.claim_job("pacs")
    assert running is not None and running.priority == ROUTINE
    assert not state.urgent_due("pacs", running.priority)
    _routed(state, "2.2", ["pacs"], Placement({"pacs": ROUTINE}))  # same priority: no yield
    assert not state.urgent_due("pacs", running.priority)
    _routed(state, "2.3", ["other"], Placement({"other": STAT}))  # another destination's
    assert not state.urgent_due("pacs", running.priority)
    _routed(state, "2.4", ["pacs"], Placement({"pacs": STAT}))
    assert state.urgent_due("pacs", running.priority)
    assert not state.urgent_due("pacs", STAT)  # nothing overtakes stat
    state.release_job(running)  # the worker yields after its chunk
    stat = state.claim_job("pacs")
    assert stat is not None and stat.study_uid == "2.4"
    state.finish_job(stat, None, 3, 1.0)
    again = state.claim_job("pacs")
    assert again is not None and again.study_uid == "2.1"  # older than 2.2: resumes first
    jobs = {j["study_uid"]: j for j in state.jobs()}
    assert jobs["2.4"]["priority"] == "stat" and jobs["2.1"]["priority"] == "routine"
    by = state.gauges()["by_priority"]
    assert by["pacs"] == {"routine": 2} and by["other"] == {"stat": 1}
    samples = {(s.labels["destination"], s.labels["priority"]): s.value
               for family in StateCollector(state, Path(".")).collect()
               if family.name == "dicomrouter_jobs_queued_by_priority"
               for s in family.samples}
    assert samples == {("pacs", "routine"): 2, ("other", "stat"): 1}


def test_a_held_study_waits_until_released_and_the_audit_says_who_and_why(
        state: State) -> None:
    _routed(state, "3.1", ["pacs", "research"], Placement(held=frozenset({"research"})))
    first = state.claim_job("research")
    assert first is None  # held: never claimable
    assert state.next_due("research") is None  # and no worker wakes for it
    pacs = state.claim_job("pacs")
    assert pacs is not None
    state.finish_job(pacs, None, 3, 1.0)
    assert not state.settle_study("3.1")  # the held job keeps the study open
    assert [h["destinations"] for h in state.held_studies()] == [["research"]]
    assert state.gauges()["queues"]["research"] == {"held": 1}
    assert state.release_study("3.1", "alice (command line)", "consent checked") == \
        ["research"]
    assert state.release_study("3.1", "alice", "twice") == []  # nothing held any more
    job = state.claim_job("research")
    assert job is not None and job.attempts == 0
    state.finish_job(job, None, 3, 1.0)
    assert state.settle_study("3.1")
    events = [e["event"] for e in state.events_since(0, "3.1")]
    assert any(e.startswith("held for research") for e in events), events
    assert "released by alice (command line) for research: consent checked" in events


def test_a_rejected_study_is_never_delivered_and_kept(state: State) -> None:
    _routed(state, "4.1", ["research"], Placement(held=frozenset({"research"})))
    assert state.reject_study("4.1", "bob (command line)", "no consent") == ["research"]
    assert state.claim_job("research") is None
    assert state.release_study("4.1", "bob", "too late") == []  # rejected stays rejected
    study = state.study("4.1")
    assert study is not None and study.state == "rejected" and study.in_spool
    assert state.held_studies() == []
    events = [e["event"] for e in state.events_since(0, "4.1")]
    assert "rejected (not delivered) by bob (command line) for research: no consent" in events
    # beside a delivered destination, the study settles as delivered (there)
    _routed(state, "4.2", ["pacs", "research"], Placement(held=frozenset({"research"})))
    job = state.claim_job("pacs")
    assert job is not None
    state.finish_job(job, None, 3, 1.0)
    state.reject_study("4.2", "bob", "no consent")
    again = state.study("4.2")
    assert again is not None and again.state == "delivered"


def test_a_late_arrival_to_a_held_study_is_held_again(state: State) -> None:
    _routed(state, "5.1", ["research"], Placement({"research": HIGH},
                                                  frozenset({"research"})))
    state.release_study("5.1", "carol", "ok")
    job = state.claim_job("research")
    assert job is not None and job.priority == HIGH
    state.finish_job(job, None, 3, 1.0)
    time.sleep(0.01)
    _routed(state, "5.1", ["research"], Placement(held=frozenset({"research"})), n=3)
    assert state.claim_job("research") is None  # the new generation waits again
    assert [j["state"] for j in state.jobs(study_uids=["5.1"])] == ["held"]


# ---- the configuration and the routing's placement ------------------------------------------

def _cfg(routes: list[dict[str, Any]], **extra: Any) -> Any:
    return from_dict({"destinations": {
        "pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
        "research": {"type": "dicom", "ae_title": "RES", "host": "127.0.0.1", "port": 105}},
        "routes": routes, **extra}, Path("."), "test")


def test_the_most_urgent_route_decides_and_a_hold_is_never_bypassed() -> None:
    cfg = _cfg([{"name": "stat", "priority": "stat", "to": ["pacs"]},
                {"name": "low", "priority": "low", "to": ["pacs", "research"]},
                {"name": "quarantine", "hold": True, "to": ["research"]},
                {"name": "plain", "to": ["research"]}])
    assert cfg.chunk_instances == 200 and cfg.routes[3].priority == "routine"
    both = placement(cfg.routes, ["stat", "low", "quarantine", "plain"], ["pacs", "research"])
    assert both.priority("pacs") == STAT and both.priority("research") == ROUTINE
    assert both.held == {"research"}
    only = placement(cfg.routes, ["low", "plain"], ["pacs", "research"])
    assert only.priority("pacs") == LOW and only.held == frozenset()
    # a destination not routed now (its route waits for its stable age) is not placed
    assert placement(cfg.routes, ["stat"], ["research"]).priorities == {}


@pytest.mark.parametrize(("routes", "extra", "key", "problem"), [
    ([{"priority": "urgent", "to": ["pacs"]}], {}, "routes[0].priority", "stat"),
    ([{"hold": "yes", "to": ["pacs"]}], {}, "routes[0].hold", "true or false"),
    ([{"hold": True, "level": "series", "to": ["pacs"]}], {}, "routes[0].hold",
     "level: series"),
    ([{"hold": True, "to": ["research"]},
      {"forward": "immediate", "when": {"Modality": "CT"}, "to": ["research"]}], {},
     "routes[0].hold", "before they complete (routes[1]"),
    ([{"to": ["pacs"]}], {"chunk_instances": 0}, "chunk_instances", ""),
])
def test_invalid_priority_and_hold_settings_name_the_key(
        routes: list[dict[str, Any]], extra: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        _cfg(routes, **extra)
    assert err.value.key == key, str(err.value)
    assert problem in str(err.value)


def test_status_shows_priorities_and_held_studies(tmp_path: Path) -> None:
    state = SQLiteState(tmp_path / "state.db")
    try:
        _routed(state, "6.1", ["pacs"], Placement({"pacs": STAT}))
        _routed(state, "6.2", ["pacs"])
        _routed(state, "6.3", ["research"], Placement(held=frozenset({"research"})))
    finally:
        state.close()
    text = dicomrouter("status", "--spool", str(tmp_path))
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert "pacs: pending 0 of 2 [priority stat]" in out, out
    assert "(by priority: stat 1, routine 1)" in out, out
    assert "research: held 0 of 2 [priority" not in out  # routine is not repeated
    assert "held (a route with hold: true;" in out and "6.3  patient P1 → research" in out
    data = json.loads(dicomrouter("status", "--spool", str(tmp_path), "--json").stdout)
    assert data["by_priority"]["pacs"] == {"stat": 1, "routine": 1}
    assert [h["study_uid"] for h in data["held"]] == ["6.3"]
    assert data["queues"]["research"] == {"held": 1}


def test_a_held_study_whose_instances_all_moved_holds_nothing(state: State) -> None:
    _routed(state, "7.1", ["research"], Placement(held=frozenset({"research"})), n=1)
    state.record_instance({"StudyInstanceUID": "7.2", "SeriesInstanceUID": "7.2.1",
                           "SOPInstanceUID": "7.1.1.0", "SOPClassUID": CT, "PatientID": "P2",
                           "Modality": "CT"}, EXPLICIT, "data/7.2/7.1.1.0.dcm", 100, "MOD",
                          "ROUTER")
    moved = state.study("7.1")
    assert moved is not None and moved.state == "moved"
    assert state.held_studies() == [] and state.jobs(study_uids=["7.1"]) == []
    assert state.release_study("7.1", "dave", "late") == []


def test_explain_says_the_priority_and_the_hold(tmp_path: Path) -> None:
    files = generate(tmp_path / "in", series=1, instances=1, rows=8, cols=8, seed=263)
    cfg = tmp_path / "r.yml"
    cfg.write_text(json.dumps({
        "destinations": {"pacs": {"type": "folder", "path": "pacs"},
                         "research": {"type": "folder", "path": "research"}},
        "routes": [{"name": "ct first", "when": {"Modality": "CT"}, "priority": "high",
                    "to": ["pacs"]},
                   {"name": "quarantine", "hold": True, "to": ["research", "pacs"]}]}))
    r = dicomrouter("explain", str(files[0]), "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "  priority: pacs high" in r.stdout, r.stdout
    assert "  held for pacs, research (hold: true)" in r.stdout, r.stdout
    data = json.loads(dicomrouter("explain", str(files[0]), "--config", str(cfg),
                                  "--json").stdout)
    assert data[0]["priorities"] == {"pacs": "high", "research": "routine"}
    assert data[0]["held"] == ["pacs", "research"]


# ---- review fixes: a hold never bypassed, a running job's new generation held again ---------

def _jobs(state: State, study: str) -> dict[str, str]:
    return {j["destination"]: j["state"] for j in state.jobs(study_uids=[study])}


def test_a_job_queued_before_a_holding_route_matched_is_held_then(state: State) -> None:
    # pacs pending, research failed (waiting for its retry), other delivered, run running
    _routed(state, "8.1", ["pacs", "research", "other", "run"])
    failed = state.claim_job("research")
    assert failed is not None
    state.finish_job(failed, "refused", 3, 60.0)
    done = state.claim_job("other")
    assert done is not None
    state.finish_job(done, None, 3, 1.0)
    running = state.claim_job("run")
    assert running is not None
    held = state.hold_placed("8.1", Placement({"pacs": STAT},
                                              frozenset({"pacs", "research", "other", "run"})))
    assert held == ["pacs", "research"]
    assert _jobs(state, "8.1") == {"pacs": "held", "research": "held", "other": "delivered",
                                   "run": "running"}  # delivered and running: left alone
    assert state.claim_job("pacs") is None and state.claim_job("research") is None
    assert {j["destination"]: j["priority"] for j in state.jobs(study_uids=["8.1"])}["pacs"] \
        == "stat"
    events = [e["event"] for e in state.events_since(0, "8.1")]
    assert any(e.startswith("held for pacs, research (a route with hold: true matched after")
               for e in events), events
    # released by an operator, the same placement does not hold them again
    assert state.release_study("8.1", "erin", "checked") == ["pacs", "research"]
    assert state.hold_placed("8.1", Placement(held=frozenset({"pacs", "research"}))) == []
    assert _jobs(state, "8.1")["pacs"] == "pending"
    # a new generation is held again by route_study, and its release mark is gone
    time.sleep(0.01)
    _routed(state, "8.1", ["pacs"], Placement(held=frozenset({"pacs"})), n=3)
    assert _jobs(state, "8.1")["pacs"] == "held"


@pytest.mark.parametrize("end", ["finished", "failed", "yielded", "restarted"])
def test_a_late_arrival_to_a_released_study_still_running_is_held_again(
        state: State, end: str) -> None:
    _routed(state, "9.1", ["research"], Placement(held=frozenset({"research"})))
    state.release_study("9.1", "frank", "ok")
    job = state.claim_job("research")
    assert job is not None
    time.sleep(0.01)
    # a late arrival while the released generation is still being delivered
    _routed(state, "9.1", ["research"], Placement(held=frozenset({"research"})), n=3)
    assert _jobs(state, "9.1") == {"research": "running"}  # the run goes on (its chunk)
    if end == "finished":
        assert state.finish_job(job, None, 3, 1.0) == "held"
    elif end == "failed":
        assert state.finish_job(job, "reset by peer", 3, 1.0) == "held"
    elif end == "yielded":
        state.release_job(job)  # after a chunk, or at shutdown
    else:
        state.reset_running_jobs()  # the node crashed during the run and started again
    assert _jobs(state, "9.1") == {"research": "held"}
    if end == "failed":
        assert "delivery to research failed (attempt 1/3, held: its new generation waits for " \
            "release): reset by peer" in [e["event"] for e in state.events_since(0, "9.1")]
    assert state.claim_job("research") is None
    assert [h["study_uid"] for h in state.held_studies()] == ["9.1"]
    assert state.release_study("9.1", "frank", "the late series too") == ["research"]
    again = state.claim_job("research")
    assert again is not None and again.study_uid == "9.1"
    # a late arrival that no route holds still just runs again
    time.sleep(0.01)
    _routed(state, "9.1", ["research"], n=4)
    assert state.finish_job(again, None, 3, 1.0) == "pending"


def test_a_run_whose_node_died_is_held_not_resumed_when_a_held_generation_came(
        pg_dsn: str, tmp_path: Path) -> None:
    a = PostgresState(pg_dsn, "node-a", tmp_path / "a", lease=0.2)
    b = PostgresState(pg_dsn, "node-b", tmp_path / "b", lease=30)
    try:
        _routed(a, "10.1", ["research"], Placement(held=frozenset({"research"})))
        a.release_study("10.1", "gina", "ok")
        assert a.claim_job("research") is not None  # node a runs it, then stops renewing
        time.sleep(0.01)
        _routed(a, "10.1", ["research"], Placement(held=frozenset({"research"})), n=3)
        time.sleep(0.3)
        assert b.claim_job("research") is None  # not resumed on node b: held
        assert _jobs(b, "10.1") == {"research": "held"}
    finally:
        a.close()
        b.close()


def test_status_on_a_spool_from_before_the_priorities_says_to_start_the_router(
        tmp_path: Path) -> None:
    import sqlite3

    from dicomrouter.state.sqlite import MIGRATIONS

    state = SQLiteState(tmp_path / "state.db")
    try:
        _routed(state, "11.1", ["pacs"])
    finally:
        state.close()
    # the schema of the version before issue 26 (user_version 8: no jobs.priority)
    con = sqlite3.connect(tmp_path / "state.db")
    for column in {r[1] for r in con.execute("PRAGMA table_info(jobs)")} & {"priority",
                                                                             "released"}:
        con.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
    con.execute("PRAGMA user_version = 8")
    con.close()
    for args in (["status"], ["status", "--json"], ["status", "--study", "11.1"]):
        r = dicomrouter(*args, "--spool", str(tmp_path))
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert r.stderr.strip() == "Error: the state database is from an older version; " \
            "start the router once to upgrade it", r.stderr
        assert "Traceback" not in r.stderr + r.stdout
    SQLiteState(tmp_path / "state.db").close()  # what the router does when it starts
    con = sqlite3.connect(tmp_path / "state.db")
    assert con.execute("PRAGMA user_version").fetchone()[0] == MIGRATIONS[-1][0]
    con.close()
    r = dicomrouter("status", "--spool", str(tmp_path))
    assert r.returncode == 0 and "pacs: pending 0 of 2" in r.stdout, (r.stdout, r.stderr)
