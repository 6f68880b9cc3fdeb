"""Completeness evidence: the sender (a real Orthanc) is asked how many instances a study
has, and the study completes as soon as they are all in, long before its stable age."""

from __future__ import annotations

import time
from pathlib import Path

from peers import Orthanc, run_storescu, wait_until
from router_fixtures import Router, dicomrouter, tags_of

from dicomrouter.sample import generate
from dicomrouter_bench.procs import free_port


def history(router: Router, uid: str) -> str:
    return dicomrouter("status", "--study", uid, "--config", str(router.config_path)).stdout


def test_an_announced_count_completes_the_study_before_the_timer(tmp_path: Path,
                                                                  orthanc) -> None:
    port = free_port()
    pacs: Orthanc = orthanc(aet="PACS", modalities={"router": ["DICOMROUTER", "127.0.0.1",
                                                               port]})
    study = generate(tmp_path / "study", series=2, instances=3, rows=8, cols=8, seed=151)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    for f in study:
        pacs.post("/instances", f.read_bytes())
    partial = generate(tmp_path / "partial", series=1, instances=4, rows=8, cols=8, seed=152)
    partial_uid = tags_of(partial[0], "StudyInstanceUID")[0]
    for f in partial:
        pacs.post("/instances", f.read_bytes())
    with Router(tmp_path / "router", {
        "port": port, "stable_age": "5m",
        "known_aes": {"PACS": {"host": "127.0.0.1", "port": pacs.dicom_port,
                               "count_query": True}},
        "destinations": {"tree": {"type": "folder", "path": str(tmp_path / "tree")}},
        "routes": [{"to": "tree"}],
    }) as router:
        started = time.monotonic()
        pacs.post("/modalities/router/store", {"Resources": pacs.get("/studies"),
                                               "Synchronous": True})
        router.wait_state(uid, "delivered", timeout=120)
        assert time.monotonic() - started < 120  # long before the 5 minute stable age
        text = history(router, uid)
        assert "PACS announced 6 instance(s) (C-FIND)" in text, text
        assert "complete with 6 of 6 announced instance(s)" in text, text
        router.wait_state(partial_uid, "delivered", timeout=120)
        assert "complete with 4 of 4" in history(router, partial_uid)
    assert len(list((tmp_path / "tree").rglob("*.dcm"))) == 10


def test_the_timer_records_fewer_instances_than_announced(tmp_path: Path, orthanc) -> None:
    pacs: Orthanc = orthanc(aet="PACS", modalities={  # Orthanc answers C-FIND from known AEs
        "router": ["DICOMROUTER", "127.0.0.1", 104]})
    study = generate(tmp_path / "study", series=1, instances=4, rows=8, cols=8, seed=153)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    for f in study:
        pacs.post("/instances", f.read_bytes())
    with Router(tmp_path / "router", {
        "stable_age": "2s",
        "known_aes": {"PACS": {"host": "127.0.0.1", "port": pacs.dicom_port,
                               "count_query": True}},
        "destinations": {"tree": {"type": "folder", "path": str(tmp_path / "tree")}},
        "routes": [{"to": "tree"}],
    }) as router:
        assert run_storescu(study[:2], router.port, calling="PACS").returncode == 0
        router.wait_state(uid, "delivered", timeout=120)
        text = history(router, uid)
    assert "PACS announced 4 instance(s)" in text, text
    assert "the stable age passed with only 2 of 4 announced instance(s)" in text, text
    wait_until(lambda: len(list((tmp_path / "tree").rglob("*.dcm"))) == 2, timeout=30,
               what="the 2 instances delivered")


def test_a_route_expectation_routes_before_the_timer(tmp_path: Path) -> None:
    from pydicom import dcmread

    study = generate(tmp_path / "study", series=2, instances=2, rows=8, cols=8, seed=154,
                     modality="MR")
    series = sorted({str(dcmread(f).SeriesInstanceUID) for f in study})
    names = dict(zip(series, ["AX T1", "AX T2"], strict=True))
    for f in study:  # the protocol's two series, by description
        ds = dcmread(f)
        ds.SeriesDescription = names[str(ds.SeriesInstanceUID)]
        ds.save_as(f)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    first = [f for f in study if dcmread(f).SeriesDescription == "AX T1"]
    with Router(tmp_path / "router", {
        "stable_age": "1h",
        "destinations": {"ai": {"type": "folder", "path": str(tmp_path / "ai")}},
        "routes": [{"name": "mr protocol", "when": {"Modality": "MR"}, "to": "ai",
                    "expect": {"series": ["AX T1", "AX T2"]}}],
    }) as router:
        assert run_storescu(first, router.port).returncode == 0
        wait_until(lambda: "receiving from STORESCU" in history(router, uid), timeout=30,
                   what="the first series in")
        assert router.study_state(uid) == "receiving"  # AX T2 is not there yet
        assert run_storescu([f for f in study if f not in first], router.port).returncode == 0
        router.wait_state(uid, "delivered", timeout=60)
        text = history(router, uid)
    assert "route 'mr protocol': expected series AX T1, AX T2 all in, before its stable age" \
        in text, text
    assert len(list((tmp_path / "ai").rglob("*.dcm"))) == 4


def test_series_level_routing_sends_each_series_on_its_own(tmp_path: Path, orthanc) -> None:
    from pydicom import dcmread

    pacs: Orthanc = orthanc(aet="VIEWER")
    study = generate(tmp_path / "study", series=2, instances=2, rows=8, cols=8, seed=155)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    by_series: dict[str, list[Path]] = {}
    for f in study:
        by_series.setdefault(str(dcmread(f).SeriesInstanceUID), []).append(f)
    (a_uid, a), (_b_uid, b) = sorted(by_series.items())
    sops = {f: tags_of(f, "SOPInstanceUID")[0] for f in study}
    with Router(tmp_path / "router", {
        "stable_age": "1h",  # the study never completes during the test: only its series do
        "destinations": {"viewer": {"type": "dicom", "ae_title": "VIEWER", "host": "127.0.0.1",
                                    "port": pacs.dicom_port}},
        "routes": [{"name": "per series", "to": "viewer", "level": "series",
                    "stable_age": "2s"}],
    }) as router:
        assert run_storescu(a, router.port).returncode == 0
        wait_until(lambda: pacs.instance_sop_uids() == {sops[f] for f in a}, timeout=60,
                   what="the first series alone in Orthanc")
        assert router.study_state(uid) == "receiving"
        assert run_storescu(b, router.port).returncode == 0
        wait_until(lambda: pacs.instance_sop_uids() == set(sops.values()), timeout=60,
                   what="the second series too")
        text = history(router, uid)
        assert router.status()["ledger"]["resent"] == 0
    assert f"series {a_uid}" in text and "route 'per series' sends it to viewer" in text, text
