"""The receive log (``receive_log: true``), a second durability mechanism: its own crash tests.

The router is killed (SIGKILL, from inside, through ``DICOMROUTER_CRASH_AT``) at every step of
the receive path, and a power cut is simulated (``DICOMROUTER_POWERCUT_IO``: every write not yet
synced is dropped before the process dies). After a restart every instance the sender saw
acknowledged must be in the spool with the bytes it sent, and be delivered. The sender is
pynetdicom in this process, so "acknowledged" is exact: a C-STORE-RSP with status 0x0000.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from peers import run_storescu, wait_until
from pydicom import dcmread
from pynetdicom import AE
from router_fixtures import Router, dataset_bytes, tags_of

from dicomrouter.sample import generate
from dicomrouter.spool import recvlog
from dicomrouter.spool.faults import STEPS
from dicomrouter.state import open_state


class LogRouter(Router):
    """A router with the receive log on, and environment variables for the fault points."""

    def __init__(self, work_dir: Path, config: dict[str, Any], **env: str) -> None:
        super().__init__(work_dir, {"receive_log": True, **config})
        self.extra_env = env

    def env(self) -> dict[str, str]:
        return {**super().env(), **self.extra_env}

    def died(self) -> bool:
        return self.proc is None or self.proc.poll() is not None


def folder_config(out: Path, **extra: Any) -> dict[str, Any]:
    """Routes everything to the folder ``out``; the spool is next to it, so a restarted router
    (in a work directory of its own: a fresh log to read) finds it."""
    return {"destinations": {"out": {"type": "folder", "path": str(out)}},
            "routes": [{"name": "all", "to": ["out"]}], "spool": str(out.parent / "spool"),
            **extra}


def send(port: int, files: list[Path], acked: list[str], go_on: threading.Event | None = None,
         ) -> None:
    """C-STORE ``files`` one by one over one association (the file's own bytes: pynetdicom
    sends a path's dataset as it is), noting each SOP Instance UID answered 0x0000; stops at
    the first failure (the router died)."""
    ae = AE(ae_title="CRASHSCU")
    ds0 = dcmread(files[0], stop_before_pixels=True)
    ae.add_requested_context(ds0.SOPClassUID, ds0.file_meta.TransferSyntaxUID)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMROUTER")
    if not assoc.is_established:
        return
    try:
        for f in files:
            if go_on is not None and not go_on.is_set():
                break
            status = assoc.send_c_store(f)
            if not status or getattr(status, "Status", None) != 0x0000:
                break
            acked.append(tags_of(f, "SOPInstanceUID")[0])
    except Exception:  # noqa: BLE001 - the router died under us: what was acked is noted
        pass
    finally:
        if assoc.is_established:
            assoc.release()


def sop_files(files: list[Path]) -> dict[str, Path]:
    return {tags_of(f, "SOPInstanceUID")[0]: f for f in files}


def spool_file(router: Router, study: str, sop: str) -> Path:
    return router.spool / "data" / study / f"{sop}.dcm"


#: the routing keys a C-STORE on the main listener gives each instance, and its calling AE
C_STORE_KEYS = ({"_SourceHost": "127.0.0.1", "_Listener": "main"}, "CRASHSCU")


def check_recovered(tmp: Path, cfg: dict[str, Any], acked: list[str],
                    by_sop: dict[str, Path], out: Path,
                    keys: tuple[dict[str, str], str] = C_STORE_KEYS) -> str:
    """Restart without faults: every acknowledged instance is in the spool, byte for byte as
    sent, with the routing ``keys`` (index tags, calling AE) it was received with, then
    delivered byte for byte. Returns the restarted router's log."""
    assert acked, "nothing was acknowledged before the crash: the test proves nothing"
    with LogRouter(tmp / "again", {**cfg, "stable_age": "1h"}) as router:
        for sop in acked:
            path = spool_file(router, tags_of(by_sop[sop], "StudyInstanceUID")[0], sop)
            assert path.is_file(), f"acknowledged instance {sop} lost"
            assert dataset_bytes(path) == dataset_bytes(by_sop[sop]), f"{sop} differs"
        # the routing keys of the association came back with each instance, adopted or not
        # (spool/note.py: they were added in memory only, and an instance adopted from its
        # slot or log record came back without them)
        state = open_state(Path(cfg["spool"]) / "state.db", readonly=True)
        try:
            tags, calling = keys
            for sop in acked:
                inst = state.instance(sop)
                assert inst is not None, sop
                got = ({k: inst.tags.get(k) for k in tags}, inst.calling_ae, inst.called_ae)
                assert got == (tags, calling, router.aet), sop
        finally:
            state.close()
        log = router.log(20000)
    with LogRouter(tmp / "deliver", {**cfg, "stable_age": "500ms"}) as router:
        wait_until(lambda: {p.stem for p in out.rglob("*.dcm")} >= set(acked), timeout=90,
                   what="every acknowledged instance delivered")
        for p in out.rglob("*.dcm"):
            assert dataset_bytes(p) == dataset_bytes(by_sop[p.stem])
        log += router.log(20000)
    assert "Traceback" not in log
    return log


# the n-th time the step is reached: late enough that instances were acknowledged before it
NTH = {"record-written": 6, "record-synced": 6, "acked": 6, "spool-written": 6, "flush": 2,
       "wrap": 1}


@pytest.mark.parametrize("step", STEPS)
def test_kill_at_every_step_loses_nothing_acknowledged(tmp_path: Path, step: str) -> None:
    files = generate(tmp_path / "study", series=1, instances=120, rows=64, cols=64, seed=61)
    by_sop = sop_files(files)
    out = tmp_path / "out"
    # 512 KiB: 120 instances of ~10 kB go round the log twice (the "wrap" step needs it)
    cfg = folder_config(out, receive_log_size="512KiB", receive_log_max_record="64KiB")
    router = LogRouter(tmp_path / "r", {**cfg, "stable_age": "1h"},
                       DICOMROUTER_CRASH_AT=f"{step}:{NTH[step]}")
    cfg["port"] = router.port
    acked: list[str] = []
    with router:
        send(router.port, files, acked)
        wait_until(router.died, timeout=60, what=f"the router killed at {step}")
    assert len(acked) < len(files) or step == "flush"
    check_recovered(tmp_path, cfg, acked, by_sop, out)


def test_power_cut_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """Every write not synced at the cut is dropped: held-back log writes are discarded,
    spool files the flusher has not synced yet are cut to half their length. Three
    associations at once: their records share syncs (group commit)."""
    studies = [generate(tmp_path / f"study{i}", series=1, instances=150, rows=64, cols=64,
                        seed=62 + i) for i in range(3)]
    files = [f for study in studies for f in study]
    by_sop = sop_files(files)
    out = tmp_path / "out"
    cfg = folder_config(out, receive_log_size="1MiB", receive_log_max_record="64KiB")
    # a flush a second (or when the log is half full): many files unsynced at the cut
    router = LogRouter(tmp_path / "r", {**cfg, "stable_age": "1h"},
                       DICOMROUTER_POWERCUT_IO="1", DICOMROUTER_FLUSH_EVERY="1")
    cfg["port"] = router.port
    acked: list[str] = []
    with router:
        senders = [threading.Thread(target=send, args=(router.port, study, acked))
                   for study in studies]
        for sender in senders:
            sender.start()
        wait_until(lambda: len(acked) >= 150, timeout=120, what="150 acknowledged instances")
        assert router.proc is not None
        os.kill(router.proc.pid, signal.SIGUSR1)  # the power cut
        wait_until(router.died, timeout=60, what="the router dead after the power cut")
        for sender in senders:
            sender.join(60)
    assert 150 <= len(acked) < len(files)
    log = check_recovered(tmp_path, cfg, acked, by_sop, out)
    replayed = sum(int(n) for n in re.findall(r"(\d+) acknowledged instance\(s\) replayed", log))
    assert replayed > 0, "the power cut dropped no unsynced spool file: the test proves nothing"


def test_log_wraps_many_times(tmp_path: Path) -> None:
    files = generate(tmp_path / "study", series=2, instances=150, rows=64, cols=64, seed=63)
    by_sop = sop_files(files)
    out = tmp_path / "out"
    # 300 instances of ~10 kB (12 kB a record) through a 256 KiB log: round it ~14 times
    cfg = folder_config(out, receive_log_size="256KiB", receive_log_max_record="64KiB",
                        stable_age="1s")
    with LogRouter(tmp_path / "r", cfg) as router:
        r = run_storescu(files, router.port)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: {p.stem for p in out.rglob("*.dcm")} == set(by_sop), timeout=120,
                   what="all 300 delivered")
        for p in out.rglob("*.dcm"):
            assert dataset_bytes(p) == dataset_bytes(by_sop[p.stem])
        log_file = router.spool / "receive-log" / "0.log"
        assert log_file.stat().st_size == 256 * 1024
        assert "Traceback" not in router.log(20000)
    checkpoint, left = recvlog.scan(log_file)
    assert checkpoint >= 300 and not left  # every record passed (a clean stop flushes all)


