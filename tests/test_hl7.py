"""HL7 v2 in and out (issue 27, items 1 and 2), end to end: the router as a subprocess, python-hl7's
own ``mllp_send`` program as the sender, an MLLP receiver on python-hl7's asyncio server for
what the router sends, DCMTK storescu for studies.

Every supported message type is ACKed AA and stored before the ACK; what the router cannot take
is answered AR / AE with the reason and one log line, never a traceback; a message ACKed just
before a kill -9 is there after the restart and handled; the hl7 destination's ORU reaches the
receiver with the study's fields, and a receiver answering AE makes the job retry, then die
with the receiver's reason."""

from __future__ import annotations

import json
import socket
import ssl
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hl7_peer import Hl7Receiver, fields, message, mllp_send, msa, msh
from peers import free_port, run_storescu, wait_until
from router_fixtures import Router, dicomrouter, tags_of

from dicomrouter.config import load
from dicomrouter.sample import generate
from dicomrouter.state import State, state_for
from dicomrouter_bench.tlscerts import make_certs

FAST_RETRY = {"initial": "200ms", "max_delay": "500ms", "max_attempts": 3}


def _router(tmp_path: Path, name: str = "router", **extra: Any) -> Router:
    hl7 = {"bind": "127.0.0.1", "port": free_port(), **extra.pop("hl7", {})}
    return Router(tmp_path / name, {"hl7": hl7, **extra})


def _state(router: Router) -> State:
    return state_for(load(router.config_path, secrets=False), readonly=True)


def _read(router: Router, fn: Any) -> Any:
    state = _state(router)
    try:
        return fn(state)
    finally:
        state.close()


def _pid(pid: str = "P1^^^HOSP", name: str = "DOE^JOHN^Q", birth: str = "19700101",
         sex: str = "M") -> list[str]:
    return fields("PID", f1="1", f3=pid, f5=name, f7=birth, f8=sex)


def orm(control: str, accession: str, pid: str = "P1^^^HOSP", modality: str = "CT",
        priority: str = "S", app: str = "RIS", facility: str = "HOSP") -> str:
    """ORM^O01 as IHE Scheduled Workflow (v2.3.1) sends it: accession OBR-18, requested
    procedure OBR-19, modality OBR-24, Study Instance UID in ZDS-1."""
    return message(msh("ORM^O01", control, app, facility, "2.3.1"), _pid(pid),
                   fields("ORC", f1="NW", f2="PL" + control, f3="FL" + control,
                          f7=f"^^^20261208093000^^{priority}", f21="St. Elsewhere Radiology"),
                   fields("OBR", f1="1", f2="PL" + control, f3="FL" + control,
                          f4="CTCHEST^CT Chest w/o contrast", f18=accession, f19="RP" + control,
                          f24=modality, f27=f"^^^20261208093000^^{priority}"),
                   fields("ZDS", f1="1.2.826.0.1.3680043.2.1125.99." + control +
                          "^100^Application^DICOM"))


def omi(control: str, accession: str) -> str:
    """OMI^O23 (v2.5.1): accession IPC-1, requested procedure IPC-2, Study UID IPC-3, modality
    IPC-5, scheduled TQ1-7."""
    return message(msh("OMI^O23", control), _pid("P2^^^HOSP", "ROE^JANE"),
                   fields("ORC", f1="NW", f2="PL" + control),
                   fields("TQ1", f1="1", f7="202612081000", f9="R"),
                   fields("OBR", f1="1", f4="MRHEAD^MR Head"),
                   fields("IPC", f1=accession, f2="RP-" + control, f3="1.2.3.4.5." + control,
                          f4="SPS1", f5="MR"))


def adt(event: str, control: str, pid: str, name: str, prior: str = "") -> str:
    segs = [msh(f"ADT^{event}", control), fields("EVN", f1=event), _pid(pid, name)]
    if prior:
        segs.append(fields("MRG", f1=prior))
    return message(*segs)


def _handled(router: Router, n: int) -> bool:
    rows = _read(router, lambda s: s.hl7_messages(1000))
    return len(rows) == n and all(r["handled_at"] for r in rows)


