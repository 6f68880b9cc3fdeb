"""Several routers behind one AE title on a real PostgreSQL and an S3 spool (moto over HTTP),
delivering to a real Orthanc: a split study is routed once, whole; a killed node's delivery is
finished by another; a PostgreSQL restart loses nothing; every node shows the same cluster."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import MotoS3, Orthanc, run_storescu, sop_uids, wait_until
from router_fixtures import Router, dataset_bytes, dicomrouter, tags_of

from dicomrouter.sample import generate
from dicomrouter.spool import note
from dicomrouter_bench.procs import Postgres, free_port, stop_together

BUCKET = "shared-spool"


@pytest.fixture
def cluster_env(monkeypatch: pytest.MonkeyPatch, moto_s3: MotoS3) -> MotoS3:
    monkeypatch.setenv("BENCH_S3_KEY", "bench")  # the shared spool's credentials (moto: any)
    moto_s3.client().create_bucket(Bucket=BUCKET)
    return moto_s3


def node_config(tmp_path: Path, name: str, dsn: str, s3_url: str, pacs: Orthanc | None,
                **extra: Any) -> dict[str, Any]:
    dsn_file = tmp_path / f"{name}.dsn"
    dsn_file.write_text(dsn + "\n")
    config: dict[str, Any] = {
        "node_id": name,
        "stable_age": "2s",
        "state": {"type": "postgresql", "dsn_file": str(dsn_file), "lease": "3s"},
        "shared_spool": {"type": "s3", "bucket": BUCKET, "prefix": "cluster",
                         "endpoint_url": s3_url, "region": "us-east-1",
                         "access_key_env": "BENCH_S3_KEY", "secret_key_env": "BENCH_S3_KEY"},
        "retry": {"initial": "1s", "max_delay": "2s", "max_attempts": 50},
        **extra,
    }
    if pacs is not None:
        config["destinations"] = {"pacs": {"type": "dicom", "ae_title": pacs.aet,
                                           "host": "127.0.0.1", "port": pacs.dicom_port}}
        config["routes"] = [{"to": "pacs"}]
    return config


@pytest.fixture
def nodes(tmp_path: Path, pg_dsn: str, cluster_env: MotoS3
          ) -> Iterator[Callable[..., list[Router]]]:
    started: list[Router] = []

    def start(n: int, pacs: Orthanc | None, first: dict[str, Any] | None = None,
              **extra: Any) -> list[Router]:
        """``n`` nodes with the same configuration; ``first``: keys for node1 only."""
        routers = [Router(tmp_path / f"node{i}", node_config(
            tmp_path, f"node{i}", pg_dsn, cluster_env.endpoint_url, pacs,
            **extra, **((first or {}) if i == 1 else {})))
            for i in range(1, n + 1)]
        for r in routers:
            started.append(r.start())
        return routers

    yield start
    stop_together(started)


def ledger(pg_server: Postgres, dsn: str) -> tuple[int, int, int]:
    """(entries, sends, delivered) of the shared ledger."""
    (row,) = pg_server.sql("SELECT COUNT(*), COALESCE(SUM(sends),0), COUNT(delivered_at)"
                           " FROM ledger", dsn=dsn)
    return int(row[0]), int(row[1]), int(row[2])


def status(router: Router, *args: str) -> dict[str, Any]:
    r = dicomrouter("status", "--json", *args, "--config", str(router.config_path))
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def test_a_study_split_over_three_nodes_is_routed_once_whole(
        tmp_path: Path, nodes: Callable[..., list[Router]], cluster_env: MotoS3,
        orthanc: Callable[..., Orthanc], pg_server: Postgres, pg_dsn: str) -> None:
    pacs = orthanc(aet="PACS")
    web_port = free_port()
    routers = nodes(3, pacs, first={"web": {"enabled": True, "bind": "127.0.0.1",
                                            "port": web_port}})
    study = generate(tmp_path / "study", series=3, instances=8, rows=32, cols=32, seed=71)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    by_series: dict[str, list[Path]] = {}
    for f in study:
        by_series.setdefault(tags_of(f, "SeriesInstanceUID")[0], []).append(f)
    # each series to another node, over its own association, interleaved in time
    results: list[int] = []
    threads = []
    for i, series_files in enumerate(by_series.values()):
        def send(files: list[Path] = series_files, port: int = routers[i].port) -> None:
            for f in files:  # one association per instance: the series interleave
                results.append(run_storescu([f], port).returncode)
        threads.append(threading.Thread(target=send))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [0] * len(study)
    routers[0].wait_state(uid, "delivered", timeout=120)
    assert pacs.wait_for_instances(sop_uids(study)) == sop_uids(study)
    assert pacs.count() == len(study)
    entries, sends, delivered = ledger(pg_server, pg_dsn)
    assert (entries, sends, delivered) == (len(study), len(study), len(study))  # each once
    events = history(routers[1], uid)
    assert sum(1 for e in events if e.startswith("complete (")) == 1, events
    # every node sees the same cluster: the study, who received what, and the nodes
    views = [status(r, "--all") for r in routers]
    for view in views:
        (s,) = [s for s in view["studies"] if s["study_uid"] == uid]
        assert s["received_by"] == {"node1": 8, "node2": 8, "node3": 8}
        assert s["state"] == "delivered"
        assert sorted((n["node_id"], n["alive"]) for n in view["nodes"]) == \
            [("node1", True), ("node2", True), ("node3", True)]
    assert views[0]["studies"] == views[1]["studies"] == views[2]["studies"]
    with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/api/nodes", timeout=30) as rsp:
        api = json.loads(rsp.read())  # the web side of node1 sees the cluster too
    assert api["this"] == "node1" and len(api["nodes"]) == 3
    # delivered and deleted: no object of the study is left in the shared store
    s3 = cluster_env.client()
    wait_until(lambda: s3.list_objects_v2(Bucket=BUCKET).get("KeyCount", 0) == 0,
               timeout=60, what="the shared spool to be emptied after delivery")


def test_a_killed_delivering_node_is_taken_over_after_its_lease(
        tmp_path: Path, nodes: Callable[..., list[Router]],
        orthanc: Callable[..., Orthanc], pg_server: Postgres, pg_dsn: str) -> None:
    pacs = orthanc(aet="PACS")
    routers = nodes(2, pacs)
    study = generate(tmp_path / "study", series=2, instances=150, rows=256, cols=256, seed=72)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    half = len(study) // 2
    assert run_storescu(study[:half], routers[0].port).returncode == 0
    assert run_storescu(study[half:], routers[1].port).returncode == 0  # all acknowledged

    def delivering() -> str | None:
        rows = pg_server.sql("SELECT node FROM jobs WHERE state='running'", dsn=pg_dsn)
        done = ledger(pg_server, pg_dsn)[2]
        return rows[0][0] if rows and 0 < done < len(study) - 20 else None

    node = wait_until(delivering, timeout=120, interval=0.02, what="a delivery under way")
    victim = next(r for r in routers if r.config["node_id"] == node)
    survivor = next(r for r in routers if r is not victim)
    victim.kill()  # kill -9, mid-study
    delivered_at_kill = ledger(pg_server, pg_dsn)[2]
    assert delivered_at_kill < len(study)
    survivor.wait_state(uid, "delivered", timeout=180)
    assert pacs.wait_for_instances(sop_uids(study)) == sop_uids(study)  # nothing lost
    entries, sends, delivered = ledger(pg_server, pg_dsn)
    assert entries == delivered == len(study)
    assert sends - entries <= 1, "more than the one instance in flight was sent again"
    events = history(survivor, uid)
    assert any(f"resumed on node {survivor.config['node_id']}" in e for e in events), events
    view = status(survivor)
    assert {n["node_id"]: n["alive"] for n in view["nodes"]} == \
        {survivor.config["node_id"]: True, node: False}


def test_routers_carry_on_through_a_postgresql_restart(
        tmp_path: Path, cluster_env: MotoS3, orthanc: Callable[..., Orthanc]) -> None:
    pacs = orthanc(aet="PACS")
    with Postgres(tmp_path / "pg") as pg:
        routers = [Router(tmp_path / f"node{i}", node_config(
            tmp_path, f"node{i}", pg.dsn, cluster_env.endpoint_url, pacs)) for i in (1, 2)]
        try:
            for r in routers:
                r.start()
            first = generate(tmp_path / "first", series=1, instances=5, rows=32, cols=32,
                             seed=73)
            assert run_storescu(first, routers[0].port).returncode == 0
            pg.stop()
            pg.start()  # same data, same port
            second = generate(tmp_path / "second", series=1, instances=5, rows=32, cols=32,
                              seed=74)
            # acknowledged only when durable: a refusal while the state reconnects is retried
            wait_until(lambda: run_storescu(second, routers[1].port).returncode == 0,
                       timeout=60, interval=1, what="node2 to take the second study")
            want = sop_uids(first) | sop_uids(second)
            assert pacs.wait_for_instances(want, timeout=120) == want
            for r in routers:
                assert r.alive(), r.log()
                assert "Traceback" not in r.log(5000)
        finally:
            stop_together(routers)


def test_the_shared_store_unreachable_answers_a700_then_recovers(
        tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_S3_KEY", "bench")
    s3 = MotoS3(tmp_path / "moto")
    study = generate(tmp_path / "study", series=1, instances=3, rows=32, cols=32, seed=75)
    with s3:
        s3.client().create_bucket(Bucket=BUCKET)
        router = Router(tmp_path / "node1", node_config(tmp_path, "node1", pg_dsn,
                                                        s3.endpoint_url, None))
        with router:
            s3.stop()  # the shared store goes away
            r = run_storescu(study, router.port)
            assert "Refused: OutOfResources" in r.stdout + r.stderr, r.stdout + r.stderr
            wait_until(lambda: "refused with 0xA700" in router.log(2000), timeout=10,
                       what="the refusal in the router's log")
            assert "shared store" in router.log(2000)
            s3.start()
            s3.client().create_bucket(Bucket=BUCKET)
            wait_until(lambda: run_storescu(study, router.port).returncode == 0, timeout=60,
                       interval=1, what="the router to store again once S3 is back")
            keys = s3.client().list_objects_v2(Bucket=BUCKET)["Contents"]
            assert len(keys) == 3 and all(k["Key"].startswith("cluster/data/") for k in keys)
            assert "shared store" in router.log(2000) and "Traceback" not in router.log(5000)


def test_ack_after_local_acknowledges_first_and_uploads_behind(
        tmp_path: Path, nodes: Callable[..., list[Router]], cluster_env: MotoS3,
        orthanc: Callable[..., Orthanc], pg_server: Postgres, pg_dsn: str) -> None:
    pacs = orthanc(aet="PACS")
    (router,) = nodes(1, pacs, ack_after="local", keep_after_delivery=True)
    study = generate(tmp_path / "study", series=1, instances=4, rows=32, cols=32, seed=76)
    assert run_storescu(study, router.port).returncode == 0
    wait_until(lambda: pg_server.sql("SELECT COUNT(*) FROM instances WHERE shared=1",
                                     dsn=pg_dsn)[0][0] == 4, timeout=60,
               what="the uploads behind the acknowledgements")
    keys = [o["Key"] for o in cluster_env.client().list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert len(keys) == 4 and all(k.startswith("cluster/data/") for k in keys)
    assert pacs.wait_for_instances(sop_uids(study), timeout=120) == sop_uids(study)


def test_ack_after_local_uploads_in_batches_and_retries_while_s3_is_away(
        tmp_path: Path, pg_dsn: str, pg_server: Postgres,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The uploader takes what is queued in batches (several puts at once, one transaction to
    record them); with S3 away the instances are still acknowledged, and once it is back every
    one is uploaded and recorded, none lost."""
    monkeypatch.setenv("BENCH_S3_KEY", "bench")
    s3 = MotoS3(tmp_path / "moto")
    study = generate(tmp_path / "study", series=2, instances=40, rows=16, cols=16, seed=78)
    with s3:
        s3.client().create_bucket(Bucket=BUCKET)
        router = Router(tmp_path / "node1", node_config(
            tmp_path, "node1", pg_dsn, s3.endpoint_url, None, ack_after="local",
            shared_spool={"type": "s3", "bucket": BUCKET, "prefix": "cluster",
                          "endpoint_url": s3.endpoint_url, "region": "us-east-1",
                          "access_key_env": "BENCH_S3_KEY", "secret_key_env": "BENCH_S3_KEY",
                          "transfer_threads": 3, "timeout": "2s"}))
        with router:
            s3.stop()
            r = run_storescu(study, router.port)
            assert r.returncode == 0 and "Refused" not in r.stdout + r.stderr, r.stdout
            wait_until(lambda: "failed" in router.log(3000) and "will retry" in
                       router.log(3000), timeout=60, what="an upload failing while S3 is away")
            assert pg_server.sql("SELECT COUNT(*) FROM instances WHERE shared=1",
                                 dsn=pg_dsn)[0][0] == 0
            s3.start()
            s3.client().create_bucket(Bucket=BUCKET)
            wait_until(lambda: pg_server.sql("SELECT COUNT(*) FROM instances WHERE shared=1",
                                             dsn=pg_dsn)[0][0] == 80, timeout=120,
                       what="every instance uploaded once S3 is back")
            objects = s3.client().list_objects_v2(Bucket=BUCKET)["Contents"]
            assert len(objects) == 80
            for obj in objects[:5]:  # the bytes the sender sent
                sop = obj["Key"].rsplit("/", 1)[-1].split("~", 1)[0]
                src = next(f for f in study if tags_of(f, "SOPInstanceUID")[0] == sop)
                got = tmp_path / f"{sop}.dcm"
                got.write_bytes(
                    s3.client().get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read())
                assert dataset_bytes(got) == dataset_bytes(src), sop
                # the slot's marker is not in the object; its reception note is, for a node
                # that adopts it (adopt_shared_orphans)
                raw = got.read_bytes()
                assert raw[:24] == bytes(24)
                assert note.read(raw[:128])[0] == {"_Listener": "main",
                                                   "_SourceHost": "127.0.0.1"}, sop
            assert "Traceback" not in router.log(10000)


