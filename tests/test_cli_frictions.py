"""A newcomer's frictions with the CLI: every error is one line, exit 2 for usage, 1 for
failure; warnings where a mistake would otherwise pass silently."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from peers import run_storescu
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
