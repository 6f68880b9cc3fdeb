"""Pull sources fetch what a study gains at the source, never what the router holds, and wait
until a study is no longer being stored there: against Orthanc (C-FIND/C-MOVE; its DICOMweb
plugin; its REST API behind a proxy that stores an instance at the worst moment), DCMTK's
dcmqrscp (a PACS that does not count), Orthanc capping its C-FIND answers, and a kill -9 in
the middle of a C-MOVE."""

from __future__ import annotations

import http.server
import json
import re
import signal
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from peers import DcmQrScp, Orthanc, run_storescu, sop_uids, wait_until
from pydicom import dcmread
from router_fixtures import Router, dataset_bytes, tags_of
from test_sources_interop import polled_since, router_history, source_row, tree

from dicomrouter.sample import generate
from dicomrouter_bench.procs import free_port

STABLE = "3s"  # source_stable_age in these tests


def _pull_lines(router: Router, study: str) -> list[str]:
    return [line for line in router.log(5000).splitlines()
            if f"study {study} pulled" in line]


def _received_at(router: Router, study: str) -> dict[str, float]:
    """SOP Instance UID → when the router recorded it (a re-fetched instance is recorded
    again, with a later time)."""
    con = sqlite3.connect(f"file:{router.spool / 'state.db'}?mode=ro", uri=True)
    try:
        return dict(con.execute("SELECT sop_uid, received_at FROM instances WHERE study_uid=?",
                                (study,)).fetchall())
    finally:
        con.close()


def _history(router: Router, study: str) -> list[str]:
    return [e for _, e in router_history(router, study)]


def _by_series(files: list[Path]) -> list[list[Path]]:
    out: dict[str, list[Path]] = {}
    for f in files:
        out.setdefault(tags_of(f, "SeriesInstanceUID")[0], []).append(f)
    return list(out.values())


def _wait_poll(router: Router, name: str) -> None:
    t = time.time()
    wait_until(lambda: polled_since(router, name, t), timeout=60, what="a poll")


def _stable_then_delta(router: Router, name: str, put: Any, first: list[Path],
                       rest: list[Path], delta: list[Path], root: Path) -> str:
    """``first`` stored at the source, seen by a poll, then ``rest`` (the study still being
    stored): the first pull must bring both. Then ``delta`` arrives there: only it is pulled.
    Returns the study's UID."""
    study = tags_of(first[0], "StudyInstanceUID")[0]
    put(first)
    _wait_poll(router, name)
    put(rest)  # well within source_stable_age of the first sight
    assert not tree(root), "pulled while the study was still being stored"
    whole = sop_uids(first + rest)
    wait_until(lambda: set(tree(root)) >= whole, timeout=90, what="the stable study pulled")
    before = _received_at(router, study)
    put(delta)
    wait_until(lambda: set(tree(root)) >= whole | sop_uids(delta), timeout=90,
               what="the instances stored at the source later")
    first_pulls = [e for e in _history(router, study) if " from source " in e]
    assert first_pulls[0] == f"pulled {len(first) + len(rest)} instance(s) from source {name}", \
        first_pulls
    assert f"pulled {len(delta)} more instance(s) from source {name}" in first_pulls, first_pulls
    after = _received_at(router, study)
    assert {s: after[s] for s in before} == before, "an instance the router held came again"
    row = source_row(router, name)
    total = len(first) + len(rest) + len(delta)
    assert (row["studies_pulled"], row["instances_pulled"]) == (1, total), row
    assert row["last_error"] is None, row
    got = tree(root)
    for f in first + rest + delta:
        assert dataset_bytes(got[tags_of(f, "SOPInstanceUID")[0]]) == dataset_bytes(f)
    return study


def _dicom_router(tmp: Path, port: int, ae: str, dicom_port: int, **extra: Any) -> Router:
    return Router(tmp / "router", {
        "port": port,
        "sources": {"pacs": {"type": "dicom", "ae_title": ae, "host": "127.0.0.1",
                             "port": dicom_port, "interval": "500ms", "lookback": "all",
                             "source_stable_age": STABLE, **extra}},
        "destinations": {"tree": {"type": "folder", "path": str(tmp / "tree")}},
        "routes": [{"to": "tree"}],
    })