def test_each_message_type_is_acked_and_stored(tmp_path: Path) -> None:
    with _router(tmp_path) as router:
        port = router.config["hl7"]["port"]
        sent = {"C1": orm("C1", "ACC100"), "C2": omi("C2", "ACC200"),
                "C3": adt("A08", "C3", "P1^^^HOSP", "DOE^JOHNNY^Q"),
                "C4": adt("A31", "C4", "P2^^^HOSP", "ROE^JANET"),
                "C5": adt("A40", "C5", "P9^^^HOSP", "NINE^NEW", prior="P1^^^HOSP")}
        for control, text in sent.items():
            code, acked, reason = msa(mllp_send(port, text, tmp_path))
            assert (code, acked, reason) == ("AA", control, "")
        wait_until(lambda: _handled(router, 5), timeout=30, what="5 messages handled")
        rows = _read(router, lambda s: s.hl7_messages(1000))
        assert sorted((r["message_type"], r["control_id"]) for r in rows) == [
            ("ADT^A08", "C3"), ("ADT^A31", "C4"), ("ADT^A40", "C5"), ("OMI^O23", "C2"),
            ("ORM^O01", "C1")]
        omi_order = _read(router, lambda s: s.latest_hl7_order(accession="ACC200"))
        assert omi_order == {"PatientID": "P2", "IssuerOfPatientID": "HOSP",
                             "PatientName": "ROE^JANET", "PatientBirthDate": "19700101",
                             "PatientSex": "M", "AccessionNumber": "ACC200",
                             "RequestedProcedureID": "RP-C2"}
        # ORM for P1, A08 renamed P1, A40 merged P1 into P9: the order answers P9's
        orm_order = _read(router, lambda s: s.latest_hl7_order(accession="ACC100"))
        assert orm_order is not None
        assert (orm_order["PatientID"], orm_order["PatientName"],
                orm_order["RequestedProcedureID"]) == ("P9", "NINE^NEW", "RPC1")
        assert _read(router, lambda s: s.latest_hl7_order(patient_id="P1"))["PatientID"] == "P9"
        full = _read(router, lambda s: s.hl7_order("ACC100"))
        assert (full["modality"], full["scheduled"], full["priority"], full["study_uid"]) == (
            "CT", "2026-12-08T09:30:00", "S", "1.2.826.0.1.3680043.2.1125.99.C1")
        log = router.log(400)
        assert log.count("stored as #") == 5 and "Traceback" not in log


def test_msh_18_names_the_character_set_of_the_message(tmp_path: Path) -> None:
    """A Latin-1 message that says so in MSH-18 is read as Latin-1 although the listener's
    ``encoding`` is UTF-8; the same bytes without MSH-18 are refused (AR), never misread; a
    set the router does not know is read as ``encoding``, with a warning."""
    def latin(control: str, accession: str, charset: str) -> bytes:
        text = orm(control, accession).replace("DOE^JOHN^Q", "MÜLLER^HANS")
        head, rest = text.split("\r", 1)
        return (head + ("||||||" + charset if charset else "") + "\r" + rest).encode("latin-1")

    with _router(tmp_path) as router:
        port = router.config["hl7"]["port"]
        assert msa(mllp_send(port, latin("L1", "ACCL1", "8859/1"), tmp_path))[0] == "AA"
        code, _acked, reason = msa(mllp_send(port, latin("L2", "ACCL2", ""), tmp_path))
        assert code == "AR" and "not utf-8 text" in reason, reason
        utf = orm("L3", "ACCL3").replace("DOE^JOHN^Q", "MÜLLER^HANS")
        head, rest = utf.split("\r", 1)
        assert msa(mllp_send(port, (head + "||||||ISO IR87\r" + rest).encode(),
                             tmp_path))[0] == "AA"
        wait_until(lambda: _handled(router, 2), timeout=30, what="2 messages handled")
        order = _read(router, lambda s: s.latest_hl7_order(accession="ACCL1"))
        assert order is not None and order["PatientName"] == "MÜLLER^HANS"
        third = _read(router, lambda s: s.latest_hl7_order(accession="ACCL3"))
        assert third is not None and third["PatientName"] == "MÜLLER^HANS"
        assert "names the character set 'ISO IR87' in MSH-18" in router.log(400)


