"""The Q/R proxy (issue 28, item 3) against a real Orthanc as the PACS behind the router, with
DCMTK findscu, movescu and getscu as the requesters: merged C-FIND answers, a study only the
PACS holds retrieved through the router as its instances arrive, served again from the cache
with the PACS stopped, the documented statuses with the PACS down, and the WADO-RS hook."""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import (
    Orthanc,
    StoreSCP,
    dcmtk,
    find_dcmtk,
    find_orthanc,
    peer_env,
    require_peer,
    run_storescu,
    sop_uids,
    wait_until,
)
from pydicom import dcmread
from router_fixtures import Router, tags_of

from dicomrouter.config import load
from dicomrouter.proxy import QueryRetrieveProxy
from dicomrouter.proxy.service import StillFetching
from dicomrouter.sample import generate
from dicomrouter.spool import note, spool_for
from dicomrouter.state import state_for
from dicomrouter_bench.procs import free_port


class Site:
    """A router (a proxy to Orthanc) holding study ``local``; Orthanc holds ``local`` too and
    ``remote`` (60 instances of 384×384, so its retrieve takes a while) and ``other``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        port = free_port()
        self.storescp = StoreSCP(root / "storescp", aet="STORESCP")
        self.pacs = Orthanc(root / "orthanc", aet="PACS",
                            modalities={"router": ["DICOMROUTER", "127.0.0.1", port]})
        self.router = Router(root / "router", {
            "port": port,
            "destinations": {"archive": {"type": "folder", "path": str(root / "out")}},
            "routes": [{"to": "archive"}],
            "keep_after_delivery": True,
            "known_aes": {"PACS": {"host": "127.0.0.1", "port": self.pacs.dicom_port},
                          "STORESCP": {"host": "127.0.0.1", "port": self.storescp.port}},
            "query_retrieve_proxy": "PACS",
            "query_retrieve_proxy_timeout": "20s",
        })
        self.files = {
            "local": generate(root / "local", series=1, instances=3, rows=16, cols=16,
                              patient_id="PX1", seed=281),
            "remote": generate(root / "remote", series=2, instances=30, rows=384, cols=384,
                               patient_id="PX2", seed=282),
            "other": generate(root / "other", series=1, instances=2, rows=16, cols=16,
                              patient_id="PX3", seed=283),
            "getonly": generate(root / "getonly", series=2, instances=4, rows=64, cols=64,
                                patient_id="PX4", seed=289),
        }
        self.uid = {k: tags_of(v[0], "StudyInstanceUID")[0] for k, v in self.files.items()}

    def start(self) -> None:
        self.storescp.start()
        self.pacs.start()
        self.router.start()
        r = run_storescu(self.files["local"], self.router.port)
        assert r.returncode == 0, r.stderr
        self.router.wait_state(self.uid["local"], "delivered")
        for name in ("local", "remote", "other", "getonly"):
            self.pacs.upload(self.files[name])

    def stop(self) -> None:
        self.router.stop()
        self.pacs.stop()
        self.storescp.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    for tool in ("findscu", "movescu", "getscu", "storescu", "storescp"):
        require_peer(f"DCMTK {tool}", find_dcmtk(tool) is not None, "dcmtk")
    require_peer("Orthanc", find_orthanc() is not None, "orthanc")
    s = Site(tmp_path_factory.mktemp("proxy"))
    try:
        s.start()
        yield s
        assert "Traceback" not in s.router.log(100_000), "a traceback in the router's log"
    finally:
        s.stop()


def findscu(site: Site, out: Path, *keys: str, root: str = "-S") -> tuple[list[Any], str]:
    out.mkdir(parents=True, exist_ok=True)
    args = [dcmtk("findscu"), "-v", root, "-aet", "FINDSCU", "-aec", "DICOMROUTER", "-X",
            "-od", str(out)]
    for k in keys:
        args += ["-k", k]
    r = subprocess.run([*args, "127.0.0.1", str(site.router.port)], capture_output=True,
                       text=True, env=peer_env(), timeout=120)
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))], r.stdout + r.stderr


def movescu(site: Site, study: str) -> str:
    r = subprocess.run(
        [dcmtk("movescu"), "-d", "-S", "-aet", "MOVESCU", "-aec", "DICOMROUTER", "-aem",
         "STORESCP", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
         "127.0.0.1", str(site.router.port)],
        capture_output=True, text=True, env=peer_env(), timeout=300)
    return r.stdout + r.stderr


def getscu(site: Site, study: str, out: Path) -> str:
    return getscu_at(site.router.port, study, out)


def same_instances(got: list[Path], originals: list[Path]) -> None:
    """The decoded pixels and the identifying tags at the requester are the originals'."""
    by_uid = {str(dcmread(p).SOPInstanceUID): p for p in got}
    assert set(by_uid) == sop_uids(originals)
    for f in originals:
        src = dcmread(f)
        ds = dcmread(by_uid[str(src.SOPInstanceUID)])
        assert (ds.pixel_array == src.pixel_array).all()
        for kw in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID",
                   "InstanceNumber", "Rows", "Columns"):
            assert ds.get(kw) == src.get(kw), kw


