"""``hold: true`` beside routes that become ready at other times (issue 26, item 5; the review's
findings): the study tracker places every job by *every* matching route, so a quarantine
whose route waits for a longer stable age is not bypassed by a route that is ready first; a
job created held later (a route's own stable age over, the sweep with a new routing table)
says so (the ``held`` notification, the log line); a job queued before a holding route
matched is held then; a released one is not held again. SQLite and a real PostgreSQL."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicomrouter.completion.tracker import StudyTracker
from dicomrouter.config import from_dict
from dicomrouter.spool import Spool
from dicomrouter.state import State
from dicomrouter.state.postgres import PostgresState
from dicomrouter.state.sqlite import SQLiteState

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


@pytest.fixture(params=["sqlite", "postgresql"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[State]:
    if request.param == "sqlite":
        s: State = SQLiteState(tmp_path / "spool" / "state.db")
    else:
        s = PostgresState(request.getfixturevalue("pg_dsn"), "node-a", tmp_path, lease=30)
    yield s
    s.close()


class Tracker:
    """A real StudyTracker on a state, with its clock moved by hand (the seconds since the
    study's last arrival decide which routes are ready) and its notifications kept."""

    def __init__(self, state: State, tmp_path: Path, routes: list[dict[str, Any]]) -> None:
        self.state = state
        self.offset = 0.0
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        cfg = from_dict({"stable_age": "2s", "destinations": {
            name: {"type": "dicom", "ae_title": name.upper(), "host": "127.0.0.1",
                   "port": 104 + i} for i, name in enumerate(("pacs", "research", "archive"))},
            "routes": routes}, Path("."), "test")
        self.tracker = StudyTracker(
            cfg, state, Spool(tmp_path / "spool", state), notify=lambda _d: None,
            settled=lambda _s: None, clock=lambda: time.time() + self.offset,
            events=lambda name, uid, **facts: self.events.append((name, uid, facts)))

    def held(self) -> list[dict[str, Any]]:
        return [facts for name, _uid, facts in self.events if name == "held"]


def _received(state: State, study: str, n: int = 2) -> None:
    for i in range(n):
        state.record_instance({"StudyInstanceUID": study, "SeriesInstanceUID": f"{study}.1",
                               "SOPInstanceUID": f"{study}.1.{i}", "SOPClassUID": CT,
                               "PatientID": "P1", "Modality": "CT"}, EXPLICIT,
                              f"data/{study}/{study}.1.{i}.dcm", 100, "MOD", "ROUTER")


def _jobs(state: State, study: str) -> dict[str, str]:
    return {j["destination"]: j["state"] for j in state.jobs(study_uids=[study])}


QUARANTINE = {"name": "quarantine", "hold": True, "stable_age": "600s", "to": ["research"]}


def test_a_route_ready_first_does_not_bypass_a_hold_that_waits_longer(
        state: State, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    t = Tracker(state, tmp_path, [QUARANTINE, {"name": "copies", "to": ["research"]}])
    _received(state, "1.1")
    t.offset = 5  # "copies" is ready, "quarantine" waits for its 600 s
    with caplog.at_level(logging.INFO, logger="dicomrouter"):
        t.tracker.complete("1.1")
    assert _jobs(state, "1.1") == {"research": "held"}
    assert state.claim_job("research") is None
    assert [(h["destinations"], h["routes"]) for h in t.held()] == \
        [(["research"], ["quarantine", "copies"])]
    assert "study 1.1: held for research (a route with hold: true)" in caplog.text
    t.offset = 700  # the quarantine route's own stable age is over: nothing new, still held
    t.tracker.complete_waiting("1.1")
    assert _jobs(state, "1.1") == {"research": "held"} and len(t.held()) == 1
    assert state.release_study("1.1", "hana", "checked") == ["research"]
    assert state.claim_job("research") is not None


def test_a_job_created_held_when_its_route_is_ready_later_says_held(
        state: State, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    t = Tracker(state, tmp_path, [QUARANTINE, {"name": "everything", "to": ["pacs"]}])
    _received(state, "2.1")
    t.offset = 5
    t.tracker.complete("2.1")
    assert _jobs(state, "2.1") == {"pacs": "pending"} and t.held() == []
    t.offset = 700
    with caplog.at_level(logging.INFO, logger="dicomrouter"):
        t.tracker.complete_waiting("2.1")
    assert _jobs(state, "2.1") == {"pacs": "pending", "research": "held"}
    assert [(h["destinations"], h["reason"]) for h in t.held()] == \
        [(["research"], "a route with hold: true")]
    assert "study 2.1: held for research (a route with hold: true)" in caplog.text


def test_the_sweep_holds_what_a_new_holding_route_names_and_says_so(
        state: State, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = Tracker(state, tmp_path, [{"name": "everything", "to": ["pacs", "research"]}])
    _received(state, "3.1")
    before.offset = 5
    before.tracker.complete("3.1")
    job = state.claim_job("pacs")
    assert job is not None
    state.finish_job(job, None, 3, 1.0)
    # the table now quarantines everything to all three: research's queued job is held,
    # archive's new one is created held, pacs's delivered one stays delivered
    after = Tracker(state, tmp_path, [
        {"name": "everything", "to": ["pacs", "research"]},
        {"name": "quarantine", "hold": True, "priority": "high",
         "to": ["pacs", "research", "archive"]}])
    with caplog.at_level(logging.INFO, logger="dicomrouter"):
        assert after.tracker.sweep() == 1
    assert _jobs(state, "3.1") == {"pacs": "delivered", "research": "held", "archive": "held"}
    assert [h["destinations"] for h in after.held()] == [["archive", "research"]]
    assert "study 3.1: held for archive, research (a route with hold: true)" in caplog.text
    prio = {j["destination"]: j["priority"] for j in state.jobs(study_uids=["3.1"])}
    assert prio == {"pacs": "routine", "research": "high", "archive": "high"}
    assert after.tracker.sweep() == 0 and len(after.held()) == 1  # said once


def test_a_released_job_is_not_held_again_by_a_route_ready_later(
        state: State, tmp_path: Path) -> None:
    t = Tracker(state, tmp_path, [
        {"name": "quarantine", "hold": True, "to": ["research"]},
        {"name": "late copies", "stable_age": "600s", "to": ["research"]}])
    _received(state, "4.1")
    t.offset = 5
    t.tracker.complete("4.1")
    assert _jobs(state, "4.1") == {"research": "held"}
    assert state.release_study("4.1", "ines", "consent checked") == ["research"]
    t.offset = 700
    t.tracker.complete_waiting("4.1")
    assert _jobs(state, "4.1") == {"research": "pending"} and len(t.held()) == 1
    job = state.claim_job("research")
    assert job is not None and job.study_uid == "4.1"