def test_what_cannot_be_taken_is_refused_with_the_reason(tmp_path: Path) -> None:
    with _router(tmp_path, hl7={"allowed_senders": [{"application": "RIS"}],
                                "max_message_size": "4KiB"},
                 web={"enabled": True, "port": free_port()}) as router:
        port = router.config["hl7"]["port"]
        cases = [
            ("garbage", "this is not HL7 at all\rPID|1||x", "AR", "malformed"),
            ("type", message(msh("ORU^R01", "T1"), _pid()), "AR", "unsupported message type"),
            ("sender", orm("S1", "ACC1", app="EVIL"), "AR", "not in allowed_senders"),
            ("nopid", message(msh("ADT^A08", "N1"), fields("EVN", f1="A08")), "AE",
             "no PID segment"),
            ("noacc", message(msh("ORM^O01", "N2"), _pid(), fields("OBR", f1="1")), "AE",
             "no accession number"),
            ("merge", message(msh("ADT^A40", "N3"), _pid(), fields("MRG")), "AE", "MRG-1"),
            ("badmsh", "MSH|^~\\&|RIS|HOSP", "AR", "malformed"),
        ]
        for i, (_what, text, code, why) in enumerate(cases):
            got = msa(mllp_send(port, text, tmp_path, f"m{i}.hl7"))
            assert got[0] == code and why in got[2], (got, why)
        # larger than max_message_size: AR and the connection closed
        big = orm("B1", "ACC-BIG").replace("CT Chest", "x" * 5000)
        assert msa(mllp_send(port, big, tmp_path, "big.hl7"))[0] == "AR"
        # bytes that are not the encoding
        assert msa(mllp_send(port, orm("E1", "ACC1").encode() + b"\xff\xfe", tmp_path,
                             "enc.hl7"))[0] == "AR"
        # and the listener still takes a good one
        assert msa(mllp_send(port, orm("OK1", "ACC-OK"), tmp_path, "ok.hl7"))[0] == "AA"
        wait_until(lambda: _handled(router, 1), timeout=30, what="the good one handled")
        log = router.log(400)
        assert log.count("refused (A") == len(cases) + 2  # one line per message
        assert "larger than max_message_size" in log
        assert "Traceback" not in log
        web = router.config["web"]["port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/metrics", timeout=30) as r:
            text = r.read().decode()
        counts = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                  if line.startswith("dicomrouter_hl7_messages_total{")}
        assert counts == {
            'dicomrouter_hl7_messages_total{ack="AR",message_type="unreadable"}': 4.0,
            'dicomrouter_hl7_messages_total{ack="AR",message_type="other"}': 1.0,
            'dicomrouter_hl7_messages_total{ack="AR",message_type="ORM^O01"}': 1.0,
            'dicomrouter_hl7_messages_total{ack="AE",message_type="ADT^A08"}': 1.0,
            'dicomrouter_hl7_messages_total{ack="AE",message_type="ORM^O01"}': 1.0,
            'dicomrouter_hl7_messages_total{ack="AE",message_type="ADT^A40"}': 1.0,
            'dicomrouter_hl7_messages_total{ack="AA",message_type="ORM^O01"}': 1.0}, counts


def test_an_acked_message_survives_kill_9_and_is_handled_after_restart(tmp_path: Path) -> None:
    router = _router(tmp_path)
    port = router.config["hl7"]["port"]
    router.start()
    try:
        assert msa(mllp_send(port, orm("K1", "ACC-K1"), tmp_path))[0] == "AA"
        router.kill()  # right after the ACK: handled or not yet
        assert _read(router, lambda s: [r["control_id"] for r in s.hl7_messages()]) == ["K1"]
        # a message stored but not handled when the router died (the state as a crash between
        # the ACK and the handling leaves it): handled at the next start, once
        state = state_for(load(router.config_path, secrets=False))
        state.store_hl7_message(orm("K2", "ACC-K2"), "ORM^O01", "K2", "RIS", "HOSP", "test")
        state.close()
        router.start()
        wait_until(lambda: _handled(router, 2), timeout=30, what="both handled")
        for acc in ("ACC-K1", "ACC-K2"):
            assert _read(router, lambda s, a=acc: s.latest_hl7_order(accession=a)) is not None
        assert router.log(400).count("K2 handled") == 1
    finally:
        router.stop()


