"""A newcomer's frictions with the CLI: every error is one line, exit 2 for usage, 1 for
failure; warnings where a mistake would otherwise pass silently."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from peers import run_storescu, wait_until
from router_fixtures import Router, dicomrouter, tags_of

from dicomrouter.sample import generate


@pytest.mark.parametrize(("args", "code", "says"), [
    (["echo", "--host", "no.such.host.invalid", "--timeout", "5"], 1, "no.such.host.invalid"),
    (["echo", "--aet", "A" * 17], 2, "AE title"),
    (["echo", "--port", "70000"], 2, "70000"),
    (["serve", "--port", "70000"], 2, "70000"),
    (["serve", "--port", "0"], 2, "--port"),
    (["sample", "x", "--studies", "0"], 2, "--studies"),
    (["find", "--port", "0"], 2, "--port"),
    (["send", "--port", "99999", "."], 2, "99999"),
])
def test_cli_errors_are_one_line(tmp_path: Path, args: list[str], code: int, says: str) -> None:
    r = dicomrouter(*args, cwd=tmp_path, timeout=60)
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert says in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, r.stderr


def test_empty_config_and_config_without_routes_warn(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yml"
    empty.write_text("")
    r = dicomrouter("serve", "--check", "--config", str(empty))
    assert r.returncode == 0, r.stderr
    assert "empty" in r.stderr and "embedded defaults" in r.stderr, r.stderr
    no_routes = tmp_path / "noroutes.yml"
    no_routes.write_text("destinations:\n  a: {type: folder, path: out}\n")
    r = dicomrouter("serve", "--check", "--config", str(no_routes))
    assert r.returncode == 0 and "no routes" in r.stderr, r.stderr


def test_serve_on_a_port_in_use_fails_before_creating_anything(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        cfg = tmp_path / "r.yml"
        cfg.write_text(f"bind: 127.0.0.1\nport: {port}\nspool: spool\n"
                       "web: {enabled: false}\n")
        r = dicomrouter("serve", "--config", str(cfg), cwd=tmp_path, timeout=60)
    assert r.returncode == 1, r.stderr
    assert f"port {port}" in r.stderr and "in use" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "spool").exists()


def test_status_shows_counts_progress_and_retry_warns(tmp_path: Path) -> None:
    study = generate(tmp_path / "study", series=1, instances=3, rows=8, cols=8, seed=111)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    with Router(tmp_path / "router", {
        "destinations": {"tree": {"type": "folder", "path": str(tmp_path / "tree")},
                         "down": {"type": "dicom", "ae_title": "DOWN", "host": "127.0.0.1",
                                  "port": 9, "retry": {"initial": "1h"}}},
        "routes": [{"to": ["tree", "down"]}],
    }) as router:
        assert run_storescu(study, router.port).returncode == 0
        router.wait_state(uid, "routed")
        cfg = str(router.config_path)
        r = dicomrouter("status", "--config", cfg)
        assert r.returncode == 0, r.stderr
        assert "tree: delivered 3 of 3" in r.stdout, r.stdout
        assert "down: failed 0 of 3" in r.stdout, r.stdout
        assert "failed 1 time(s), next attempt at" in r.stdout, r.stdout
        r = dicomrouter("status", "--config", cfg, "--study", uid)
        assert "tree: delivered 3 of 3" in r.stdout, r.stdout
        r = dicomrouter("retry", "--config", cfg, "--destination", "nosuch")
        assert r.returncode == 1 and "no destination 'nosuch'" in r.stderr, r.stderr
        r = dicomrouter("status", "--json", "--all", "--config", cfg)
        row = next(s for s in json.loads(r.stdout)["studies"] if s["study_uid"] == uid)
        assert row["instances_received"] == 3 and row["bytes_received"] > 0


def test_audit_trail_survives_a_purge(tmp_path: Path) -> None:
    study = generate(tmp_path / "study", series=1, instances=2, rows=8, cols=8, seed=112)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    with Router(tmp_path / "router", {
        "keep_after_delivery": True,
        "destinations": {"tree": {"type": "folder", "path": str(tmp_path / "tree")}},
        "routes": [{"name": "all", "to": "tree"}],
    }) as router:
        assert run_storescu(study, router.port).returncode == 0
        router.wait_state(uid, "delivered")
        cfg = str(router.config_path)
        r = dicomrouter("purge", "--study", uid, "--yes", "--config", cfg)
        assert r.returncode == 0, r.stderr
        r = dicomrouter("audit", "--since", "1h", "--config", cfg)
        assert r.returncode == 0, r.stderr
        events = [json.loads(line) for line in r.stdout.splitlines()]
        texts = [e["event"] for e in events if e["study_uid"] == uid]
        assert texts[0].startswith("receiving from STORESCU")
        assert any("routes: all; destinations: tree" in t for t in texts), texts
        assert any(t == "delivered to tree" for t in texts), texts
        assert "routing: 'all' matched (no conditions)" in texts, texts
        assert "purged by hand: 2 instance(s)" in texts[-1] and "tree (2)" in texts[-1], texts
        r = dicomrouter("status", "--study", uid, "--config", cfg)
        assert "purged by hand" in r.stdout, r.stdout
        r = dicomrouter("audit", "--since", "yesterday-ish", "--config", cfg)
        assert r.returncode == 2 and "--since" in r.stderr


def test_status_shows_what_was_just_delivered(tmp_path: Path) -> None:
    """Right after a delivery the spool is empty (keep_after_delivery: false): status lists the
    studies delivered in the last 24 h with where they went, instead of "(none)"."""
    studies = generate(tmp_path / "in", studies=2, series=1, instances=2, rows=8, cols=8,
                       seed=113)
    uids = sorted({tags_of(f, "StudyInstanceUID")[0] for f in studies})
    with Router(tmp_path / "router", {
        "destinations": {"archive": {"type": "folder", "path": str(tmp_path / "out")}},
        "routes": [{"to": "archive"}],
    }) as router:
        r = dicomrouter("send", str(tmp_path / "in"), "--port", str(router.port))
        assert r.returncode == 0, r.stderr
        for uid in uids:
            router.wait_state(uid, "delivered")
        cfg = str(router.config_path)
        r = dicomrouter("status", "--config", cfg)
        assert r.returncode == 0, r.stderr
        assert "delivered in the last 24 h" in r.stdout, r.stdout
        for uid in uids:
            line = next(x for x in r.stdout.splitlines() if uid in x)
            assert "2 instance(s) from DICOMSEND → archive" in line, line
        assert "studies in the spool:\n  (none)" in r.stdout
        data = json.loads(dicomrouter("status", "--json", "--config", cfg).stdout)
        assert sorted(s["study_uid"] for s in data["recently_delivered"]) == uids
        assert data["delivered_earlier"] == 0


def test_send_output_is_plain_lines_off_a_terminal(tmp_path: Path) -> None:
    """Off a terminal, send prints no progress label glued to the next line, and a skipped
    file's warning carries no pydicom hint a CLI user cannot act on."""
    generate(tmp_path / "in", series=1, instances=2, rows=8, cols=8, seed=114)
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    with Router(tmp_path / "router", {
        "destinations": {"archive": {"type": "folder", "path": str(tmp_path / "out")}},
        "routes": [{"to": "archive"}],
    }) as router:
        r = dicomrouter("send", str(tmp_path / "in"), "--port", str(router.port))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("sent 2 of 2 instance(s)"), r.stdout
    assert "C-STORE to" not in r.stderr, r.stderr  # the label of a terminal's progress bar
    (warning,) = [line for line in r.stderr.splitlines() if "notes.txt" in line]
    assert warning.startswith("warning: skipping") and "not a DICOM Part 10 file" in warning
    assert "force" not in warning, warning


