"""Which studies the Processing card and ``GET /api/processing`` list (web/steps.py), on a
real SQLite state: a study whose ``process:<route>`` job is not finished (here dead, days
old) is listed; one whose job was delivered is listed for an hour, then not; a study with
only ordinary deliveries never is; each row carries the steps read from the history."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomrouter.config import from_dict
from dicomrouter.state import State
from dicomrouter.state.sqlite import SQLiteState
from dicomrouter.web.steps import processing_rows

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    s = SQLiteState(tmp_path / "state.db")
    yield s
    s.close()


def _study(state: State, uid: str, dests: list[str], patient: str) -> None:
    state.record_instance({"StudyInstanceUID": uid, "SeriesInstanceUID": f"{uid}.1",
                           "SOPInstanceUID": f"{uid}.1.1", "SOPClassUID": CT,
                           "PatientID": patient}, EXPLICIT, f"data/{uid}/1.dcm", 100, "CT1",
                          "ROUTER")
    seen = state.study(uid)
    assert seen is not None and state.route_study(uid, dests, ["ai"], seen)


def _finish(state: State, dest: str, error: str | None) -> None:
    job = state.claim_job(dest)
    assert job is not None
    if error is None:
        state.mark_sending(f"{job.study_uid}.1.1", dest, job.study_uid)
        state.mark_delivered([f"{job.study_uid}.1.1"], dest)
    state.finish_job(job, error, 1, 1.0)


def test_unfinished_listed_always_finished_for_an_hour(tmp_path: Path, state: State) -> None:
    cfg = from_dict({"destinations": {"pacs": {"type": "folder", "path": str(tmp_path / "p")}},
                     "routes": [{"name": "ai", "to": ["pacs"], "process": [
                         {"name": "seg", "command": ["true"]}]}]}, tmp_path, "test")
    _study(state, "1.29.1", ["pacs", "process:ai"], "DONE")
    _finish(state, "process:ai", None)
    _study(state, "1.29.2", ["pacs", "process:ai"], "DEAD")
    state.note("1.29.2", "processing step 'seg' (ai) running")
    state.note("1.29.2", "processing step 'seg' (ai) failed: exit code 2 after 0.1 s")
    _finish(state, "process:ai", "processing step 'seg' failed: exit code 2")
    _study(state, "1.29.3", ["pacs"], "PLAIN")
    _finish(state, "pacs", None)

    rows = {r["study_uid"]: r for r in processing_rows(state, cfg)}
    assert set(rows) == {"1.29.1", "1.29.2"}
    dead = rows["1.29.2"]
    assert dead["patient_id"] == "DEAD"
    assert [(j["destination"], j["state"]) for j in dead["jobs"]] == [("process:ai", "dead")]
    assert [(s["name"], s["kind"], s["state"], s["attempts"]) for s in dead["steps"]] == \
        [("seg", "command", "failed", 1)]
    # delivered, nothing in its history: its step is listed, pending (none ever said more)
    assert [(s["name"], s["state"]) for s in rows["1.29.1"]["steps"]] == [("seg", "pending")]
    later = processing_rows(state, cfg, now=time.time() + 2 * 3600)
    assert [r["study_uid"] for r in later] == ["1.29.2"]
