"""Hostile input against a running router: malformed associations, PDUs and datasets, slow-loris,
oversized requests, descriptor exhaustion, log injection. The router must answer each with a
DICOM status, an A-ASSOCIATE-RJ or an A-ABORT, log one line (never a traceback), keep nothing
partial, and go on serving real senders."""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

from peers import dcmtk, peer_env, run_storescu, wait_until
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from rawdicom import (
    CT,
    EXPLICIT_LE,
    VERIFICATION,
    RawAssociation,
    accepted_contexts,
    associate_rq,
    context,
    recv_pdu,
)
from router_fixtures import Router

from dicomrouter.sample import generate

SEED = 20261124
STRICT = {"acse_timeout": "3s", "network_timeout": "3s", "dimse_timeout": "5s",
          "destinations": {}, "routes": [], "stable_age": "1h"}


def encoded(ds, sop: str) -> bytes:  # type: ignore[no-untyped-def]
    ds.SOPInstanceUID = sop
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def element_offsets(data: bytes) -> list[int]:
    """Offsets of the top-level element headers of an explicit VR LE dataset."""
    out, o = [], 0
    while o + 8 <= len(data):
        out.append(o)
        vr = data[o + 4:o + 6]
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL"):
            o += 12 + struct.unpack_from("<I", data, o + 8)[0]
        else:
            o += 8 + struct.unpack_from("<H", data, o + 6)[0]
    return out


def deep(depth: int) -> bytes:
    inner = b"\x08\x00\x55\x11UI\x06\x001.2.3\x00"
    for _ in range(depth):
        inner = (b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff"
                 + b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + inner
                 + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    return inner


def mutate_dataset(rng: random.Random, data: bytes, offsets: list[int]) -> tuple[str, bytes]:
    kind = rng.choice(["truncate", "flip", "length", "append", "deep", "intact", "empty_tail"])
    b = bytearray(data)
    if kind == "truncate":
        return kind, bytes(b[:rng.randrange(1, len(b))])
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(0, min(400, len(b)))] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "length":
        o = rng.choice(offsets)
        if b[o + 4:o + 6] in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
            struct.pack_into("<I", b, o + 8, rng.choice([0, 1, 0xFFFFFFFF, rng.getrandbits(32)]))
        else:
            struct.pack_into("<H", b, o + 6, rng.getrandbits(16))
        return kind, bytes(b)
    if kind == "append":
        return kind, bytes(b) + rng.randbytes(rng.randint(1, 40))
    if kind == "deep":
        return kind, bytes(b) + deep(rng.randint(33, 400))
    if kind == "empty_tail":
        return kind, bytes(b[:offsets[rng.randrange(1, len(offsets))]])  # ends on a boundary
    return kind, bytes(b)