@pytest.mark.parametrize("retrieve", ["move", "get"])
def test_dicom_source_waits_for_a_stable_study_then_pulls_only_what_it_gained(
        tmp_path: Path, orthanc, retrieve: str) -> None:
    port = free_port()
    pacs: Orthanc = orthanc(aet="PACS", modalities={"router": ["DICOMROUTER", "127.0.0.1",
                                                               port]})
    a, b, c = _by_series(generate(tmp_path / "study", series=3, instances=8, rows=16, cols=16,
                                  seed=81))
    with _dicom_router(tmp_path, port, "PACS", pacs.dicom_port, retrieve=retrieve) as router:
        _wait_poll(router, "pacs")
        # the delta: 2 instances of a series the router holds part of (IMAGE level) and a
        # series it lacks (SERIES level)
        study = _stable_then_delta(router, "pacs", pacs.upload, a[:3],
                                   a[3:6] + b, a[6:] + c, tmp_path / "tree")
        delta = _pull_lines(router, study)[-1]
        assert "10 of 24 instance(s) there were missing; 10 in" in delta, delta
        assert "2 retrieve(s), 10 sub-operation(s)" in delta, delta
        assert "Traceback" not in router.log(5000)


def _without_counts(path: str, body: bytes) -> bytes:
    """QIDO-RS answers as from a server that does not count a study's instances."""
    if not path.split("?")[0].endswith("/studies"):
        return body
    studies = json.loads(body)
    for study in studies:
        study.pop("00201208", None)
    return json.dumps(studies).encode()


@pytest.mark.parametrize("counts", [True, False], ids=["counted", "not-counted"])
def test_dicomweb_source_waits_for_a_stable_study_then_pulls_only_what_it_gained(
        tmp_path: Path, orthanc, counts: bool) -> None:
    pacs: Orthanc = orthanc(aet="WEBPACS", dicomweb=True)
    a, b = _by_series(generate(tmp_path / "study", series=2, instances=5, rows=16, cols=16,
                               seed=82))
    with _proxy(pacs.url, rewrite=None if counts else _without_counts) as proxy, \
            Router(tmp_path / "router", {
                "sources": {"web": {"type": "dicomweb", "url": f"{proxy.url}/dicom-web",
                                    "interval": "500ms", "lookback": "all",
                                    "source_stable_age": STABLE}},
                "destinations": {"tree": {"type": "folder", "path": str(tmp_path / "tree")}},
                "routes": [{"to": "tree"}],
            }) as router:
        _wait_poll(router, "web")
        _stable_then_delta(router, "web", pacs.upload, a[:2], a[2:4],
                           a[4:] + b, tmp_path / "tree")
        with urllib.request.urlopen(f"{proxy.url}/dicom-web/studies", timeout=30) as r:
            (study,) = json.loads(r.read())
        assert ("00201208" in study) is counts
        assert "Traceback" not in router.log(5000)


class QrScp(DcmQrScp):
    """DCMTK ``dcmqrscp`` (AE ARCHIVE) that may C-MOVE to the router: a PACS that stores, finds
    and moves, but returns no NumberOfStudyRelatedInstances or NumberOfSeriesRelatedInstances."""

    def __init__(self, work_dir: Path, router_port: int) -> None:
        super().__init__(work_dir)
        self.router_port = router_port

    def prepare(self) -> None:
        super().prepare()
        cfg = self.work_dir / "dcmqrscp.cfg"
        cfg.write_text(cfg.read_text().replace(
            "HostTable BEGIN\n",
            f"HostTable BEGIN\nrouter = (DICOMROUTER, 127.0.0.1, {self.router_port})\n"))

    def store(self, files: list[Path]) -> None:
        r = run_storescu(files, self.port, aet="ARCHIVE")
        assert r.returncode == 0, r.stdout + r.stderr


def test_dicom_source_counts_a_study_itself_when_the_pacs_does_not(tmp_path: Path) -> None:
    port = free_port()
    a, b = _by_series(generate(tmp_path / "study", series=2, instances=4, rows=16, cols=16,
                               seed=83))
    with QrScp(tmp_path / "qr", port) as qr, \
            _dicom_router(tmp_path, port, "ARCHIVE", qr.port) as router:
        _wait_poll(router, "pacs")
        study = _stable_then_delta(router, "pacs", qr.store, a[:1], a[1:3], a[3:] + b,
                                   tmp_path / "tree")
        delta = _pull_lines(router, study)[-1]
        assert "5 of 8 instance(s) there were missing; 5 in" in delta, delta
        assert "5 sub-operation(s)" in delta, delta
        assert "Traceback" not in router.log(5000)


