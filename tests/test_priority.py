"""STAT overtakes routine work already queued and running for the same destination (issue 26,
item 1), as the destination sees it.

2,000 routine instances go to one C-STORE destination (a pynetdicom Storage SCP that records
the order and time of every arrival, and takes a few milliseconds per instance, as a PACS
does). Once their delivery is running, a study whose RequestedProcedurePriority is STAT
arrives: a route with ``priority: stat`` matches it. Its first instance must reach the
destination within a few seconds of its routing, after at most one chunk of the routine study
(``chunk_instances``), all of it before the routine study resumes; the routine study then
completes, every instance exactly once.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from peers import free_port, run_storescu, wait_until
from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt
from router_fixtures import Router, dicomrouter

from dicomrouter.sample import generate

CHUNK = 100
STORE_SECONDS = 0.004  # the destination's own time per instance


class RecordingSCP:
    """A Storage SCP recording (monotonic time, SOP Instance UID) of each C-STORE, in order."""

    def __init__(self) -> None:
        self.port = free_port()
        self.arrivals: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._server: Any = None

    def _store(self, event: Any) -> int:
        time.sleep(STORE_SECONDS)
        with self._lock:
            self.arrivals.append((time.time(), str(event.request.AffectedSOPInstanceUID)))
        return 0x0000

    def uids(self) -> list[str]:
        with self._lock:
            return [u for _t, u in self.arrivals]

    def __enter__(self) -> RecordingSCP:
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        ae.maximum_pdu_size = 0
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()


def _stat_study(tmp_path: Path) -> list[Path]:
    files = generate(tmp_path / "stat", series=1, instances=5, rows=16, cols=16, seed=262)
    for f in files:  # what a modality's worklist entry gives it for an urgent order
        ds = dcmread(f)
        ds.RequestedProcedurePriority = "STAT"
        ds.save_as(f, enforce_file_format=True)
    return files


def test_a_stat_study_overtakes_2000_routine_instances_being_delivered(tmp_path: Path) -> None:
    routine = generate(tmp_path / "routine", series=4, instances=500, rows=16, cols=16,
                       seed=261)
    stat = _stat_study(tmp_path)
    routine_uids = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in routine}
    stat_uids = {str(dcmread(f).SOPInstanceUID) for f in stat}
    stat_study = str(dcmread(stat[0]).StudyInstanceUID)
    with RecordingSCP() as pacs:
        router = Router(tmp_path / "router", {
            "stable_age": "2s", "chunk_instances": CHUNK,
            "destinations": {"pacs": {"type": "dicom", "ae_title": "PACS",
                                      "host": "127.0.0.1", "port": pacs.port}},
            "routes": [{"name": "stat", "when": {"RequestedProcedurePriority": "STAT"},
                        "priority": "stat", "to": ["pacs"]},
                       {"name": "everything", "to": ["pacs"]}]})
        router.start()
        try:
            assert run_storescu([tmp_path / "routine"], router.port,
                                timeout=600).returncode == 0
            # the routine study is being delivered, past its first chunks
            wait_until(lambda: len(pacs.uids()) >= 3 * CHUNK, timeout=180,
                       what="the routine delivery under way")
            assert run_storescu(stat, router.port).returncode == 0
            wait_until(lambda: stat_uids <= set(pacs.uids()), timeout=120,
                       what="the STAT study delivered")
            wait_until(lambda: routine_uids <= set(pacs.uids()), timeout=300,
                       what="the routine study delivered afterwards")
            router.wait_state(stat_study, "delivered")
            arrivals = list(pacs.arrivals)
            r = dicomrouter("status", "--study", stat_study, "--json", "--config",
                            str(router.config_path))
            assert r.returncode == 0, r.stderr
            shown = json.loads(r.stdout)
            log = router.log(200_000)
        finally:
            router.stop()
    order = [u for _t, u in arrivals]
    # each instance exactly once
    assert len(order) == len(set(order)) == len(routine_uids) + len(stat_uids)
    first = min(i for i, u in enumerate(order) if u in stat_uids)
    last = max(i for i, u in enumerate(order) if u in stat_uids)
    # overtook: routine work was still to come when STAT arrived, and STAT went in one piece
    assert sum(1 for u in order[last + 1:] if u in routine_uids) > 0, "routine was done first"
    assert last - first == len(stat_uids) - 1, order[first:last + 1]
    # within a few seconds of its routing, after at most one chunk of the routine study
    routed = next(ts for ts, e in shown["history"] if e.startswith("complete ("))
    waited = arrivals[first][0] - routed
    before = sum(1 for t, u in arrivals if routed <= t < arrivals[first][0] and
                 u in routine_uids)
    print(f"STAT waited {waited:.2f} s after its routing, behind {before} routine "
          f"instance(s); overtook {sum(1 for u in order[last + 1:] if u in routine_uids)}")
    assert waited < 6.0, waited
    assert before <= CHUNK + 1, before
    job = shown["jobs"][0]
    assert job["priority"] == "stat" and job["routes"] == ["stat", "everything"]
    assert "a more urgent job of the destination goes first" in log
    assert any("priority: pacs stat" in e for _ts, e in shown["history"])
    assert "Traceback" not in log
