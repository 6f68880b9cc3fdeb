"""Delivery windows: the window arithmetic, its configuration errors, and a real router (in
this process, with an injected clock) holding a study until the window opens."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
from peers import run_storescu, wait_until
from router_fixtures import dicomrouter, tags_of

from dicomrouter.config import ConfigError, from_dict
from dicomrouter.sample import generate
from dicomrouter.schedule import parse_window
from dicomrouter_bench.procs import free_port


def utc(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


@pytest.mark.parametrize(("between", "days", "at", "is_open", "opens"), [
    ("20:00-06:00", ["fri"], "2026-11-27T19:59", False, "2026-11-27T20:00"),  # a Friday
    ("20:00-06:00", ["fri"], "2026-11-27T23:30", True, "2026-11-27T23:30"),
    ("20:00-06:00", ["fri"], "2026-11-28T05:59", True, "2026-11-28T05:59"),  # Fri's window
    ("20:00-06:00", ["fri"], "2026-11-28T06:00", False, "2026-12-04T20:00"),
    ("08:00-17:30", None, "2026-11-24T17:30", False, "2026-11-25T08:00"),
    ("08:00-17:30", None, "2026-11-24T12:00", True, "2026-11-24T12:00"),
    ("08:00-17:30", ["sat", "sunday"], "2026-11-24T12:00", False, "2026-11-28T08:00"),
])
def test_window_arithmetic(between: str, days: list[str] | None, at: str, is_open: bool,
                           opens: str) -> None:
    w = parse_window(between, days, "UTC")
    assert w is not None
    assert w.is_open(utc(at)) is is_open
    assert w.next_open(utc(at)) == utc(opens)


@pytest.mark.parametrize(("keys", "message"), [
    ({"deliver_between": "25:00-06:00"}, "destinations.a.deliver_between: expected HH:MM-HH:MM"),
    ({"deliver_between": "20:00-20:00"}, "destinations.a.deliver_between: start and end"),
    ({"deliver_between": "20:00-06:00", "days": ["funday"]},
     "destinations.a.days[0]: 'funday' is not one of mon"),
    ({"days": ["mon"]}, "destinations.a.days: needs deliver_between"),
    ({"deliver_between": "20:00-06:00", "timezone": "Mars/Olympus"},
     "destinations.a.timezone: unknown time zone"),
])
def test_window_config_errors(tmp_path: Path, keys: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"destinations": {"a": {"type": "folder", "path": "x", **keys}}}, tmp_path, "t")
    assert str(err.value).startswith(message), str(err.value)


class FakeClock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def test_a_study_waits_for_its_window_and_moving_the_clock_releases_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from dicomrouter.app import Router

    # a one-hour window that opens two hours from now (UTC), whatever the time is
    opens = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    closes = opens + dt.timedelta(hours=1)
    port = free_port()
    raw = {"port": port, "bind": "127.0.0.1", "stable_age": "1s", "web": {"enabled": False},
           "spool": str(tmp_path / "spool"),
           "destinations": {"night": {"type": "folder", "path": str(tmp_path / "out"),
                                      "deliver_between": f"{opens:%H:%M}-{closes:%H:%M}",
                                      "timezone": "UTC"}},
           "routes": [{"to": "night"}]}
    cfg_file = tmp_path / "r.yml"
    import yaml

    cfg_file.write_text(yaml.safe_dump(raw))
    caplog.set_level("INFO", logger="dicomrouter.delivery")
    clock = FakeClock()
    router = Router(from_dict(raw, tmp_path, str(cfg_file)), clock=clock)
    router.start()
    try:
        study = generate(tmp_path / "study", series=1, instances=2, rows=8, cols=8, seed=131)
        uid = tags_of(study[0], "StudyInstanceUID")[0]
        assert run_storescu(study, port).returncode == 0
        wait_until(lambda: (s := router.state.study(uid)) is not None and s.state == "routed",
                   timeout=60, what="the study routed")
        r = dicomrouter("status", "--config", str(cfg_file))
        assert "scheduled until" in r.stdout, r.stdout
        # the worker saw the due job and the closed window (its log line), and did not claim it
        wait_until(lambda: "outside its delivery window" in caplog.text, timeout=30,
                   what="the worker's decision to wait")
        assert router.state.jobs(study_uids=[uid])[0]["state"] == "pending"
        assert not list((tmp_path / "out").rglob("*.dcm"))
        clock.offset = (opens - dt.datetime.now(dt.UTC)).total_seconds() + 60
        router.workers.notify(["night"])
        wait_until(lambda: len(list((tmp_path / "out").rglob("*.dcm"))) == 2, timeout=60,
                   what="delivery once the window opened")
    finally:
        router.stop()


def test_a_route_window_holds_only_that_routes_jobs(tmp_path: Path) -> None:
    from dicomrouter.app import Router

    opens = dt.datetime.now(dt.UTC) + dt.timedelta(hours=3)
    closes = opens + dt.timedelta(hours=1)
    port = free_port()
    raw = {"port": port, "bind": "127.0.0.1", "stable_age": "1s", "web": {"enabled": False},
           "spool": str(tmp_path / "spool"),
           "destinations": {"now": {"type": "folder", "path": str(tmp_path / "now")},
                            "night": {"type": "folder", "path": str(tmp_path / "night")}},
           "routes": [{"name": "at once", "to": "now"},
                      {"name": "off-peak", "to": "night", "timezone": "UTC",
                       "deliver_between": f"{opens:%H:%M}-{closes:%H:%M}"}]}
    import yaml

    cfg_file = tmp_path / "r.yml"
    cfg_file.write_text(yaml.safe_dump(raw))
    clock = FakeClock()
    router = Router(from_dict(raw, tmp_path, str(cfg_file)), clock=clock)
    router.start()
    try:
        study = generate(tmp_path / "study", series=1, instances=2, rows=8, cols=8, seed=132)
        uid = tags_of(study[0], "StudyInstanceUID")[0]
        assert run_storescu(study, port).returncode == 0
        wait_until(lambda: len(list((tmp_path / "now").rglob("*.dcm"))) == 2, timeout=60,
                   what="the unscheduled route's delivery")
        jobs = {j["destination"]: j for j in router.state.jobs(study_uids=[uid])}
        assert jobs["night"]["state"] == "pending" and jobs["night"]["next_attempt"] > time.time()
        r = dicomrouter("status", "--config", str(cfg_file))
        assert "1 scheduled, the first until" in r.stdout, r.stdout
        clock.offset = (opens - dt.datetime.now(dt.UTC)).total_seconds() + 60
        router.workers.notify(["night"])
        wait_until(lambda: len(list((tmp_path / "night").rglob("*.dcm"))) == 2, timeout=60,
                   what="the off-peak route's delivery once its window opened")
        assert any("scheduled for" in e for _, e in router.state.history(uid))
    finally:
        router.stop()