def test_error_comments_are_cut_at_a_word() -> None:
    from dicomrouter.dimse import error_comment

    text = ("dataset SOPInstanceUID '1.2.3.4.5.6.7.8.9' is not the command's '9.8.7' and the "
            "rest goes past the limit")
    cut = error_comment(text)
    assert len(cut) <= 64 and cut.endswith("...")
    assert text.startswith(cut[:-3]) and text[len(cut) - 3] == " ", cut
    assert error_comment("short") == "short"
    assert error_comment("x" * 80) == "x" * 61 + "..."
    assert error_comment("back\\slash\nnewline") == "back?slash?newline"


def test_serve_check_tests_folder_destinations_and_counts_sources(tmp_path: Path) -> None:
    cfg = tmp_path / "r.yml"
    cfg.write_text("destinations:\n  out: {type: folder, path: /proc/nonexistent/out}\n"
                   "routes: [{to: out}]\n")
    r = dicomrouter("serve", "--check", "--config", str(cfg))
    assert r.returncode == 1, r.stdout
    assert "destinations.out.path: /proc/nonexistent/out cannot be created" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cfg.write_text(f"destinations:\n  out: {{type: folder, path: {blocker}/out}}\n"
                   "routes: [{to: out}]\n")
    r = dicomrouter("serve", "--check", "--config", str(cfg))
    assert r.returncode == 1 and "is not a folder" in r.stderr, r.stderr
    cfg.write_text("destinations:\n  out: {type: folder, path: out, staging: ../staging}\n"
                   "sources:\n  pacs: {type: dicom, ae_title: PACS, host: 127.0.0.1, port: 104}\n"
                   "routes: [{to: out}]\n")
    r = dicomrouter("serve", "--check", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "1 destination(s), 1 route(s), 1 source(s)" in r.stdout
    assert not (tmp_path / "out").exists(), "the check leaves nothing behind"


def test_echo_to_a_web_port_says_it_is_not_dicom(tmp_path: Path) -> None:
    """The classic slip: echo at the router's web port (uvicorn) instead of its DICOM port."""
    from dicomrouter_bench.procs import free_port

    web_port = free_port()
    with Router(tmp_path / "router", {"web": {"enabled": True, "port": web_port}}):
        r = dicomrouter("echo", "--port", str(web_port), "--timeout", "10", timeout=60)
    assert r.returncode == 1
    assert "association aborted by the peer: it answered in HTTP, not DICOM (is this its web " \
        "port?)" in r.stderr, r.stderr
    from dicomrouter.netutil import describe_non_dicom

    assert describe_non_dicom(b"<!DOCTYPE") == \
        ": it does not speak DICOM (it answered '<!DOCTYP')"
    assert describe_non_dicom(b"\x07\x00\x00\x00") == ""


def test_a_stow_connection_error_is_one_short_line(tmp_path: Path) -> None:
    study = generate(tmp_path / "in", series=1, instances=1, rows=8, cols=8, seed=115)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with Router(tmp_path / "router", {
        "destinations": {"cloud": {"type": "dicomweb", "url": f"http://127.0.0.1:{port}/dw",
                                   "retry": {"max_attempts": 1}}},
        "routes": [{"to": "cloud"}],
    }) as router:
        assert dicomrouter("send", str(tmp_path / "in"), "--port",
                           str(router.port)).returncode == 0
        router.wait_state(uid, "failed")
        (dead,) = router.status()["dead"]
    assert dead["last_error"] == (f"STOW-RS to 127.0.0.1:{port}: cannot connect: "
                                   "Connection refused"), dead


def test_status_against_an_unreachable_postgresql_fails_fast(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    import time

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("TEST_DSN", f"postgresql://router:pw@127.0.0.1:{port}/router")
    cfg = tmp_path / "r.yml"
    cfg.write_text("state: {type: postgresql, dsn_env: TEST_DSN}\n")
    started = time.monotonic()
    r = dicomrouter("status", "--config", str(cfg), timeout=60)
    took = time.monotonic() - started
    assert r.returncode == 1
    assert took < 8, f"status took {took:.1f} s"  # 3 s for PostgreSQL, plus Python's start-up
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "PostgreSQL is not reachable (127.0.0.1" in lines[0], r.stderr
    assert "pw" not in r.stderr and "psycopg.pool" not in r.stderr


def test_status_needs_none_of_the_destinations_secrets(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUD_PASSWORD", "secret")
    study = generate(tmp_path / "in", series=1, instances=1, rows=8, cols=8, seed=116)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    with Router(tmp_path / "router", {
        "destinations": {
            "tree": {"type": "folder", "path": str(tmp_path / "out")},
            "cloud": {"type": "dicomweb", "url": "http://127.0.0.1:9/dw", "username": "r",
                      "password_env": "CLOUD_PASSWORD", "retry": {"initial": "1h"}}},
        "routes": [{"to": ["tree", "cloud"]}],
    }) as router:
        assert dicomrouter("send", str(tmp_path / "in"), "--port",
                           str(router.port)).returncode == 0
        router.wait_state(uid, "routed")
        monkeypatch.delenv("CLOUD_PASSWORD")
        cfg = str(router.config_path)
        for args in (["status"], ["status", "--study", uid], ["audit", "--since", "1h"],
                     ["retry", "--destination", "cloud"]):
            r = dicomrouter(*args, "--config", cfg)
            assert r.returncode == 0, (args, r.stderr)
        r = dicomrouter("serve", "--check", "--config", cfg)
        assert r.returncode == 1 and "CLOUD_PASSWORD is not set" in r.stderr


def test_an_embedded_router_keeps_its_heartbeat(tmp_path: Path) -> None:
    """status --json and /api/nodes showed a running embedded router as gone once its start-up
    heartbeat was older than the lease: it renews it like a cluster node."""
    with Router(tmp_path / "router", {"state": {"type": "sqlite", "lease": "3s"}}) as router:
        def renewed() -> bool:
            (node,) = router.status()["nodes"]
            return bool(node["alive"]) and node["heartbeat"] > node["started"] + 1.5

        wait_until(renewed, timeout=60, interval=0.5, what="a renewed heartbeat")