def test_find_merges_the_spool_and_the_pacs(site: Site, tmp_path: Path) -> None:
    found, out = findscu(site, tmp_path, "QueryRetrieveLevel=STUDY", "PatientID=PX*",
                         "StudyInstanceUID", "RetrieveAETitle", "PatientID")
    uids = [str(ds.StudyInstanceUID) for ds in found]
    assert sorted(uids) == sorted(site.uid.values()), out  # "local" once, from the spool
    assert {str(ds.RetrieveAETitle) for ds in found} == {"DICOMROUTER"}
    series, _out = findscu(site, tmp_path / "series", "QueryRetrieveLevel=SERIES",
                           f"StudyInstanceUID={site.uid['remote']}", "SeriesInstanceUID")
    assert len({str(ds.SeriesInstanceUID) for ds in series}) == 2
    patients, out = findscu(site, tmp_path / "patients", "QueryRetrieveLevel=PATIENT",
                            "PatientID=PX*", root="-P")
    assert sorted(str(ds.PatientID) for ds in patients) == ["PX1", "PX2", "PX3", "PX4"], out


def test_get_of_a_study_only_the_pacs_holds(site: Site, tmp_path: Path) -> None:
    out = getscu(site, site.uid["getonly"], tmp_path / "get")
    same_instances(list((tmp_path / "get").iterdir()), site.files["getonly"])
    assert "8 more fetched from the PACS" in site.router.log(50_000), out


def test_move_of_a_study_only_the_pacs_holds_streams_it(site: Site) -> None:
    out = movescu(site, site.uid["remote"])
    originals = site.files["remote"]
    wait_until(lambda: site.storescp.sop_uids() >= sop_uids(originals), timeout=120,
               what="the proxied study in storescp")
    final = out[out.index("Received Final Move Response"):]
    assert re.search(r"Completed Suboperations\s*:\s*60\b", final), out
    assert re.search(r"Failed Suboperations\s*:\s*0\b", final), out
    assert "DIMSE Status                  : 0x0000" in final, out
    completed = [int(n) for n in re.findall(r"Completed Suboperations\s*:\s*(\d+)", out)]
    remaining = [int(n) for n in re.findall(r"Remaining Suboperations\s*:\s*(\d+)", out)]
    assert completed == sorted(completed) and len(completed) == 60, out  # counted up
    assert remaining[0] == 59 and remaining == sorted(remaining, reverse=True), out
    got = [p for p in site.storescp.files()
           if tags_of(p, "StudyInstanceUID")[0] == site.uid["remote"]]
    same_instances(got, originals)
    # streamed: the first instance reached the requester before the last one reached the router
    first_at_requester = min(p.stat().st_mtime for p in got)
    in_spool = list((site.router.spool / "data" / site.uid["remote"]).glob("*.dcm"))
    assert len(in_spool) == 60
    last_at_router = max(p.stat().st_mtime for p in in_spool)
    assert first_at_requester < last_at_router, (first_at_requester, last_at_router)
    # a cache, not a new arrival: the route without Proxied does not send it on
    site.router.wait_state(site.uid["remote"], "unrouted")
    assert not any(site.uid["remote"] in str(p) for p in (site.root / "out").rglob("*.dcm"))


