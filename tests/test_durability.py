"""Durable delivery: retries, dead letters, ledger, late arrivals, quota, disk full, crash safety.

All against real peers: DCMTK storescu as the sender, Orthanc as the destination.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import subprocess
import time
from pathlib import Path

import pytest
from peers import Orthanc, dcmtk, free_port, peer_env, require_peer, run_storescu, wait_until
from router_fixtures import Router, dicomrouter, tags_of

from dicomrouter.sample import generate

CRASH_ROUNDS = int(os.environ.get("DICOMROUTER_CRASH_ROUNDS", "10"))


def sop(f: Path) -> str:
    return tags_of(f, "SOPInstanceUID")[0]


def acknowledged(result: subprocess.CompletedProcess[str]) -> tuple[list[str], list[str]]:
    """(files storescu saw stored with success, statuses of the others) from ``storescu -v``."""
    ok: list[str] = []
    other: list[str] = []
    current = None
    for line in (result.stdout + result.stderr).splitlines():
        m = re.search(r"Sending file: (.+)$", line)
        if m:
            current = m.group(1).strip()
            continue
        m = re.search(r"Received Store Response \((.+)\)", line)
        if m and current:
            (ok if m.group(1).startswith("Success") else other).append(
                current if m.group(1).startswith("Success") else m.group(1))
            current = None
    return ok, other


def pacs_config(port: int, **retry: str | int) -> dict:
    return {
        "destinations": {"pacs": {"type": "dicom", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                  "port": port, "timeout": "10s",
                                  "retry": {"initial": "300ms", "max_delay": "1s", **retry}}},
        "routes": [{"name": "to pacs", "to": ["pacs"]}],
    }


def test_destination_down_then_back_receives_the_study_in_full(tmp_path: Path) -> None:
    port = free_port()
    study = generate(tmp_path / "study", series=2, instances=3, rows=16, cols=16, seed=21)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    with Router(tmp_path / "r", pacs_config(port, max_attempts=1000)) as router:
        assert run_storescu([tmp_path / "study"], router.port).returncode == 0
        wait_until(lambda: any(j["attempts"] >= 2 for j in router.status()["retrying"]),
                   timeout=60, what="at least two failed attempts with backoff")
        pacs = Orthanc(tmp_path / "orthanc", aet="ORTHANC")
        pacs.dicom_port = port
        with pacs:
            pacs.wait_for_instances({sop(f) for f in study}, timeout=90)
            router.wait_state(uid, "delivered")
            assert pacs.instance_sop_uids() == {sop(f) for f in study}
        log = router.log(5000)
        assert re.search(r"attempt 1/1000 failed .*retry in", log)
        assert "delivered 6 instance(s)" in log


def test_dead_letter_then_retry_dead_after_the_peer_is_fixed(tmp_path: Path) -> None:
    port = free_port()
    study = generate(tmp_path / "study", series=1, instances=4, rows=16, cols=16, seed=22)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    with Router(tmp_path / "r", pacs_config(port, max_attempts=2)) as router:
        assert run_storescu([tmp_path / "study"], router.port).returncode == 0
        router.wait_state(uid, "failed")
        st = router.status()
        assert [(d["study_uid"], d["destination"], d["attempts"]) for d in st["dead"]] == \
            [(uid, "pacs", 2)]
        assert "no connection" in st["dead"][0]["last_error"]
        assert st["queues"]["pacs"] == {"dead": 1}
        assert st["studies"][0]["instances_in_spool"] == 4  # kept in the spool
        text = dicomrouter("status", "--config", str(router.config_path)).stdout
        assert "dead letters" in text and uid in text
        assert "dead-lettered" in router.log(5000)
        pacs = Orthanc(tmp_path / "orthanc", aet="ORTHANC")
        pacs.dicom_port = port
        with pacs:
            r = dicomrouter("retry", "--dead", "--destination", "pacs", "--config",
                            str(router.config_path))
            assert r.returncode == 0 and "requeued 1 job(s)" in r.stdout
            pacs.wait_for_instances({sop(f) for f in study}, timeout=90)
            router.wait_state(uid, "delivered")
        history = dicomrouter("status", "--study", uid, "--config", str(router.config_path))
        assert "requeued by hand" in history.stdout and "delivered to pacs" in history.stdout


def test_late_arrivals_send_only_the_new_instances(tmp_path: Path, orthanc) -> None:
    pacs: Orthanc = orthanc(aet="ORTHANC")
    study = generate(tmp_path / "study", series=1, instances=6, rows=16, cols=16, seed=23)
    first, late = study[:4], study[4:]
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    with Router(tmp_path / "r", pacs_config(pacs.dicom_port)) as router:
        assert run_storescu(first, router.port).returncode == 0
        pacs.wait_for_instances({sop(f) for f in first})
        router.wait_state(uid, "delivered")
        assert run_storescu(late, router.port).returncode == 0
        pacs.wait_for_instances({sop(f) for f in study})
        wait_until(lambda: router.status()["ledger"]["delivered"] == 6, timeout=60,
                   what="ledger shows all six delivered")
        router.wait_state(uid, "delivered")
        ledger = router.status()["ledger"]
        assert ledger == {"entries": 6, "sends": 6, "delivered": 6, "resent": 0}
        log = router.log(5000)
        sends = re.findall(rf"study {re.escape(uid)} → pacs .*: sending (\d+) instance", log)
        assert sends == ["4", "2"]
        history = dicomrouter("status", "--study", uid, "--config",
                              str(router.config_path)).stdout
        assert "generation 1" in history and "generation 2" in history
        assert "reopened by a late arrival" in history
        assert pacs.instance_sop_uids() == {sop(f) for f in study}


@pytest.mark.parametrize("receiver", ["fast", "pynetdicom"])
def test_spool_quota_answers_out_of_resources_until_space_frees(tmp_path: Path,
                                                                receiver: str) -> None:
    study = generate(tmp_path / "study", series=1, instances=8, rows=16, cols=16, seed=24)
    size = study[0].stat().st_size
    # no route: the study stays in the spool (unrouted), so the quota stays reached
    cfg = {"max_spool_size": size * 3 + size // 2, "destinations": {}, "routes": [],
           "receiver": receiver}
    with Router(tmp_path / "r", cfg) as router:
        r = run_storescu(study, router.port, extra=("--no-halt",))
        ok, other = acknowledged(r)
        assert len(ok) == 3, r.stderr
        assert len(other) == 5 and all("OutOfResources" in s for s in other), \
            other
        assert len(list((router.spool / "data").rglob("*.dcm"))) == 3
        assert not router.partial_receptions()
        assert "spool quota" in router.log(5000) and "0xA700" in router.log(5000)
        uid = tags_of(study[0], "StudyInstanceUID")[0]
        router.wait_state(uid, "unrouted")
        assert dicomrouter("purge", "--study", uid, "--yes", "--config",
                           str(router.config_path)).returncode == 0
        # space freed: the rest goes in now (the running server learns it on its next check)
        wait_until(lambda: len(acknowledged(run_storescu(study[3:5], router.port))[0]) == 2,
                   timeout=60, what="C-STORE accepted again after purge")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1.5 MB tmpfs, as a full disk for the spool (needs root; skipped elsewhere)."""
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    require_peer(f"a small tmpfs to fill ({r.stderr.strip()})", r.returncode == 0,
                 "nothing: run the tests as root (CI does)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("receiver", ["fast", "pynetdicom"])
def test_disk_full_answers_out_of_resources_and_leaves_nothing_partial(
        tmp_path: Path, small_disk: Path, receiver: str) -> None:
    study = generate(tmp_path / "study", series=1, instances=12, rows=256, cols=256, seed=25)
    # min_free_disk: 0, so the disk really runs full (min_free_disk is tested on its own)
    cfg = {"spool": str(small_disk / "spool"), "destinations": {}, "routes": [],
           "receiver": receiver, "min_free_disk": 0}
    with Router(tmp_path / "r", cfg) as router:
        r = run_storescu(study, router.port, extra=("--no-halt",))
        ok, other = acknowledged(r)
        assert ok and other, r.stderr
        assert all("OutOfResources" in s for s in other), other
        # every acknowledged instance is complete on disk and recorded; nothing else is there
        files = {p.stem for p in (router.spool / "data").rglob("*.dcm")}
        assert files == {sop(Path(f)) for f in ok}
        assert not router.partial_receptions()
        # indexed after the answer (ack after durability, index behind it): poll for it
        wait_until(lambda: sum(s["instances_in_spool"] for s in router.status()["studies"])
                   == len(ok), timeout=60, what="every acknowledged instance indexed")
        assert "0xA700" in router.log(5000)


def _fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last byte; returns the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\x00" * size)
    finally:
        os.close(fd)
    return filler


def test_full_disk_refuses_then_delivery_resumes_without_restart(tmp_path: Path,
                                                                 small_disk: Path) -> None:
    """Disk full: new associations are refused (min_free_disk), the delivery worker's database
    writes fail and it carries on; once space frees, the study is delivered, no restart."""
    study = generate(tmp_path / "study", series=1, instances=3, rows=8, cols=8, seed=27)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    pacs_port = free_port()
    cfg = {"spool": str(small_disk / "spool"), "min_free_disk": "200kB",
           "destinations": {"pacs": {"type": "dicom", "ae_title": "STORESCP",
                                     "host": "127.0.0.1", "port": pacs_port,
                                     "retry": {"initial": "1s", "max_delay": "2s",
                                               "max_attempts": 1000}}},
           "routes": [{"name": "all", "to": ["pacs"]}]}
    with Router(tmp_path / "r", cfg) as router:
        assert run_storescu(study, router.port).returncode == 0
        wait_until(lambda: "retry in" in router.log(2000), timeout=60,
                   what="a first failed delivery (the destination is not up yet)")
        filler = _fill(small_disk)
        refused = run_storescu(study[:1], router.port)
        assert refused.returncode != 0 and "Local Limit Exceeded" in refused.stdout + \
            refused.stderr
        from peers import StoreSCP

        with StoreSCP(tmp_path / "scp", aet="STORESCP", port=pacs_port) as scp:
            wait_until(lambda: "disk is full" in router.log(5000), timeout=60,
                       what="a database write failing on the full disk")
            assert not scp.files() or router.study_state(uid) != "delivered"
            filler.unlink()
            wait_until(lambda: len(scp.files()) == 3, timeout=90, what="the study delivered")
            router.wait_state(uid, "delivered", timeout=60)
            assert run_storescu(study[:1], router.port).returncode == 0  # accepted again
        log = router.log(20000)
    assert "less than min_free_disk" in log
    assert "the worker carries on" in log
    assert "Traceback" not in log


def test_retention_and_keep_after_delivery(tmp_path: Path) -> None:
    study = generate(tmp_path / "study", series=1, instances=2, rows=8, cols=8, seed=26)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    base = {"destinations": {"a": {"type": "folder", "path": str(tmp_path / "out")}},
            "routes": [{"name": "all", "to": ["a"]}]}
    with Router(tmp_path / "keep", {**base, "keep_after_delivery": True}) as router:
        assert run_storescu(study, router.port).returncode == 0
        router.wait_state(uid, "delivered")
        assert len(list((router.spool / "data").rglob("*.dcm"))) == 2
    with Router(tmp_path / "ret", {**base, "retention": "2s"}) as router:
        assert run_storescu(study, router.port).returncode == 0
        router.wait_state(uid, "delivered")
        assert len(list((router.spool / "data").rglob("*.dcm"))) == 2
        wait_until(lambda: not list((router.spool / "data").rglob("*.dcm")), timeout=60,
                   what="spool files deleted after the retention period")
        assert "retention period over" in router.log(5000)


def test_crash_anywhere_loses_nothing_acknowledged(tmp_path: Path, orthanc) -> None:
    """SIGKILL the router at random moments while storescu sends and while it delivers."""
    pacs: Orthanc = orthanc(aet="ORTHANC")
    cfg = pacs_config(pacs.dicom_port, max_attempts=1000)
    cfg["stable_age"] = "300ms"
    cfg["port"] = free_port()
    rng = random.Random(int(os.environ.get("DICOMROUTER_CRASH_SEED", "4242")))
    acked_all: set[str] = set()
    kills = 0
    router = Router(tmp_path / "r", cfg)
    for n in range(CRASH_ROUNDS):
        corpus = tmp_path / f"round{n}"
        files = generate(corpus, studies=2, series=2, instances=8, rows=16, cols=16, seed=n)
        router.start()
        log_file = tmp_path / f"storescu{n}.log"
        with open(log_file, "w") as out:
            proc = subprocess.Popen(  # storescu sends while we pick the moment to crash
                [dcmtk("storescu"), "-v", "-R", "-aet", "STORESCU", "-aec", router.aet,
                 "127.0.0.1", str(router.port), *map(str, files)],
                stdout=out, stderr=subprocess.STDOUT, env=peer_env())
            # 0..~1.5 s: while receiving, right after the acks, or while delivering
            time.sleep(rng.uniform(0.0, 1.5))
            router.kill()
            kills += 1
            proc.wait(60)
        result = subprocess.CompletedProcess(proc.args, proc.returncode,
                                             log_file.read_text(), "")
        ok, _ = acknowledged(result)
        acked = {sop(Path(f)) for f in ok}
        acked_all |= acked
        router.start()  # restart: recover and deliver
        pacs.wait_for_instances(acked_all, timeout=120)
        router.stop()
    router.start()
    try:
        stored = pacs.instance_sop_uids()
        assert acked_all <= stored
        ledger = router.status()["ledger"]
        # re-sends only for what was on the wire when the process died: at most one per kill
        assert ledger["resent"] <= kills
        print(f"\ncrash test: {CRASH_ROUNDS} rounds, {kills} SIGKILLs, "
              f"{len(acked_all)} instances acknowledged, {len(stored)} at Orthanc, "
              f"ledger {ledger}")
    finally:
        router.stop()


def test_spool_files_the_index_lost_are_adopted_and_delivered(tmp_path: Path) -> None:
    """Power cut model: the files were fsync'd (acknowledged) but the index lost its rows."""
    import sqlite3

    study = generate(tmp_path / "study", series=1, instances=3, rows=8, cols=8, seed=27)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    cfg = {"destinations": {"a": {"type": "folder", "path": str(tmp_path / "out")}},
           "routes": [{"name": "all", "to": ["a"]}], "stable_age": "1h"}
    router = Router(tmp_path / "r", cfg)
    with router:
        assert run_storescu(study, router.port, calling="MODALITY").returncode == 0
    db = sqlite3.connect(router.spool / "state.db")
    db.execute("DELETE FROM instances")
    db.execute("DELETE FROM studies")
    db.commit()
    db.close()
    cfg["stable_age"] = "500ms"
    with Router(tmp_path / "r", cfg) as router2:
        router2.wait_state(uid, "delivered")
        assert {p.stem for p in (tmp_path / "out").rglob("*.dcm")} == {sop(f) for f in study}
        assert "recorded 3 spool file(s) the state database did not know" in router2.log(5000)
        history = dicomrouter("status", "--study", uid, "--config",
                              str(router2.config_path)).stdout
        assert "from MODALITY" in history  # calling AE recovered from the file meta


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _alive(pids: set[int]) -> set[int]:
    return {p for p in pids if Path(f"/proc/{p}").exists() and
            "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]}


def test_several_receiver_processes_share_the_port_and_the_spool(tmp_path: Path) -> None:
    studies = [generate(tmp_path / f"s{i}", series=2, instances=5, rows=16, cols=16, seed=50 + i)
               for i in range(4)]
    cfg = {"receivers": 2, "stable_age": "500ms",
           "destinations": {"a": {"type": "folder", "path": str(tmp_path / "out")}},
           "routes": [{"name": "all", "to": ["a"]}]}
    router = Router(tmp_path / "r", cfg)
    with router:
        wait_until(lambda: "extra receiver process(es)" in router.log(), timeout=60,
                   what="receiver processes started")
        assert router.proc is not None
        kids = wait_until(lambda: _children(router.proc.pid), timeout=30, what="a child")
        procs = [subprocess.Popen([dcmtk("storescu"), "-R", "-aet", f"SENDER{i}", "-aec",
                                   router.aet, "127.0.0.1", str(router.port), *map(str, files)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env=peer_env())
                 for i, files in enumerate(studies)]
        assert [p.wait(120) for p in procs] == [0, 0, 0, 0]
        # the kernel spreads connections by a hash: a few more single associations make sure
        # the extra process has served one (and not only the main one)
        for i in range(40):
            if "[receiver-1]: association from" in router.log(5000):
                break
            run_storescu(studies[0][:1], router.port, calling=f"PROBE{i}")
        assert "[receiver-1]: association from" in router.log(5000)
        expected = {sop(f) for files in studies for f in files}
        wait_until(lambda: {p.stem for p in (tmp_path / "out").rglob("*.dcm")} == expected,
                   timeout=90, what="every instance delivered")
        for files in studies:
            router.wait_state(tags_of(files[0], "StudyInstanceUID")[0], "delivered")
    wait_until(lambda: not _alive(kids), timeout=30, what="receiver processes stopped")

    # a crash of the main process: its receivers notice and stop too
    with Router(tmp_path / "r", cfg) as router2:
        wait_until(lambda: "extra receiver process(es)" in router2.log(), timeout=60,
                   what="receiver processes started")
        assert router2.proc is not None
        kids = wait_until(lambda: _children(router2.proc.pid), timeout=30, what="a child")
        router2.kill()
        wait_until(lambda: not _alive(kids), timeout=30, what="orphaned receivers to stop")


def test_several_receivers_need_the_fast_receiver(tmp_path: Path) -> None:
    p = tmp_path / "r.yml"
    p.write_text("receivers: 2\nreceiver: pynetdicom\n")
    r = dicomrouter("serve", "--check", "--config", str(p))
    assert r.returncode != 0 and "receivers: several receiver processes need" in r.stderr
