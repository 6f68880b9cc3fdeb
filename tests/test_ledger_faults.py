"""The ledger's promises under faults: what a destination confirmed is never sent again, what
was only accepted is not counted as stored, sends count what went on the wire, an interrupted
S3 upload leaves nothing open, an identical re-send is not delivered twice."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from peers import DcmQrScp, MotoS3, StoreSCP, run_storescu, wait_until
from pydicom import dcmread
from router_fixtures import Router, dicomrouter, tags_of
from stow_server import StowServer

from dicomrouter.sample import generate

FAST_RETRY = {"initial": "1s", "max_delay": "2s", "max_attempts": 6}


def _study(tmp_path: Path, seed: int, instances: int) -> tuple[Path, list[Path], str]:
    folder = tmp_path / f"study{seed}"
    files = generate(folder, series=1, instances=instances, rows=8, cols=8, seed=seed)
    return folder, files, tags_of(files[0], "StudyInstanceUID")[0]


def _send(router: Router, folder: Path) -> None:
    r = dicomrouter("send", str(folder), "--port", str(router.port))
    assert r.returncode == 0, r.stderr


def _stow_router(tmp_path: Path, server: StowServer, **options: Any) -> Router:
    return Router(tmp_path / "router", {
        "destinations": {"cloud": {"type": "dicomweb", "url": server.url, "batch_size": 10,
                                   "retry": FAST_RETRY, **options}},
        "routes": [{"to": "cloud"}],
    })


def test_a_503_mid_study_resends_only_the_unconfirmed_batch(tmp_path: Path) -> None:
    """Batches 1 and 2 confirmed, batch 3 answered 503: the retry sends batch 3 alone (it
    once re-sent the study from the first instance: 20 twice)."""
    folder, files, uid = _study(tmp_path, 201, 30)
    with StowServer(lambda n: "503" if n == 3 else "ok") as server, \
            _stow_router(tmp_path, server) as router:
        _send(router, folder)
        router.wait_state(uid, "delivered", timeout=120)
        assert set(server.stored) == {tags_of(f, "SOPInstanceUID")[0] for f in files}
        assert len(server.received) == 40, "20 confirmed once, batch 3 twice (refused, retried)"
        assert len(set(server.received)) == 30
        ledger = router.status()["ledger"]
        assert (ledger["sends"], ledger["delivered"], ledger["resent"]) == (40, 30, 10), ledger
        assert "failed after 20 delivered" in router.log(5000)


def test_kill_during_a_stow_batch_resumes_after_the_confirmed_ones(tmp_path: Path) -> None:
    folder, _files, uid = _study(tmp_path, 202, 30)
    plan = {"hang_on": 3}
    with StowServer(lambda n: "hang" if n == plan["hang_on"] else "ok") as server:
        router = _stow_router(tmp_path, server)
        with router:
            _send(router, folder)
            assert server.hanging.wait(120), "the third STOW-RS request"
            router.kill()  # kill -9 while batch 3 is on the wire
            plan["hang_on"] = 0
            server.release.set()
            posts_before = server.posts
            router.start()
            router.wait_state(uid, "delivered", timeout=120)
            assert server.posts - posts_before == 1, "only batch 3 again, in one request"
            assert len(server.received) == 40 and len(set(server.received)) == 30
            ledger = router.status()["ledger"]
            assert ledger["delivered"] == 30 and ledger["resent"] == 10, ledger


def test_verify_qido_counts_only_what_the_server_lists(tmp_path: Path) -> None:
    """The server answers 200 for every instance but keeps one of them (as Orthanc 1.10 does
    for an instance its filter refused): with verify: qido that one is retried, then
    dead-lettered as accepted but not stored; the others are delivered once."""
    folder, files, uid = _study(tmp_path, 203, 5)
    lost = tags_of(files[2], "SOPInstanceUID")[0]
    with StowServer(lambda n: f"drop:{lost}") as server, \
            _stow_router(tmp_path, server, verify="qido",
                         retry={"initial": "1s", "max_attempts": 2}) as router:
        _send(router, folder)
        router.wait_state(uid, "failed", timeout=120)
        (dead,) = router.status()["dead"]
        assert "1 of 1 instance(s) refused" in dead["last_error"], dead
        assert "accepted but not stored" in dead["last_error"], dead
        assert server.received.count(lost) == 2
        assert len(server.received) == 6, "the retry sends the lost one only"
        assert lost not in server.stored and len(server.stored) == 4
        assert router.status()["ledger"]["delivered"] == 4


@pytest.mark.usefixtures("dcmtk_available")
@pytest.mark.parametrize("ignore", [False, True], ids=["keeps", "ignores"])
def test_verify_c_find_against_a_pacs(tmp_path: Path, ignore: bool) -> None:
    """dcmqrscp --ignore answers C-STORE with success and keeps nothing: with verify: c-find
    nothing is counted delivered; a dcmqrscp that keeps them verifies every instance."""
    folder, files, uid = _study(tmp_path, 204, 3)
    with DcmQrScp(tmp_path / "pacs", ignore=ignore) as pacs, Router(tmp_path / "router", {
        "destinations": {"pacs": {"type": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1",
                                  "port": pacs.port, "verify": "c-find",
                                  "retry": {"initial": "1s", "max_attempts": 1}}},
        "routes": [{"to": "pacs"}],
    }) as router:
        _send(router, folder)
        if ignore:
            router.wait_state(uid, "failed", timeout=120)
            (dead,) = router.status()["dead"]
            assert "3 of 3 instance(s) refused" in dead["last_error"], dead
            assert "accepted but not stored" in dead["last_error"]
            assert router.status()["ledger"]["delivered"] == 0
        else:
            router.wait_state(uid, "delivered", timeout=120)
            assert router.status()["ledger"]["delivered"] == 3
            stored = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                      for p in pacs.db.glob("*") if p.is_file() and p.name != "index.dat"}
            assert stored == {tags_of(f, "SOPInstanceUID")[0] for f in files}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sends_count_what_went_on_the_wire(tmp_path: Path, moto_s3: MotoS3,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing connects: nothing was sent, whatever was buffered (it once counted one send
    per instance and attempt)."""
    monkeypatch.setenv("S3_KEY", MotoS3.access_key)
    monkeypatch.setenv("S3_SECRET", MotoS3.secret_key)
    folder, _files, uid = _study(tmp_path, 205, 3)
    retry = {"initial": "1s", "max_attempts": 2}
    with Router(tmp_path / "router", {
        "destinations": {
            "cloud": {"type": "dicomweb", "url": f"http://127.0.0.1:{_closed_port()}/dw",
                      "retry": retry},
            "bucket": {"type": "s3", "bucket": "b", "region": "us-east-1",
                       "endpoint_url": f"http://127.0.0.1:{_closed_port()}",
                       "access_key_env": "S3_KEY", "secret_key_env": "S3_SECRET",
                       "timeout": "2s", "retry": retry}},
        "routes": [{"to": ["cloud", "bucket"]}],
    }) as router:
        _send(router, folder)
        wait_until(lambda: len(router.status()["dead"]) == 2, timeout=180, what="2 dead jobs")
        assert router.study_state(uid) == "failed"
        ledger = router.status()["ledger"]
        assert ledger["sends"] == 0 and ledger["resent"] == 0, ledger


