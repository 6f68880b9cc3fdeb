"""The folder destination's staging, zip and manifest, with storescu sending for real."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import zipfile
from pathlib import Path

import pytest
from peers import run_storescu
from router_fixtures import Router, dataset_bytes, tags_of

from dicomrouter.sample import generate

pytestmark = pytest.mark.usefixtures("dcmtk_available")


def test_a_watcher_never_sees_half_a_staged_study(tmp_path: Path) -> None:
    """Studies are written in DOWNLOADING and appear in QUEUED whole: a watcher polling QUEUED
    every few milliseconds finds every study folder complete the first time it sees it."""
    queued = tmp_path / "QUEUED"
    studies = generate(tmp_path / "in", studies=3, series=2, instances=6, rows=64, cols=64,
                       seed=71)
    per_study: dict[str, int] = {}
    for f in studies:
        uid = tags_of(f, "StudyInstanceUID")[0]
        per_study[uid] = per_study.get(uid, 0) + 1
    seen: dict[str, int] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for patient in (queued.iterdir() if queued.exists() else []):
                for study in patient.iterdir():
                    if study.name not in seen:
                        seen[study.name] = len(list(study.rglob("*.dcm")))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    with Router(tmp_path / "router", {
        "destinations": {"out": {"type": "folder", "path": str(queued),
                                 "staging": "../DOWNLOADING"}},
        "routes": [{"to": "out"}],
    }) as router:
        watcher.start()
        try:
            assert run_storescu(studies, router.port).returncode == 0
            for uid in per_study:
                router.wait_state(uid, "delivered", timeout=120)
        finally:
            stop.set()
            watcher.join(10)
    assert seen == per_study, "a study folder was seen before it was complete"
    assert not list((tmp_path / "DOWNLOADING").rglob("*.dcm"))
    for uid in per_study:
        study_dir = next(queued.glob(f"*/{uid}"))
        m = json.loads((study_dir / "manifest.json").read_text())
        assert m["instances"] == per_study[uid] and sorted(m["series"].values()) == [6, 6]
        assert m["routes"] == ["route 1"]
        for e in m["files"]:
            data = (study_dir / e["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == e["sha256"] and len(data) == e["size"]


def test_zip_mode_writes_one_valid_zip_per_study(tmp_path: Path) -> None:
    studies = generate(tmp_path / "in", studies=2, series=1, instances=3, rows=32, cols=32,
                       seed=72)
    out = tmp_path / "zips"
    with Router(tmp_path / "router", {
        "destinations": {"out": {"type": "folder", "path": str(out), "zip": True}},
        "routes": [{"to": "out"}],
    }) as router:
        assert run_storescu(studies, router.port).returncode == 0
        uids = {tags_of(f, "StudyInstanceUID")[0] for f in studies}
        for uid in uids:
            router.wait_state(uid, "delivered", timeout=120)
    zips = sorted(out.rglob("*.zip"))
    assert len(zips) == 2 and not list(out.rglob("*.part"))
    for z in zips:
        with zipfile.ZipFile(z) as archive:
            assert archive.testzip() is None
            m = json.loads(archive.read("manifest.json"))
            assert z.name == f"{m['study_instance_uid']}.zip" and m["instances"] == 3
            for e in m["files"]:
                member = tmp_path / "m.dcm"
                member.write_bytes(archive.read(e["path"]))
                src = next(f for f in studies if tags_of(f, "SOPInstanceUID")[0] ==
                           e["sop_instance_uid"])
                assert dataset_bytes(member) == dataset_bytes(src)
                assert hashlib.sha256(member.read_bytes()).hexdigest() == e["sha256"]
