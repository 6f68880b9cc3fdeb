"""Hold and release (issue 26, item 5) against a real DCMTK storescp.

A route with ``hold: true`` (here: studies sent to the called AE title QUARANTINE) holds its
jobs even though another route names the same destination. A normal study sent beside them is
delivered; the held ones are not, for as long again as the normal one took. Released (from the
command line, and through the token-protected REST call) a held study's bytes arrive at
storescp; rejected (both ways) one never does. The audit trail records who, when and why; REST
without the token is refused and changes nothing.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from peers import StoreSCP, run_storescu, sop_uids, wait_until
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid
from router_fixtures import Router, dataset_bytes, dicomrouter

from dicomrouter.sample import generate
from dicomrouter_bench.procs import free_port


def wait_until_read(predicate: Any, **kwargs: Any) -> Any:
    """``wait_until`` over the destination's files: one storescp is still writing is not an
    error yet (it is read again at the next poll)."""
    return wait_until(predicate, ignore=(InvalidDicomError, EOFError, OSError), **kwargs)

TOKEN = "hold-t0ken"


def post(url: str, body: dict[str, Any], token: str | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, method="POST", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return str(r.read().decode())


@pytest.fixture
def token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOLD_WEB_TOKEN", TOKEN)


def _study(tmp_path: Path, name: str, seed: int) -> tuple[list[Path], str, set[str]]:
    files = generate(tmp_path / name, series=1, instances=3, rows=16, cols=16, seed=seed)
    return files, str(dcmread(files[0]).StudyInstanceUID), sop_uids(files)


@pytest.mark.usefixtures("token_env")
def test_held_studies_wait_for_release_and_a_rejected_one_never_goes(tmp_path: Path) -> None:
    normal, normal_uid, normal_sops = _study(tmp_path, "normal", 71)
    held = {name: _study(tmp_path, name, seed) for name, seed in
            (("cli_release", 72), ("rest_release", 73), ("cli_reject", 74),
             ("rest_reject", 75))}
    with StoreSCP(tmp_path / "pacs", aet="PACS") as pacs:
        router = Router(tmp_path / "router", {
            "web": {"port": free_port(), "token_env": "HOLD_WEB_TOKEN"},
            "destinations": {"pacs": {"type": "dicom", "ae_title": "PACS",
                                      "host": "127.0.0.1", "port": pacs.port}},
            "routes": [{"name": "quarantine", "when": {"CalledAE": "QUARANTINE"},
                        "hold": True, "to": ["pacs"]},
                       {"name": "everything", "to": ["pacs"]}]})
        router.start()
        base = f"http://127.0.0.1:{router.config['web']['port']}"
        config = ["--config", str(router.config_path)]
        try:
            started = time.monotonic()
            for files, _uid, _sops in held.values():
                assert run_storescu(files, router.port, aet="QUARANTINE").returncode == 0
            assert run_storescu(normal, router.port).returncode == 0
            wait_until_read(lambda: normal_sops <= sop_uids(pacs.files()), timeout=120,
                       what="the normal study delivered")
            router.wait_state(normal_uid, "delivered")
            took = time.monotonic() - started
            # as long again as the normal one took: the held ones stay where they are
            held_sops = set().union(*(sops for _f, _u, sops in held.values()))
            deadline = time.monotonic() + max(took, 3.0)
            while time.monotonic() < deadline:
                assert not held_sops & sop_uids(pacs.files()), "a held study was delivered"
                time.sleep(0.2)
            status = router.status()
            assert {h["study_uid"] for h in status["held"]} == \
                {uid for _f, uid, _s in held.values()}
            assert status["queues"]["pacs"].get("held") == 4
            text = dicomrouter("status", *config)
            assert "held (a route with hold: true" in text.stdout, text.stdout
            assert get(base + "/").count("pacs") >= 4 and held["cli_release"][1] in get(
                base + "/")
            for _f, uid, _s in held.values():
                assert router.study_state(uid) == "routed"
            assert 'dicomrouter_jobs{destination="pacs",state="held"} 4.0' in get(
                base + "/metrics")
            jobs = json.loads(get(f"{base}/api/studies/{held['cli_release'][1]}"))["jobs"]
            assert [(j["state"], j["priority"]) for j in jobs] == [("held", "routine")]

            # REST without the token (or with a wrong one) is refused and changes nothing
            rest_uid = held["rest_release"][1]
            for token in (None, "wrong"):
                code, _body = post(f"{base}/api/studies/{rest_uid}/release",
                                   {"reason": "no token"}, token)
                assert code == 401
                code, _body = post(f"{base}/api/studies/{rest_uid}/reject",
                                   {"reason": "no token"}, token)
                assert code == 401
            assert len(router.status()["held"]) == 4

            # release from the command line: the bytes arrive
            files, uid, sops = held["cli_release"]
            r = dicomrouter("release", uid, "--reason", "radiologist checked the ID",
                            *config)
            assert r.returncode == 0 and "released study" in r.stdout, r.stderr
            wait_until_read(lambda: sops <= sop_uids(pacs.files()), timeout=60,
                       what="the released study at storescp")
            got = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p
                   for p in pacs.files()}
            for f in files:
                assert dataset_bytes(got[dcmread(f).SOPInstanceUID]) == dataset_bytes(f)
            router.wait_state(uid, "delivered")
            # release through REST, with the token
            code, body = post(f"{base}/api/studies/{rest_uid}/release",
                              {"reason": "cleared by PACS admin"}, TOKEN)
            assert (code, body["released"]) == (200, ["pacs"]), body
            wait_until_read(lambda: held["rest_release"][2] <= sop_uids(pacs.files()),
                       timeout=60, what="the study released through REST at storescp")
            # reject: from the command line, and through REST
            r = dicomrouter("reject", held["cli_reject"][1], "--reason", "wrong patient",
                            *config)
            assert r.returncode == 0, r.stderr
            code, body = post(f"{base}/api/studies/{held['rest_reject'][1]}/reject",
                              {"reason": "duplicate of an earlier study"}, TOKEN)
            assert (code, body["rejected"]) == (200, ["pacs"]), body
            code, body = post(f"{base}/api/studies/{held['rest_reject'][1]}/release",
                              {"reason": "changed my mind"}, TOKEN)
            assert code == 409  # rejected stays rejected
            # a reason is required
            r = dicomrouter("release", held["cli_reject"][1], *config)
            assert r.returncode == 2 and "--reason" in r.stderr
            # the rejected ones never arrive (as long again as a delivery took), kept
            rejected = held["cli_reject"][2] | held["rest_reject"][2]
            deadline = time.monotonic() + max(took, 3.0)
            while time.monotonic() < deadline:
                assert not rejected & sop_uids(pacs.files()), "a rejected study was delivered"
                time.sleep(0.2)
            for name in ("cli_reject", "rest_reject"):
                assert router.study_state(held[name][1]) == "rejected"
            assert router.status()["held"] == []
            audit = dicomrouter("audit", *config)
            events = [json.loads(line) for line in audit.stdout.splitlines()]
            log = router.log(100_000)
        finally:
            router.stop()
    said = {e["study_uid"]: [x["event"] for x in events if x["study_uid"] == e["study_uid"]]
            for e in events}
    user = said[held["cli_release"][1]]
    assert any(e.startswith("held for pacs") for e in user)
    assert any(e.startswith("released by ") and "(command line) for pacs: radiologist "
               "checked the ID" in e for e in user), user
    assert any("rejected (not delivered) by " in e and "(command line) for pacs: wrong patient"
               in e for e in said[held["cli_reject"][1]])
    assert "released by the web token holder at 127.0.0.1 (REST) for pacs: cleared by PACS " \
           "admin" in said[rest_uid]
    assert "rejected (not delivered) by the web token holder at 127.0.0.1 (REST) for pacs: " \
           "duplicate of an earlier study" in said[held["rest_reject"][1]]
    assert not any("no token" in e for x in said.values() for e in x)
    assert all(isinstance(e["ts"], float) for e in events)
    assert f"study {rest_uid}: held for pacs (a route with hold: true)" in log
    assert "Traceback" not in log


def test_a_hold_whose_route_waits_longer_is_not_bypassed_by_a_route_ready_first(
        tmp_path: Path) -> None:
    """The quarantine route has its own, longer stable age; the route beside it, to the same
    storescp, is ready after the global one (1 s). The study is held from the first routing
    on, stays held after the quarantine route's stable age too, and arrives when released."""
    normal, normal_uid, normal_sops = _study(tmp_path, "normal", 81)
    files, uid, sops = _study(tmp_path, "held", 82)
    with StoreSCP(tmp_path / "pacs", aet="PACS") as pacs:
        router = Router(tmp_path / "router", {
            "destinations": {"pacs": {"type": "dicom", "ae_title": "PACS",
                                      "host": "127.0.0.1", "port": pacs.port}},
            "routes": [{"name": "quarantine", "when": {"CalledAE": "QUARANTINE"},
                        "hold": True, "stable_age": "6s", "to": ["pacs"]},
                       {"name": "everything", "to": ["pacs"]}]})
        router.start()
        config = ["--config", str(router.config_path)]
        try:
            started = time.monotonic()
            assert run_storescu(files, router.port, aet="QUARANTINE").returncode == 0
            assert run_storescu(normal, router.port).returncode == 0
            wait_until_read(lambda: normal_sops <= sop_uids(pacs.files()), timeout=120,
                       what="the normal study delivered")
            router.wait_state(normal_uid, "delivered")
            took = time.monotonic() - started
            wait_until(lambda: [h["study_uid"] for h in router.status()["held"]] == [uid],
                       timeout=60, what="the study held")
            # past the quarantine route's own stable age, and as long again as the normal
            # study took: nothing of the held one arrives
            deadline = started + max(6.0 + 3.0, 2 * took)
            while time.monotonic() < deadline:
                assert not sops & sop_uids(pacs.files()), "the held study was delivered"
                time.sleep(0.2)
            status = router.status()
            assert [h["study_uid"] for h in status["held"]] == [uid]
            assert status["queues"]["pacs"].get("held") == 1
            r = dicomrouter("release", uid, "--reason", "checked", *config)
            assert r.returncode == 0, r.stderr
            wait_until_read(lambda: sops <= sop_uids(pacs.files()), timeout=60,
                       what="the released study at storescp")
            router.wait_state(uid, "delivered")
            log = router.log(100_000)
        finally:
            router.stop()
    assert f"study {uid}: held for pacs (a route with hold: true)" in log
    assert "Traceback" not in log