def history(router: Router, uid: str) -> list[str]:
    return [e for _ts, e in status(router, "--study", uid)["history"]]


def _store(cluster_env: MotoS3) -> Any:
    from dicomrouter.config.models import SharedSpoolModel
    from dicomrouter.spool import SharedStore

    return SharedStore(SharedSpoolModel.model_validate({
        "type": "s3",
        "bucket": BUCKET,
        "prefix": "cluster",
        "endpoint_url": cluster_env.endpoint_url,
        "region": "us-east-1",
        "access_key_env": "BENCH_S3_KEY",
        "secret_key_env": "BENCH_S3_KEY",
        "timeout": 10.0,
        "verify_tls": True}))


def test_a_local_file_no_row_knows_is_adopted_with_its_routing_keys(
        tmp_path: Path, cluster_env: MotoS3, pg_dsn: str) -> None:
    """A node died between renaming an instance into its spool and recording it: start-up
    records it with the routing keys of its association, from its reception note."""
    from dicomrouter.spool import ClusterSpool
    from dicomrouter.state.postgres import PostgresState

    (f,) = generate(tmp_path / "study", series=1, instances=1, rows=16, cols=16, seed=78)
    study, sop = tags_of(f, "StudyInstanceUID", "SOPInstanceUID")
    keys = {"_Listener": "main", "_SourceHost": "10.9.8.7"}
    state = PostgresState(pg_dsn, "node3", tmp_path / "spool", lease=3)
    spool = ClusterSpool(tmp_path / "spool", state, _store(cluster_env), "local", "node3")
    try:
        local = tmp_path / "spool" / "data" / study / f"{sop}.dcm"
        local.parent.mkdir(parents=True)
        local.write_bytes(note.overlay(f.read_bytes(), 0, note.pack("CT9", "NODE", keys)))
        assert spool.adopt_orphans() == 1
        inst = state.instance(sop)
        assert inst is not None and {k: inst.tags.get(k) for k in keys} == keys
        assert (inst.calling_ae, inst.called_ae) == ("CT9", "NODE")
    finally:
        state.close()