def test_get_is_served_from_the_cache_with_the_pacs_stopped(site: Site, tmp_path: Path) -> None:
    wait_until(lambda: site.router.study_state(site.uid["remote"]) is not None, timeout=60,
               what="the proxied study in the spool (after the move test)")
    site.pacs.stop()
    try:
        out = getscu(site, site.uid["remote"], tmp_path / "get")
        same_instances(list((tmp_path / "get").iterdir()), site.files["remote"])
        assert "PACS not reachable" in site.router.log(20_000)
        # C-FIND with the PACS down: the spool's matches, then 0xC001
        found, fout = findscu(site, tmp_path / "find", "QueryRetrieveLevel=STUDY",
                              "PatientID=PX*", "StudyInstanceUID")
        got = {str(ds.StudyInstanceUID) for ds in found}
        assert got >= {site.uid["local"], site.uid["remote"]}, fout  # the spool's
        assert site.uid["other"] not in got, fout  # only at the PACS
        assert "Final Find Response (Failed: UnableToProcess)" in fout, fout  # 0xC001
        # a study only the PACS holds, the PACS down: 0xA701, no sub-operations
        mout = movescu(site, site.uid["other"])
        assert "0xa701" in mout.lower(), mout
    finally:
        site.pacs.start()
    assert out


def test_wado_hook_fetches_a_study_into_the_spool(tmp_path: Path, orthanc) -> None:
    """``proxy_fetcher.fetch`` as the DICOMweb server calls it, against Orthanc, in-process."""
    port = free_port()
    pacs: Orthanc = orthanc(aet="PACS", modalities={"router": ["DICOMROUTER", "127.0.0.1",
                                                               port]})
    study = generate(tmp_path / "study", series=2, instances=2, rows=16, cols=16, seed=284)
    pacs.upload(study)
    router = Router(tmp_path / "router", {
        "port": port, "query_retrieve_proxy": "PACS",
        "known_aes": {"PACS": {"host": "127.0.0.1", "port": pacs.dicom_port}}})
    router.prepare()
    cfg = load(router.config_path, secrets=False)
    state = state_for(cfg)
    spool = spool_for(cfg, state)
    try:
        proxy = QueryRetrieveProxy(cfg, state, spool)
        uid = tags_of(study[0], "StudyInstanceUID")[0]
        series = tags_of(study[0], "SeriesInstanceUID")[0]
        assert proxy.fetch(uid, series_uid=series, timeout=60) is True
        held = {i.sop_uid for i in state.instances(uid)}
        assert held == {tags_of(f, "SOPInstanceUID")[0] for f in study
                        if tags_of(f, "SeriesInstanceUID")[0] == series}
        assert proxy.fetch(uid, timeout=60) is True
        assert {i.sop_uid for i in state.instances(uid)} == sop_uids(study)
        assert all(i.tags.get("_Proxied") for i in state.instances(uid))
        # ... and so does each file, for start-up's adoption after a crash (spool/note.py)
        for i in state.instances(uid):
            assert note.read_file(spool.path(i.key)) == ({"_Proxied": "1"}, "PACS",
                                                         cfg.ae_title), i.sop_uid
        assert proxy.fetch("1.2.3.4.5.6.7", timeout=10) is False  # not at the PACS
        # no tracker runs here: the study is still receiving, and stays out of the expiry
        assert proxy.expire(now=2e10) == 0
        assert len(state.instances(uid)) == 4
    finally:
        state.close()


