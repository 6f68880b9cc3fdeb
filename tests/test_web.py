"""The HTTP side against a running router with real DCMTK traffic: metrics move by the right
amounts, the REST API, token auth, and the status page in a real headless Chromium."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from peers import StoreSCP, run_storescu, sop_uids, wait_until
from router_fixtures import Router, tags_of

from dicomrouter.sample import generate
from dicomrouter_bench.procs import free_port

TOKEN = "t0ken-for-tests"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def http(url: str, method: str = "GET", token: str | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
            status = r.status
            kind = r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        body, status, kind = err.read(), err.code, err.headers.get("Content-Type", "")
    return status, json.loads(body) if "json" in kind else body.decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus exposition (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:]+)(\{[^}]*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = ",".join(sorted((m.group(2) or "{}")[1:-1].split(","))) if m.group(2) else ""
        if got == want:
            return float(m.group(3))
    return 0.0


def web_router(tmp_path: Path, archive_port: int, **extra: Any) -> Router:
    return Router(tmp_path / "router", {
        "web": {"port": free_port(), "token_env": "ROUTER_WEB_TOKEN"},
        "destinations": {
            "tree": {"type": "folder", "path": str(tmp_path / "tree")},
            "archive": {"type": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1",
                        "port": archive_port, "retry": {"max_attempts": 1}},
        },
        "routes": [{"to": ["tree", "archive"]}],
        **extra,
    })


@pytest.fixture
def token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTER_WEB_TOKEN", TOKEN)


@pytest.mark.usefixtures("token_env")
def test_metrics_api_and_retry_through_the_api(tmp_path: Path) -> None:
    archive_port = free_port()
    study = generate(tmp_path / "study", series=2, instances=3, rows=16, cols=16, seed=101)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    size = sum(f.stat().st_size for f in study)
    with web_router(tmp_path, archive_port) as router:
        base = f"http://127.0.0.1:{router.config['web']['port']}"
        assert http(base + "/health") == (200, {"status": "ok"})
        status, ready = http(base + "/ready")
        assert status == 200, ready
        assert run_storescu(study, router.port).returncode == 0
        wait_until(lambda: http(base + "/api/jobs?state=dead")[1]["jobs"], timeout=90,
                   what="the archive's dead job")
        # the two destinations run in parallel: wait for the tree's delivery to be counted
        def tree_counted() -> str | None:
            text = http(base + "/metrics")[1]
            done = metric(text, "dicomrouter_deliveries_total", destination="tree",
                          outcome="delivered")
            return text if done == 1 else None

        text = wait_until(tree_counted, timeout=90, what="the tree's delivery in the metrics")
        assert metric(text, "dicomrouter_instances_received_total", calling_ae="STORESCU") == 6
        received = metric(text, "dicomrouter_bytes_received_total", calling_ae="STORESCU")
        assert abs(received - size) < 0.05 * size  # what was written to the spool
        assert metric(text, "dicomrouter_associations_total", outcome="accepted") == 1
        assert metric(text, "dicomrouter_c_store_seconds_count") == 6
        assert metric(text, "dicomrouter_studies_completed_total", outcome="routed") == 1
        assert metric(text, "dicomrouter_deliveries_total", destination="tree",
                      outcome="delivered") == 1
        assert metric(text, "dicomrouter_deliveries_total", destination="archive",
                      outcome="dead") == 1
        assert metric(text, "dicomrouter_delivery_seconds_count", destination="tree") == 1
        assert metric(text, "dicomrouter_jobs", destination="archive", state="dead") == 1

        _, listed = http(base + "/api/studies")
        row = next(s for s in listed["studies"] if s["study_uid"] == uid)
        progress = {j["destination"]: (j["state"], j["delivered"], j["total"])
                    for j in row["jobs"]}
        assert progress == {"tree": ("delivered", 6, 6), "archive": ("dead", 0, 6)}
        _, one = http(base + f"/api/studies/{uid}")
        assert any("dead-lettered" in h["event"] for h in one["history"])
        _, dests = http(base + "/api/destinations")
        health = {d["name"]: d["health"] for d in dests["destinations"]}
        assert health == {"tree": "ok", "archive": "dead letters"}
        job = http(base + "/api/jobs?state=dead")[1]["jobs"][0]

        assert http(base + f"/api/jobs/{job['id']}/retry", "POST")[0] == 401
        assert http(base + f"/api/jobs/{job['id']}/retry", "POST", "wrong")[0] == 401
        assert http(base + f"/api/studies/{uid}/reroute", "POST")[0] == 401
        with StoreSCP(tmp_path / "archive", aet="ARCHIVE", port=archive_port) as archive:
            status, body = http(base + f"/api/jobs/{job['id']}/retry", "POST", TOKEN)
            assert status == 200, body
            wait_until(lambda: archive.sop_uids() >= sop_uids(study), timeout=90,
                       what="the retried delivery")
        router.wait_state(uid, "delivered")
        _, schema = http(base + "/openapi.json")
        assert "/api/jobs/{job_id}/retry" in schema["paths"]


def test_web_binds_to_loopback_by_default(tmp_path: Path) -> None:
    from dicomrouter.config import from_dict

    cfg = from_dict({}, tmp_path, "test")
    assert (cfg.web.bind, cfg.web.port) == ("127.0.0.1", 8080)


@pytest.mark.usefixtures("token_env")
def test_status_page_in_headless_chromium(tmp_path: Path, chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    archive_port = free_port()
    study = generate(tmp_path / "study", series=1, instances=4, rows=16, cols=16, seed=102)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    ARTIFACTS.mkdir(exist_ok=True)
    with web_router(tmp_path, archive_port) as router:
        base = f"http://127.0.0.1:{router.config['web']['port']}"
        assert run_storescu(study, router.port).returncode == 0
        wait_until(lambda: http(base + "/api/jobs?state=dead")[1]["jobs"], timeout=90,
                   what="the archive's dead job")
        job = http(base + "/api/jobs?state=dead")[1]["jobs"][0]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True,
                                        args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 420, "height": 900})  # a phone
                page.goto(base + "/")
                studies = page.locator("#studies").inner_text()
                assert uid[-24:] in studies
                assert "tree: delivered" in studies and "4 of 4" in studies
                assert "archive: dead" in studies and "0 of 4" in studies
                page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)
                page.fill("#token", TOKEN)
                page.dispatch_event("#token", "change")
                page.click(f"#retry-{job['id']}")
                page.wait_for_selector("#msg.ok", timeout=30_000)
                assert "requeued" in page.inner_text("#msg")
            finally:
                browser.close()
        # the archive is still down: the requeued job runs again (and fails again)
        history = http(base + f"/api/studies/{uid}")[1]["history"]
        assert any("archive requeued by hand" in h["event"] for h in history), history
