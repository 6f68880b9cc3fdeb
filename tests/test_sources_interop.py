"""Pull sources against a real Orthanc: C-FIND + C-MOVE (and C-GET), the /changes feed with
move semantics, and QIDO-RS + WADO-RS through its DICOMweb plugin."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from peers import Orthanc, StoreSCP, sop_uids, wait_until
from router_fixtures import Router, dataset_bytes, tags_of

from dicomrouter.sample import generate
from dicomrouter_bench.procs import free_port


def tree(root: Path) -> dict[str, Path]:
    """SOP Instance UID → file, for every .dcm under ``root``."""
    return {tags_of(p, "SOPInstanceUID")[0]: p for p in root.rglob("*.dcm")} \
        if root.exists() else {}


def source_row(router: Router, name: str) -> dict[str, Any]:
    rows = {s["name"]: s for s in router.status().get("sources", [])}
    return rows.get(name, {})


def polled_since(router: Router, name: str, t: float) -> bool:
    row = source_row(router, name)
    return bool(row.get("last_success")) and row["last_success"] > t


def dicom_source_router(tmp: Path, pacs: Orthanc, port: int, **extra: Any) -> Router:
    return Router(tmp / "router", {
        "port": port,
        "sources": {"pacs": {"type": "dicom", "ae_title": pacs.aet, "host": "127.0.0.1",
                             "port": pacs.dicom_port, "interval": "1s", "lookback": "all",
                             "source_stable_age": "1s", **extra}},
        "destinations": {"tree": {"type": "folder", "path": str(tmp / "tree")}},
        "routes": [{"when": {"Source": "pacs"}, "to": "tree"}],
    })


@pytest.mark.parametrize("retrieve", ["move", "get"])
def test_dicom_source_pulls_new_studies_once_across_restarts(tmp_path: Path, orthanc,
                                                             retrieve: str) -> None:
    port = free_port()
    pacs: Orthanc = orthanc(aet="PACS", modalities={"router": ["DICOMROUTER", "127.0.0.1",
                                                               port]})
    study = generate(tmp_path / "study", series=2, instances=2, rows=16, cols=16, seed=71)
    with dicom_source_router(tmp_path, pacs, port, retrieve=retrieve) as router:
        wait_until(lambda: polled_since(router, "pacs", 0), timeout=60, what="a first poll")
        pacs.upload(study)  # after start-up
        wait_until(lambda: set(tree(tmp_path / "tree")) >= sop_uids(study), timeout=90,
                   what="the pulled study in the folder tree")
        row = source_row(router, "pacs")
        assert row["studies_pulled"] == 1 and row["last_error"] is None, row
    got = tree(tmp_path / "tree")
    for f in study:
        assert dataset_bytes(got[tags_of(f, "SOPInstanceUID")[0]]) == dataset_bytes(f)
    rel = got[tags_of(study[0], "SOPInstanceUID")[0]].relative_to(tmp_path / "tree")
    assert len(rel.parts) == 4, rel  # Patient/Study/Series/SOP.dcm
    restarted = time.time()
    with dicom_source_router(tmp_path, pacs, port, retrieve=retrieve) as router:
        wait_until(lambda: polled_since(router, "pacs", restarted + 1), timeout=60,
                   what="two polls after the restart")
        assert source_row(router, "pacs")["studies_pulled"] == 1
        assert "pulled" not in router.log(2000).split("source pacs: dicom")[-1]
        assert router.status()["ledger"]["resent"] == 0
        assert router.study_state(tags_of(study[0], "StudyInstanceUID")[0]) == "delivered"


def test_orthanc_source_deletes_only_after_delivery(tmp_path: Path, orthanc) -> None:
    pacs: Orthanc = orthanc(aet="PACS")
    archive_port = free_port()
    study = generate(tmp_path / "study", series=1, instances=3, rows=16, cols=16, seed=72)
    with Router(tmp_path / "router", {
        "sources": {"orthanc": {"type": "orthanc", "url": pacs.url, "interval": "1s",
                                "delete_after_pull": True}},
        "destinations": {
            "tree": {"type": "folder", "path": str(tmp_path / "tree")},
            "archive": {"type": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1",
                        "port": archive_port, "retry": {"initial": "1s", "max_delay": "2s"}},
        },
        "routes": [{"to": ["tree", "archive"]}],
    }) as router:
        wait_until(lambda: polled_since(router, "orthanc", 0), timeout=60, what="a first poll")
        pacs.upload(study)
        wait_until(lambda: set(tree(tmp_path / "tree")) >= sop_uids(study), timeout=90,
                   what="the pulled study delivered to the folder")
        wait_until(lambda: router.status()["retrying"], timeout=60,
                   what="the archive's failed attempt")
        t = time.time()
        wait_until(lambda: polled_since(router, "orthanc", t + 1), timeout=60,
                   what="more polls (and housekeeping) while the archive is down")
        assert pacs.count() == len(study), "deleted at the source before every delivery"
        with StoreSCP(tmp_path / "archive", aet="ARCHIVE", port=archive_port) as archive:
            wait_until(lambda: archive.sop_uids() >= sop_uids(study), timeout=90,
                       what="the retried delivery to the archive")
            wait_until(lambda: pacs.count() == 0, timeout=60,
                       what="the study deleted in Orthanc once delivered everywhere")
        history = [e for _, e in router_history(router, tags_of(study[0],
                                                                "StudyInstanceUID")[0])]
        assert any("deleted at source orthanc" in e for e in history), history
        assert source_row(router, "orthanc")["studies_pulled"] == 1
        assert "Traceback" not in router.log(5000)


def router_history(router: Router, study_uid: str) -> list[tuple[float, str]]:
    import json

    from router_fixtures import dicomrouter

    r = dicomrouter("status", "--json", "--study", study_uid, "--config",
                    str(router.config_path))
    assert r.returncode == 0, r.stderr
    return [tuple(x) for x in json.loads(r.stdout)["history"]]


def test_dicomweb_source_pulls_through_qido_and_wado(tmp_path: Path, orthanc) -> None:
    pacs: Orthanc = orthanc(aet="WEBPACS", dicomweb=True)
    study = generate(tmp_path / "study", series=2, instances=2, rows=16, cols=16, seed=73)
    pacs.upload(study)  # already there: lookback "all" finds it
    with Router(tmp_path / "router", {
        "sources": {"web": {"type": "dicomweb", "url": f"{pacs.url}/dicom-web",
                            "interval": "1s", "lookback": "all", "source_stable_age": "1s"}},
        "destinations": {"tree": {"type": "folder", "path": str(tmp_path / "tree")}},
        "routes": [{"when": {"Source": "web"}, "to": "tree"}],
    }) as router:
        wait_until(lambda: set(tree(tmp_path / "tree")) >= sop_uids(study), timeout=90,
                   what="the study pulled by WADO-RS")
        assert source_row(router, "web")["instances_pulled"] == len(study)
        assert "Traceback" not in router.log(5000)
    got = tree(tmp_path / "tree")
    for f in study:
        assert dataset_bytes(got[tags_of(f, "SOPInstanceUID")[0]]) == dataset_bytes(f)