def test_wado_fetches_of_one_study_share_one_transfer_and_are_capped(
        tmp_path: Path, orthanc) -> None:
    """Three WADO-RS requests for the same study at once: one retrieve from the PACS (the
    real Orthanc; the PACS's ``retrieve`` is wrapped to count calls and to hold the transfer
    open), all three answered. With query_retrieve_proxy_max_fetches: 1, a fetch of another
    study while that one is coming is refused at once (StillFetching: the 503)."""
    port = free_port()
    pacs: Orthanc = orthanc(aet="PACS", modalities={"router": ["DICOMROUTER", "127.0.0.1",
                                                               port]})
    study = generate(tmp_path / "study", series=1, instances=3, rows=16, cols=16, seed=296)
    other = generate(tmp_path / "other", series=1, instances=1, rows=16, cols=16, seed=297)
    pacs.upload(study + other)
    router = Router(tmp_path / "router", {
        "port": port, "query_retrieve_proxy": "PACS", "query_retrieve_proxy_max_fetches": 1,
        "known_aes": {"PACS": {"host": "127.0.0.1", "port": pacs.dicom_port}}})
    router.prepare()
    cfg = load(router.config_path, secrets=False)
    state = state_for(cfg)
    spool = spool_for(cfg, state)
    try:
        proxy = QueryRetrieveProxy(cfg, state, spool)
        real, release, calls = proxy.pacs.retrieve, threading.Event(), []

        def held_retrieve(*args: Any, **kwargs: Any) -> Any:
            calls.append(args)
            release.wait(60)
            return real(*args, **kwargs)

        proxy.pacs.retrieve = held_retrieve  # type: ignore[method-assign]
        uid = tags_of(study[0], "StudyInstanceUID")[0]
        results: list[Any] = []
        threads = [threading.Thread(target=lambda: results.append(proxy.fetch(uid, timeout=90)))
                   for _ in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: len(calls) >= 1, timeout=30, what="the transfer started")
        with pytest.raises(StillFetching, match="query_retrieve_proxy_max_fetches"):
            proxy.fetch(tags_of(other[0], "StudyInstanceUID")[0], timeout=30)
        release.set()
        for t in threads:
            t.join(90)
        assert results == [True, True, True]
        assert len(calls) == 1  # one transfer for the three requests
        assert {i.sop_uid for i in state.instances(uid)} == sop_uids(study)
        # the slot is free again: the other study comes now
        assert proxy.fetch(tags_of(other[0], "StudyInstanceUID")[0], timeout=60) is True
    finally:
        release.set()
        state.close()


def test_cache_retention_removes_an_unused_fetched_study(tmp_path: Path, orthanc) -> None:
    port = free_port()
    pacs: Orthanc = orthanc(aet="PACS", modalities={"router": ["DICOMROUTER", "127.0.0.1",
                                                               port]})
    study = generate(tmp_path / "study", series=1, instances=3, rows=16, cols=16, seed=285)
    pacs.upload(study)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    with Router(tmp_path / "router", {
            "port": port, "query_retrieve_proxy": "PACS", "query_retrieve_proxy_cache": "3s",
            "known_aes": {"PACS": {"host": "127.0.0.1", "port": pacs.dicom_port}},
            "destinations": {"archive": {"type": "folder", "path": str(tmp_path / "out")}},
            "routes": [{"to": "archive"}]}) as router:
        out = getscu_at(router.port, uid, tmp_path / "get")
        assert {str(dcmread(p).SOPInstanceUID) for p in (tmp_path / "get").iterdir()} == \
            sop_uids(study), out
        wait_until(lambda: router.study_state(uid) == "purged", timeout=60,
                   what="the fetched study removed after query_retrieve_proxy_cache")
        assert not (router.spool / "data" / uid).exists()
        wait_until(lambda: "left the cache" in router.log(20_000), timeout=30,
                   what="the log line, written once the purge returned")
        assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.dcm"))


def getscu_at(port: int, study: str, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        [dcmtk("getscu"), "-v", "-S", "-aet", "GETSCU", "-aec", "DICOMROUTER", "-od", str(out),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
         "127.0.0.1", str(port)], capture_output=True, text=True, env=peer_env(), timeout=300)
    return r.stdout + r.stderr