def _study(tmp_path: Path, seed: int, instances: int = 3) -> tuple[list[Path], dict[str, str]]:
    files = generate(tmp_path / f"study{seed}", series=1, instances=instances, rows=16,
                     cols=16, seed=seed, patient_id="PID^7|X")  # separators to escape
    keys = ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber")
    return files, dict(zip(keys, tags_of(files[0], *keys), strict=True))


@pytest.mark.usefixtures("dcmtk_available")
def test_hl7_destination_sends_oru_with_the_study(tmp_path: Path) -> None:
    files, tags = _study(tmp_path, 501)
    template = ("MSH|^~\\&|ME||{{ receiving_application|hl7 }}||{{ now }}||{{ message_type }}|"
                "{{ control_id }}|P|2.5.1\n"
                "PID|1||{{ study.PatientID|hl7 }}||{{ study.PatientName|hl7_name }}\n\n"
                "ZXX|{{ routes|join('~')|hl7 }}|{{ instances }}|{{ study.Nothing }}\n")
    with Hl7Receiver() as ris, Hl7Receiver() as other, _router(tmp_path, destinations={
            "ris": {"type": "hl7", "host": "127.0.0.1", "port": ris.port,
                    "receiving_application": "RIS", "retry": FAST_RETRY},
            "custom": {"type": "hl7", "host": "127.0.0.1", "port": other.port,
                       "message_type": "OMG^O19", "receiving_application": "R|S",
                       "template": template}},
            routes=[{"name": "tell-ris", "to": ["ris", "custom"]}]) as router:
        assert run_storescu(files, router.port).returncode == 0
        router.wait_state(tags["StudyInstanceUID"], "delivered")
        assert len(ris.messages) == 1 and len(other.messages) == 1
        custom = other.messages[0]  # the template's segments, blank lines dropped, escaped
        assert [str(s[0]) for s in custom] == ["MSH", "PID", "ZXX"]
        assert str(custom.segment("MSH")[5]) == "R\\F\\S"
        assert str(custom.segment("MSH")[9]) == "OMG^O19"
        assert custom.unescape(str(custom.segment("PID")[3])) == tags["PatientID"]
        assert [str(custom.segment("ZXX")[i]) for i in (1, 2, 3)] == ["tell-ris", "3", ""]
        msg = ris.messages[0]
        assert str(msg.segment("MSH")[9]) == "ORU^R01"
        assert str(msg.segment("MSH")[5]) == "RIS"
        # the PatientID's | and ^ arrive escaped, and unescape to the DICOM value
        assert msg.unescape(str(msg.segment("PID")[3])) == tags["PatientID"]
        obr = msg.segment("OBR")
        assert (str(obr[3]), str(obr[18]), str(obr[24]), str(obr[25])) == (
            tags["AccessionNumber"], tags["AccessionNumber"], "CT", "F")
        obx = {str(s[3]): str(s[5]) for s in msg.segments("OBX")}
        assert obx["StudyInstanceUID"] == tags["StudyInstanceUID"]
        assert obx["NumberOfStudyRelatedInstances"] == "3"
        assert obx["Destination"] == "ris"
        assert str(msg.extract_field("ZDS", 1, 1, 1, 1)) == tags["StudyInstanceUID"]