def test_instance_above_the_record_limit_takes_a_receive_slot(tmp_path: Path) -> None:
    small = generate(tmp_path / "small", series=1, instances=4, rows=32, cols=32, seed=64)
    big = generate(tmp_path / "big", series=1, instances=2, rows=256, cols=256, seed=65)
    by_sop = sop_files(small + big)
    out = tmp_path / "out"
    cfg = folder_config(out, receive_log_size="1MiB", receive_log_max_record="64KiB",
                        stable_age="1h")
    router = LogRouter(tmp_path / "r", cfg)
    cfg["port"] = router.port
    with router:
        assert big[0].stat().st_size > 64 * 1024
        r = run_storescu([small[0], big[0], small[1], big[1], *small[2:]], router.port)
        assert r.returncode == 0, r.stderr
        assert router.log(5000).count("over receive_log_max_record") == 2
        router.kill()  # the small ones' spool files may not be synced yet: replayed if needed
    _checkpoint, records = recvlog.scan(router.spool / "receive-log" / "0.log")
    logged = {Path(r.name).stem for r in records}
    assert not logged & {tags_of(f, "SOPInstanceUID")[0] for f in big}
    # both kinds come back after the crash and are delivered
    for f in big:  # the big ones went the slot path: synced before the answer
        study = tags_of(f, "StudyInstanceUID")[0]
        assert dataset_bytes(spool_file(router, study, tags_of(f, "SOPInstanceUID")[0])) == \
            dataset_bytes(f)
    with LogRouter(tmp_path / "deliver", {**cfg, "stable_age": "500ms"}):
        wait_until(lambda: {p.stem for p in out.rglob("*.dcm")} == set(by_sop), timeout=90,
                   what="all six delivered")
    for p in out.rglob("*.dcm"):
        assert dataset_bytes(p) == dataset_bytes(by_sop[p.stem])


