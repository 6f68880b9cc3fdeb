"""Notifications (issue 26, item 7), end to end: the router as a subprocess receives real DICOM
from DCMTK storescu, delivers to DCMTK storescp, and notifies a real local HTTP server
(``webhook_server.py``). The events arrive with their fields and, by default, without PHI; a
template that asks for the PatientID gets it; a receiver that fails is retried; one that hangs
delays no delivery; a full queue drops with one log line and a metric."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from peers import StoreSCP, free_port, run_storescu, wait_until
from pydicom import dcmread
from router_fixtures import Router, tags_of
from test_cluster import cluster_env, nodes  # noqa: F401 - the cluster's fixtures
from webhook_server import WebhookServer

from dicomrouter.config import ConfigError, from_dict
from dicomrouter.sample import generate

PATIENT_ID = "PHI-ID-4711"
FAST_RETRY = {"initial": "200ms", "max_delay": "1s", "max_attempts": 5}


def _study(tmp_path: Path, seed: int, instances: int = 2) -> tuple[list[Path], dict[str, str]]:
    files = generate(tmp_path / f"study{seed}", series=1, instances=instances, rows=16, cols=16,
                     seed=seed, patient_id=PATIENT_ID)
    keys = ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate",
            "AccessionNumber", "StudyDescription")
    return files, dict(zip(keys, tags_of(files[0], *keys), strict=True))


def _router(tmp_path: Path, scp: StoreSCP, notifications: list[dict[str, Any]],
            **extra: Any) -> Router:
    return Router(tmp_path / "router", {
        "destinations": {"pacs": {"type": "dicom", "ae_title": scp.aet, "host": "127.0.0.1",
                                  "port": scp.port}},
        "routes": [{"name": "all", "to": "pacs"}],
        "web": {"enabled": True, "port": free_port()},
        "notifications": notifications, **extra})


@contextlib.contextmanager
def _set_env(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> Iterator[None]:
    """An environment variable set for the router started inside (its secrets)."""
    monkeypatch.setenv(name, value)
    yield


def _metrics(router: Router) -> str:
    port = router.config["web"]["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        return str(r.read().decode())


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line
                                                for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.usefixtures("dcmtk_available")
def test_events_arrive_with_their_fields_and_no_phi(tmp_path: Path, storescp: StoreSCP) -> None:
    files, tags = _study(tmp_path, 301, instances=12)  # one received, not one per instance
    uid = tags["StudyInstanceUID"]
    with WebhookServer() as hook, _router(tmp_path, storescp, [
            {"name": "ops", "url": hook.url,
             "events": ["received", "completed", "routed", "delivered"]}]) as router:
        assert run_storescu(files, router.port).returncode == 0
        router.wait_state(uid, "delivered")
        wait_until(lambda: hook.events("delivered"), timeout=60, what="the delivered event")
        names = [e["event"] for e in hook.events()]
        assert names == ["received", "completed", "routed", "delivered"], names
        received, completed, routed, delivered = hook.events()
        for e in hook.events():
            assert e["study_instance_uid"] == uid
            assert e["router"] == {"ae_title": "DICOMROUTER", "node": e["router"]["node"]}
            assert e["time"].endswith("Z") and abs(e["timestamp"] - time.time()) < 300
        assert received["calling_ae"] == "STORESCU" and received["generation"] == 1
        assert 1 <= received["instances"] <= len(files)
        assert completed["instances"] == len(files) and completed["destinations"] == ["pacs"]
        assert completed["routes"] == ["all"] and routed["destinations"] == ["pacs"]
        assert delivered["destination"] == "pacs" and delivered["routes"] == ["all"]
        assert delivered["instances"] == len(files) == delivered["instances_in_study"]
        assert delivered["attempt"] == 1 and delivered["study_state"] in ("routed", "delivered")
        assert storescp.sop_uids() == {tags_of(f, "SOPInstanceUID")[0] for f in files}
        # no PHI by default, anywhere in what was sent
        raw = b"".join(r.body for r in hook.requests).decode()
        for key in ("PatientID", "PatientName", "PatientBirthDate", "AccessionNumber",
                    "StudyDescription"):
            assert tags[key] and tags[key] not in raw, f"{key} {tags[key]!r} leaked: {raw}"
        assert all(r.headers["Content-Type"] == "application/json" for r in hook.requests)
        text = _metrics(router)
        assert _metric(text, "dicomrouter_notifications_sent_total", notification="ops") == 4
        assert _metric(text, "dicomrouter_notifications_failed_total") == 0
        # once per study arrival: a late arrival reopening the study is a new one
        late = generate(tmp_path / "late", series=1, instances=1, rows=16, cols=16, seed=302)
        ds = dcmread(late[0])
        ds.StudyInstanceUID = uid
        ds.PatientID = PATIENT_ID
        ds.save_as(late[0])
        assert run_storescu(late, router.port).returncode == 0
        wait_until(lambda: len(hook.events("delivered")) == 2, timeout=60,
                   what="the late arrival's delivery")
        again = hook.events("received")
        assert len(again) == 2 and again[1]["generation"] == 2, again


@pytest.mark.usefixtures("dcmtk_available")
def test_a_template_that_asks_for_the_patient_id_gets_it(tmp_path: Path, storescp: StoreSCP,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_SECRET", "s3cret-value")
    files, tags = _study(tmp_path, 303)
    secret_path = "/hooks/T0KEN-IN-THE-PATH"
    template = ('{"what": "{{ event }}", "to": "{{ destination }}", '
                '"patient": {{ study.PatientID | tojson }}, "n": {{ instances }}, '
                '"all": {{ payload | tojson }}}')
    with WebhookServer() as hook, _set_env(monkeypatch, "HOOK_URL",
                                           hook.url.replace("/hook", secret_path)), \
            _router(tmp_path, storescp, [
            {"url_env": "HOOK_URL", "events": ["delivered"], "template": template,
             "headers": {"X-Hook-Token": {"value_env": "HOOK_SECRET"},
                         "X-Source": "router-test"}}]) as router:
        assert run_storescu(files, router.port).returncode == 0
        (body,) = wait_until(lambda: hook.events() or None, timeout=90, what="the notification")
        assert body["what"] == "delivered" and body["to"] == "pacs"
        assert body["patient"] == PATIENT_ID and body["n"] == len(files)
        assert body["all"]["study_instance_uid"] == tags["StudyInstanceUID"]
        (req,) = hook.requests
        assert req.path == secret_path
        assert req.headers["X-Hook-Token"] == "s3cret-value"
        assert req.headers["X-Source"] == "router-test"
        log = router.log(20000)
        assert "s3cret-value" not in log and "T0KEN" not in log, log
        assert f"notification #1: http://127.0.0.1:{hook.port} on delivered" in log


@pytest.mark.usefixtures("dcmtk_available")
def test_a_receiver_that_fails_twice_gets_it_on_the_third_attempt(tmp_path: Path,
                                                                   storescp: StoreSCP) -> None:
    files, tags = _study(tmp_path, 304)
    with WebhookServer(fail_first=2, fail_status=503) as hook, _router(tmp_path, storescp, [
            {"name": "flaky", "url": hook.url, "events": ["delivered"],
             "retry": FAST_RETRY}]) as router:
        assert run_storescu(files, router.port).returncode == 0
        wait_until(lambda: hook.events(), timeout=90, what="the retried notification")
        assert len(hook.requests) == 3
        assert hook.requests[0].body == hook.requests[2].body  # the same notification
        gaps = [b.at - a.at for a, b in zip(hook.requests, hook.requests[1:], strict=False)]
        assert gaps[0] >= 0.15 and gaps[1] >= 0.35, gaps  # backoff: 0.2 s, then 0.4 s
        assert hook.events()[0]["study_instance_uid"] == tags["StudyInstanceUID"]
        text = _metrics(router)
        assert _metric(text, "dicomrouter_notifications_sent_total", notification="flaky") == 1
        assert _metric(text, "dicomrouter_notifications_failed_total") == 0
        log = router.log(20000)
        assert log.count("attempt 1/5 failed") == 1 and "HTTP 503" in log
        assert "accepts notifications again" in log


@pytest.mark.usefixtures("dcmtk_available")
def test_a_receiver_that_refuses_is_not_retried(tmp_path: Path, storescp: StoreSCP) -> None:
    files, _tags = _study(tmp_path, 305)
    with WebhookServer(fail_first=100, fail_status=404) as hook, _router(tmp_path, storescp, [
            {"name": "gone", "url": hook.url, "events": ["delivered"],
             "retry": FAST_RETRY}]) as router:
        assert run_storescu(files, router.port).returncode == 0
        wait_until(lambda: "not retried: HTTP 404" in router.log(20000), timeout=90,
                   what="the refusal logged")
        time.sleep(1.0)  # what a retry would take (0.2 s): there is none
        assert len(hook.requests) == 1
        assert _metric(_metrics(router), "dicomrouter_notifications_failed_total",
                       notification="gone", event="delivered") == 1


@pytest.mark.usefixtures("dcmtk_available")
def test_a_hanging_receiver_delays_no_delivery_and_a_full_queue_drops(
        tmp_path: Path, storescp: StoreSCP) -> None:
    studies = [_study(tmp_path, 310 + i, instances=1) for i in range(5)]
    with WebhookServer(hang=True) as stuck, WebhookServer() as healthy, \
            _router(tmp_path, storescp, [
                {"name": "stuck", "url": stuck.url, "events": ["routed", "delivered"],
                 "timeout": "5m", "queue_size": 3},
                {"name": "healthy", "url": healthy.url, "events": ["delivered"]}]) as router:
        files, tags = studies[0]
        assert run_storescu(files, router.port).returncode == 0
        wait_until(lambda: stuck.hanging, timeout=60, what="the webhook to hang")
        started = time.monotonic()
        for files, _tags in studies[1:]:
            assert run_storescu(files, router.port).returncode == 0
        for _files, tags in studies:
            router.wait_state(tags["StudyInstanceUID"], "delivered", timeout=60)
        took = time.monotonic() - started
        # every study delivered while the first notification is still stuck
        assert stuck.hanging == 1 and len(stuck.requests) == 1, took
        assert len(storescp.sop_uids()) == len(studies)
        # the other notification is not held up by it
        wait_until(lambda: len(healthy.events("delivered")) == len(studies), timeout=60,
                   what="the healthy webhook's notifications")
        # stuck: 1 being attempted + 2 queued; of the 10 events the other 7 were dropped
        text = _metrics(router)
        assert _metric(text, "dicomrouter_notifications_dropped_total",
                       notification="stuck") == 2 * len(studies) - 3
        assert _metric(text, "dicomrouter_notifications_dropped_total",
                       notification="healthy") == 0
        assert router.log(50000).count("notification stuck: queue full") == 1
        assert _metric(text, "dicomrouter_notifications_queued", notification="stuck") == 3
        stuck.release.set()
        wait_until(lambda: len(stuck.answered) == 3, timeout=60, what="the queue to drain")


@pytest.mark.usefixtures("dcmtk_available")
def test_failed_and_dead_carry_the_error(tmp_path: Path, storescp: StoreSCP) -> None:
    files, tags = _study(tmp_path, 320, instances=1)
    down = free_port()
    with WebhookServer() as hook, Router(tmp_path / "router", {
        "destinations": {
            "down": {"type": "dicom", "ae_title": "NOBODY", "host": "127.0.0.1", "port": down,
                     "retry": {"initial": "500ms", "max_attempts": 2}},
            "pacs": {"type": "dicom", "ae_title": storescp.aet, "host": "127.0.0.1",
                     "port": storescp.port}},
        "routes": [{"name": "both", "to": ["down", "pacs"]}],
        # only the events about "down"
        "notifications": [{"url": hook.url, "events": ["failed", "dead", "delivered"],
                           "destinations": ["down"]}]}) as router:
        assert run_storescu(files, router.port).returncode == 0
        wait_until(lambda: hook.events("dead"), timeout=90, what="the dead event")
        assert [e["event"] for e in hook.events()] == ["failed", "dead"]
        failed, dead = hook.events()
        for e in (failed, dead):
            assert e["destination"] == "down" and e["routes"] == ["both"]
            assert e["study_instance_uid"] == tags["StudyInstanceUID"]
            assert e["max_attempts"] == 2 and str(down) in e["error"], e
        assert failed["attempt"] == 1
        retry_at = datetime.fromisoformat(failed["next_attempt"].replace("Z", "+00:00"))
        assert 0.4 <= retry_at.timestamp() - failed["timestamp"] <= 0.6, failed  # initial
        assert dead["attempt"] == 2 and dead["study_state"] == "failed"
        assert len(storescp.sop_uids()) == 1  # delivered to pacs: not this notification's


@pytest.mark.usefixtures("dcmtk_available")
def test_held_by_force_complete_hold(tmp_path: Path, storescp: StoreSCP) -> None:
    files, tags = _study(tmp_path, 330, instances=1)
    with WebhookServer() as hook, _router(tmp_path, storescp, [
            {"url": hook.url, "events": ["held", "completed"]}],
            stable_age="10m", force_complete_after="2s", force_complete="hold") as router:
        assert run_storescu(files, router.port).returncode == 0
        (held,) = wait_until(lambda: hook.events("held"), timeout=60, what="the held event")
        assert held["study_instance_uid"] == tags["StudyInstanceUID"]
        assert "force_complete: hold" in held["reason"] and held["destinations"] == ["pacs"]
        assert not hook.events("completed")
        raw = json.dumps(held)
        assert PATIENT_ID not in raw


def test_held_by_a_route_with_hold(tmp_path: Path, storescp: StoreSCP) -> None:
    files, tags = _study(tmp_path, 331, instances=1)
    with WebhookServer() as hook, _router(tmp_path, storescp, [
            {"url": hook.url, "events": ["held", "delivered"]}],
            routes=[{"name": "quarantine", "to": "pacs", "hold": True}],
            stable_age="1s") as router:
        assert run_storescu(files, router.port).returncode == 0
        (held,) = wait_until(lambda: hook.events("held"), timeout=60, what="the held event")
        assert held["study_instance_uid"] == tags["StudyInstanceUID"]
        assert "hold: true" in held["reason"] and held["destinations"] == ["pacs"]
        assert held["routes"] == ["quarantine"] and PATIENT_ID not in json.dumps(held)
        assert not hook.events("delivered") and storescp.count() == 0


def _config(notification: dict[str, Any]) -> Any:
    return from_dict({"destinations": {"pacs": {"type": "folder", "path": "/tmp/x"}},
                      "routes": [{"name": "r", "to": "pacs"}],
                      "notifications": [notification]}, Path("."), "test")


@pytest.mark.parametrize(("entry", "key", "words"), [
    ({"url": "http://h/", "events": ["delivred"]}, "notifications[0].events", "unknown event"),
    ({"url": "http://h/", "events": []}, "notifications[0].events", "list of events"),
    ({"events": ["dead"]}, "notifications[0].url", "give one of url, url_env, url_file"),
    ({"url": "http://h/", "url_env": "HOME", "events": ["dead"]}, "notifications[0].url_env",
     "give one of"),
    ({"url": "http://h/", "smtp": {"host": "h", "sender": "a@b", "to": ["c@d"]},
      "events": ["dead"]}, "notifications[0].url", "or smtp"),
    ({"url_env": "HOME", "events": ["dead"]}, "notifications[0].url_env",
     "expected an http:// or https:// URL"),
    ({"url": "ftp://h/", "events": ["dead"]}, "notifications[0].url", "http://"),
    ({"url": "http://h/", "events": ["dead"], "template": "{{ x"},
     "notifications[0].template", "template error on line 1"),
    ({"url": "http://h/", "events": ["dead"], "destinations": ["nope"]},
     "notifications[0].destinations", "unknown destination 'nope'"),
    ({"url": "http://h/", "events": ["dead"], "routes": ["nope"]},
     "notifications[0].routes", "unknown route 'nope'"),
    ({"url": "http://h/", "events": ["dead"], "headers": {"A": {"value_env": "UNSET_X_42"}}},
     "notifications[0].headers.A.value_env", "UNSET_X_42 is not set"),
    ({"url": "http://h/", "events": ["dead"], "headers": {"A": {}}},
     "notifications[0].headers.A.value", "exactly one"),
    ({"url": "http://h/", "events": ["dead"], "queue_size": 0},
     "notifications[0].queue_size", ""),
    ({"url": "http://h/", "events": ["dead"], "timeout": "0s"},
     "notifications[0].timeout", "more than 0"),
    ({"smtp": {"host": "h", "sender": "a@b", "to": ["c@d"], "username": "u"},
      "events": ["dead"]}, "notifications[0].smtp.username", "password_env"),
])
def test_invalid_notifications_name_the_key(entry: dict[str, Any], key: str,
                                            words: str) -> None:
    with pytest.raises(ConfigError) as err:
        _config(entry)
    assert err.value.key == key and words in err.value.problem, err.value


@pytest.mark.usefixtures("dcmtk_available")
def test_an_email_on_dead(tmp_path: Path, storescp: StoreSCP) -> None:
    """Against a real SMTP server (aiosmtpd) on a free port: the mail has the rendered
    subject, the recipients, and the JSON payload as its text without PHI."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Message

    mails: list[Any] = []

    class Keep(Message):
        def handle_message(self, message: Any) -> None:
            mails.append(message)

    files, tags = _study(tmp_path, 340, instances=1)
    port = free_port()
    smtpd = Controller(Keep(), hostname="127.0.0.1", port=port)
    smtpd.start()
    try:
        with Router(tmp_path / "router", {
            "destinations": {"down": {"type": "dicom", "ae_title": "NOBODY",
                                      "host": "127.0.0.1", "port": free_port(),
                                      "retry": {"max_attempts": 1}}},
            "routes": [{"to": "down"}],
            "notifications": [{"name": "mail", "events": ["dead"],
                               "smtp": {"host": "127.0.0.1", "port": port,
                                        "sender": "router@example.org",
                                        "to": ["pacs-admin@example.org", "oncall@example.org"],
                                        "subject": "{{ destination }}: {{ event }}"}}],
        }) as router:
            assert run_storescu(files, router.port).returncode == 0
            (mail,) = wait_until(lambda: mails or None, timeout=90, what="the e-mail")
            assert mail["Subject"] == "down: dead"
            assert mail["From"] == "router@example.org"
            assert mail["To"] == "pacs-admin@example.org, oncall@example.org"
            body = json.loads(mail.get_payload(decode=True))
            assert body["event"] == "dead" and body["destination"] == "down"
            assert body["study_instance_uid"] == tags["StudyInstanceUID"]
            assert PATIENT_ID not in mail.as_string()
            assert "notification mail: smtp://127.0.0.1" in router.log(20000)
    finally:
        smtpd.stop()