def test_a_study_partly_in_the_spool_gets_the_rest_from_the_pacs(tmp_path: Path,
                                                                  orthanc) -> None:
    port = free_port()
    pacs: Orthanc = orthanc(aet="PACS", modalities={"router": ["DICOMROUTER", "127.0.0.1",
                                                               port]})
    study = generate(tmp_path / "study", series=2, instances=3, rows=16, cols=16, seed=286)
    pacs.upload(study)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    pushed = study[:2]
    with Router(tmp_path / "router", {
            "port": port, "query_retrieve_proxy": "PACS",
            "known_aes": {"PACS": {"host": "127.0.0.1", "port": pacs.dicom_port}},
            "keep_after_delivery": True, "query_retrieve_proxy_cache": "2s",
            "destinations": {"archive": {"type": "folder", "path": str(tmp_path / "out")}},
            "routes": [{"to": "archive"}]}) as router:
        assert run_storescu(pushed, router.port).returncode == 0
        router.wait_state(uid, "delivered")
        out = getscu_at(router.port, uid, tmp_path / "get")
        same_instances(list((tmp_path / "get").iterdir()), study)
        assert "4 more fetched from the PACS" in router.log(20_000), out
        # what was pushed went to the archive; what the proxy fetched did not
        wait_until(lambda: router.study_state(uid) not in (None, "receiving"), timeout=60,
                   what="the study out of receiving")
        archived = {tags_of(p, "SOPInstanceUID")[0] for p in (tmp_path / "out").rglob("*.dcm")}
        assert archived == sop_uids(pushed)
        # past query_retrieve_proxy_cache: a study with pushed instances is not purged
        wait_until(lambda: "stays in the spool" in router.log(20_000), timeout=60,
                   what="the mixed study leaving the cache")
        assert len(list((router.spool / "data" / uid).glob("*.dcm"))) == 6
        assert router.study_state(uid) != "purged"


def test_a_pacs_refusing_the_retrieve_fails_the_suboperations(tmp_path: Path,
                                                              orthanc) -> None:
    pacs: Orthanc = orthanc(aet="PACS", extra_config={"DicomAlwaysAllowFind": True,
                                                      "DicomAlwaysAllowGet": False})
    study = generate(tmp_path / "study", series=1, instances=2, rows=16, cols=16, seed=287)
    pacs.upload(study)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    with Router(tmp_path / "router", {
            "query_retrieve_proxy": "PACS",
            "known_aes": {"PACS": {"host": "127.0.0.1", "port": pacs.dicom_port}}}) as router:
        (tmp_path / "get").mkdir()
        r = subprocess.run(
            [dcmtk("getscu"), "-d", "-S", "-aet", "GETSCU", "-aec", "DICOMROUTER", "-od",
             str(tmp_path / "get"), "-k", "QueryRetrieveLevel=STUDY", "-k",
             f"StudyInstanceUID={uid}", "127.0.0.1", str(router.port)],
            capture_output=True, text=True, env=peer_env(), timeout=300)
        out = r.stdout + r.stderr
        final = out[out.rindex("C-GET-RSP"):] if "C-GET-RSP" in out else out
        assert re.search(r"Failed Suboperations\s*:\s*2\b", final), out
        assert re.search(r"Status\s*:\s*0xa702", final, re.I), out
        assert not list((tmp_path / "get").iterdir())
        assert "Traceback" not in router.log(50_000)


