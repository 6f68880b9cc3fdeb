"""The benchmark runs end to end on tiny corpora, and its arithmetic is right (no timing checks)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from peers import REPO_ROOT, find_dcmtk, find_orthanc, require_peer

from dicomrouter_bench.profile import format_profile, parse_collapsed, top
from dicomrouter_bench.report import Row, build_rows, median, render_markdown, render_text
from dicomrouter_bench.scenarios import Settings


def _leftover_processes(marker: str) -> list[str]:
    """Command lines of running processes that mention ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(cmdline)
    return found


def test_bench_smoke_tiny_corpora(tmp_path: Path) -> None:
    tools = ("storescu", "storescp", "echoscu")
    missing = [t for t in tools if find_dcmtk(t) is None]
    require_peer(f"DCMTK ({', '.join(missing)})", not missing, "dcmtk (apt-get install dcmtk)")
    require_peer("Orthanc", find_orthanc() is not None, "orthanc (apt-get install orthanc)")
    work = tmp_path / "work"
    out = tmp_path / "bench.json"
    env = {**os.environ, "TCP_NODELAY": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                      os.environ.get("PYTHONPATH")]))}
    r = subprocess.run(
        [sys.executable, "-m", "dicomrouter_bench.cli", "--small", "20", "--ct", "4", "--large-mb",
         "5", "--study-mb", "9", "--runs", "1", "--nodes", "2", "--flat-studies", "40",
         "--flat-instances", "2000", "--workdir", str(work), "--json-out", str(out)],
        capture_output=True, text=True, timeout=420, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    for scenario in ("P1", "P2", "P3", "P4", "P5", "P7", "P8"):
        assert re.search(rf"^{scenario}\s", r.stdout, re.MULTILINE), (scenario, r.stdout)
    assert re.search(r"^P3\s+end to end small → Orthanc via STOW-RS.*C-STORE", r.stdout,
                     re.MULTILINE), r.stdout
    data = json.loads(out.read_text())
    assert {row["id"] for row in data["rows"]} == {"P1", "P2", "P3", "P4", "P5", "P7", "P8"}
    # P8: the synthetic state is what the router answers from: C-FIND finds its studies
    for prefix in ("P8", "P8/pg"):  # SQLite, and PostgreSQL (a server of its own)
        large, empty = data["runs"][0][f"{prefix}/large"], data["runs"][0][f"{prefix}/empty"]
        assert (large["instances"], empty["instances"]) == (2000, 0)
        assert large["find_patient_matches"] == 2 and empty["find_patient_matches"] == 0, large
        assert large["find_dates_matches"] >= 1, large
        assert large["receive"]["instances"] == 20 and large["tick_ms"] >= 0, large
    p8 = [r["measurement"] for r in data["rows"] if r["id"] == "P8"]
    assert len([m for m in p8 if "SQLite" in m]) == len([m for m in p8 if "PostgreSQL" in m]) \
        == 9, p8
    # P7: one node in both ack_after modes and two nodes, each with its per-instance costs
    for key in ("nodes1-shared", "nodes1-local", "nodes2-shared", "nodes2-shared-pinned"):
        m = data["runs"][0][f"P7/small/{key}"]
        assert m["instances"] == 20 and m["s3_objects"] == 1.0, m
        assert m["pg_transactions"] >= 1.0 and m["router_cpu_ms"] > 0, m
    assert not any("error" in m for m in data["runs"][0].values())
    # P5: the CPU the receivers spent (what more cores would buy), router and storescp --fork
    for kind in ("router", "router-2", "storescp-fork"):
        assert data["runs"][0][f"P5/small/{kind}"]["cpu_seconds"] > 0, kind
    assert all("CPU s/1000" in r["router"] for r in data["rows"]
               if r["id"] == "P5" and r["measurement"].startswith("receive")), data["rows"]
    assert data["runs"][0]["P4/study/router"]["instances"] == 5  # 9 MB of 2.1 MB instances
    for mode in ("stow", "cstore"):  # P3: both paths into the DICOMweb-enabled Orthanc
        assert data["runs"][0][f"P3/small/{mode}"]["instances"] == 20
    for mode in ("stow-in", "cstore-in"):  # P3: STOW-RS ingest against C-STORE ingest
        assert data["runs"][0][f"P3/ct/{mode}"]["instances"] == 4
    assert re.search(r"^P3\s+STOW-RS ingest vs C-STORE ingest.*C-STORE", r.stdout,
                     re.MULTILINE), r.stdout
    assert [r["measurement"] for r in data["rows"] if r["id"] == "P4"] == [
        "peak RSS, large instance (5 MB) in + out",
        "peak RSS, big study (5 × 2.1 MB) in + out",
        "peak RSS, big study via STOW-RS (5 × 2.1 MB) in + out",
        "peak RSS, big study as an S3 zip (5 × 2.1 MB) in + out",
        "peak RSS, big study as a folder zip (5 × 2.1 MB) in + out"]
    # P1: the receive log (the default) and the slot path (receive_log: false) side by side
    p1 = [r["measurement"] for r in data["rows"] if r["id"] == "P1"]
    assert len([m for m in p1 if "receive_log: false" in m]) == 2, p1
    # P2: forwarding while receiving, beside the stable-age router, for both corpora
    p2 = [r["measurement"] for r in data["rows"] if r["id"] == "P2"]
    assert len([m for m in p2 if "forward: immediate" in m]) == 2, p2
    for corpus in ("small", "ct"):
        m = data["runs"][0][f"P2/{corpus}/router-immediate"]
        assert m["stable_age"] == 0 and m["seconds"] == m["total_seconds"], m
    # everything it started is gone, and so is its temporary directory
    assert _leftover_processes(str(work)) == []
    assert list(work.iterdir()) == []


def test_ratios_are_medians_of_per_run_ratios() -> None:
    def rx(seconds: float) -> dict[str, float]:
        return {"seconds": seconds, "instances": 100, "bytes": 1_000_000, "associations": 1}

    # run 1: router 2x slower, run 2: router as fast, run 3: router 4x slower
    runs = [{"P1/small/router": rx(2.0), "P1/small/storescp": rx(1.0)},
            {"P1/small/router": rx(5.0), "P1/small/storescp": rx(5.0)},
            {"P1/small/router": rx(4.0), "P1/small/storescp": {"error": "boom"}}]
    settings = Settings(runs=3, scenarios=frozenset({"P1"}), orthanc=False)
    rows = build_rows(settings, runs)
    small = next(r for r in rows if r.measurement.startswith("receive small"))
    assert small.values["ratio"] == median([0.5, 1.0])  # the failed run has no pair
    assert small.verdict == "not met"
    assert small.router.startswith("25 inst/s")  # median of 50, 20, 25 inst/s
    assert {r.id for r in rows} == {"P1", "P2", "P3", "P4", "P5", "P7", "P8"}
    assert next(r for r in rows if r.id == "P3").verdict == "-"  # not selected
    text, md = render_text(rows), render_markdown(rows)
    assert text.splitlines()[0].split()[0] == "measurement"
    assert md.count("\n") == len(rows) + 1


def test_collapsed_stacks_summary() -> None:
    raw = ("thread (0x1): MainThread;main (a.py:1);work (a.py:5);fsync (b.py:9) 3\n"
           "thread (0x2): AcceptorThread@20261123;main (a.py:1);work (a.py:6) 1\n")
    prof = parse_collapsed(raw)
    assert prof.total == 4
    assert prof.threads == {"MainThread [0x1]": 3, "AcceptorThread [0x2]": 1}
    assert prof.thread_self["MainThread [0x1]"] == {"fsync (b.py:9)": 3}
    text = format_profile("wall", prof)
    assert "thread MainThread [0x1]: 3 samples, all in fsync (b.py:9)" in text
    assert prof.self_lines["fsync (b.py:9)"] == 3
    assert prof.cumulative["work (a.py)"] == 4  # two lines, one function
    assert top(prof.self_lines, prof.total, 1) == [("fsync (b.py:9)", 75.0)]
    assert Row("P9", "x", "y", "z").verdict == "-"
