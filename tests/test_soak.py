"""The chaos soak, 3 minutes: senders never stop while storescp, Orthanc, the S3 server,
PostgreSQL, a router node and the spool's disk fail in turn; every acknowledged instance must reach
every destination (dicomrouter_bench/soak.py; the 30-minute figures are in docs/performance.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from peers import REPO_ROOT, find_dcmtk, find_orthanc, require_peer

from dicomrouter_bench.procs import MotoServer, Postgres, find_dicomweb_plugin


def test_soak_three_minutes_two_nodes_every_fault(tmp_path: Path) -> None:
    missing = [t for t in ("storescu", "storescp", "echoscu") if find_dcmtk(t) is None]
    require_peer(f"DCMTK ({', '.join(missing)})", not missing, "dcmtk (apt-get install dcmtk)")
    require_peer("Orthanc with DICOMweb", find_orthanc() is not None
                 and find_dicomweb_plugin() is not None,
                 "orthanc orthanc-dicomweb (apt-get install orthanc orthanc-dicomweb)")
    require_peer("PostgreSQL", Postgres.available(), "postgresql (apt-get install postgresql)")
    require_peer("moto server", MotoServer.available(), "moto[server] (pip install '.[test]')")
    out = tmp_path / "soak.json"
    env = {**os.environ, "TCP_NODELAY": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                      os.environ.get("PYTHONPATH")]))}
    r = subprocess.run(
        [sys.executable, "-m", "dicomrouter_bench.cli", "--only", "soak", "--minutes", "3",
         "--soak-cluster", "--workdir", str(tmp_path / "work"), "--json-out", str(out)],
        capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path)
    assert out.exists(), r.stdout + r.stderr
    soak = json.loads(out.read_text())["soak"]
    assert r.returncode == 0 and soak["ok"], (soak, r.stdout, r.stderr[-3000:])
    faults = soak["faults"]
    expected = {"storescp", "orthanc", "s3-freeze", "router-kill", "postgresql"}
    if os.geteuid() == 0:  # the spool's own tmpfs, filled to just under min_free_disk
        expected.add("disk-full")
    assert expected <= set(faults), faults
    assert soak["acked"] > 100, soak
    # every acknowledged instance at each of the three destinations (counted there: storescp's
    # files, Orthanc's instances, the bucket's objects), each sent at most once per fault
    assert soak["delivered"] == {"archive": soak["acked"], "pacs": soak["acked"],
                                 "viewer": soak["acked"]}, soak
    assert soak["ledger"]["max_sends"] <= 1 + sum(faults.values()), soak
    assert soak["tracebacks"] == 0 and soak["memory"]["flat"], soak
    if "disk-full" in faults:
        assert soak["disk_full_refusals"] > 0, soak