class ThrottlingProxy:
    """A TCP proxy to ``target`` passing at most ``rate`` bytes/s towards it: an S3 upload
    slow enough to be interrupted."""

    def __init__(self, target: tuple[str, int], rate: int) -> None:
        self.target, self.rate = target, rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False),
                             daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, slow: bool) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
                if slow:
                    time.sleep(len(chunk) / self.rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()


@pytest.mark.usefixtures("dcmtk_available")
def test_kill_during_an_s3_multipart_upload_aborts_it_at_the_next_start(
        tmp_path: Path, moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S3_KEY", MotoS3.access_key)
    monkeypatch.setenv("S3_SECRET", MotoS3.secret_key)
    s3 = moto_s3.client()
    s3.create_bucket(Bucket="exports")
    files = generate(tmp_path / "big", series=1, instances=2, rows=3000, cols=3000, seed=206)
    uid = tags_of(files[0], "StudyInstanceUID")[0]
    proxy = ThrottlingProxy(("127.0.0.1", int(moto_s3.endpoint_url.rsplit(":", 1)[1])),
                            rate=8_000_000)
    try:
        router = Router(tmp_path / "router", {
            "destinations": {"bucket": {"type": "s3", "bucket": "exports", "region": "us-east-1",
                                        "endpoint_url": f"http://127.0.0.1:{proxy.port}",
                                        "access_key_env": "S3_KEY", "secret_key_env": "S3_SECRET",
                                        "retry": FAST_RETRY}},
            "routes": [{"to": "bucket"}],
        })
        with router:
            assert run_storescu(files, router.port).returncode == 0
            wait_until(lambda: s3.list_multipart_uploads(Bucket="exports").get("Uploads"),
                       timeout=120, interval=0.05, what="the zip's multipart upload")
            router.kill()
            (open_upload,) = s3.list_multipart_uploads(Bucket="exports")["Uploads"]
            router.start()
            router.wait_state(uid, "delivered", timeout=180)
            log = router.log(5000)
            assert "aborted 1 unfinished multipart upload(s)" in log, log
            assert open_upload["Key"] in log
            assert "partial reception" not in log and "never acknowledged" not in log
            assert not s3.list_multipart_uploads(Bucket="exports").get("Uploads")
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket="exports")["Contents"]]
            assert keys == [open_upload["Key"]]
            assert not list((router.spool / "exports").rglob("*.part"))
    finally:
        proxy.close()


