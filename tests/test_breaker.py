"""The circuit breaker per destination (issue 26, item 3), against real peers.

A destination nobody listens on opens its breaker after ``breaker_failures`` connection
failures: attempts stop increasing (a study routed meanwhile uses none), no job is
dead-lettered, the log says "open" once, and ``status``, the web page and ``/metrics`` show it.
A DCMTK storescp started on that port is found by the next probe (C-ECHO): the breaker closes
within ``probe_every`` and every instance arrives once. A peer that refuses every instance
(a C-STORE failure status) answers: its breaker never opens.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from peers import (
    MotoS3,
    StoreSCP,
    free_port,
    moto_available,
    require_peer,
    run_storescu,
    sop_uids,
    wait_until,
)
from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt
from router_fixtures import Router, dicomrouter
from stow_server import StowServer

from dicomrouter.breaker import Breaker
from dicomrouter.config import from_dict
from dicomrouter.delivery import DeliveryWorkers
from dicomrouter.destinations.base import Context
from dicomrouter.destinations.folder import FolderDestination
from dicomrouter.dicomfile import identify
from dicomrouter.sample import generate
from dicomrouter.spool import Spool
from dicomrouter.state import State, open_state
from dicomrouter.state.base import Placement
from dicomrouter.values import PRIORITIES

PROBE_EVERY = 3.0
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def _dicom(aet: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"type": "dicom", "ae_title": aet, "host": "127.0.0.1", "port": port,
            "timeout": "10s", "retry": {"initial": "1s", "max_delay": "1s",
                                        "max_attempts": 50}, **extra}


def _jobs(router: Router, study: str) -> list[dict[str, Any]]:
    r = dicomrouter("status", "--json", "--study", study, "--config", str(router.config_path))
    assert r.returncode == 0, r.stderr
    return list(json.loads(r.stdout)["jobs"])


def _metric(base: str, destination: str) -> float | None:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as rsp:
        text = rsp.read().decode()
    m = re.search(rf'^dicomrouter_breaker_open{{destination="{destination}"}} (\S+)$', text,
                  re.M)
    return float(m.group(1)) if m else None


def test_breaker_opens_stops_attempts_and_closes_when_the_peer_is_back(tmp_path: Path) -> None:
    port = free_port()
    web_port = free_port()
    first = generate(tmp_path / "a", series=2, instances=5, rows=16, cols=16, seed=261)
    second = generate(tmp_path / "b", series=1, instances=4, rows=16, cols=16, seed=262)
    study1 = str(dcmread(first[0]).StudyInstanceUID)
    study2 = str(dcmread(second[0]).StudyInstanceUID)
    router = Router(tmp_path / "router", {
        "web": {"port": web_port},
        "destinations": {"pacs": _dicom("PACS", port, breaker_failures=3,
                                         probe_every=f"{PROBE_EVERY}s")},
        "routes": [{"name": "all", "to": ["pacs"]}]})
    base = f"http://127.0.0.1:{web_port}"
    with router:
        assert run_storescu(first, router.port, aet=router.aet).returncode == 0
        wait_until(lambda: "circuit breaker open" in router.log(50000), timeout=90,
                   what="the breaker to open")
        assert re.search(r"destination pacs: circuit breaker open after 3 consecutive "
                         r"connection failures \(last: .*no connection", router.log(50000))
        attempts = _jobs(router, study1)[0]["attempts"]
        assert attempts == 3, attempts
        # routed while open: waits with no attempt
        assert run_storescu(second, router.port, aet=router.aet).returncode == 0
        wait_until(lambda: router.study_state(study2) == "routed", timeout=60,
                   what="the second study routed")
        # several probe periods: no attempt, no dead letter, one "open" line
        deadline = time.monotonic() + 2.5 * PROBE_EVERY
        while time.monotonic() < deadline:
            assert _jobs(router, study1)[0]["attempts"] == 3
            assert _jobs(router, study2)[0]["attempts"] == 0
            time.sleep(0.5)
        assert _jobs(router, study1)[0]["state"] in ("failed", "pending")
        log = router.log(50000)
        assert log.count("circuit breaker open") == 1, log
        assert "dead-lettered" not in log
        # status (JSON and text), the web page, /metrics
        status = router.status()
        breaker = status["breakers"]["pacs"]
        assert breaker["state"] == "open" and "no connection" in breaker["reason"]
        assert breaker["failed_probes"] >= 1, breaker
        text = dicomrouter("status", "--config", str(router.config_path)).stdout
        assert re.search(r"pacs .*circuit breaker OPEN since .*no connection", text), text
        with urllib.request.urlopen(base + "/", timeout=10) as rsp:
            assert "breaker open" in rsp.read().decode()
        assert _metric(base, "pacs") == 1.0

        # the peer comes back: the next probe closes the breaker, everything arrives once
        with StoreSCP(tmp_path / "pacs", aet="PACS", port=port) as pacs:
            back = time.monotonic()
            wait_until(lambda: "circuit breaker closed" in router.log(50000),
                       timeout=PROBE_EVERY + 10, what="the breaker to close")
            assert time.monotonic() - back <= PROBE_EVERY + 3
            wait_until(lambda: sop_uids(pacs.files()) >= sop_uids(first + second), timeout=60,
                       what="both studies delivered")
            router.wait_state(study1, "delivered")
            router.wait_state(study2, "delivered")
            log = router.log(50000)
            assert log.count("circuit breaker closed") == 1
            assert log.count("circuit breaker open") == 1
            assert "C-ECHO reached it" in log
            assert len(pacs.files()) == len(first) + len(second)
            status = router.status()
            assert status["ledger"]["resent"] == 0, status["ledger"]
            assert status["ledger"]["delivered"] == len(first) + len(second)
            assert status["breakers"]["pacs"]["state"] == "closed"
            assert _metric(base, "pacs") == 0.0
            assert [j["state"] for j in _jobs(router, study2)] == ["delivered"]
        assert "Traceback" not in router.log(50000)


class RefusingSCP:
    """A Storage SCP (pynetdicom) that answers every C-STORE with 0xA700 (out of resources):
    the peer is reachable; each instance is refused."""

    def __init__(self) -> None:
        self.port = free_port()
        self.refused = 0
        self._lock = threading.Lock()
        self._server: Any = None

    def _store(self, event: Any) -> int:
        with self._lock:
            self.refused += 1
        return 0xA700

    def __enter__(self) -> RefusingSCP:
        ae = AE(ae_title="FULL")
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()


def test_refused_instances_are_not_connection_failures(tmp_path: Path) -> None:
    files = generate(tmp_path / "a", series=1, instances=3, rows=16, cols=16, seed=263)
    study = str(dcmread(files[0]).StudyInstanceUID)
    with RefusingSCP() as full:
        router = Router(tmp_path / "router", {
            "destinations": {"full": _dicom("FULL", full.port, breaker_failures=2,
                                            probe_every="1s")},
            "routes": [{"name": "all", "to": ["full"]}]})
        with router:
            assert run_storescu(files, router.port, aet=router.aet).returncode == 0
            # four refused attempts in a row: twice the threshold, and still closed
            wait_until(lambda: max([j["attempts"] for j in _jobs(router, study)] or [0]) >= 4,
                       timeout=90,
                       what="four refused attempts")
            assert full.refused >= 4 * len(files)
            log = router.log(50000)
            assert "refused" in log
            assert "circuit breaker" not in log, log
            assert router.status()["breakers"] == {}  # nothing recorded: never opened


# ---- the state methods, on both backends ---------------------------------------------------


def test_retry_now_and_published_breakers_on_both_backends(state: State) -> None:
    state.record_instance({"StudyInstanceUID": "1.2.9", "SeriesInstanceUID": "1.2.9.1",
                           "SOPInstanceUID": "1.2.9.1.1", "SOPClassUID": CT},
                          EXPLICIT, "data/1.2.9/1.2.9.1.1.dcm", 1000, "MODALITY", "ROUTER")
    seen = state.study("1.2.9")
    assert seen is not None
    state.route_study("1.2.9", ["pacs", "other"], ["all"], seen)
    for dest in ("pacs", "other"):
        job = state.claim_job(dest)
        assert job is not None
        assert state.finish_job(job, "no connection", 10, 600.0) == "failed"
    assert state.claim_job("pacs") is None  # waiting ten minutes for its retry
    assert state.retry_now("pacs") == 1  # the breaker closed: due now, attempts kept
    job = state.claim_job("pacs")
    assert job is not None and job.attempts == 1
    assert state.claim_job("other") is None  # another destination's job keeps waiting
    assert state.retry_now("pacs") == 0  # nothing failed any more

    state.heartbeat({"host": "h1", "pid": 1})
    state.publish_breakers({"pacs": {"state": "open", "reason": "no connection"}})
    state.heartbeat()  # the periodic heartbeat keeps them
    (node,) = state.nodes()
    assert node["info"]["host"] == "h1"
    assert node["info"]["breakers"]["pacs"] == {"state": "open", "reason": "no connection"}
    state.heartbeat({"host": "h1", "pid": 2})  # a restart: every breaker starts closed
    assert "breakers" not in state.nodes()[0]["info"]


def test_dicomweb_breaker_opens_on_a_dead_server_and_closes_when_it_answers(
        tmp_path: Path) -> None:
    port = free_port()
    files = generate(tmp_path / "a", series=1, instances=6, rows=16, cols=16, seed=265)
    study = str(dcmread(files[0]).StudyInstanceUID)
    router = Router(tmp_path / "router", {
        "destinations": {"web": {"type": "dicomweb", "url": f"http://127.0.0.1:{port}/dicom-web",
                                 "timeout": "10s", "batch_size": 4,
                                 "retry": {"initial": "1s", "max_delay": "1s",
                                           "max_attempts": 50},
                                 "breaker_failures": 2, "probe_every": "2s"}},
        "routes": [{"name": "all", "to": ["web"]}]})
    with router:
        assert run_storescu(files, router.port, aet=router.aet).returncode == 0
        wait_until(lambda: "circuit breaker open" in router.log(50000), timeout=90,
                   what="the breaker to open")
        deadline = time.monotonic() + 5.0  # two and a half probe periods: no attempt
        while time.monotonic() < deadline:
            assert _jobs(router, study)[0]["attempts"] == 2
            time.sleep(0.5)
        assert router.status()["breakers"]["web"]["probe"] == "HTTP HEAD"
        with StowServer(port=port) as server:
            wait_until(lambda: set(server.received) >= sop_uids(files), timeout=30,
                       what="the study stored over STOW-RS")
            router.wait_state(study, "delivered")
            assert sorted(server.received) == sorted(sop_uids(files))  # each once
        log = router.log(50000)
        assert log.count("circuit breaker open") == 1
        assert log.count("circuit breaker closed") == 1
        assert "HTTP HEAD reached it" in log
        assert "Traceback" not in log


def test_s3_breaker_probes_head_bucket_until_the_bucket_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_peer("moto server", moto_available(), "moto[server] boto3 (pip install)")
    monkeypatch.setenv("S3_KEY", MotoS3.access_key)
    monkeypatch.setenv("S3_SECRET", MotoS3.secret_key)
    server = MotoS3(tmp_path / "moto")  # not started yet: its port refuses connections
    files = generate(tmp_path / "a", series=1, instances=3, rows=16, cols=16, seed=266)
    study = str(dcmread(files[0]).StudyInstanceUID)
    router = Router(tmp_path / "router", {
        "destinations": {"bucket": {
            "type": "s3", "bucket": "exports", "endpoint_url": server.endpoint_url,
            "region": "us-east-1", "access_key_env": "S3_KEY", "secret_key_env": "S3_SECRET",
            "mode": "instances", "timeout": "5s",
            "retry": {"initial": "1s", "max_delay": "1s", "max_attempts": 50},
            "breaker_failures": 2, "probe_every": "1s"}},
        "routes": [{"name": "all", "to": ["bucket"]}]})
    with router:
        assert run_storescu(files, router.port, aet=router.aet).returncode == 0
        wait_until(lambda: "circuit breaker open" in router.log(50000), timeout=120,
                   what="the breaker to open")
        assert _jobs(router, study)[0]["attempts"] == 2
        with server:
            # up, but without the bucket: head-bucket fails, the breaker stays open
            wait_until(lambda: router.status()["breakers"]["bucket"].get(
                "failed_probes", 0) >= 2 and "head-bucket" in router.status()["breakers"][
                    "bucket"].get("last_probe_error", ""), timeout=60,
                what="probes that reach the server but not the bucket")
            assert "circuit breaker closed" not in router.log(50000)
            assert _jobs(router, study)[0]["attempts"] == 2
            server.client().create_bucket(Bucket="exports")
            router.wait_state(study, "delivered", timeout=60)
            objects = server.client().list_objects_v2(Bucket="exports")["Contents"]
            assert len(objects) == len(files)
        log = router.log(50000)
        assert log.count("circuit breaker open") == 1
        assert "S3 head-bucket reached it" in log
        assert "Traceback" not in log


def test_a_run_that_yields_after_a_chunk_counts_as_a_success(tmp_path: Path) -> None:
    """A routine study is sent in chunks; after its first chunk a STAT study of the same
    destination is due, so the run yields. The chunk it sent reached the destination: the
    breaker's count of consecutive failures restarts and a half-open breaker is closed for
    good (else the next failure would open it as if the chunk had failed)."""
    cfg = from_dict({"chunk_instances": 2,
                     "destinations": {"f": {"type": "folder", "path": str(tmp_path / "out")}},
                     "routes": [{"to": ["f"]}]}, tmp_path, "test")
    state = open_state(tmp_path / "spool" / "state.db")
    spool = Spool(tmp_path / "spool", state)

    def study(n: int, seed: int) -> str:
        for f in generate(tmp_path / f"s{seed}", series=1, instances=n, rows=8, cols=8,
                          seed=seed):
            tags, ts = identify(f)
            shutil.copy(f, tmp_path / "copy.dcm")
            spool._place(str(tmp_path / "copy.dcm"), tags, ts, "TEST", "ROUTER")
        return str(tags["StudyInstanceUID"])

    routine = study(6, 271)
    assert state.route_study(routine, ["f"], ["all"], state.study(routine))
    dest = FolderDestination(cfg.destinations["f"], Context())
    workers = DeliveryWorkers(cfg, state, spool, {"f": dest}, lambda job, outcome: None)
    job = state.claim_job("f")
    assert job is not None and job.study_uid == routine
    stat = study(1, 272)  # arrives while the routine study is being sent
    assert state.route_study(stat, ["f"], ["all"], state.study(stat),
                             placement=Placement({"f": PRIORITIES.index("stat")}))
    breaker = workers.breakers.by_name["f"]
    breaker.failures, breaker.half_open = 1, True  # closed by a probe, one failure before
    assert workers.run(job, dest) == ""  # yielded: back to pending, not an attempt
    assert len(state.undelivered(routine, "f")) == 4  # one chunk went
    assert (breaker.failures, breaker.half_open) == (0, False)


def test_half_open_admits_only_the_prober_until_a_run_outcome(tmp_path: Path) -> None:
    """Closed by a probe, the breaker lets only the worker that probed run jobs until a run's
    outcome is known: a peer that answers the probe but not the delivery costs one attempt
    per probe, not one per worker (``concurrency``). (A folder destination: its probe, a
    test file written and removed, succeeds.)"""
    (tmp_path / "out").mkdir()
    cfg = from_dict({"destinations": {"f": {"type": "folder", "path": str(tmp_path / "out"),
                                            "concurrency": 2}},
                     "routes": [{"to": ["f"]}]}, tmp_path, "test")
    dest = FolderDestination(cfg.destinations["f"], Context())
    now = [0.0]
    breaker = Breaker(dest, 1, 30.0, lambda b: None, clock=lambda: now[0])
    breaker.observe(True, "no connection")
    assert breaker.state == "open"
    now[0] = 31.0  # a probe is due

    def admits_in_thread() -> bool:
        out: list[bool] = []
        t = threading.Thread(target=lambda: out.append(breaker.admits(lambda s: None)))
        t.start()
        t.join()
        return out[0]

    assert breaker.admits(lambda s: None)  # this thread probed: closed, half-open
    assert breaker.state == "closed" and breaker.half_open
    assert not admits_in_thread()  # the other worker waits for the first run's outcome
    assert breaker.admits(lambda s: None)  # the prober again (it found no job, say)
    breaker.observe(True, "association aborted")  # its run failed: open again at once
    assert breaker.state == "open"
    now[0] = 62.0
    assert admits_in_thread()  # a probe by the other worker closes it; it runs the trial
    assert not breaker.admits(lambda s: None)
    breaker.observe(False, None)  # a run succeeded: closed for good, everyone runs
    assert not breaker.half_open
    assert breaker.admits(lambda s: None) and admits_in_thread()
