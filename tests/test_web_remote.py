"""The web side reachable from the network: off loopback, nothing but /health without the token.

A second machine is a network namespace of the test's own (a veth pair, 10.x.y.1 here and
10.x.y.2 there): it reaches the router's web port the way another host on the ward's network
would. The status page is driven by headless Chromium with HTTP basic auth.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import require_peer, run_storescu, wait_until
from router_fixtures import Router, dicomrouter, tags_of

from dicomrouter.sample import generate
from dicomrouter_bench.procs import free_port

TOKEN = "s3cret-web-token"
CLIENT = r"""
import base64, json, sys, urllib.error, urllib.request
url, auth = sys.argv[1], sys.argv[2]
req = urllib.request.Request(url)
if auth:
    req.add_header("Authorization", auth)
try:
    with urllib.request.urlopen(req, timeout=20) as r:
        status, body = r.status, r.read().decode()
except urllib.error.HTTPError as err:
    status, body = err.code, err.read().decode()
print(json.dumps({"status": status, "body": body}))
"""


class OtherHost:
    """A network namespace joined to this one by a veth pair: another machine on the LAN."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns = f"drt-{tag}"
        self.here_if, self.there_if = f"drh{tag}", f"drt{tag}"
        octet = int(tag[:2], 16) % 200 + 20
        self.here, self.there = f"10.{octet}.77.1", f"10.{octet}.77.2"

    def __enter__(self) -> OtherHost:
        steps = [
            ["ip", "netns", "add", self.ns],
            ["ip", "link", "add", self.here_if, "type", "veth", "peer", "name", self.there_if],
            ["ip", "link", "set", self.there_if, "netns", self.ns],
            ["ip", "addr", "add", f"{self.here}/24", "dev", self.here_if],
            ["ip", "link", "set", self.here_if, "up"],
            ["ip", "netns", "exec", self.ns, "ip", "addr", "add", f"{self.there}/24", "dev",
             self.there_if],
            ["ip", "netns", "exec", self.ns, "ip", "link", "set", self.there_if, "up"],
            ["ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up"],
        ]
        try:
            for cmd in steps:
                subprocess.run(cmd, check=True, capture_output=True, timeout=30)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "link", "del", self.here_if], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=30)

    def get(self, url: str, auth: str = "") -> tuple[int, str]:
        """GET ``url`` from the other machine; (status, body)."""
        r = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c", CLIENT, url,
                            auth], capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        return int(out["status"]), str(out["body"])


def _netns_possible() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


@pytest.fixture
def other_host() -> Iterator[OtherHost]:
    require_peer("a second host (ip netns, as root)", _netns_possible(),
                 "iproute2 (apt-get install iproute2), run as root")
    with OtherHost() as host:
        yield host


@pytest.fixture
def token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTER_WEB_TOKEN", TOKEN)


def _router(tmp_path: Path, name: str, **web: Any) -> Router:
    return Router(tmp_path / name, {
        "web": {"bind": "0.0.0.0", "port": free_port(), "token_env": "ROUTER_WEB_TOKEN",
                **web},
        "destinations": {
            "tree": {"type": "folder", "path": str(tmp_path / name / "tree")},
            "down": {"type": "dicom", "ae_title": "DOWN", "host": "127.0.0.1",
                     "port": free_port(), "retry": {"max_attempts": 1}}},
        "routes": [{"to": ["tree", "down"]}],
    })


@pytest.mark.usefixtures("token_env")
def test_a_second_machine_sees_nothing_without_the_token(tmp_path: Path,
                                                         other_host: OtherHost) -> None:
    study = generate(tmp_path / "study", series=1, instances=2, rows=16, cols=16, seed=111,
                     patient_id="PATIENT-SECRET-111")
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    with _router(tmp_path, "r1") as router:
        base = f"http://{other_host.here}:{router.config['web']['port']}"
        assert run_storescu(study, router.port).returncode == 0
        router.wait_state(uid, "failed", timeout=120)  # tree delivered, down dead
        assert other_host.get(base + "/health")[0] == 200
        for path in ("/", "/api/studies", f"/api/studies/{uid}", "/api/audit", "/api/jobs",
                     "/api/destinations", "/api/nodes", "/metrics", "/openapi.json", "/ready",
                     "/dicom-web/studies", f"/dicom-web/studies/{uid}",
                     f"/dicom-web/studies/{uid}/metadata", "/dicom-web/instances"):
            status, body = other_host.get(base + path)
            assert status == 401, (path, body)
            assert "PATIENT-SECRET-111" not in body and uid not in body, path
        for wrong in ("Bearer nope", "Basic " + _basic("admin", "nope"), TOKEN):
            assert other_host.get(base + "/api/studies", wrong)[0] == 401
        status, body = other_host.get(base + "/api/studies", f"Bearer {TOKEN}")
        assert status == 200 and "PATIENT-SECRET-111" in body
        for wrong in ("Bearer nope", TOKEN):  # DICOMweb: the same token
            assert other_host.get(base + "/dicom-web/studies", wrong)[0] == 401
        status, body = other_host.get(base + "/dicom-web/studies", f"Bearer {TOKEN}")
        assert status == 200 and "PATIENT-SECRET-111" in body
        status, body = other_host.get(base + "/", "Basic " + _basic("anyone", TOKEN))
        assert status == 200 and uid[-24:] in body
        assert other_host.get(base + "/metrics", f"Bearer {TOKEN}")[0] == 200

    with _router(tmp_path, "r2", metrics_public=True) as router:
        base = f"http://{other_host.here}:{router.config['web']['port']}"
        status, body = other_host.get(base + "/metrics")
        assert status == 200 and "dicomrouter_" in body
        assert other_host.get(base + "/api/studies")[0] == 401


