"""The S3 destination against moto in server mode, over real HTTP."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import zipfile
from pathlib import Path

import pytest
from peers import MotoS3, moto_available, require_peer, run_storescu
from router_fixtures import Router, dataset_bytes, tags_of

from dicomrouter.dicomfile import safe_component
from dicomrouter.sample import generate


def s3_router(tmp_path: Path, endpoint: str, **options: object) -> Router:
    return Router(tmp_path / "router", {
        "destinations": {"bucket": {"type": "s3", "bucket": "exports", "endpoint_url": endpoint,
                                    "region": "us-east-1", "access_key_env": "S3_KEY",
                                    "secret_key_env": "S3_SECRET", **options}},
        "routes": [{"to": "bucket"}],
    })


@pytest.fixture
def s3_env(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("S3_KEY", MotoS3.access_key)
    monkeypatch.setenv("S3_SECRET", MotoS3.secret_key)


def test_one_zip_per_study_at_the_templated_key_with_a_manifest(
        tmp_path: Path, moto_s3: MotoS3, s3_env: None) -> None:
    s3 = moto_s3.client()
    s3.create_bucket(Bucket="exports")
    study = generate(tmp_path / "study", series=2, instances=3, rows=32, cols=32, seed=61,
                     patient_id="PAT/../61")
    template = "{PatientID}/{StudyDate}-{StudyDescription}/{StudyInstanceUID}.zip"
    with s3_router(tmp_path, moto_s3.endpoint_url, key=template) as router:
        assert run_storescu(study, router.port).returncode == 0
        uid = tags_of(study[0], "StudyInstanceUID")[0]
        router.wait_state(uid, "delivered", timeout=120)
        pid, date, desc = tags_of(study[0], "PatientID", "StudyDate", "StudyDescription")
        key = f"{safe_component(pid)}/{safe_component(f'{date}-{desc}')}/{uid}.zip"
        obj = s3.get_object(Bucket="exports", Key=key)
        body = obj["Body"].read()
        assert obj["Metadata"]["study-instance-uid"] == uid
        assert obj["Metadata"]["instance-count"] == "6"
        assert obj["Metadata"]["sha256"] == hashlib.sha256(body).hexdigest()
        with zipfile.ZipFile(io.BytesIO(body)) as z:
            manifest = json.loads(z.read("manifest.json"))
            assert manifest["study_instance_uid"] == uid and manifest["instances"] == 6
            assert manifest["routes"] == ["route 1"] and manifest["destination"] == "bucket"
            assert sorted(manifest["series"].values()) == [3, 3]
            by_uid = {m["sop_instance_uid"]: m for m in manifest["files"]}
            for f in study:
                entry = by_uid[tags_of(f, "SOPInstanceUID")[0]]
                data = z.read(entry["path"])
                assert hashlib.sha256(data).hexdigest() == entry["sha256"]
                assert entry["size"] == len(data)
                member = tmp_path / "member.dcm"
                member.write_bytes(data)
                assert dataset_bytes(member) == dataset_bytes(f)
        # exported: deleted from the router's spool (keep_after_delivery is false)
        assert not list((router.spool / "data").rglob("*.dcm"))


def test_instances_mode_writes_one_object_each(tmp_path: Path, moto_s3: MotoS3,
                                               s3_env: None) -> None:
    s3 = moto_s3.client()
    s3.create_bucket(Bucket="exports")
    study = generate(tmp_path / "study", series=1, instances=4, rows=16, cols=16, seed=62)
    with s3_router(tmp_path, moto_s3.endpoint_url, mode="instances") as router:
        assert run_storescu(study, router.port).returncode == 0
        router.wait_state(tags_of(study[0], "StudyInstanceUID")[0], "delivered", timeout=120)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="exports")["Contents"]]
        assert len(keys) == 4
        for f in study:
            pid, st, se, sop = tags_of(f, "PatientID", "StudyInstanceUID",
                                       "SeriesInstanceUID", "SOPInstanceUID")
            obj = s3.get_object(Bucket="exports", Key=f"{safe_component(pid)}/{st}/{se}/{sop}.dcm")
            data = obj["Body"].read()
            assert obj["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
            member = tmp_path / "obj.dcm"
            member.write_bytes(data)
            assert dataset_bytes(member) == dataset_bytes(f)


def test_unreachable_endpoint_fails_clearly_then_delivers(tmp_path: Path, s3_env: None) -> None:
    require_peer("moto server", moto_available(), "moto[server] boto3 (pip install)")
    server = MotoS3(tmp_path / "moto")  # not started yet: its port refuses connections
    study = generate(tmp_path / "study", series=1, instances=2, rows=16, cols=16, seed=63)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    with s3_router(tmp_path, server.endpoint_url, timeout="5s",
                   retry={"initial": "1s", "max_delay": "2s", "max_attempts": 100}) as router:
        assert run_storescu(study, router.port).returncode == 0
        from peers import wait_until

        # the job is back to running a second later: keep what the poll saw
        retrying = wait_until(lambda: router.status()["retrying"], timeout=120,
                              what="a failed upload")
        error = retrying[0]["last_error"]
        # one line that names the endpoint (boto3's EndpointConnectionError, or obstore's
        # connect error as the destination words it)
        assert "S3 upload" in error and "connect to the endpoint" in error.lower(), error
        assert "\n" not in error and "Debug source" not in error, error
        # the router waits (SIGSTOP) while the server starts and gets its bucket: a retry
        # between the two would meet a missing bucket, which is a permanent failure
        router.proc.send_signal(signal.SIGSTOP)
        try:
            server.start()
            server.client().create_bucket(Bucket="exports")
        finally:
            router.proc.send_signal(signal.SIGCONT)
        with server:
            router.wait_state(uid, "delivered", timeout=120)
            keys = [o["Key"] for o in server.client().list_objects_v2(
                Bucket="exports")["Contents"]]
            assert keys == [f"{safe_component(tags_of(study[0], 'PatientID')[0])}/{uid}.zip"]
        assert "Traceback" not in router.log(100000)  # an outage is a job error, one line