@pytest.mark.usefixtures("dcmtk_available")
def test_two_nodes_notify_each_event_once(tmp_path: Path, storescp: StoreSCP,
                                          nodes: Any) -> None:  # noqa: F811
    """Two routers on one PostgreSQL and S3 spool, a study split over both: one ``received``
    (one node announces it), one ``completed``, ``routed``, ``delivered``."""
    study = generate(tmp_path / "study", series=2, instances=3, rows=16, cols=16, seed=350,
                     patient_id=PATIENT_ID)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    by_series: dict[str, list[Path]] = {}
    for f in study:
        by_series.setdefault(tags_of(f, "SeriesInstanceUID")[0], []).append(f)
    with WebhookServer() as hook:
        routers = nodes(2, None, destinations={
            "pacs": {"type": "dicom", "ae_title": storescp.aet, "host": "127.0.0.1",
                     "port": storescp.port}}, routes=[{"name": "all", "to": "pacs"}],
            notifications=[{"url": hook.url, "events": ["received", "completed", "routed",
                                                        "delivered"]}])
        for router, files in zip(routers, by_series.values(), strict=True):
            assert run_storescu(files, router.port).returncode == 0
        routers[0].wait_state(uid, "delivered", timeout=120)
        wait_until(lambda: hook.events("delivered"), timeout=60, what="the delivered event")
        time.sleep(2.0)  # a duplicate from the other node would come within a poll or two
        assert sorted(e["event"] for e in hook.events()) == \
            ["completed", "delivered", "received", "routed"], hook.events()
        assert {e["router"]["node"] for e in hook.events()} <= {"node1", "node2"}
        assert len(storescp.sop_uids()) == len(study)