def test_an_object_no_node_recorded_is_adopted_from_the_shared_store(
        tmp_path: Path, cluster_env: MotoS3, pg_dsn: str) -> None:
    """A node acknowledged an instance (it is in the bucket) and died with its disk before
    recording it: housekeeping on any node records it from the object; reading it gives the
    stored bytes."""
    from dicomrouter.spool import ClusterSpool, SpoolReader
    from dicomrouter.state.postgres import PostgresState

    (f,) = generate(tmp_path / "study", series=1, instances=1, rows=16, cols=16, seed=77)
    study, sop = tags_of(f, "StudyInstanceUID", "SOPInstanceUID")
    key = f"data/{study}/{sop}~deadnode-0001.dcm"
    s3 = cluster_env.client()
    keys = {"_Listener": "main", "_SourceHost": "10.9.8.6"}  # its reception note (note.py)
    s3.put_object(Bucket=BUCKET, Key=f"cluster/{key}",
                  Body=note.overlay(f.read_bytes(), 0, note.pack("CT8", "DEAD", keys)))
    state = PostgresState(pg_dsn, "node2", tmp_path / "spool", lease=3)
    spool = ClusterSpool(tmp_path / "spool", state, _store(cluster_env), "shared", "node2")
    try:
        assert spool.adopt_shared_orphans(min_age=3600) == 0  # too young: maybe in flight
        assert spool.adopt_shared_orphans(min_age=0) == 1
        assert spool.adopt_shared_orphans(min_age=0) == 0  # known now
        (inst,) = state.instances(study)
        assert inst.key == key and inst.sop_uid == sop
        assert {k: inst.tags.get(k) for k in keys} == keys
        assert (inst.calling_ae, inst.called_ae) == ("CT8", "DEAD")
        with spool.open(inst) as data:
            got = data.read()
        with SpoolReader(str(f)) as original:
            assert got == original.read()
        assert state.study(study) is not None and state.study(study).state == "receiving"
    finally:
        state.close()
