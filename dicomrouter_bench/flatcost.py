"""P8: the cost of the router's everyday operations as the work grows.

One measurement runs them against a router whose state holds ``studies`` studies of
``instances`` instances in all (synthetic rows, :mod:`.synthetic`; 0 is the empty state the
ratios compare with): the start-up (recovery scan included) until the port answers, C-FIND at
STUDY level by PatientID and by a StudyDate range of two days (pynetdicom as the SCU, the
association opened beforehand), ``dicomrouter status`` (as a process, and its work alone:
the command run in this process, imports done), a ``/metrics`` scrape, one study-tracker
tick and one housekeeping pass (in this process, on the same database, the router stopped),
and the receive throughput of the small corpus (storescu, one association).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore

from dicomrouter import config as config_mod
from dicomrouter.cli.status import status as status_command
from dicomrouter.completion.housekeeping import Housekeeping
from dicomrouter.completion.tracker import StudyTracker
from dicomrouter.netutil import adjust_associations
from dicomrouter.spool import spool_for
from dicomrouter.state import state_for

from .corpus import Corpus
from .procs import (
    BenchError,
    Postgres,
    RouterServer,
    StoreSCU,
    free_port,
    router_env,
    storescu_argv,
)
from .synthetic import build_postgres, build_sqlite, patient_id, study_date

REPEAT = 7  # each timed operation: the median of this many


def _median_ms(fn: Callable[[], Any], repeat: int = REPEAT) -> float:
    fn()  # warm: the first call pays for imports and cold pages
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def _find(assoc: Any, **keys: str) -> int:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    query.PatientID = ""
    query.StudyDate = ""
    for k, v in keys.items():
        setattr(query, k, v)
    n = 0
    for status, identifier in assoc.send_c_find(query,
                                                StudyRootQueryRetrieveInformationModelFind):
        if status is None:
            raise BenchError("C-FIND: no answer (association lost?)")
        if status.Status in (0xFF00, 0xFF01) and identifier is not None:
            n += 1
    return n


def measure(work: Path, corpus: Corpus, studies: int, instances: int, timeout: float,
            backend: str = "sqlite") -> dict[str, Any]:
    """Every P8 figure for one size of state (``studies`` 0: empty) on ``backend``
    (``sqlite``, or ``postgresql``: a server of its own, fsync on)."""
    with contextlib.ExitStack() as stack:
        config: dict[str, Any] = {
            "stable_age": "1h",  # nothing completes during the measurement
            "query_retrieve": True,
            "web": {"enabled": True, "bind": "127.0.0.1", "port": free_port()},
            "destinations": {"archive": {"type": "folder", "path": str(work / "out")}},
            "routes": [{"to": "archive"}],
            "retention": "3650d",  # the synthetic studies are kept: Q/R finds them
        }
        dsn, pg = "", None
        if backend == "postgresql":
            pg = stack.enter_context(Postgres(work / "pg", fsync=True))
            dsn = pg.dsn
            (work / "dsn").write_text(dsn + "\n")
            config["state"] = {"type": "postgresql", "dsn_file": str(work / "dsn")}
        router = RouterServer(work / "router", config)
        result: dict[str, Any] = {"studies": studies, "instances": instances,
                                  "backend": backend}
        if studies and dsn:
            result["build_seconds"] = build_postgres(dsn, studies, instances)
        elif studies:
            router.spool.mkdir(parents=True, exist_ok=True)
            result["build_seconds"] = build_sqlite(router.spool / "state.db", studies,
                                                   instances)
        os.sync()  # the build's writes on disk now, not during the measurements
        result.update(_with_router(work, router, corpus, studies, timeout, pg))
        result.update(_in_process(router.config_path))
        return result


def _wal_position(pg: Postgres) -> int:
    """Bytes of WAL PostgreSQL has written so far (exact at once, unlike its statistics)."""
    return int(pg.sql("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")[0][0])


def _with_router(work: Path, router: RouterServer, corpus: Corpus, studies: int,
                 timeout: float, pg: Postgres | None = None) -> dict[str, Any]:
    """What is measured from outside, the router running."""
    result: dict[str, Any] = {}
    started = time.perf_counter()
    with router:
        result["startup_seconds"] = time.perf_counter() - started
        web = f"http://127.0.0.1:{router.config['web']['port']}"
        adjust_associations()  # else Nagle and delayed ACKs add 40 ms to every answer
        ae = AE(ae_title="BENCHFIND")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", router.port, ae_title=router.aet)
        if not assoc.is_established:
            raise BenchError("C-FIND: the router did not accept the association")
        try:
            pid = patient_id(studies // 2, studies) if studies else "PAT0000000"
            result["find_patient_ms"] = _median_ms(lambda: _find(assoc, PatientID=pid))
            result["find_patient_matches"] = _find(assoc, PatientID=pid)
            middle = studies // 2
            days = f"{study_date(middle)}-{study_date(middle + 1)}"
            result["find_dates_ms"] = _median_ms(lambda: _find(assoc, StudyDate=days))
            result["find_dates_matches"] = _find(assoc, StudyDate=days)
        finally:
            assoc.release()
        result["metrics_ms"] = _median_ms(
            lambda: urllib.request.urlopen(f"{web}/metrics", timeout=60).read())
        argv = [sys.executable, "-m", "dicomrouter", "status", "--config",
                str(router.config_path)]
        result["status_ms"] = _median_ms(lambda: subprocess.run(
            argv, capture_output=True, check=True, env=router_env(), timeout=120), repeat=3)
        argvs = [storescu_argv(corpus.files, router.port, router.aet, corpus.transfer_syntax,
                               calling="BENCHSCU1")]
        wal = _wal_position(pg) if pg is not None else None
        seconds = StoreSCU(work / "storescu").run(argvs, timeout=timeout)
        result["receive"] = {"seconds": seconds, "instances": corpus.count,
                             "bytes": corpus.size}
        if pg is not None and wal is not None:  # what each received instance cost PostgreSQL
            result["receive"]["wal_bytes_per_instance"] = \
                (_wal_position(pg) - wal) / corpus.count
    return result


def _in_process(config_path: Path) -> dict[str, float]:
    """A tracker tick and a housekeeping pass, timed here on the router's own database."""
    cfg = config_mod.load(config_path, secrets=False)
    state = state_for(cfg)
    try:
        spool = spool_for(cfg, state)
        housekeeping = Housekeeping(cfg, state, spool)
        tracker = StudyTracker(cfg, state, spool, notify=lambda _d: None,
                               settled=housekeeping.settled)
        runner = CliRunner()

        def status() -> None:
            result = runner.invoke(status_command, ["--config", str(config_path)])
            if result.exit_code != 0:
                raise BenchError(f"dicomrouter status failed: {result.output.strip()}")

        return {"tick_ms": _median_ms(tracker.tick, repeat=21),
                "housekeeping_ms": _median_ms(housekeeping.run, repeat=3),
                "status_inprocess_ms": _median_ms(status, repeat=3)}
    finally:
        state.close()
