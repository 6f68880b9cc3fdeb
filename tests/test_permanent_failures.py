"""Failures waiting cannot heal go to the dead letter at once, with the reason and what the
operator can do; transient ones are retried. Real peers refuse: DCMTK dcmqrscp (a called AE
title it does not know), Orthanc's DICOMweb plugin (a wrong URL), moto (a missing bucket)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from peers import DcmQrScp, MotoS3, Orthanc, free_port, run_storescu, wait_until
from router_fixtures import Router, dicomrouter, tags_of

from dicomrouter.destinations.store import status_is_permanent
from dicomrouter.sample import generate

RETRYING = {"initial": "1s", "max_attempts": 10}


def _dead_after_one_attempt(router: Router, uid: str) -> dict[str, Any]:
    router.wait_state(uid, "failed", timeout=120)
    status = router.status()
    (dead,) = status["dead"]
    assert dead["attempts"] == 1, f"retried although permanent: {dead}"
    assert not status["retrying"]
    return dict(dead)


def _study(tmp_path: Path, seed: int, instances: int = 1) -> tuple[list[Path], str]:
    """One instance by default: on a slow machine a second one can arrive after the tests' 1 s
    stable age, reopen the routed study, and its new generation is rightly attempted again."""
    files = generate(tmp_path / f"study{seed}", series=1, instances=instances, rows=16, cols=16,
                     seed=seed)
    return files, tags_of(files[0], "StudyInstanceUID")[0]


@pytest.mark.usefixtures("dcmtk_available")
@pytest.mark.parametrize("sender", ["fast", "pynetdicom"])
def test_an_association_rejected_for_its_ae_title_is_dead_at_once(tmp_path: Path,
                                                                  sender: str) -> None:
    study, uid = _study(tmp_path, 81)
    with DcmQrScp(tmp_path / "qr") as archive, Router(tmp_path / "router", {
        "destinations": {
            "wrong": {"type": "dicom", "ae_title": "NOTARCHIVE", "host": "127.0.0.1",
                      "port": archive.port, "sender": sender, "retry": RETRYING}},
        "routes": [{"to": "wrong"}],
    }) as router:
        assert run_storescu(study, router.port).returncode == 0
        dead = _dead_after_one_attempt(router, uid)
        error = dead["last_error"]
        assert "Called AE title not recognised" in error, error
        assert "not retried: make the peer accept" in error, error
        text = dicomrouter("status", "--config", str(router.config_path)).stdout
        assert "dead letters" in text and "not retried" in text
        assert "failed permanently, dead-lettered without retrying" in router.log(5000)
        assert "Refusing Association (BadAEService)" in archive.log()


@pytest.mark.usefixtures("dcmtk_available")
def test_a_peer_that_is_down_is_still_retried(tmp_path: Path) -> None:
    study, uid = _study(tmp_path, 82)
    with Router(tmp_path / "router", {
        "destinations": {"down": {"type": "dicom", "ae_title": "X", "host": "127.0.0.1",
                                  "port": free_port(), "retry": RETRYING}},
        "routes": [{"to": "down"}],
    }) as router:
        assert run_storescu(study, router.port).returncode == 0
        wait_until(lambda: any(j["attempts"] >= 2 for j in router.status()["retrying"]),
                   timeout=120, what="a second attempt")
        assert not router.status()["dead"]


def test_a_dicomweb_4xx_is_dead_at_once(tmp_path: Path,
                                       orthanc: Any) -> None:
    pacs: Orthanc = orthanc(aet="CLOUD", dicomweb=True)
    study, uid = _study(tmp_path, 83)
    with Router(tmp_path / "router", {
        "destinations": {"cloud": {"type": "dicomweb", "retry": RETRYING,
                                   "url": f"http://127.0.0.1:{pacs.http_port}/no-such-path"}},
        "routes": [{"to": "cloud"}],
    }) as router:
        r = dicomrouter("send", str(tmp_path / "study83"), "--port", str(router.port))
        assert r.returncode == 0, r.stderr
        error = _dead_after_one_attempt(router, uid)["last_error"]
        assert "HTTP 404" in error and "check the destination's url" in error, error
    assert pacs.instance_sop_uids() == set()


def test_a_missing_bucket_is_dead_at_once(tmp_path: Path, moto_s3: MotoS3,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S3_KEY", MotoS3.access_key)
    monkeypatch.setenv("S3_SECRET", MotoS3.secret_key)
    study, uid = _study(tmp_path, 84)
    with Router(tmp_path / "router", {
        "destinations": {"bucket": {"type": "s3", "bucket": "never-created",
                                    "endpoint_url": moto_s3.endpoint_url, "region": "us-east-1",
                                    "access_key_env": "S3_KEY", "secret_key_env": "S3_SECRET",
                                    "retry": RETRYING}},
        "routes": [{"to": "bucket"}],
    }) as router:
        r = dicomrouter("send", str(tmp_path / "study84"), "--port", str(router.port))
        assert r.returncode == 0, r.stderr
        error = _dead_after_one_attempt(router, uid)["last_error"]
        assert "NoSuchBucket" in error and "create the bucket" in error, error


def test_a_zip_of_a_study_no_longer_whole_is_dead_at_once(tmp_path: Path) -> None:
    """Delivered as a zip, deleted from the spool, then a late arrival: the study cannot be
    zipped whole again, which no amount of waiting changes."""
    study, uid = _study(tmp_path, 85, instances=3)
    late = tmp_path / "late"
    late.mkdir()
    study[-1].rename(late / study[-1].name)
    with Router(tmp_path / "router", {
        "destinations": {"zips": {"type": "folder", "path": str(tmp_path / "out"), "zip": True,
                                  "retry": RETRYING}},
        "routes": [{"to": "zips"}],
    }) as router:
        r = dicomrouter("send", str(tmp_path / "study85"), "--port", str(router.port))
        assert r.returncode == 0, r.stderr
        router.wait_state(uid, "delivered", timeout=120)
        wait_until(lambda: not list((router.spool / "data").rglob("*.dcm")), timeout=60,
                   what="the spool emptied")
        r = dicomrouter("send", str(late), "--port", str(router.port))
        assert r.returncode == 0, r.stderr
        error = _dead_after_one_attempt(router, uid)["last_error"]
        assert "cannot be exported whole again" in error and "not retried" in error, error
        text = dicomrouter("status", "--study", uid, "--config", str(router.config_path)).stdout
        assert "zips: dead" in text and "cannot be exported whole again" in text, text


@pytest.mark.parametrize(("status", "permanent"), [
    (0x0000, False), (0xA700, False), (0xA7FF, False), (0x0110, False), (0xFE00, False),
    (0x0122, True), (0x0124, True), (0xA900, True), (0xA9FF, True), (0xC000, True),
    (0xCFFF, True),
])
def test_c_store_failure_statuses_are_classified(status: int, permanent: bool) -> None:
    assert status_is_permanent(status) is permanent