def test_dicomweb_pacs_behind_the_proxy(tmp_path: Path, orthanc) -> None:
    pacs: Orthanc = orthanc(aet="WEBPACS", dicomweb=True)
    study = generate(tmp_path / "study", series=2, instances=2, rows=16, cols=16, seed=288)
    pacs.upload(study)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    with Router(tmp_path / "router", {
            "query_retrieve_proxy": "web",
            "sources": {"web": {"type": "dicomweb", "url": f"{pacs.url}/dicom-web",
                                "interval": "1s"}},
            "destinations": {"archive": {"type": "folder", "path": str(tmp_path / "out")}},
            "routes": [{"to": "archive"}]}) as router:
        (tmp_path / "find").mkdir()
        r = subprocess.run(
            [dcmtk("findscu"), "-S", "-aet", "FINDSCU", "-aec", "DICOMROUTER", "-X", "-od",
             str(tmp_path / "find"), "-k", "QueryRetrieveLevel=STUDY", "-k",
             "StudyInstanceUID", "-k", "PatientID", "-k", "RetrieveAETitle",
             "127.0.0.1", str(router.port)],
            capture_output=True, text=True, env=peer_env(), timeout=120)
        found = [dcmread(p) for p in (tmp_path / "find").glob("rsp*.dcm")]
        assert [str(d.StudyInstanceUID) for d in found] == [uid], r.stdout + r.stderr
        assert str(found[0].RetrieveAETitle) == "DICOMROUTER"
        out = getscu_at(router.port, uid, tmp_path / "get")
        same_instances(list((tmp_path / "get").iterdir()), study)
        assert "4 more fetched from the PACS" in router.log(20_000), out
        assert "source web" not in router.log(50_000)  # the PACS's address: not polled
        assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.dcm"))


def test_wado_rs_of_a_study_only_the_pacs_holds(tmp_path: Path, orthanc) -> None:
    """The DICOMweb server (issue 28, item 2) asks ``Router.proxy_fetcher`` for a study the
    spool lacks: dicomweb-client retrieves it through the router, decoded pixels compared."""
    from dicomweb_client.api import DICOMwebClient

    port, web_port = free_port(), free_port()
    pacs: Orthanc = orthanc(aet="PACS", modalities={"router": ["DICOMROUTER", "127.0.0.1",
                                                               port]})
    study = generate(tmp_path / "study", series=2, instances=2, rows=32, cols=32, seed=290)
    pacs.upload(study)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    with Router(tmp_path / "router", {
            "port": port, "web": {"port": web_port}, "query_retrieve_proxy": "PACS",
            "known_aes": {"PACS": {"host": "127.0.0.1", "port": pacs.dicom_port}}}) as router:
        client = DICOMwebClient(url=f"http://127.0.0.1:{web_port}/dicom-web")
        got = client.retrieve_study(uid)
        by_uid = {str(ds.SOPInstanceUID): ds for ds in got}
        assert set(by_uid) == sop_uids(study)
        for f in study:
            src = dcmread(f)
            assert (by_uid[str(src.SOPInstanceUID)].pixel_array == src.pixel_array).all()
        assert "for WADO-RS: 4 of 4 instance(s) in the spool" in router.log(20_000)