@pytest.mark.usefixtures("dcmtk_available")
def test_a_template_cannot_leave_its_sandbox(tmp_path: Path, storescp: StoreSCP) -> None:
    """A template reaching for Python internals fails to render (logged, counted as failed),
    the other notifications and the delivery go on."""
    files, tags = _study(tmp_path, 360, instances=1)
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with WebhookServer() as hook, _router(tmp_path, storescp, [
            {"name": "evil", "url": hook.url, "events": ["delivered"], "template": evil},
            {"name": "plain", "url": hook.url, "events": ["delivered"],
             "template": "{{ event }} {{ study.NoSuchKeyword }}|{{ destination }}"}]) as router:
        assert run_storescu(files, router.port).returncode == 0
        wait_until(lambda: hook.answered, timeout=60, what="the plain notification")
        wait_until(lambda: "template error" in router.log(20000), timeout=30,
                   what="the evil template's failure")
        assert [r.body for r in hook.requests] == [b"delivered |pacs"]
        log = router.log(20000)
        assert "notification evil: delivered event of study " + tags["StudyInstanceUID"] + \
            " not sent: template error (SecurityError" in log, log
        assert "Traceback" not in log
        text = _metrics(router)
        assert _metric(text, "dicomrouter_notifications_failed_total", notification="evil") == 1
        assert _metric(text, "dicomrouter_notifications_sent_total", notification="plain") == 1
        router.wait_state(tags["StudyInstanceUID"], "delivered")