def test_a_late_arrival_to_a_released_study_being_delivered_is_held_again(
        tmp_path: Path) -> None:
    """Released, the study goes to storescp slowly (``max_rate``); an instance arriving for it
    meanwhile is a new generation the quarantine route holds: the run in progress sends the
    released instances, and then the job is held, not pending: the late instance waits for
    its own release."""
    files, uid, sops = _study(tmp_path, "held", 91)
    files += generate(tmp_path / "more", series=1, instances=7, rows=64, cols=64, seed=91)
    ds = dcmread(files[0])
    for f in files[3:]:  # the same study (generate gives each call its own)
        more = dcmread(f)
        more.StudyInstanceUID, more.PatientID = ds.StudyInstanceUID, ds.PatientID
        more.save_as(f)
    sops = sop_uids(files)
    late = tmp_path / "late.dcm"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(late)
    with StoreSCP(tmp_path / "pacs", aet="PACS") as pacs:
        router = Router(tmp_path / "router", {
            "destinations": {"pacs": {"type": "dicom", "ae_title": "PACS", "max_rate": "8kB/s",
                                      "host": "127.0.0.1", "port": pacs.port}},
            "routes": [{"name": "quarantine", "hold": True, "to": ["pacs"]}]})
        router.start()
        config = ["--config", str(router.config_path)]
        try:
            assert run_storescu(files, router.port).returncode == 0
            wait_until(lambda: [h["study_uid"] for h in router.status()["held"]] == [uid],
                       timeout=60, what="the study held")
            r = dicomrouter("release", uid, "--reason", "checked", *config)
            assert r.returncode == 0, r.stderr
            wait_until_read(lambda: sop_uids(pacs.files()), timeout=60, what="the first instance")
            assert run_storescu([late], router.port).returncode == 0
            said = f"study {uid}: held for pacs (a route with hold: true)"
            wait_until(lambda: router.log(1_000_000).count(said) == 2, timeout=60,
                       what="the late arrival routed (held)")
            assert len(sop_uids(pacs.files())) < len(sops), \
                "the run ended before the late arrival was routed: nothing tested"
            wait_until_read(lambda: sops <= sop_uids(pacs.files()), timeout=120,
                       what="the released instances delivered")
            wait_until(lambda: router.status()["queues"]["pacs"].get("held") == 1,
                       timeout=60, what="the job held again")
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                assert ds.SOPInstanceUID not in sop_uids(pacs.files()), \
                    "the late arrival was delivered without a release"
                time.sleep(0.2)
            r = dicomrouter("release", uid, "--reason", "the late series too", *config)
            assert r.returncode == 0, r.stderr
            wait_until_read(lambda: ds.SOPInstanceUID in sop_uids(pacs.files()), timeout=60,
                       what="the late instance released")
            router.wait_state(uid, "delivered")
            log = router.log(100_000)
        finally:
            router.stop()
    assert f"study {uid} → pacs: its new generation is held" in log, log[-3000:]
    assert "Traceback" not in log