def _basic(user: str, password: str) -> str:
    import base64

    return base64.b64encode(f"{user}:{password}".encode()).decode()


def test_a_network_bind_without_a_token_does_not_start(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "router.yml"
    cfg.write_text(f"spool: {tmp_path / 'spool'}\nweb: {{bind: 0.0.0.0}}\n")
    r = dicomrouter("serve", "--config", str(cfg), timeout=60)
    assert r.returncode != 0
    assert "web.token_env: required with web.bind 0.0.0.0, which is not a loopback" in r.stderr
    assert "Traceback" not in r.stderr
    monkeypatch.setenv("EMPTY_TOKEN", " ")
    cfg.write_text(f"spool: {tmp_path / 'spool'}\nweb: {{bind: 0.0.0.0, "
                   "token_env: EMPTY_TOKEN}\n")
    r = dicomrouter("serve", "--check", "--config", str(cfg), timeout=60)
    assert r.returncode != 0 and "web.token_env: environment variable EMPTY_TOKEN is empty" \
        in r.stderr
    cfg.write_text(f"spool: {tmp_path / 'spool'}\nweb: {{bind: 0.0.0.0, enabled: false}}\n")
    assert dicomrouter("serve", "--check", "--config", str(cfg), timeout=60).returncode == 0


@pytest.mark.usefixtures("token_env")
def test_status_page_login_in_headless_chromium(tmp_path: Path, chromium: str,
                                                other_host: OtherHost) -> None:
    """Chromium gets the login answer without credentials, the page with them (basic auth,
    the token as the password), and the retry button works through that login alone."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    study = generate(tmp_path / "study", series=1, instances=2, rows=16, cols=16, seed=112)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    with _router(tmp_path, "r3") as router:
        # the router's own non-loopback address (the one the other host reaches)
        base = f"http://{other_host.here}:{router.config['web']['port']}"
        assert run_storescu(study, router.port).returncode == 0
        router.wait_state(uid, "failed", timeout=120)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True,
                                        args=["--no-sandbox", "--disable-background-networking"])
            try:
                # without credentials Chromium is asked to log in and gets nothing
                with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
                    browser.new_page().goto(base + "/")
                # a wrong token: refused, the login page without patient data
                wrong = browser.new_context(
                    http_credentials={"username": "nurse", "password": "wrong"}).new_page()
                response = wrong.goto(base + "/")
                assert response is not None and response.status == 401
                assert response.headers["www-authenticate"].startswith("Basic")
                assert "log in with any user name and the token" in wrong.content()
                assert uid[-24:] not in wrong.content()
                context = browser.new_context(
                    http_credentials={"username": "nurse", "password": TOKEN})
                page = context.new_page()
                response = page.goto(base + "/")
                assert response is not None and response.status == 200
                studies = page.locator("#studies").inner_text()
                assert uid[-24:] in studies and "down: dead" in studies
                job = next(j for j in json.loads(page.evaluate(
                    "fetch('/api/jobs?state=dead').then(r => r.text())"))["jobs"])
                page.click(f"#retry-{job['id']}")
                page.wait_for_selector("#msg.ok", timeout=30_000)
                assert "requeued" in page.inner_text("#msg")
            finally:
                browser.close()
        wait_until(lambda: "requeued by hand" in router.log(5000) or any(
            "requeued by hand" in e for e in _history(router, uid)), timeout=60,
            what="the requeue in the study's history")


def _history(router: Router, uid: str) -> list[str]:
    r = dicomrouter("status", "--study", uid, "--json", "--config", str(router.config_path))
    return [e for _ts, e in json.loads(r.stdout)["history"]] if r.returncode == 0 else []