def test_several_receiver_processes_each_claim_a_log(tmp_path: Path) -> None:
    files = generate(tmp_path / "study", series=1, instances=10, rows=32, cols=32, seed=66)
    out = tmp_path / "out"
    with LogRouter(tmp_path / "r", folder_config(out, receivers=2)) as router:
        wait_until(lambda: "extra receiver process(es)" in router.log(), timeout=60,
                   what="receiver processes started")
        wait_until(lambda: (router.spool / "receive-log" / "1.log").is_file(), timeout=60,
                   what="the second process's log")
        for i in range(6):
            assert run_storescu(files, router.port, calling=f"SENDER{i}").returncode == 0
        wait_until(lambda: len(list(out.rglob("*.dcm"))) == 10, timeout=90,
                   what="all delivered")
        log = router.log(20000)
    assert "receive-log/0.log" in log and "receive-log/1.log" in log
    assert "Traceback" not in log


def test_config_checks_the_record_limit_against_the_log_size(tmp_path: Path) -> None:
    from router_fixtures import dicomrouter

    p = tmp_path / "r.yml"
    p.write_text("receive_log: true\nreceive_log_size: 1MiB\nreceive_log_max_record: 512KiB\n")
    r = dicomrouter("serve", "--check", "--config", str(p))
    assert r.returncode != 0 and "receive_log_max_record" in r.stderr
    # cluster mode keeps the receive slots: the key is accepted there all the same
    (tmp_path / "dsn").write_text("postgresql://u@127.0.0.1:9/db\n")
    p.write_text("receive_log: true\nstate: {type: postgresql, dsn_file: dsn}\n"
                 "shared_spool: {type: s3, bucket: b}\nack_after: local\n"
                 "destinations: {a: {type: folder, path: out}}\nroutes: [{to: a}]\n")
    r = dicomrouter("serve", "--check", "--config", str(p))
    assert r.returncode == 0, r.stderr


