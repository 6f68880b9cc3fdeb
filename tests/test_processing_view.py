"""Processing shown step by step (issue 29, "Done when": the round trip "is shown step by step
in ``status --study`` and on the web page"), with a real router, DCMTK storescu as the
modality, storescp as the PACS and the sender, and the processing program of
test_processing.py (pydicom writes a Basic Text SR referencing the input).

A step that fails once (its program fails while a marker file is absent, and creates it) is
shown ``failed`` in ``status --study`` and the REST API until an operator requeues it, then
``done`` with attempts 2; a step still running (its program waits for a file the test
creates) is shown ``running`` on the status page in headless Chromium, the step after it
``pending``, its name (HTML in it) escaped; both ``done`` once the file is there."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from peers import run_storescu, wait_until
from router_fixtures import Router, dicomrouter
from test_processing import SR_PROGRAM, _check_sr, _program, _study
from test_web import ARTIFACTS, TOKEN, http

from dicomrouter_bench.procs import free_port

FLAKY = r'''
import os, runpy, sys
marker, program = sys.argv[1], sys.argv[2]
if not os.path.exists(marker):
    open(marker, "w").close()
    sys.stderr.write("first attempt fails on purpose\n")
    sys.exit(3)
sys.argv = [program, *sys.argv[3:]]
runpy.run_path(program, run_name="__main__")
'''

WAIT_THEN_PASS_ON = r'''
import os, shutil, sys, time
go, started, inp, out = sys.argv[1:5]
open(started, "w").close()
while not os.path.exists(go):
    time.sleep(0.2)
for n in os.listdir(inp):
    shutil.copy(os.path.join(inp, n), os.path.join(out, n))
print("passed on", len(os.listdir(out)), "file(s)")
'''

SLOW_NAME = "wait <i>for</i> go"  # HTML in a step's name: shown as text, not markup


@pytest.fixture
def token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTER_WEB_TOKEN", TOKEN)


def _config(tmp_path: Path, pacs: Any, sender: Any, steps: list[dict[str, Any]],
            retry: dict[str, Any]) -> dict[str, Any]:
    return {"web": {"port": free_port(), "token_env": "ROUTER_WEB_TOKEN"},
            "destinations": {"pacs": {"type": "dicom", "ae_title": pacs.aet,
                                      "host": "127.0.0.1", "port": pacs.port}},
            "known_aes": {"CT1": {"host": "127.0.0.1", "port": sender.port}},
            "retry": retry,
            "routes": [{"name": "ai", "to": ["pacs"], "process": steps,
                        "results": ["return_to_sender"]}]}


def _status(router: Router, study: str) -> tuple[str, list[dict[str, Any]]]:
    """``status --study``: its text and its JSON's ``processing``."""
    args = ("status", "--study", study, "--config", str(router.config_path))
    text = dicomrouter(*args)
    as_json = dicomrouter(*args, "--json")
    assert text.returncode == 0 and as_json.returncode == 0, text.stderr + as_json.stderr
    return text.stdout, json.loads(as_json.stdout)["processing"]


def _block(text: str) -> list[str]:
    """The ``processing:`` block of ``status --study`` (it comes last)."""
    lines = text.splitlines()
    return lines[lines.index("processing:") + 1:]