@pytest.mark.usefixtures("dcmtk_available")
def test_an_identical_resend_is_not_delivered_again(tmp_path: Path) -> None:
    """A PACS retrying after a lost C-STORE response sends the same bytes again: the study
    reopens, but the destination does not get them twice. A changed instance (same UID, new
    content) is delivered again."""
    folder, files, uid = _study(tmp_path, 207, 3)
    with StoreSCP(tmp_path / "pacs", aet="PACS") as pacs, Router(tmp_path / "router", {
        "destinations": {"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                                  "port": pacs.port}},
        "routes": [{"to": "pacs"}],
    }) as router:
        def stores() -> int:
            return pacs.log(100000).count("Received Store Request")

        assert run_storescu(files, router.port).returncode == 0
        router.wait_state(uid, "delivered")
        wait_until(lambda: stores() == 3, what="3 instances at the PACS")
        assert run_storescu(files, router.port).returncode == 0  # the very same bytes
        wait_until(lambda: any("identical content" in e for e in _history(router, uid)),
                   timeout=90, what="the identical re-send in the history")
        router.wait_state(uid, "delivered")
        assert stores() == 3, "an identical re-send was delivered again"
        changed = dcmread(files[1])
        changed.SeriesDescription = "CORRECTED"
        changed.save_as(files[1], enforce_file_format=True)
        assert run_storescu([files[1]], router.port).returncode == 0
        wait_until(lambda: stores() == 4, timeout=90, what="the corrected instance")
        router.wait_state(uid, "delivered")
        got = next(p for p in pacs.files()
                   if dcmread(p).SOPInstanceUID == dcmread(files[1]).SOPInstanceUID)
        assert dcmread(got).SeriesDescription == "CORRECTED"
        ledger = router.status()["ledger"]
        assert ledger["resent"] == 0 and ledger["delivered"] == 3, ledger


@pytest.mark.usefixtures("dcmtk_available")
def test_a_zip_is_not_made_again_for_an_identical_resend_and_made_whole_for_a_change(
        tmp_path: Path) -> None:
    """A whole-study destination: the same study sent again does not rewrite the zip; one
    corrected instance makes it again, whole (the identical instances inside it too)."""
    import zipfile

    _folder, files, uid = _study(tmp_path, 208, 3)
    out = tmp_path / "zips"
    with Router(tmp_path / "router", {
            "retention": "1h",  # the study stays in the spool to be zipped whole again
            "destinations": {"out": {"type": "folder", "path": str(out), "zip": True}},
            "routes": [{"to": "out"}]}) as router:
        assert run_storescu(files, router.port).returncode == 0
        router.wait_state(uid, "delivered")
        (first,) = list(out.rglob("*.zip"))
        made = first.stat().st_mtime_ns
        assert run_storescu(files, router.port).returncode == 0  # the very same bytes
        wait_until(lambda: any("identical content" in e for e in _history(router, uid)),
                   timeout=90, what="the identical re-send in the history")
        router.wait_state(uid, "delivered")
        assert [p.stat().st_mtime_ns for p in out.rglob("*.zip")] == [made]
        changed = dcmread(files[1])
        changed.SeriesDescription = "CORRECTED"
        changed.save_as(files[1], enforce_file_format=True)
        assert run_storescu([files[1]], router.port).returncode == 0
        wait_until(lambda: sum("delivered to out" in e for e in _history(router, uid)) >= 2,
                   timeout=90, what="the study zipped again")
        router.wait_state(uid, "delivered")
    (again,) = list(out.rglob("*.zip"))
    with zipfile.ZipFile(again) as archive:
        names = [n for n in archive.namelist() if n.endswith(".dcm")]
        assert len(names) == 3  # whole: the two unchanged instances too
        corrected = [n for n in names if b"CORRECTED" in archive.read(n)]
    assert len(corrected) == 1


def _history(router: Router, uid: str) -> list[str]:
    import json

    r = dicomrouter("status", "--study", uid, "--json", "--config", str(router.config_path))
    return [e for _ts, e in json.loads(r.stdout)["history"]] if r.returncode == 0 else []