@pytest.mark.usefixtures("dcmtk_available")
def test_a_receiver_answering_ae_is_retried_then_dead(tmp_path: Path) -> None:
    files, tags = _study(tmp_path, 502, instances=1)
    with Hl7Receiver("AE", "no such order") as ris, _router(tmp_path, destinations={
            "ris": {"type": "hl7", "host": "127.0.0.1", "port": ris.port,
                    "retry": FAST_RETRY}},
            routes=[{"to": "ris"}]) as router:
        assert run_storescu(files, router.port).returncode == 0
        router.wait_state(tags["StudyInstanceUID"], "failed")
        assert len(ris.messages) == 3  # max_attempts
        jobs = _read(router, lambda s: s.jobs(destination="ris"))
        assert jobs[0]["state"] == "dead"
        assert "AE: no such order" in jobs[0]["last_error"]


@pytest.mark.usefixtures("dcmtk_available")
def test_hl7_notification_on_delivered(tmp_path: Path, storescp: Any) -> None:
    files, tags = _study(tmp_path, 503, instances=2)
    with Hl7Receiver() as ris, _router(tmp_path, destinations={
            "pacs": {"type": "dicom", "ae_title": storescp.aet, "host": "127.0.0.1",
                     "port": storescp.port}},
            routes=[{"to": "pacs"}],
            notifications=[{"name": "ris", "events": ["delivered"],
                            "hl7": {"host": "127.0.0.1", "port": ris.port,
                                    "message_type": "OMG^O19"}}]) as router:
        assert run_storescu(files, router.port).returncode == 0
        router.wait_state(tags["StudyInstanceUID"], "delivered")
        wait_until(lambda: ris.messages, timeout=30, what="the notification")
        msg = ris.messages[0]
        assert str(msg.segment("MSH")[9]) == "OMG^O19"
        obx = {str(s[3]): str(s[5]) for s in msg.segments("OBX")}
        assert obx["StudyInstanceUID"] == tags["StudyInstanceUID"]
        assert obx["NumberOfStudyRelatedInstances"] == "2" and obx["Destination"] == "pacs"
        assert str(msg.extract_field("OBR", 1, 18)) == tags["AccessionNumber"]


def _delivered_studies(folder: Path) -> set[str]:
    return {tags_of(f, "StudyInstanceUID")[0] for f in folder.rglob("*.dcm")}


@pytest.mark.usefixtures("dcmtk_available")
def test_an_order_gives_its_study_pseudo_keys_for_routes(tmp_path: Path) -> None:
    """Two studies, two orders: only the STAT one from the right facility goes to 'urgent'; a
    third study without any order goes the fallback way too (no order: no value)."""
    (stat_files, stat), (routine_files, routine), (none_files, none) = (
        _study(tmp_path, seed, 2) for seed in (601, 602, 603))
    assert len({stat["AccessionNumber"], routine["AccessionNumber"],
                none["AccessionNumber"]}) == 3
    with _router(tmp_path, destinations={
            "urgent": {"type": "folder", "path": str(tmp_path / "urgent")},
            "routine": {"type": "folder", "path": str(tmp_path / "routine")}},
            routes=[{"name": "stat", "to": "urgent",
                     "when": {"OrderPriority": "S", "OrderingFacility": "/elsewhere/i"}},
                    {"name": "rest", "to": "routine", "fallback": True}]) as router:
        port = router.config["hl7"]["port"]
        for control, tags, priority in (("O1", stat, "S"), ("O2", routine, "R")):
            ack = mllp_send(port, orm(control, tags["AccessionNumber"], priority=priority),
                            tmp_path, f"{control}.hl7")
            assert msa(ack)[0] == "AA"
        wait_until(lambda: _handled(router, 2), timeout=30, what="both orders handled")
        for files in (stat_files, routine_files, none_files):
            assert run_storescu(files, router.port).returncode == 0
        for tags in (stat, routine, none):
            router.wait_state(tags["StudyInstanceUID"], "delivered")
        assert _delivered_studies(tmp_path / "urgent") == {stat["StudyInstanceUID"]}
        assert _delivered_studies(tmp_path / "routine") == {routine["StudyInstanceUID"],
                                                            none["StudyInstanceUID"]}
        r = dicomrouter("explain", "--study", stat["StudyInstanceUID"], "--json", "--config",
                        str(router.config_path))
        assert r.returncode == 0, r.stderr
        found = json.loads(r.stdout)[0]
        assert found["hl7_order"]["accession"] == stat["AccessionNumber"]
        assert found["hl7_order"]["priority"] == "S"
        stat_route = next(x for x in found["routes"] if x["name"] == "stat")
        assert stat_route["matched"] and "OrderPriority" in stat_route["why"]
        text = dicomrouter("explain", "--study", stat["StudyInstanceUID"], "--config",
                           str(router.config_path)).stdout
        assert "expected by HL7 order O1" in text
        for args in ((), ("--json",)):
            st = dicomrouter("status", "--study", stat["StudyInstanceUID"], *args, "--config",
                             str(router.config_path))
            assert st.returncode == 0 and "O1" in st.stdout, st.stderr


