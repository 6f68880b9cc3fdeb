"""DICOM TLS with real DCMTK peers: a plain LAN listener and a TLS WAN listener side by side,
client certificates checked, the router's own TLS C-STORE checked by storescp, Q/R over TLS."""

from __future__ import annotations

import subprocess
from pathlib import Path

from peers import StoreSCP, dcmtk, peer_env, run_storescu, sop_uids, wait_until
from pydicom import dcmread
from router_fixtures import Router, dataset_bytes, tags_of

from dicomrouter.sample import generate
from dicomrouter_bench.procs import free_port
from dicomrouter_bench.tlscerts import Certs, make_certs


def tls_args(certs: Certs, pair: str | None) -> list[str]:
    if pair is None:
        return ["+tla", "+cf", str(certs.ca)]
    p = getattr(certs, pair)
    return ["+tls", str(p.key), str(p.cert), "+cf", str(certs.ca)]


def two_listener_router(tmp_path: Path, certs: Certs, wan_port: int) -> Router:
    return Router(tmp_path / "router", {
        "listeners": [{"name": "wan", "port": wan_port, "tls": {
            "cert": str(certs.server.cert), "key": str(certs.server.key), "ca": str(certs.ca),
            "verify_client": True}}],
        "keep_after_delivery": True,
        "destinations": {"lan": {"type": "folder", "path": str(tmp_path / "lan")},
                         "wan": {"type": "folder", "path": str(tmp_path / "wan")}},
        "routes": [{"when": {"Listener": "main"}, "to": "lan"},
                   {"when": {"Listener": "wan"}, "to": "wan"}],
    })


def files_in(folder: Path) -> set[str]:
    return {tags_of(p, "SOPInstanceUID")[0] for p in folder.rglob("*.dcm")} \
        if folder.exists() else set()