def _part10(size: int) -> bytearray:
    """A buffer shaped like what the receive log holds: the completion marker, then data."""
    from dicomrouter.spool.slots import Checksum

    data = bytearray(os.urandom(size))
    data[:24] = bytes(24)
    checksum = Checksum()
    checksum.update(data)
    data[:24] = checksum.marker()
    return data


def test_a_full_log_waits_for_the_flusher_then_refuses(tmp_path: Path) -> None:
    """No room within receive_log_wait: LogFull (the spool answers 0xA700 for it); once the
    spool files of the records are written and synced by the flusher, there is room again."""
    rl = recvlog.ReceiveLog.claim(tmp_path / "receive-log", 256 * 1024, wait=0.5)
    rl.reset(0)
    rl.start()
    try:
        data = _part10(40_000)
        # 40 kB records take 40 KiB each: six fill the 252 KiB after the log's head
        recs = [rl.append(f"data/s/{i}.dcm", data, 1) for i in range(6)]
        with pytest.raises(recvlog.LogFull, match="receive_log_wait"):
            rl.append("data/s/6.dcm", data, 1)
        for i, rec in enumerate(recs):  # the spool files, written behind
            (tmp_path / f"{i}.dcm").write_bytes(data)
            rl.placed(rec, str(tmp_path / f"{i}.dcm"))
        rec = rl.append("data/s/6.dcm", data, 1)  # waits for the flusher, then fits
        assert rec.seq == 7 and rl.checkpoint >= 1  # (the refused one took no number)
        wait_until(lambda: rl.checkpoint == 6, timeout=30, what="every placed record flushed")
    finally:
        rl.stop()


def test_a_record_hidden_in_received_data_is_not_replayed(tmp_path: Path) -> None:
    """A sender cannot plant a record: a record's CRC covers the log's random salt."""
    rl = recvlog.ReceiveLog.claim(tmp_path / "receive-log", 256 * 1024, wait=0.5)
    rl.reset(0)
    data = _part10(20_000)
    fake = bytearray(_part10(2_000))
    name = b"data/evil/evil.dcm"
    crc = recvlog._record_crc(b"", 99, 1, len(fake), name, fake[:24])  # no salt to know
    planted = recvlog.REC.pack(recvlog.REC_MAGIC, 99, 1, len(fake), crc, len(name)) + name + fake
    head = recvlog.REC.size + len(b"data/s/0.dcm")
    data[8192 - head:8192 - head + len(planted)] = planted  # on a block boundary of the log
    from dicomrouter.spool.slots import Checksum

    data[:24] = bytes(24)  # the marker again, over the data with the planted record
    checksum = Checksum()
    checksum.update(data)
    data[:24] = checksum.marker()
    rl.append("data/s/0.dcm", data, 1)
    rl.stop()
    checkpoint, found = recvlog.scan(tmp_path / "receive-log" / "0.log")
    assert checkpoint == 0 and [(f.seq, f.name) for f in found] == [(1, "data/s/0.dcm")]


def test_the_wrap_is_seen_when_the_flusher_keeps_up(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A flusher that frees every record before the next leaves no live record when the log
    goes round; that is still a wrap (the crash test's "wrap" step waited for it in vain on a
    busy CI machine, where the flusher kept up), and the records written after it are found."""
    reached: list[str] = []
    monkeypatch.setattr(recvlog, "crash_point", reached.append)
    rl = recvlog.ReceiveLog.claim(tmp_path / "receive-log", 256 * 1024, wait=5)
    rl.reset(0)
    rl.start()
    try:
        data = _part10(40_000)
        for i in range(9):  # 9 x 40 KiB in 252 KiB: round once
            rec = rl.append(f"data/s/{i}.dcm", data, 1)
            (tmp_path / f"{i}.dcm").write_bytes(data)
            rl.placed(rec, str(tmp_path / f"{i}.dcm"))
            wait_until(lambda seq=rec.seq: rl.checkpoint == seq, timeout=30,
                       what=f"record {rec.seq} flushed before the next")
            assert not rl._live
        assert reached.count("wrap") == 1, reached
    finally:
        rl.stop()
    checkpoint, found = recvlog.scan(tmp_path / "receive-log" / "0.log")
    assert (checkpoint, found) == (9, [])  # every record flushed: none to replay
