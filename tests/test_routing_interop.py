"""Routing and delivery details against real peers: several destinations, unrouted studies,
refused instances, transcoding for a peer that refuses compressed data, re-sent instances."""

from __future__ import annotations

import queue
import socket
from pathlib import Path
from types import SimpleNamespace

from peers import SAMPLE_DIR, StoreSCP, run_storescu, wait_until
from pydicom import dcmread
from pynetdicom.transport import AssociationSocket
from router_fixtures import Router, dicomrouter, tags_of

from dicomrouter.netutil import adjust_associations
from dicomrouter.sample import generate


def sop(f: Path) -> str:
    return tags_of(f, "SOPInstanceUID")[0]


def test_rules_send_each_study_where_it_belongs_and_keep_the_rest(tmp_path: Path) -> None:
    ct = generate(tmp_path / "ct", series=1, instances=2, modality="CT", rows=8, cols=8, seed=31)
    mr = generate(tmp_path / "mr", series=1, instances=2, modality="MR", rows=8, cols=8, seed=32)
    us = generate(tmp_path / "us", series=1, instances=1, modality="US", rows=8, cols=8, seed=33)
    cfg = {
        "destinations": {n: {"type": "folder", "path": str(tmp_path / n),
                             "template": "{Modality}/{SOPInstanceUID}.dcm"}
                         for n in ("ct_archive", "mr_archive", "from_modality")},
        "routes": [
            {"name": "CT", "when": {"Modality": "CT"}, "to": ["ct_archive"]},
            {"name": "MR", "when": {"Modality": "/^M[RG]$/"}, "to": ["mr_archive"]},
            {"name": "by caller", "when": {"CallingAE": "MODALITY1", "Modality": ["CT", "MR"]},
             "to": ["from_modality", "ct_archive"]},
        ],
    }
    with Router(tmp_path / "r", cfg) as router:
        assert run_storescu([tmp_path / "ct"], router.port, calling="MODALITY1").returncode == 0
        assert run_storescu([tmp_path / "mr"], router.port, calling="OTHER").returncode == 0
        assert run_storescu([tmp_path / "us"], router.port).returncode == 0
        us_uid = tags_of(us[0], "StudyInstanceUID")[0]
        router.wait_state(us_uid, "unrouted")
        wait_until(lambda: len(list((tmp_path / "mr_archive").rglob("*.dcm"))) == 2 and
                   len(list((tmp_path / "from_modality").rglob("*.dcm"))) == 2, timeout=60,
                   what="MR and CT deliveries")
        wait_until(lambda: router.study_state(tags_of(ct[0], "StudyInstanceUID")[0]) ==
                   "delivered", timeout=60, what="CT study delivered")
        assert {p.stem for p in (tmp_path / "ct_archive").rglob("*.dcm")} == {sop(f) for f in ct}
        assert {p.stem for p in (tmp_path / "from_modality").rglob("*.dcm")} == \
            {sop(f) for f in ct}
        assert {p.stem for p in (tmp_path / "mr_archive").rglob("*.dcm")} == {sop(f) for f in mr}
        st = router.status()
        unrouted = [s for s in st["studies"] if s["state"] == "unrouted"]
        assert [(s["study_uid"], s["instances_in_spool"]) for s in unrouted] == [(us_uid, 1)]
        # the CT study went once to ct_archive although two routes name it
        assert st["ledger"]["entries"] == 2 + 2 + 2
        text = dicomrouter("status", "--config", str(router.config_path)).stdout
        assert "unrouted" in text and us_uid in text
        assert "matched no route" in router.log(5000)


