"""One destination down, slow or refusing never holds up another (issue 26, item 2).

Each destination has its own delivery workers, its own retries and backoff; this checks it
end to end with real peers beside a healthy DCMTK storescp: a pynetdicom Storage SCP that
answers each C-STORE after 2 s, a port nobody listens on, and a storescp that refuses every
association (``--refuse``). The healthy destination gets the whole study while the slow one is
still on its first instances, and about as fast as when it is the only destination.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from peers import StoreSCP, free_port, run_storescu, sop_uids, wait_until
from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt
from router_fixtures import Router

from dicomrouter.sample import generate

SLOW_SECONDS = 2.0


class SlowSCP:
    """A Storage SCP (pynetdicom) that takes ``SLOW_SECONDS`` to answer each C-STORE."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[str] = []
        self._lock = threading.Lock()
        self._server: Any = None

    def _store(self, event: Any) -> int:
        time.sleep(SLOW_SECONDS)
        with self._lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def __enter__(self) -> SlowSCP:
        ae = AE(ae_title="SLOW")
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()


def _dicom(aet: str, port: int) -> dict[str, Any]:
    return {"type": "dicom", "ae_title": aet, "host": "127.0.0.1", "port": port,
            "timeout": "30s", "retry": {"initial": "1s", "max_delay": "5s",
                                        "max_attempts": 1000}}


def _deliver(tmp_path: Path, name: str, files: list[Path], destinations: dict[str, Any],
             healthy: StoreSCP) -> tuple[float, Router]:
    """Send the study; seconds until the healthy destination has all of it."""
    router = Router(tmp_path / name, {
        "stable_age": "1s", "destinations": destinations,
        "routes": [{"name": "all", "to": list(destinations)}]})
    router.start()
    started = time.monotonic()
    assert run_storescu(files, router.port, aet=router.aet).returncode == 0
    wait_until(lambda: sop_uids(healthy.files()) >= sop_uids(files), timeout=120,
               what=f"the healthy destination served ({name})")
    return time.monotonic() - started, router


def test_a_slow_a_down_and_a_refusing_destination_hold_up_no_other(tmp_path: Path) -> None:
    first = generate(tmp_path / "a", series=1, instances=20, rows=16, cols=16, seed=81)
    second = generate(tmp_path / "b", series=1, instances=20, rows=16, cols=16, seed=82)
    # alone: the healthy destination's time on this machine, now
    with StoreSCP(tmp_path / "alone", aet="HEALTHY") as alone:
        t_alone, router = _deliver(tmp_path, "alone", first, {"healthy": _dicom(
            "HEALTHY", alone.port)}, alone)
        router.stop()
    with StoreSCP(tmp_path / "healthy", aet="HEALTHY") as healthy, \
            StoreSCP(tmp_path / "refusing", aet="REFUSING", extra=["--refuse"]) as refusing, \
            SlowSCP() as slow:
        t_beside, router = _deliver(tmp_path, "beside", second, {
            "healthy": _dicom("HEALTHY", healthy.port),
            "slow": _dicom("SLOW", slow.port),
            "down": _dicom("DOWN", free_port()),
            "refusing": _dicom("REFUSING", refusing.port)}, healthy)
        try:
            # the slow one needs 40 s for the study: it is still on its first instances
            assert len(slow.received) < len(second), slow.received
            study = str(dcmread(second[0]).StudyInstanceUID)
            assert router.study_state(study) in ("routed", "failed")  # not delivered yet
            # their failures are their own jobs' errors, retried (or dead-lettered) on their own
            for name in ("down", "refusing"):
                wait_until(lambda name=name: f"{study} → {name}: attempt 1/" in router.log(20000),
                           timeout=60, what=f"the {name} destination's failed attempt")
            assert "Traceback" not in router.log(20000)
        finally:
            router.stop()
    # beside the broken ones, within the noise of this box (2 shared cores)
    assert t_beside <= 3 * t_alone + 5, (t_alone, t_beside)
