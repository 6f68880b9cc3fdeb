"""The MPPS part of the state (issue 27 item 4) on both backends: SQLite and a real
PostgreSQL (Debian's package, started by the test, as in test_state_postgres.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dicomrouter.config import ConfigError, from_dict
from dicomrouter.state import Mpps, State
from dicomrouter.state.postgres import MIGRATIONS as POSTGRES_MIGRATIONS
from dicomrouter.state.sqlite import MIGRATIONS as SQLITE_MIGRATIONS

CT = "1.2.840.10008.5.1.4.1.1.2"
MPPS = "1.2.840.10008.3.1.2.3.3"


def _record(state: State, study: str, sop: str) -> None:
    state.record_instance({"StudyInstanceUID": study, "SeriesInstanceUID": study + ".1",
                           "SOPInstanceUID": sop, "SOPClassUID": CT, "PatientID": "P1"},
                          "1.2.840.10008.1.2.1", f"data/{study}/{sop}.dcm", 10, "MOD", "ROUTER")


def _step(uid: str, status: str = "IN PROGRESS", listed: tuple[str, ...] = ()) -> Mpps:
    now = time.time()
    return Mpps(uid, status, "MOD", now, now, ("1.2.3",), listed, f"data of {uid} {status}")


def test_steps_are_kept_once_and_end_once(state: State) -> None:
    assert state.mpps_create(_step("9.1"), ["ris"], "MPPS 9.1 IN PROGRESS")
    assert not state.mpps_create(_step("9.1"), ["ris"], "again")  # duplicate
    assert state.mpps("9.1").status == "IN PROGRESS"  # type: ignore[union-attr]
    assert state.mpps("9.404") is None
    done = _step("9.1", "COMPLETED", ("1.2.3.1", "1.2.3.2"))
    assert state.mpps_set(done, "the N-SET", ["ris"], "MPPS 9.1 COMPLETED")
    assert not state.mpps_set(done, "again", ["ris"], "no")  # no longer IN PROGRESS
    assert [m.uid for m in state.mpps_open()] == ["9.1"]
    assert [m.listed for m in state.mpps_for_study("1.2.3")] == [("1.2.3.1", "1.2.3.2")]
    _record(state, "1.2.3", "1.2.3.1")
    assert state.arrived_in(["1.2.3.1", "1.2.3.2"]) == {"1.2.3.1": "1.2.3"}
    assert [str(r) for r in state.mpps_reports("1.2.3")] == ["MPPS 9.1 COMPLETED: 1/2 instances"]
    state.flag_incomplete("1.2.3", "1 missing")
    state.mpps_resolve("9.1", "incomplete", {"1.2.3": "decided"})
    assert state.mpps_open() == []
    assert [m.outcome for m in state.mpps_open(incomplete_since=0)] == ["incomplete"]
    assert state.study_rows(study_uid="1.2.3")[0]["incomplete"] == "1 missing"
    assert [str(r) for r in state.mpps_reports("1.2.3")] == \
        ["MPPS 9.1 COMPLETED: 1/2 instances (flagged incomplete)"]
    events = [e for _ts, e in state.history("1.2.3")]
    assert events[0] == "MPPS 9.1 IN PROGRESS" and "MPPS 9.1 COMPLETED" in events
    assert "flagged incomplete: 1 missing" in events and events[-1] == "decided"


def test_the_outbox_keeps_order_per_peer(state: State) -> None:
    state.mpps_create(_step("9.2"), ["ris", "pacs"], "created")
    state.mpps_set(_step("9.2", "COMPLETED"), "set", ["ris", "pacs"], "completed")
    state.outbox_add(["ian"], "N-CREATE", "1.2.840.10008.5.1.4.33", "9.3", "ian", "IAN", "1.2.3")
    now = time.time()
    assert sorted(state.outbox_destinations(now)) == ["ian", "pacs", "ris"]
    first = state.outbox_next("ris")
    assert first is not None and (first.operation, first.sop_class, first.dataset) == \
        ("N-CREATE", MPPS, "data of 9.2 IN PROGRESS")
    state.outbox_retry(first.id, "down", now + 60)  # the head waits: so does the rest
    assert sorted(state.outbox_destinations(now)) == ["ian", "pacs"]
    again = state.outbox_next("ris")
    assert again is not None and again.id == first.id and again.attempts == 1
    assert sorted(state.outbox_destinations(now + 61)) == ["ian", "pacs", "ris"]
    state.outbox_done(first.id, "sent")
    second = state.outbox_next("ris")
    assert second is not None and (second.operation, second.dataset) == ("N-SET", "set")
    state.outbox_done(second.id, "refused", "0x0110")
    assert state.outbox_next("ris") is None
    assert state.outbox_counts() == {"ris": {"sent": 1, "refused": 1}, "pacs": {"pending": 2},
                                     "ian": {"pending": 1}}
    rows = state.outbox_rows(10)
    assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), reverse=True)
    assert "IAN queued for ian" in [e for _ts, e in state.history("1.2.3")]


def test_migration_versions() -> None:
    assert 15 in [v for v, _ in SQLITE_MIGRATIONS]
    assert 14 in [v for v, _ in POSTGRES_MIGRATIONS]


@pytest.mark.parametrize(("config", "error"), [
    ({"forward_mpps": ["RIS"]}, "forward_mpps: unknown peer 'RIS': a known_aes AE title or a "
                                "destination of type dicom"),
    ({"ian": ["out"], "destinations": {"out": {"type": "folder", "path": "out"}}},
     "ian: unknown peer 'out'"),
    ({"ian": [3]}, "ian[0]: expected a peer name, got 3"),
    ({"mpps": False, "forward_mpps": ["RIS"], "known_aes": {"RIS": {"host": "h", "port": 1}}},
     "forward_mpps: needs 'mpps: true'"),
    ({"mpps_timeout": "0s"}, "mpps_timeout: must be more than 0"),
    ({"mpps": "sometimes"}, "mpps: expected true or false"),
])
def test_config_names_the_key(tmp_path: Path, config: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError) as exc:
        from_dict(config, tmp_path, "test")
    assert str(exc.value).startswith(error), str(exc.value)


def test_config_accepts_known_aes_and_dicom_destinations(tmp_path: Path) -> None:
    cfg = from_dict({"forward_mpps": ["RIS", "pacs"], "ian": ["pacs"], "mpps_timeout": "5m",
                     "known_aes": {"RIS": {"host": "ris", "port": 104}},
                     "destinations": {"pacs": {"type": "dicom", "ae_title": "PACS",
                                               "host": "pacs", "port": 104}}},
                    tmp_path, "test")
    assert (cfg.mpps, cfg.forward_mpps, cfg.ian, cfg.mpps_timeout) == \
        (True, ("RIS", "pacs"), ("pacs",), 300.0)