def _mllp_over(sock: Any, text: str) -> str:
    """One message over an already open (TLS) socket; the ACK."""
    sock.sendall(b"\x0b" + text.encode() + b"\x1c\r")
    buf = b""
    while b"\x1c\r" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf.decode().strip("\x0b\x1c\r")


def test_tls_listener_needs_a_client_certificate_and_limits_hold(tmp_path: Path) -> None:
    """HL7 over TLS with client certificates (Python's ssl as the sender), a connection past
    max_connections closed at once, an idle one closed after idle_timeout."""
    certs = make_certs(tmp_path / "certs")
    with _router(tmp_path, hl7={"tls": {"cert": str(certs.server.cert),
                                        "key": str(certs.server.key), "ca": str(certs.ca),
                                        "verify_client": True},
                                "max_connections": 2, "idle_timeout": "2s"}) as router:
        port = router.config["hl7"]["port"]
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        ctx.check_hostname = False
        ctx.load_cert_chain(str(certs.client.cert), str(certs.client.key))
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
                ctx.wrap_socket(raw) as tls:
            assert msa(_mllp_over(tls, orm("T1", "ACC-TLS")))[0] == "AA"
        anonymous = ssl.create_default_context(cafile=str(certs.ca))
        anonymous.check_hostname = False
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
            try:
                with anonymous.wrap_socket(raw) as tls:  # TLS 1.3: refused after the handshake
                    tls.sendall(b"\x0b" + orm("T2", "ACC-NO").encode() + b"\x1c\r")
                    assert tls.recv(100) == b""
            except (ssl.SSLError, ConnectionError):
                pass
        wait_until(lambda: "HL7 TLS handshake with" in router.log(200), timeout=30,
                   what="the failed handshake logged")
        held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(2)]
        try:
            wait_until(lambda: "more than max_connections" not in router.log(200), timeout=5)
            with socket.create_connection(("127.0.0.1", port), timeout=30) as third:
                assert third.recv(100) == b""  # closed at once, before any TLS
            wait_until(lambda: "more than max_connections (2)" in router.log(200), timeout=30)
        finally:
            failed = router.log(2000).count("HL7 TLS handshake with")
            for s in held:
                s.close()
        # the router frees a slot only once it has seen each close (its handshake fails)
        wait_until(lambda: router.log(2000).count("HL7 TLS handshake with") >= failed + 2,
                   timeout=30, what="both held connections released")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as idle, \
                ctx.wrap_socket(idle) as tls:
            assert tls.recv(100) == b""  # closed after idle_timeout
        wait_until(lambda: "within idle_timeout (2 s)" in router.log(200), timeout=30)
        assert _read(router, lambda s: [r["control_id"] for r in s.hl7_messages()]) == ["T1"]
        assert "Traceback" not in router.log(400)


@pytest.mark.usefixtures("dcmtk_available")
def test_hl7_destination_over_tls(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(str(certs.server.cert), str(certs.server.key))
    files, tags = _study(tmp_path, 504, instances=1)
    with Hl7Receiver(tls=server) as ris, _router(tmp_path, destinations={
            "ris": {"type": "hl7", "host": "127.0.0.1", "port": ris.port,
                    "tls": {"ca": str(certs.ca)}, "retry": FAST_RETRY}},
            routes=[{"to": "ris"}]) as router:
        assert run_storescu(files, router.port).returncode == 0
        router.wait_state(tags["StudyInstanceUID"], "delivered")
        assert len(ris.messages) == 1