def test_stow_into_a_cached_study_is_routed_and_kept(tmp_path: Path, orthanc,
                                                      storescp: StoreSCP, monkeypatch) -> None:
    """The AI-node round trip on the DICOMweb server's own listener (with credentials): WADO-RS
    of a study only the PACS holds fills the cache (no route sees it), then a result series is
    STOW-RS'd into the same study: the route (no ``Proxied``) delivers the pushed instances and
    not the cached ones, and the study (kept after delivery) outlives
    ``query_retrieve_proxy_cache``: it holds instances that were sent to the router."""
    import requests
    from dicomweb_client.api import DICOMwebClient
    from test_stow import multipart, referenced

    monkeypatch.setenv("DW_TOKEN", "proxy-T0ken")
    port, dw_port = free_port(), free_port()
    pacs: Orthanc = orthanc(aet="PACS", modalities={"router": ["DICOMROUTER", "127.0.0.1",
                                                               port]})
    study = generate(tmp_path / "study", series=1, instances=3, rows=32, cols=32, seed=291)
    pacs.upload(study)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    result = []
    for f in generate(tmp_path / "result", series=1, instances=2, rows=16, cols=16, seed=292):
        ds = dcmread(f)  # an AI result: a new series of the cached study
        ds.StudyInstanceUID = uid
        ds.save_as(f, enforce_file_format=True)
        result.append(f)
    with Router(tmp_path / "router", {
            "port": port, "stable_age": "1s", "keep_after_delivery": True,
            "query_retrieve_proxy": "PACS", "query_retrieve_proxy_cache": "15s",
            "dicomweb": {"bind": "0.0.0.0", "port": dw_port, "auth": {"token_env": "DW_TOKEN"}},
            "known_aes": {"PACS": {"host": "127.0.0.1", "port": pacs.dicom_port}},
            "destinations": {"pacs": {"type": "dicom", "ae_title": storescp.aet,
                                      "host": "127.0.0.1", "port": storescp.port}},
            "routes": [{"to": "pacs"}]}) as router:
        base = f"http://127.0.0.1:{dw_port}/dicom-web"
        wait_until(lambda: requests.get(base + "/studies", timeout=5).status_code == 401,
                   timeout=30, what="the DICOMweb listener", ignore=(OSError,))
        client = DICOMwebClient(url=base, headers={"Authorization": "Bearer proxy-T0ken"})
        got = {str(ds.SOPInstanceUID): ds for ds in client.retrieve_study(uid)}
        assert set(got) == sop_uids(study)
        for f in study:
            assert (got[tags_of(f, "SOPInstanceUID")[0]].pixel_array ==
                    dcmread(f).pixel_array).all()
        router.wait_state(uid, "unrouted")  # the cache: no route sees it
        body, ctype = multipart([(f.read_bytes(), "application/dicom") for f in result])
        r = requests.post(f"{base}/studies/{uid}", data=body, timeout=60, headers={
            "Content-Type": ctype, "Authorization": "Bearer proxy-T0ken"})
        assert r.status_code == 200 and referenced(r) == sop_uids(result), r.text
        wait_until(lambda: storescp.sop_uids() == sop_uids(result), timeout=60,
                   what="the STOW-RS'd result series delivered")
        router.wait_state(uid, "delivered")
        wait_until(lambda: "leaves the cache but stays in the spool" in router.log(50_000),
                   timeout=60, what="the cache let go of the study")
        assert storescp.sop_uids() == sop_uids(result)  # never the PACS's own instances
        assert router.study_state(uid) == "delivered"
        assert {p.stem for p in (router.spool / "data" / uid).glob("*.dcm")} == \
            sop_uids(study) | sop_uids(result)
        assert "Traceback" not in router.log(50_000)