@pytest.mark.usefixtures("token_env")
def test_a_step_failed_once_shows_failed_then_done_with_two_attempts(tmp_path: Path,
                                                                     pacs_and_sender: Any) -> None:
    pacs, sender = pacs_and_sender
    files, study = _study(tmp_path)
    sr = _program(tmp_path, SR_PROGRAM, "sr.py")
    flaky = _program(tmp_path, FLAKY, "flaky.py")
    steps = [{"command": [sys.executable, flaky, str(tmp_path / "marker"), sr, "{input}",
                          "{output}"], "timeout": "60s"}]
    # a long backoff: the failure stays visible until the operator requeues the job
    cfg = _config(tmp_path, pacs, sender, steps,
                  {"initial": "10m", "max_delay": "10m", "max_attempts": 3})
    with Router(tmp_path / "router", cfg) as router:
        base = f"http://127.0.0.1:{cfg['web']['port']}"
        assert run_storescu(files, router.port, aet=router.aet,
                            calling="CT1").returncode == 0
        wait_until(lambda: _status(router, study)[1] and
                   _status(router, study)[1][0]["state"] == "failed", timeout=90,
                   what="the step failed")
        text, steps_json = _status(router, study)
        (line,) = _block(text)
        assert line.startswith("  ai / step 1 (command): failed — exit code 3 after "), text
        assert "stderr: first attempt fails on purpose" in line, line
        assert "[attempt" not in line, line
        assert [(s["route"], s["name"], s["kind"], s["state"], s["attempts"])
                for s in steps_json] == [("ai", "step 1", "command", "failed", 1)]
        (row,) = http(base + "/api/processing")[1]["studies"]
        assert row["study_uid"] == study and row["patient_id"] == "AI1"
        assert [j["state"] for j in row["jobs"]] == ["failed"]
        assert [(s["state"], s["attempts"]) for s in row["steps"]] == [("failed", 1)]
        assert sender.files() == []
        # the operator requeues it: the second attempt runs and succeeds
        status, answer = http(base + f"/api/jobs/{row['jobs'][0]['id']}/retry", "POST",
                              TOKEN)
        assert status == 200, answer
        wait_until(lambda: len(sender.files()) >= 1, timeout=90, what="the SR at CT1")
        router.wait_state(study, "delivered")
        _check_sr(sender.files()[0], study, files)
        text, steps_json = _status(router, study)
        (line,) = _block(text)
        assert line.startswith("  ai / step 1 (command): done — exit code 0 after "), text
        assert "1 output file(s)" in line and line.endswith("[attempt 2]"), line
        assert [(s["state"], s["attempts"]) for s in steps_json] == [("done", 2)]
        # the history printout is unchanged: both attempts are there, in order
        assert text.index("step 1' (ai) failed: exit code 3") < \
            text.index("step 1' (ai) done: exit code 0") < text.index("processing:")
        one = http(base + f"/api/studies/{study}")[1]
        assert [(s["state"], s["attempts"]) for s in one["processing"]] == [("done", 2)]
        # finished within the hour: still listed, done
        (row,) = http(base + "/api/processing")[1]["studies"]
        assert [j["state"] for j in row["jobs"]] == ["delivered"]
        assert [(s["state"], s["attempts"]) for s in row["steps"]] == [("done", 2)]


@pytest.mark.usefixtures("token_env")
def test_a_running_step_shows_running_on_the_page(tmp_path: Path, chromium: str,
                                                  pacs_and_sender: Any) -> None:
    from playwright.sync_api import sync_playwright

    pacs, sender = pacs_and_sender
    files, study = _study(tmp_path)
    go, started = tmp_path / "go", tmp_path / "started"
    waiter = _program(tmp_path, WAIT_THEN_PASS_ON, "wait.py")
    sr = _program(tmp_path, SR_PROGRAM, "sr.py")
    steps = [{"name": SLOW_NAME, "command": [sys.executable, waiter, str(go), str(started),
                                             "{input}", "{output}"], "timeout": "5m"},
             {"name": "report", "command": [sys.executable, sr, "{input}", "{output}"],
              "timeout": "60s"}]
    cfg = _config(tmp_path, pacs, sender, steps,
                  {"initial": "1s", "max_delay": "1s", "max_attempts": 2})
    with Router(tmp_path / "router", cfg) as router, sync_playwright() as p:
        base = f"http://127.0.0.1:{cfg['web']['port']}"
        assert run_storescu(files, router.port, aet=router.aet,
                            calling="CT1").returncode == 0
        wait_until(started.exists, timeout=90, what="the first step running")
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.goto(base + "/")
            card = page.locator("#processing").inner_text()
            assert study[-24:] in card and "AI1" in card, card
            assert "process:ai: running" in card, card
            assert f"ai / {SLOW_NAME}: running" in card, card  # escaped: shown as text
            assert "ai / report: pending" in card, card
            assert page.locator("#processing i").count() == 0  # no markup from the name
            ARTIFACTS.mkdir(exist_ok=True)
            page.locator("#processing").screenshot(path=str(ARTIFACTS /
                                                            "processing-card.png"))
            go.touch()
            wait_until(lambda: len(sender.files()) >= 1, timeout=90, what="the SR at CT1")
            router.wait_state(study, "delivered")
            page.goto(base + "/")
            card = page.locator("#processing").inner_text()
            assert f"ai / {SLOW_NAME}: done" in card and "ai / report: done" in card, card
            assert "process:ai: delivered" in card, card
        finally:
            browser.close()
    _check_sr(sender.files()[0], study, files)