def test_refused_instance_fails_the_delivery_with_the_reason_and_retry_sends_only_it(
        tmp_path: Path) -> None:
    study = generate(tmp_path / "study", series=1, instances=3, rows=8, cols=8, seed=34)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    with StoreSCP(tmp_path / "scp", aet="STORESCP") as scp:
        # A directory where storescp would write instance 2: it answers a failure for that one.
        blocker = scp.out_dir / f"CT.{sop(study[1])}.dcm"
        blocker.mkdir(parents=True)
        cfg = {
            "destinations": {"pacs": {"type": "dicom", "ae_title": "STORESCP",
                                      "host": "127.0.0.1", "port": scp.port,
                                      "retry": {"max_attempts": 1}}},
            "routes": [{"name": "to pacs", "to": ["pacs"]}],
        }
        with Router(tmp_path / "r", cfg) as router:
            assert run_storescu([tmp_path / "study"], router.port).returncode == 0
            router.wait_state(uid, "failed")
            dead = router.status()["dead"]
            assert len(dead) == 1
            assert "1 of 3 instance(s) refused" in dead[0]["last_error"]
            assert "answered 0xA7" in dead[0]["last_error"]  # Refused: Out of Resources
            assert scp.sop_uids() == {sop(study[0]), sop(study[2])}
            blocker.rmdir()  # the peer is fixed
            assert dicomrouter("retry", "--dead", "--config",
                               str(router.config_path)).returncode == 0
            wait_until(lambda: scp.sop_uids() == {sop(f) for f in study}, timeout=60,
                       what="the refused instance delivered on retry")
            router.wait_state(uid, "delivered")
            assert router.status()["ledger"]["sends"] == 4  # 3, then only the refused one


def test_peer_refusing_compressed_syntax_gets_it_decoded(tmp_path: Path) -> None:
    rle = next(p for p in SAMPLE_DIR.rglob("*.dcm") if "rle" in str(p))
    with StoreSCP(tmp_path / "scp", aet="PLAINSCP", accept_all=False) as scp:
        r = dicomrouter("send", str(rle), "--port", str(scp.port), "--aet", scp.aet)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: scp.sop_uids() == {sop(rle)}, timeout=60, what="decoded arrival")
        got = dcmread(scp.files()[0])
        assert not got.file_meta.TransferSyntaxUID.is_compressed
        assert (got.pixel_array == dcmread(rle).pixel_array).all()


def test_resent_instance_replaces_the_earlier_copy(tmp_path: Path) -> None:
    study = generate(tmp_path / "study", series=1, instances=3, rows=8, cols=8, seed=35)
    with Router(tmp_path / "r", {"destinations": {}, "routes": [], "stable_age": "1h"}) as router:
        for _ in range(2):
            assert run_storescu(study, router.port).returncode == 0
        st = router.status()
        assert [s["instances_in_spool"] for s in st["studies"]] == [3]
        spooled = list((router.spool / "data").rglob("*.dcm"))
        assert len(spooled) == 3
        assert st["spool_bytes"] == sum(p.stat().st_size for p in spooled)  # not counted twice


def test_tcp_nodelay_is_set_on_association_sockets() -> None:
    adjust_associations()
    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.create_connection(srv.getsockname())
        accepted, _ = srv.accept()
        try:
            assoc = SimpleNamespace(dul=SimpleNamespace(event_queue=queue.Queue()),
                                    network_timeout=None)
            s = AssociationSocket(assoc, client_socket=accepted)  # type: ignore[arg-type]
            assert s.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        finally:
            client.close()
            accepted.close()


def test_config_from_environment_and_sample_command(tmp_path: Path, monkeypatch) -> None:
    cfg = tmp_path / "router.yml"
    cfg.write_text("port: 11999\n")
    monkeypatch.setenv("DICOMROUTER_CONFIG", str(cfg))
    r = dicomrouter("serve", "--check")
    assert r.returncode == 0 and str(cfg) in r.stdout
    r = dicomrouter("sample", str(tmp_path / "s"), "--series", "1", "--instances", "2",
                    "--modality", "MR", "--transfer-syntax", "rle", "--rows", "8", "--cols", "8")
    assert r.returncode == 0, r.stderr
    files = sorted((tmp_path / "s").rglob("*.dcm"))
    assert len(files) == 2
    assert dcmread(files[0]).file_meta.TransferSyntaxUID.name == "RLE Lossless"