def test_a_pacs_answering_nonsense_costs_one_log_line(tmp_path: Path) -> None:
    """A DICOMweb PACS whose study searches are JSON but not DICOM JSON (values where objects
    belong), whose instance search ignores ``offset`` (the same page again and again) and whose
    WADO-RS answers JSON: C-FIND still gets the spool's matches and 0xC001; WADO-RS of a study
    the spool lacks is a 404 in seconds (the listing stops when a page brings nothing new),
    C-GET of it one failed sub-operation; a line each in the log, no traceback."""
    import http.server
    import json
    import threading
    import time

    import requests
    from pydicom.uid import CTImageStorage as CT

    class Nonsense(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = b'[{"0020000D": "1.2.3", "0020000E": ["x"], "00080018": 7}, 5]'
            if "/instances?" in self.path or self.path.endswith("/instances"):
                study = self.path.split("/studies/")[1].split("/")[0]
                body = json.dumps([{"0020000D": {"vr": "UI", "Value": [study]},
                                    "0020000E": {"vr": "UI", "Value": ["1.2.3.4"]},
                                    "00080018": {"vr": "UI", "Value": ["1.2.3.4.5"]},
                                    "00080016": {"vr": "UI", "Value": [CT]}}]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Nonsense)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    local = generate(tmp_path / "local", series=1, instances=2, rows=16, cols=16, seed=295)
    web_port = free_port()
    try:
        with Router(tmp_path / "router", {
                "web": {"port": web_port}, "query_retrieve_proxy": "web",
                "sources": {"web": {"type": "dicomweb",
                                    "url": f"http://127.0.0.1:{server.server_port}/dicom-web",
                                    "interval": "1h"}}}) as router:
            assert run_storescu(local, router.port).returncode == 0
            (tmp_path / "find").mkdir()
            r = subprocess.run(
                [dcmtk("findscu"), "-v", "-S", "-aet", "FINDSCU", "-aec", "DICOMROUTER", "-X",
                 "-od", str(tmp_path / "find"), "-k", "QueryRetrieveLevel=STUDY", "-k",
                 "StudyInstanceUID", "127.0.0.1", str(router.port)],
                capture_output=True, text=True, env=peer_env(), timeout=120)
            found = [dcmread(p) for p in (tmp_path / "find").glob("rsp*.dcm")]
            assert [str(d.StudyInstanceUID) for d in found] == \
                [tags_of(local[0], "StudyInstanceUID")[0]], r.stdout + r.stderr
            assert "failed: unabletoprocess" in (r.stdout + r.stderr).lower(), r.stdout  # 0xC001
            missing = "1.2.826.0.1.3680043.8.498.999"
            started = time.monotonic()
            wado = requests.get(f"http://127.0.0.1:{web_port}/dicom-web/studies/{missing}",
                                timeout=60)
            assert wado.status_code == 404 and time.monotonic() - started < 30, wado.text
            out = getscu_at(router.port, missing, tmp_path / "get")
            assert "number of failed suboperations    : 1" in out.lower(), out
            log = router.log(20_000)
    finally:
        server.shutdown()
    assert "its answer cannot be read" in log and "WADO-RS of instance 1.2.3.4.5" in log, log
    assert "Traceback" not in log and "Exception in" not in log


def test_wado_rs_of_a_study_the_pacs_is_slow_to_send_is_503(tmp_path: Path) -> None:
    """A DICOMweb PACS that lists the study's instance at once and takes longer than
    ``wado_proxy_timeout`` to send it: WADO-RS answers 503 with Retry-After (the study exists,
    it is on its way), not 404; once it came, the same request is served from the cache."""
    import http.server
    import json
    import threading
    import time

    import requests

    src = generate(tmp_path / "study", series=1, instances=1, rows=16, cols=16, seed=296)[0]
    ds = dcmread(src)
    study, series, sop = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                          str(ds.SOPInstanceUID))
    release = threading.Event()

    class SlowPacs(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if "/instances/" in self.path:  # WADO-RS of the instance: slow
                release.wait(60)
                body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + src.read_bytes() \
                    + b"\r\n--b--"
                ctype = 'multipart/related; type="application/dicom"; boundary=b'
            else:
                body = json.dumps([] if "offset=" in self.path else [{
                    "0020000D": {"vr": "UI", "Value": [study]},
                    "0020000E": {"vr": "UI", "Value": [series]},
                    "00080018": {"vr": "UI", "Value": [sop]},
                    "00080016": {"vr": "UI", "Value": [str(ds.SOPClassUID)]}}]).encode()
                ctype = "application/dicom+json"
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowPacs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    web_port = free_port()
    try:
        with Router(tmp_path / "router", {
                "web": {"port": web_port}, "query_retrieve_proxy": "web",
                "wado_proxy_timeout": "2s",
                "sources": {"web": {"type": "dicomweb",
                                    "url": f"http://127.0.0.1:{server.server_port}/dicom-web",
                                    "interval": "1h"}}}) as router:
            url = f"http://127.0.0.1:{web_port}/dicom-web/studies/{study}"
            started = time.monotonic()
            r = requests.get(url, timeout=60)
            assert r.status_code == 503 and r.headers.get("Retry-After") == "30", r.text
            assert "still coming" in r.text and time.monotonic() - started < 20
            release.set()
            wait_until(lambda: requests.get(url, timeout=60).status_code == 200, timeout=60,
                       what="the study served from the cache")
            r = requests.get(url, timeout=60, headers={
                "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
            assert dcmread(src).PixelData in r.content
            log = router.log(20_000)
    finally:
        release.set()
        server.shutdown()
    assert "the PACS is still sending" in log and "Traceback" not in log
