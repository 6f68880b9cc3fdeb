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


def _kill_while_writing(router: Router, out: Path, timeout: float = 120) -> Path:
    """SIGKILL the router the moment a partial file shows up under ``out``; that file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        partial = next(out.rglob(".*.part"), None) if out.exists() else None
        if partial is not None:
            router.kill()
            return partial
        time.sleep(0.002)
    raise AssertionError(f"no partial file appeared under {out} (log: {router.log_path})")


@pytest.mark.parametrize("zipped", [False, True], ids=["tree", "zip"])
def test_kill_during_a_folder_delivery_leaves_no_partial_file(tmp_path: Path,
                                                               zipped: bool) -> None:
    """kill -9 while a large instance is being written: after the restart the study is
    delivered whole and the partial file the crash left is gone (it once stayed forever as
    ``Series/.SOP.dcm.xxxx.part``)."""
    big = generate(tmp_path / "in", series=1, instances=2, rows=4096, cols=4096, seed=73)
    out = tmp_path / "out"
    router = Router(tmp_path / "router", {
        "destinations": {"out": {"type": "folder", "path": str(out), "zip": zipped}},
        "routes": [{"to": "out"}], "keep_after_delivery": True,
    })
    uid = tags_of(big[0], "StudyInstanceUID")[0]
    with router:
        assert run_storescu(big, router.port).returncode == 0
        partial = _kill_while_writing(router, out)
        assert partial.exists(), "the crash left a partial file (the case under test)"
        router.start()
        router.wait_state(uid, "delivered", timeout=180)
        assert not list(out.rglob("*.part")), "a partial file survived the next delivery"
        if zipped:
            (z,) = out.rglob("*.zip")
            with zipfile.ZipFile(z) as f:
                names = [n for n in f.namelist() if n.endswith(".dcm")]
                assert len(names) == 2
        else:
            written = sorted(out.rglob("*.dcm"))
            assert len(written) == 2
            by_sop = {tags_of(f, "SOPInstanceUID")[0]: f for f in big}
            for f in written:
                assert dataset_bytes(f) == dataset_bytes(by_sop[f.stem])


def test_stale_partials_of_a_study_are_removed_when_it_is_next_delivered(
        tmp_path: Path) -> None:
    """Partial files under other names (an older version's random suffixes, a template since
    changed) in the study's folder and its staging folder go when the study is delivered."""
    study = generate(tmp_path / "in", series=1, instances=2, rows=16, cols=16, seed=74)
    pid, uid, series = tags_of(study[0], "PatientID", "StudyInstanceUID", "SeriesInstanceUID")
    out, staging = tmp_path / "out", tmp_path / "staging"
    stale = [out / pid / uid / series / ".1.2.3.dcm.k2j3h4.part",
             out / pid / uid / ".old-template.dcm.part",
             staging / pid / uid / series / ".1.2.4.dcm.part"]
    other = out / pid / "9.9.9" / ".another-study.dcm.part"  # not this study's: left alone
    for p in [*stale, other]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a file")
    with Router(tmp_path / "router", {
        "destinations": {"out": {"type": "folder", "path": str(out), "staging": "../staging"}},
        "routes": [{"to": "out"}],
    }) as router:
        assert run_storescu(study, router.port).returncode == 0
        router.wait_state(uid, "delivered", timeout=120)
        assert not any(p.exists() for p in stale)
        assert other.exists()
        assert len(list((out / pid / uid).rglob("*.dcm"))) == 2
        assert "removed 3 partial file(s)" in router.log(2000)