@pytest.mark.usefixtures("dcmtk_available")
def test_received_is_not_announced_again_after_a_restart(tmp_path: Path,
                                                        storescp: StoreSCP) -> None:
    """At most once: a study still receiving when the router restarts was announced by the
    run before; a new study after the restart is announced."""
    first, tags = _study(tmp_path, 370, instances=1)
    second, tags2 = _study(tmp_path, 371, instances=1)
    with WebhookServer() as hook:
        for run, files in enumerate((first, second), start=1):
            with _router(tmp_path, storescp, [{"url": hook.url, "events": ["received"]}],
                         stable_age="10m") as router:
                assert run_storescu(files, router.port).returncode == 0
                wait_until(lambda want=run: len(hook.events()) >= want, timeout=60,
                           what="the received event")
                time.sleep(1.0)  # several polls (0.25 s each): no second one
        assert [e["study_instance_uid"] for e in hook.events()] == \
            [tags["StudyInstanceUID"], tags2["StudyInstanceUID"]]
        assert router.study_state(tags["StudyInstanceUID"]) == "receiving"


@pytest.mark.usefixtures("dcmtk_available")
def test_a_hanging_receiver_does_not_hold_up_the_stop(tmp_path: Path,
                                                       storescp: StoreSCP) -> None:
    """What is queued at a stop is not sent, and said so; the stop does not wait for the
    receiver's timeout (5 minutes here)."""
    files, _tags = _study(tmp_path, 380, instances=1)
    with WebhookServer(hang=True) as stuck:
        router = _router(tmp_path, storescp, [
            {"name": "stuck", "url": stuck.url, "events": ["routed", "delivered"],
             "timeout": "5m"}])
        with router:
            assert run_storescu(files, router.port).returncode == 0
            wait_until(lambda: stuck.hanging and
                       "dicomrouter_notifications_queued" in _metrics(router) and
                       _metric(_metrics(router), "dicomrouter_notifications_queued",
                               notification="stuck") == 2,
                       timeout=60, what="one notification stuck and one queued behind it")
            started = time.monotonic()
            router.stop()
            took = time.monotonic() - started
        log = router.log(200)
        assert took < 20, took
        assert "notification stuck: 2 notification(s) not sent at stop" in log, log
        assert "Traceback" not in log
