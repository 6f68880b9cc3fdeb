"""Shared fixtures: real peers (DCMTK, Orthanc, moto S3) and synthetic studies."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from peers import (
    MotoS3,
    Orthanc,
    PeerProcess,
    StoreSCP,
    find_dcmtk,
    find_dicomweb_plugin,
    find_orthanc,
    moto_available,
    require_peer,
)

from dicomrouter.netutil import hand_back_stolen_responses
from dicomrouter.sample import generate
from dicomrouter_bench.procs import Postgres

DCMTK_TOOLS = ("storescu", "storescp", "echoscu")

# The tests' own pynetdicom modalities and PACS get the router's fix of the race in pynetdicom's
# reactor pause (a response taken from a waiting sender, the DIMSE timeout, an abort): without
# it a test fails now and then for a reason that is not the router's (tests/test_netutil.py).
hand_back_stolen_responses()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Remember each phase's report on the item so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _test_failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(getattr(request.node, f"rep_{phase}", None), "failed", False)
        for phase in ("setup", "call")
    )


def _print_logs_on_failure(request: pytest.FixtureRequest, peers: list[PeerProcess]) -> None:
    """Print peer log tails into the failed test's report (captured teardown output)."""
    if not _test_failed(request):
        return
    for peer in peers:
        print(f"\n===== {peer.name} log ({peer.log_path}) =====\n{peer.log(200)}")


@pytest.fixture(scope="session")
def chromium() -> str:
    """The path of Debian's Chromium, with Playwright importable (skip or fail if missing)."""
    import os
    import shutil

    path = shutil.which("chromium") or "/usr/bin/chromium"
    require_peer("Chromium", os.path.exists(path), "chromium (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        require_peer("playwright", False, "playwright (pip install playwright)")
    return path


@pytest.fixture(scope="session")
def dcmtk_available() -> dict[str, str]:
    """Paths of the real DCMTK storescu/storescp/echoscu (skip or fail if missing)."""
    found = {tool: find_dcmtk(tool) for tool in DCMTK_TOOLS}
    missing = [tool for tool, path in found.items() if path is None]
    require_peer(f"DCMTK ({', '.join(missing)})", not missing, "dcmtk (apt-get install dcmtk)")
    return {tool: path for tool, path in found.items() if path is not None}


@pytest.fixture
def storescp(
    tmp_path: Path, dcmtk_available: dict[str, str], request: pytest.FixtureRequest
) -> Iterator[StoreSCP]:
    """A running DCMTK storescp (AE ``STORESCP``) writing to ``.out_dir``."""
    scp = StoreSCP(tmp_path / "storescp", aet="STORESCP")
    with scp:
        yield scp
        _print_logs_on_failure(request, [scp])


@pytest.fixture
def pacs_and_sender(tmp_path: Path, dcmtk_available: dict[str, str],
                    request: pytest.FixtureRequest) -> Iterator[tuple[StoreSCP, StoreSCP]]:
    """Two running DCMTK storescp: ``PACS``, and ``CT1``'s own SCP (a modality's results
    return there)."""
    pacs = StoreSCP(tmp_path / "pacs", aet="PACS")
    sender = StoreSCP(tmp_path / "ct1", aet="CT1")
    with pacs, sender:
        yield pacs, sender
        _print_logs_on_failure(request, [pacs, sender])


@pytest.fixture
def orthanc(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Orthanc]]:
    """Factory starting Orthanc instances: ``orthanc(aet=..., modalities=..., dicomweb=...)``.

    Keyword arguments go to :class:`peers.Orthanc`; all instances stop at teardown.
    """
    require_peer("Orthanc", find_orthanc() is not None, "orthanc (apt-get install orthanc)")
    started: list[PeerProcess] = []
    with ExitStack() as stack:

        def start(**kwargs: Any) -> Orthanc:
            if kwargs.get("dicomweb"):
                require_peer("Orthanc DICOMweb plugin", find_dicomweb_plugin() is not None,
                             "orthanc-dicomweb (apt-get install orthanc-dicomweb)")
            server = Orthanc(tmp_path / f"orthanc{len(started) + 1}", **kwargs)
            started.append(server)
            return stack.enter_context(server)

        yield start
        _print_logs_on_failure(request, started)


@pytest.fixture
def moto_s3(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MotoS3]:
    """A running moto S3 server; use ``.endpoint_url`` or ``.client()``."""
    require_peer("moto server", moto_available(), "moto[server] boto3 (pip install)")
    with MotoS3(tmp_path / "moto") as server:
        yield server
        _print_logs_on_failure(request, [server])


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Postgres]:
    """One PostgreSQL server (Debian's package, initdb in a temporary directory) for the
    session; tests take a fresh database each (``pg_dsn``)."""
    require_peer("PostgreSQL", Postgres.available(),
                 "postgresql (apt-get install postgresql) and psycopg (pip install)")
    with Postgres() as server:
        yield server


@pytest.fixture
def pg_dsn(pg_server: Postgres, request: pytest.FixtureRequest) -> str:
    """The DSN of a fresh, empty database on the session's PostgreSQL."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9]", "_", request.node.name.lower())[:40] + "_" + uuid.uuid4().hex[:6]
    return pg_server.new_database(name)


@pytest.fixture(autouse=True)
def _pynetdicom_defaults() -> Iterator[None]:
    """Router code run in-process (``netutil``: chunked C-STORE receive into the spool, chunked
    sends, the Q/R service class) switches pynetdicom's process-wide settings; a later test in
    the same worker whose pynetdicom peer receives a C-STORE (an AI node, a C-GET requester)
    would then get an empty or unreadable dataset. Each test gets them back as they were."""
    from pynetdicom import _config, association, dimse_messages

    saved = (_config.STORE_RECV_CHUNKED_DATASET, _config.STORE_SEND_CHUNKED_DATASET,
             dimse_messages.NamedTemporaryFile, association.uid_to_service_class)
    yield
    (_config.STORE_RECV_CHUNKED_DATASET, _config.STORE_SEND_CHUNKED_DATASET,
     dimse_messages.NamedTemporaryFile, association.uid_to_service_class) = saved


@pytest.fixture(params=["sqlite", "postgresql"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """The state on both backends: SQLite in ``tmp_path``, a fresh database on the session's
    PostgreSQL (jobs leased for 3 s). A test file may define its own ``state`` instead."""
    from dicomrouter.state.postgres import PostgresState
    from dicomrouter.state.sqlite import SQLiteState

    if request.param == "sqlite":
        s: Any = SQLiteState(tmp_path / "state.db")
    else:
        s = PostgresState(request.getfixturevalue("pg_dsn"), "node-a", tmp_path, lease=3)
    yield s
    s.close()


@pytest.fixture
def sample_study(tmp_path: Path) -> list[Path]:
    """One synthetic CT study: 2 series x 3 instances, 32x32, Explicit VR LE, seed 1234."""
    return generate(tmp_path / "sample_study", studies=1, series=2, instances=3, rows=32, cols=32,
                    patient_id="PYTEST1", seed=1234)