def junk_association(port: int, payload: bytes) -> int:
    """Send ``payload`` on a fresh connection, end our side; returns the answer's PDU type."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            kind, _ = recv_pdu(s)
        except OSError:
            kind = 0
    return kind


def mutate_rq(rng: random.Random) -> bytes:
    rq = bytearray(associate_rq())
    how = rng.randrange(7)
    if how == 0:
        return rng.randbytes(rng.randint(0, 300))
    if how == 1:
        return bytes(rq[:rng.randrange(1, len(rq))])
    if how == 2:
        for _ in range(rng.randint(1, 6)):
            rq[rng.randrange(len(rq))] = rng.getrandbits(8)
        return bytes(rq)
    if how == 3:
        struct.pack_into(">I", rq, 2, rng.getrandbits(32))
        return bytes(rq)
    if how == 4:  # an item length field off
        o = rq.index(b"\x20\x00", 74)
        struct.pack_into(">H", rq, o + 2, rng.getrandbits(16))
        return bytes(rq)
    if how == 5:
        ctx = [context(1, rng.choice([None, CT, "1.2.x"]), rng.choice([[], [EXPLICIT_LE], ["?"]]))]
        return associate_rq(contexts=ctx)
    return associate_rq(calling=rng.randbytes(16), called=rng.randbytes(16))


def mutate_pdata(rng: random.Random) -> bytes:
    how = rng.randrange(6)
    if how == 0:  # a PDU type nobody sends after association
        return struct.pack(">BxI", rng.choice([1, 2, 3, 6, 8, 0x55]), 4) + b"\x00" * 4
    if how == 1:  # PDV longer than its PDU
        return struct.pack(">BxI", 4, 10) + struct.pack(">IBB", 5000, 1, 3) + b"\x00" * 4
    if how == 2:  # PDV for a context never negotiated
        return struct.pack(">BxI", 4, 8) + struct.pack(">IBB", 2, 77, 3)
    if how == 3:  # a random command set
        body = rng.randbytes(rng.randint(0, 60))
        return struct.pack(">BxI", 4, len(body) + 6) + struct.pack(">IBB", len(body) + 2, 1, 3) \
            + body
    if how == 4:  # release request of the wrong length
        return struct.pack(">BxI", 5, 40) + b"\x00" * 40
    return rng.randbytes(rng.randint(1, 50))


def spool_files(router: Router) -> list[Path]:
    return sorted((router.spool / "data").rglob("*.dcm"))


def test_fuzz_1100_malformed_inputs(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    base = dcmread(generate(tmp_path / "g", series=1, instances=1, rows=8, cols=8, seed=9)[0])
    offsets = element_offsets(encoded(base, "1.2.3"))
    acknowledged: set[str] = set()
    kinds: dict[str, int] = {}
    started = time.monotonic()
    with Router(tmp_path / "router", dict(STRICT)) as router:
        answers = [junk_association(router.port, mutate_rq(rng)) for _ in range(250)]
        assert set(answers) <= {0, 2, 3, 7}, answers
        for _ in range(250):
            assoc = RawAssociation(router.port)
            with assoc.sock:
                try:
                    assoc.sock.sendall(mutate_pdata(rng))
                    assoc.sock.shutdown(socket.SHUT_WR)
                    recv_pdu(assoc.sock)
                except OSError:
                    pass
        assoc = None
        for i in range(600):
            if assoc is None:
                assoc = RawAssociation(router.port)
            sop = f"1.2.826.0.1.3680043.10.1124.{i}"
            kind, data = mutate_dataset(rng, encoded(base, sop), offsets)
            command_sop = sop if rng.random() > 0.05 else sop + ".9"
            status = assoc.c_store(data, command_sop)
            kinds[f"{kind}:{status if status is None else hex(status)}"] = \
                kinds.get(f"{kind}:{status if status is None else hex(status)}", 0) + 1
            if status == 0:
                acknowledged.add(sop)
                assert command_sop == sop, "a mismatching dataset was acknowledged"
            if status is None or rng.random() < 0.1:
                assoc.sock.close() if status is None else assoc.release()
                assoc = None
        if assoc is not None:
            assoc.release()
        took = time.monotonic() - started
        assert took < 120, f"1100 cases took {took:.0f} s"
        assert kinds.get("intact:0x0", 0) > 30, kinds
        assert any(k.startswith("truncate:0xc000") for k in kinds), kinds
        assert any(k.startswith("deep:0xc000") for k in kinds), kinds

        # the router goes on: C-ECHO and a real storescu
        echo = subprocess.run([dcmtk("echoscu"), "-aec", router.aet, "127.0.0.1",
                               str(router.port)], capture_output=True, env=peer_env(),
                              timeout=60)
        assert echo.returncode == 0, echo.stderr
        study = generate(tmp_path / "real", series=1, instances=3, rows=16, cols=16, seed=10)
        assert run_storescu(study, router.port, aet=router.aet).returncode == 0
        wait_until(lambda: not router.partial_receptions(), timeout=30, what="no partial files")
        log = router.log(1_000_000)
    assert "Traceback" not in log
    files = spool_files(router)
    names = {f.stem for f in files}
    assert acknowledged <= names and len(files) == len(acknowledged) + 3
    for start in range(0, len(files), 200):
        batch = [str(f) for f in files[start:start + 200]]
        r = subprocess.run([dcmtk("dcmdump"), "-q", *batch], capture_output=True, text=True,
                           errors="replace",
                           env=peer_env(), timeout=300)
        assert r.returncode == 0 and "premature end" not in (r.stdout + r.stderr).lower(), \
            r.stderr[-2000:]


def test_negotiation_errors_get_rj_or_abort_and_one_line(tmp_path: Path) -> None:
    with Router(tmp_path / "router", dict(STRICT)) as router:
        # a context without a transfer syntax or abstract syntax is refused on its own
        rq = associate_rq(contexts=[context(1, CT, []), context(3, None, [EXPLICIT_LE]),
                                    context(5, VERIFICATION, [EXPLICIT_LE])])
        with socket.create_connection(("127.0.0.1", router.port), timeout=20) as s:
            s.sendall(rq)
            kind, body = recv_pdu(s)
            assert kind == 0x02
            assert accepted_contexts(body) == {1: 4, 3: 3, 5: 0}
        # AE titles that are not printable ASCII: A-ASSOCIATE-RJ, calling / called not recognised
        for calling, called, diag in ((b"\xc3\xa9t\xc3\xa9", b"DICOMROUTER", 3),
                                      (b"EVIL\x1b[31m\n", b"DICOMROUTER", 3),
                                      (b"FINE", b"\xff\xfe", 7)):
            with socket.create_connection(("127.0.0.1", router.port), timeout=20) as s:
                s.sendall(associate_rq(calling=calling, called=called))
                kind, body = recv_pdu(s)
                assert kind == 0x03 and body[3] == diag, (kind, body)
        # an RQ whose items do not decode: A-ABORT
        bad = bytearray(associate_rq())
        assert bad[74] == 0x10  # the application context item: make it claim 32 kB
        struct.pack_into(">H", bad, 76, 0x7FFF)
        assert junk_association(router.port, bytes(bad)) == 0x07
        log = router.log(5000)
    assert "Traceback" not in log
    assert "not printable ASCII" in log and "does not decode" in log
    assert "\x1b" not in log and not any(line.startswith("[31m") for line in log.splitlines())


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_oversized_associate_rq_is_rejected_without_memory(tmp_path: Path) -> None:
    with Router(tmp_path / "router", dict(STRICT)) as router:
        assert router.proc is not None
        before = rss_kb(router.proc.pid)
        answers = []
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", router.port), timeout=20) as s:
                s.sendall(struct.pack(">BxI", 1, 0xFFFFFFF0))
                with contextlib.suppress(OSError):  # it stops reading: this may fail
                    s.sendall(b"\x00" * (4 << 20))
                answers.append(recv_pdu(s)[0])
        after = rss_kb(router.proc.pid)
        assert answers == [0x03, 0x03]
        assert after - before < 30_000, f"RSS grew from {before} to {after} kB"
        assert "over max_associate_rq_size" in router.log(2000)


def test_slow_loris_cannot_lock_out_real_senders(tmp_path: Path) -> None:
    """100 connections trickling a byte a second: each is cut at acse_timeout, at most
    max_pending_connections wait at once, and a real storescu gets through meanwhile."""
    cfg = dict(STRICT, acse_timeout="4s", max_pending_connections=16)
    study = generate(tmp_path / "study", series=1, instances=3, rows=16, cols=16, seed=12)
    stop = threading.Event()
    closed = []

    with Router(tmp_path / "router", cfg) as router:
        def trickle() -> None:
            s = socket.create_connection(("127.0.0.1", router.port), timeout=30)
            rq = associate_rq()
            try:
                for b in rq:
                    if stop.wait(1.0):
                        break
                    s.send(bytes([b]))
            except OSError:
                closed.append(1)
            finally:
                s.close()

        threads = [threading.Thread(target=trickle, daemon=True) for _ in range(100)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # let the tricklers connect first (they do nothing but wait)
        try:
            started = time.monotonic()
            r = run_storescu(study, router.port, aet=router.aet, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr
            assert time.monotonic() - started < 30
            wait_until(lambda: len(closed) >= 100, timeout=40, interval=0.5,
                       what="every trickling connection closed by the router")
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        log = router.log(20000)
    assert "max_pending_connections" in log and "acse_timeout" in log
    assert "Traceback" not in log


def test_descriptor_exhaustion_backs_off_and_recovers(tmp_path: Path) -> None:
    # pending connections neither time out nor push each other out here: they hold descriptors
    router = Router(tmp_path / "router", dict(STRICT, acse_timeout="60s",
                                              max_pending_connections=1000))
    command = router.command
    router.command = lambda: ["prlimit", "--nofile=60:60", *command()]  # type: ignore
    with router:
        assert router.proc is not None
        held = []
        for _ in range(80):  # more than the router can accept
            held.append(socket.create_connection(("127.0.0.1", router.port), timeout=5))
        wait_until(lambda: "cannot accept connections" in router.log(2000), timeout=30,
                   what="the accept loop noticing the descriptor limit")
        ticks = Path(f"/proc/{router.proc.pid}/stat").read_text().split()
        cpu0 = int(ticks[13]) + int(ticks[14])
        time.sleep(3)  # measuring CPU use over a window, not waiting for an outcome
        ticks = Path(f"/proc/{router.proc.pid}/stat").read_text().split()
        cpu1 = int(ticks[13]) + int(ticks[14])
        assert cpu1 - cpu0 < 100, f"{cpu1 - cpu0} ticks of CPU in 3 s: the accept loop spins"
        for s in held:
            s.close()
        wait_until(lambda: subprocess.run(
            [dcmtk("echoscu"), "-to", "5", "-aec", router.aet, "127.0.0.1", str(router.port)],
            capture_output=True, env=peer_env(), timeout=30).returncode == 0, timeout=60,
            interval=1, what="C-ECHO served again")
        log = router.log(5000)
    assert log.count("cannot accept connections") == 1
    assert "accepting connections again" in log


def test_log_injection_is_escaped(tmp_path: Path) -> None:
    base = dcmread(generate(tmp_path / "g", series=1, instances=1, rows=8, cols=8, seed=13)[0])
    base.PatientID = "X\nFAKE 2026-01-01 ERROR forged line\x1b[2J"
    cfg = dict(STRICT, stable_age="1s")
    with Router(tmp_path / "router", cfg) as router:
        assoc = RawAssociation(router.port)
        assert assoc.c_store(encoded(base, "1.2.826.0.1.3680043.10.1124.99"),
                             "1.2.826.0.1.3680043.10.1124.99") == 0
        assoc.release()
        router.wait_state(str(base.StudyInstanceUID), "unrouted")
        log = router.log(5000)
    assert "FAKE 2026" in log
    assert not any(line.startswith("FAKE") for line in log.splitlines())
    assert "\x1b" not in log and "\\x1b[2J" in log


def test_check_called_ae(tmp_path: Path) -> None:
    cfg = dict(STRICT, check_called_ae=True)
    with Router(tmp_path / "router", cfg) as router:
        def echo(called: str) -> int:
            return subprocess.run([dcmtk("echoscu"), "-aet", "ECHOER", "-aec", called,
                                   "127.0.0.1", str(router.port)], capture_output=True,
                                  env=peer_env(), timeout=60).returncode
        assert echo("SOMEONEELSE") != 0
        assert echo(router.aet) == 0
        log = router.log(3000)
    assert "to 'SOMEONEELSE'" in log and "check_called_ae" in log
    assert f"from ECHOER to {router.aet}" in log


def test_dataset_that_does_not_match_its_command_gets_a900(tmp_path: Path) -> None:
    base = dcmread(generate(tmp_path / "g", series=1, instances=1, rows=8, cols=8, seed=14)[0])
    data = encoded(base, "1.2.826.0.1.3680043.10.1124.7")
    with Router(tmp_path / "router", dict(STRICT)) as router:
        assoc = RawAssociation(router.port)
        assert assoc.c_store(data, "1.2.826.0.1.3680043.10.1124.8") == 0xA900
        assert assoc.c_store(data, "1.2.826.0.1.3680043.10.1124.7",
                             sop_class="1.2.840.10008.5.1.4.1.1.4") in (0xA900, None)
        assert assoc.c_store(data, "1.2.826.0.1.3680043.10.1124.7") == 0
        assoc.release()
        wait_until(lambda: len(spool_files(router)) == 1, timeout=30, what="one instance")
        assert "refused with 0xA900" in router.log(3000)


def test_deep_nesting_and_truncation_get_c000_in_one_line(tmp_path: Path) -> None:
    base = dcmread(generate(tmp_path / "g", series=1, instances=1, rows=8, cols=8, seed=15)[0])
    data = encoded(base, "1.2.826.0.1.3680043.10.1124.5")
    with Router(tmp_path / "router", dict(STRICT)) as router:
        assoc = RawAssociation(router.port)
        assert assoc.c_store(data + deep(500), "1.2.826.0.1.3680043.10.1124.5") == 0xC000
        assert assoc.c_store(data[:-10], "1.2.826.0.1.3680043.10.1124.5") == 0xC000
        assert assoc.c_store(data, "1.2.826.0.1.3680043.10.1124.5") == 0
        assoc.release()
        log = router.log(3000)
    assert "Traceback" not in log and "RecursionError" not in log
    lines = [line for line in log.splitlines() if "refused with 0xC000" in line]
    assert len(lines) == 2 and all(len(line) < 600 for line in lines), lines
    assert "nested more than 32" in lines[0] and "past the end" in lines[1]


def test_quota_is_enforced_while_streaming(tmp_path: Path) -> None:
    """A dataset declaring 4 GB streams 60 MB into a router with a 20 MB quota: nothing over the
    quota is written, the instance gets 0xA700 and the association goes on."""
    cfg = dict(STRICT, max_spool_size="20MB", network_timeout="30s", dimse_timeout="30s")
    base = dcmread(generate(tmp_path / "g", series=1, instances=1, rows=8, cols=8, seed=16)[0])
    del base.PixelData
    header = encoded(base, "1.2.826.0.1.3680043.10.1124.4")
    huge = header + struct.pack("<HH2sxxI", 0x7FE0, 0x0010, b"OW", 0xFFFFFFF0)
    biggest = [0]
    done = threading.Event()

    with Router(tmp_path / "router", cfg) as router:
        def watch() -> None:
            while not done.is_set():
                size = sum(p.stat().st_size for p in (router.spool / "tmp").iterdir()
                           if p.exists())
                biggest[0] = max(biggest[0], size)
                done.wait(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        assoc = RawAssociation(router.port)
        status = assoc.c_store(huge + b"\x00" * (60 << 20), "1.2.826.0.1.3680043.10.1124.4",
                               fragment=1 << 20)
        done.set()
        watcher.join(5)
        assert status == 0xA700
        small = encoded(base, "1.2.826.0.1.3680043.10.1124.3")
        assert assoc.c_store(small, "1.2.826.0.1.3680043.10.1124.3") == 0
        assoc.release()
        assert biggest[0] <= 21_000_000, f"spool/tmp reached {biggest[0]} bytes"
        assert "spool quota" in router.log(3000)