def test_tls_listener_beside_a_plain_one(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    wan_port = free_port()
    wan_study = generate(tmp_path / "wan_study", series=1, instances=3, rows=16, cols=16,
                         seed=121)
    lan_study = generate(tmp_path / "lan_study", series=1, instances=2, rows=16, cols=16,
                         seed=122)
    with two_listener_router(tmp_path, certs, wan_port) as router:
        r = run_storescu(wan_study, wan_port, extra=tls_args(certs, "client"))
        assert r.returncode == 0, r.stdout + r.stderr
        wait_until(lambda: files_in(tmp_path / "wan") >= sop_uids(wan_study), timeout=90,
                   what="the TLS study routed by its listener")
        assert not files_in(tmp_path / "lan")
        got = {tags_of(p, "SOPInstanceUID")[0]: p for p in (tmp_path / "wan").rglob("*.dcm")}
        for f in wan_study:
            assert dataset_bytes(got[tags_of(f, "SOPInstanceUID")[0]]) == dataset_bytes(f)

        for who in ("stranger", None):  # a certificate from another CA, or none at all
            r = run_storescu(lan_study, wan_port, extra=tls_args(certs, who))
            assert r.returncode != 0, r.stdout + r.stderr
        plain = run_storescu(lan_study, wan_port)  # plain DICOM to the TLS port
        assert plain.returncode != 0
        r = run_storescu(lan_study, router.port)  # the plain listener still works
        assert r.returncode == 0, r.stderr
        wait_until(lambda: files_in(tmp_path / "lan") >= sop_uids(lan_study), timeout=90,
                   what="the plain study routed to lan")
        assert files_in(tmp_path / "wan") == sop_uids(wan_study)

        out = tmp_path / "find"  # Q/R over TLS: handed to pynetdicom after the RQ was read
        out.mkdir()
        r = subprocess.run([dcmtk("findscu"), *tls_args(certs, "client"), "-S", "-aec",
                            "DICOMROUTER", "-X", "-od", str(out), "-k",
                            "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
                            "127.0.0.1", str(wan_port)],
                           capture_output=True, text=True, env=peer_env(), timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        found = {str(dcmread(p).StudyInstanceUID) for p in out.glob("rsp*.dcm")}
        assert found == {tags_of(wan_study[0], "StudyInstanceUID")[0],
                         tags_of(lan_study[0], "StudyInstanceUID")[0]}
        log = router.log(5000)
    assert log.count("TLS handshake with 127.0.0.1") >= 2, log
    assert "Traceback" not in log


def test_router_sends_over_tls_to_storescp(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    study = generate(tmp_path / "study", series=1, instances=3, rows=16, cols=16, seed=123)
    scp_args = ["+tls", str(certs.server.key), str(certs.server.cert), "+cf", str(certs.ca)]
    client = {"ca": str(certs.ca), "cert": str(certs.client.cert), "key": str(certs.client.key)}
    with StoreSCP(tmp_path / "scp", aet="TLSSCP", extra=scp_args) as scp, Router(
            tmp_path / "router", {
                "destinations": {
                    "secure": {"type": "dicom", "ae_title": "TLSSCP", "host": "127.0.0.1",
                               "port": scp.port, "tls": client},
                    "slow": {"type": "dicom", "ae_title": "TLSSCP", "host": "127.0.0.1",
                             "port": scp.port, "tls": client, "sender": "pynetdicom"},
                    "unknown_ca": {"type": "dicom", "ae_title": "TLSSCP", "host": "127.0.0.1",
                                   "port": scp.port, "tls": {"ca": str(certs.stranger_ca)},
                                   "retry": {"max_attempts": 1}}},
                "routes": [{"to": ["secure", "slow", "unknown_ca"]}]}) as router:
        assert run_storescu(study, router.port).returncode == 0
        wait_until(lambda: router.status()["dead"], timeout=90, what="the unknown CA's job")
        wait_until(lambda: router.status()["queues"].get("slow") == {"delivered": 1},
                   timeout=90, what="the pynetdicom sender's delivery")
        status = router.status()
        assert status["queues"]["secure"] == {"delivered": 1}, status
        error = status["dead"][0]["last_error"]
        assert "TLS handshake failed" in error and "certificate" in error, error
        got = {tags_of(p, "SOPInstanceUID")[0]: p for p in scp.files()}
        assert set(got) == sop_uids(study)
        for f in study:
            assert dataset_bytes(got[tags_of(f, "SOPInstanceUID")[0]]) == dataset_bytes(f)


def test_router_sends_over_tls_to_orthanc(tmp_path: Path, orthanc) -> None:
    certs = make_certs(tmp_path / "certs")
    pacs = orthanc(aet="SECUREPACS", extra_config={
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(certs.server.cert),
        "DicomTlsPrivateKey": str(certs.server.key),
        "DicomTlsTrustedCertificates": str(certs.ca),
        "DicomTlsRemoteCertificateRequired": True,
    })
    study = generate(tmp_path / "study", series=1, instances=3, rows=16, cols=16, seed=124)
    with Router(tmp_path / "router", {
        "destinations": {"pacs": {
            "type": "dicom", "ae_title": "SECUREPACS", "host": "127.0.0.1",
            "port": pacs.dicom_port, "tls": {"ca": str(certs.ca), "cert": str(certs.client.cert),
                                             "key": str(certs.client.key)}}},
        "routes": [{"to": "pacs"}],
    }) as router:
        assert run_storescu(study, router.port).returncode == 0
        router.wait_state(tags_of(study[0], "StudyInstanceUID")[0], "delivered", timeout=120)
    assert pacs.instance_sop_uids() == sop_uids(study)


def test_client_certificate_subject_limits_the_calling_ae(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    study = generate(tmp_path / "study", series=1, instances=1, rows=8, cols=8, seed=125)
    with Router(tmp_path / "router", {
        "tls": {"cert": str(certs.server.cert), "key": str(certs.server.key),
                "ca": str(certs.ca), "verify_client": True,
                "subject_aes": {"CN=partner.test": ["PARTNER"]}},
        "destinations": {}, "routes": [],
    }) as router:
        ok = run_storescu(study, router.port, calling="PARTNER",
                          extra=tls_args(certs, "client"))
        assert ok.returncode == 0, ok.stdout + ok.stderr
        other = run_storescu(study, router.port, calling="SOMEBODY",
                             extra=tls_args(certs, "client"))
        assert other.returncode != 0
        assert "not allowed for the client certificate CN=partner.test" in router.log(2000)