def _dated(files: list[Path], date: str, time_: str) -> list[Path]:
    for f in files:
        ds = dcmread(f)
        ds.StudyDate, ds.StudyTime = date, time_
        ds.save_as(f)
    return files


def test_a_capped_cfind_is_narrowed_until_every_study_is_found(tmp_path: Path,
                                                                orthanc) -> None:
    port = free_port()
    pacs: Orthanc = orthanc(aet="PACS", modalities={"router": ["DICOMROUTER", "127.0.0.1",
                                                               port]},
                            extra_config={"LimitFindResults": 5})
    studies: list[list[Path]] = []
    # 4 studies on days of their own, 8 on one day (narrowed by StudyTime), 6 in the same
    # second of another day with the same modality: they cannot be told apart by a query
    plan = [(f"2024030{d}", "101010") for d in range(1, 5)]
    plan += [("20240310", f"{h:02d}3000") for h in range(8, 16)]
    plan += [("20240320", "121212")] * 6
    for i, (date, time_) in enumerate(plan):
        studies.append(_dated(generate(tmp_path / f"s{i}", series=1, instances=1, rows=8,
                                       cols=8, seed=100 + i), date, time_))
    pacs.upload([f for s in studies for f in s])
    with _dicom_router(tmp_path, port, "PACS", pacs.dicom_port,
                       source_stable_age="0s") as router:
        separable = {tags_of(s[0], "SOPInstanceUID")[0] for s in studies[:12]}
        same_second = {tags_of(s[0], "SOPInstanceUID")[0] for s in studies[12:]}
        wait_until(lambda: set(tree(tmp_path / "tree")) >= separable
                   and len(set(tree(tmp_path / "tree")) & same_second) >= 5, timeout=120,
                   what="every study a narrower query finds, and the capped answers")
        wait_until(lambda: source_row(router, "pacs").get("last_error"), timeout=30,
                   what="the poll's error about what it could not cover")
        error = source_row(router, "pacs")["last_error"]
        assert "could not be covered" in error and "StudyDate 20240320-20240320" in error, error
        assert "StudyTime 121212-121212" in error and "still capped at 5" in error, error
        assert source_row(router, "pacs")["studies_pulled"] >= 17
        assert "narrowing the query" in router.log(5000)


def test_a_kill_during_a_cmove_retrieves_only_the_missing_instances(tmp_path: Path,
                                                                    orthanc) -> None:
    port = free_port()
    pacs: Orthanc = orthanc(aet="PACS", modalities={"router": ["DICOMROUTER", "127.0.0.1",
                                                               port]})
    files = generate(tmp_path / "study", series=2, instances=150, rows=64, cols=64, seed=84)
    study = tags_of(files[0], "StudyInstanceUID")[0]
    pacs.upload(files)
    data = tmp_path / "router" / "spool" / "data" / study
    router = _dicom_router(tmp_path, port, "PACS", pacs.dicom_port, source_stable_age="0s")
    with router:
        wait_until(lambda: data.exists() and sum(1 for _ in data.iterdir()) >= 30,
                   timeout=90, interval=0.01, what="the C-MOVE under way")
        assert router.proc is not None
        router.proc.send_signal(signal.SIGSTOP)  # freeze it where it is, then the kill -9
        router.kill()
    held = sum(1 for _ in data.iterdir())
    assert 30 <= held < 300, f"not killed during the C-MOVE ({held} of 300 held)"
    restarted = time.time()
    with router:
        wait_until(lambda: set(tree(tmp_path / "tree")) >= sop_uids(files), timeout=120,
                   what="the whole study delivered after the restart")
        (line,) = _pull_lines(router, study)  # the interrupted pull logged none
        m = re.search(r"(\d+) of 300 instance\(s\) there were missing; (\d+) in; "
                      r"(\d+) retrieve\(s\), (\d+) sub-operation\(s\)", line)
        assert m is not None, line
        missing, brought, _retrieves, sub = map(int, m.groups())
        log = router.log(5000)
        # start-up adopts what the kill left: acknowledged slots, files renamed but not recorded
        slots = sum(map(int, re.findall(r"recovered (\d+) acknowledged instance", log)))
        orphans = sum(map(int, re.findall(r"recorded (\d+) spool file\(s\) the state", log)))
        assert sub == missing == 300 - held - slots, line  # not the 300 of the whole study
        assert brought == 300  # what the interrupted pull stored counts too
        received = _received_at(router, study)
        assert len(received) == 300
        assert sum(t < restarted for t in received.values()) >= held - orphans, \
            "instances held before the kill were moved again"
        row = source_row(router, "pacs")
        # the instances of the interrupted pull count too
        assert (row["studies_pulled"], row["instances_pulled"]) == (1, 300), row
        assert "Traceback" not in router.log(5000)


class _Proxy(http.server.ThreadingHTTPServer):
    """Forwards HTTP to a real server (Orthanc), for what it cannot be made to do itself:
    ``before_delete`` runs before the first DELETE is forwarded; ``rewrite(path, body)`` may
    change a response body."""

    def __init__(self, target: str, before_delete: Any = None, rewrite: Any = None) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.target = target
        self.before_delete = before_delete
        self.rewrite = rewrite
        self.deletes: list[str] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: _Proxy

    def log_message(self, *args: Any) -> None:
        pass

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        if self.command == "DELETE":
            self.server.deletes.append(self.path)
            hook, self.server.before_delete = self.server.before_delete, None
            if hook is not None:
                hook()
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept",
                                                                          "content-type")}
        req = urllib.request.Request(self.server.target + self.path, data=body,
                                     method=self.command, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, ctype, data = r.status, r.headers.get("Content-Type"), r.read()
        except urllib.error.HTTPError as err:
            status, ctype, data = err.code, err.headers.get("Content-Type"), err.read()
        if self.server.rewrite is not None and status == 200:
            data = self.server.rewrite(self.path, data)
        self.send_response(status)
        self.send_header("Content-Type", ctype or "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _forward


@contextmanager
def _proxy(target: str, **hooks: Any) -> Iterator[_Proxy]:
    server = _Proxy(target, **hooks)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_orthanc_source_deletes_exactly_the_instances_it_delivered(tmp_path: Path,
                                                                   orthanc) -> None:
    pacs: Orthanc = orthanc(aet="PACS")
    files = generate(tmp_path / "study", series=1, instances=4, rows=16, cols=16, seed=85)
    first, late = files[:3], files[3]
    study = tags_of(first[0], "StudyInstanceUID")[0]
    with _proxy(pacs.url, before_delete=lambda: pacs.upload([late])) as proxy, \
            Router(tmp_path / "router", {
                "sources": {"orthanc": {"type": "orthanc", "url": proxy.url,
                                        "interval": "500ms", "delete_after_pull": True}},
                "destinations": {"tree": {"type": "folder", "path": str(tmp_path / "tree")}},
                "routes": [{"to": "tree"}],
            }) as router:
        _wait_poll(router, "orthanc")
        pacs.upload(first)
        # the late instance is stored in Orthanc right before the router's first DELETE:
        # it must be pulled and delivered, and deleted only then
        wait_until(lambda: set(tree(tmp_path / "tree")) >= sop_uids(files), timeout=120,
                   what="the instance stored between the look and the delete, delivered")
        wait_until(lambda: pacs.count() == 0, timeout=60, what="Orthanc emptied")
        assert proxy.before_delete is None, "no DELETE happened"
        assert all(p.startswith("/instances/") for p in proxy.deletes), proxy.deletes
        history = _history(router, study)
        deleted = [e for e in history if "deleted at source" in e]
        assert deleted == ["3 instance(s) deleted at source orthanc (delivered everywhere)",
                           "1 instance(s) deleted at source orthanc (delivered everywhere)"], \
            history
        assert "pulled 1 more instance(s) from source orthanc" in history
        row = source_row(router, "orthanc")
        assert (row["studies_pulled"], row["instances_pulled"]) == (1, 4), row
        assert "Traceback" not in router.log(5000)
