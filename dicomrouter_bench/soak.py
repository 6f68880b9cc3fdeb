"""The chaos soak (``bench --only soak``): senders that never stop while destinations, the router
and the spool's disk fail in turn; at the end, the books must balance.

Senders are pynetdicom modalities (the bench's own process), each sending small synthetic studies
over its own associations and remembering exactly which instances the router acknowledged
(status 0x0000); what was refused or cut off is sent again later, as a modality would. One fault
at a time, round robin: storescp stopped and restarted, Orthanc (STOW-RS) stopped and restarted,
the S3 server frozen (SIGSTOP: moto keeps its objects in memory, so a restart would lose what was
delivered), the router killed with -9 and restarted, and the spool's disk filled to just under
``min_free_disk`` (a tmpfs of its own, when we are root) and freed. In cluster mode (two nodes on
PostgreSQL and the S3 shared spool) PostgreSQL is stopped and restarted too, and the node killed is
one of the two.

Then the senders stop, the faults stop, and the soak waits for every acknowledged instance at every
destination. It reports the counts and fails if one is missing, if an instance was put on the wire
more often than once plus once per router kill (the documented at-most-one resend of what was in
flight), if a router log holds a traceback, or if the router's memory or open files grew.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomrouter.sample import generate

from .procs import (
    BENCH_S3_KEY,
    LOOPBACK,
    BenchError,
    MotoServer,
    Orthanc,
    Postgres,
    RouterServer,
    StoreSCP,
    find_dicomweb_plugin,
    find_orthanc,
    proc_status_kb,
    running,
    wait_until,
)

MIN_FREE_DISK = 64 * 2**20  # the router's min_free_disk in the soak
TMPFS_SIZE = 768 * 2**20  # the spool's own disk when we can mount one
SAMPLE_EVERY = 2.0  # seconds between RSS / open-file samples


@dataclass
class SoakSettings:
    """How long and how hard (``bench --minutes``, ``--soak-senders``, ``--soak-cluster``)."""

    minutes: float = 30.0
    senders: int = 3
    cluster: bool = False
    drain_timeout: float = 600.0  # after the last fault: everything acked must arrive by then
    seed: int = 1


@dataclass
class Fault:
    kind: str
    started: float
    seconds: float = 0.0
    note: str = ""


@dataclass
class Sample:
    t: float
    node: int
    pid: int
    rss_kb: int
    fds: int


@dataclass
class Books:
    """What the senders know: acknowledged SOP Instance UIDs, and what was refused."""

    acked: set[str] = field(default_factory=set)
    refused: int = 0  # responses other than success (disk full: 0xA700), sent again later
    cut: int = 0  # associations that failed (the router down): their files sent again
    studies: int = 0
    errors: list[str] = field(default_factory=list)  # what the senders' pynetdicom raised
    lock: threading.Lock = field(default_factory=threading.Lock)


class Sender(threading.Thread):
    """One modality: a new small study every ``pause`` seconds, on its own association, over
    the router's nodes in turn; what was not acknowledged goes again with the next study."""

    def __init__(self, n: int, work: Path, ports: Callable[[], list[int]], aet: str,
                 books: Books, stop: threading.Event, seed: int) -> None:
        super().__init__(name=f"soak-sender-{n}", daemon=True)
        self.n, self.work, self.ports, self.aet = n, work, ports, aet
        self.books, self.stop_new = books, stop
        self.rng = random.Random(seed)
        self.pending: list[Path] = []
        self.done = threading.Event()  # set when stopped with nothing left to send
        self.finish_by = float("inf")

    def run(self) -> None:
        import logging

        from pynetdicom import AE
        from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # refusals are counted
        ae = AE(ae_title=f"SOAK{self.n}")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        made = 0
        while True:
            if not self.stop_new.is_set():
                made += 1
                out = self.work / f"study{made}"
                self.pending += generate(out, studies=1, series=2,
                                         instances=self.rng.randint(1, 4), rows=32, cols=32,
                                         seed=self.rng.randrange(2**31))
                with self.books.lock:
                    self.books.studies += 1
            elif not self.pending or time.monotonic() > self.finish_by:
                break
            ports = self.ports()
            try:
                self._send(ae, ports[made % len(ports)])
            except Exception as exc:  # the association broke under us: send it all again
                with self.books.lock:
                    self.books.cut += 1
                    self.books.errors.append(f"{type(exc).__name__}: {exc}")
            if self.pending or not self.stop_new.is_set():
                self.stop_new.wait(0.3 if not self.pending else 1.0)
        self.done.set()

    def _send(self, ae: Any, port: int) -> None:
        """Send what is pending on one association; what is acknowledged leaves ``pending``."""
        from pydicom import dcmread

        assoc = ae.associate(LOOPBACK, port, ae_title=self.aet)
        if not assoc.is_established:
            with self.books.lock:
                self.books.cut += 1
            return
        try:
            for path in list(self.pending):
                if not assoc.is_established:
                    with self.books.lock:
                        self.books.cut += 1
                    break
                ds = dcmread(path)
                status = assoc.send_c_store(ds)
                if status is not None and getattr(status, "Status", None) == 0x0000:
                    with self.books.lock:
                        self.books.acked.add(str(ds.SOPInstanceUID))
                    self.pending.remove(path)
                    path.unlink()
                elif status is not None and "Status" in status:
                    with self.books.lock:
                        self.books.refused += 1
        finally:
            with contextlib.suppress(Exception):
                assoc.release()


class SpoolDisk:
    """The spool on a tmpfs of its own (root only), so it can be filled without the host's disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mounted = False
        self.ballast = path / "soak-ballast"

    def mount(self) -> str:
        self.path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            return "not root: the disk-full fault is skipped"
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs",
                            str(self.path)], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            return f"mount tmpfs failed ({r.stderr.strip()}): the disk-full fault is skipped"
        self.mounted = True
        return ""

    def fill(self) -> int:
        """Leave a little less than ``min_free_disk`` free; the bytes written."""
        st = os.statvfs(self.path)
        free = st.f_bavail * st.f_frsize
        size = max(0, free - MIN_FREE_DISK + 8 * 2**20)
        with self.ballast.open("wb") as f:
            chunk = b"\0" * 2**20
            for _ in range(size // len(chunk)):
                f.write(chunk)
        return size

    def free(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)
            self.mounted = False


class Soak:
    """One soak run: peers, router node(s), senders, the fault injector, the final books."""

    def __init__(self, settings: SoakSettings, root: Path,
                 progress: Callable[[str], None]) -> None:
        self.s = settings
        self.root = root
        self.progress = progress
        self.books = Books()
        self.faults: list[Fault] = []
        self.samples: list[Sample] = []
        self.kills = 0
        self.notes: list[str] = []
        self.nodes: list[RouterServer] = []
        self._node_lock = threading.Lock()
        self.stop_faults = threading.Event()
        self.stop_new = threading.Event()

    # ---- set-up ---------------------------------------------------------------------------

    def _router_config(self, n: int, storescp: StoreSCP, orthanc: Orthanc | None,
                       moto: MotoServer, pg: Postgres | None, dsn: str) -> dict[str, Any]:
        destinations: dict[str, Any] = {
            "pacs": {"type": "dicom", "ae_title": storescp.aet, "host": LOOPBACK,
                     "port": storescp.port},
            "archive": {"type": "s3", "mode": "instances", "bucket": "soak",
                        "endpoint_url": moto.url, "region": "us-east-1",
                        "access_key_env": "BENCH_S3_KEY", "secret_key_env": "BENCH_S3_KEY",
                        "timeout": "10s"},
        }
        if orthanc is not None:
            destinations["viewer"] = {"type": "dicomweb", "url": f"{orthanc.url}/dicom-web",
                                      "timeout": "15s"}
        config: dict[str, Any] = {
            "ae_title": "DICOMROUTER",
            "stable_age": "2s",
            "min_free_disk": MIN_FREE_DISK,
            "retry": {"initial": "1s", "max_delay": "5s", "max_attempts": 1_000_000},
            "destinations": destinations,
            "routes": [{"name": "everything", "to": sorted(destinations)}],
        }
        if pg is not None:
            config.update({
                "node_id": f"soak{n}", "state": {"type": "postgresql", "dsn_env": "SOAK_DSN",
                                                  "lease": "10s"},
                "shared_spool": {"type": "s3", "bucket": "soak-spool", "endpoint_url": moto.url,
                                 "region": "us-east-1", "access_key_env": "BENCH_S3_KEY",
                                 "secret_key_env": "BENCH_S3_KEY", "timeout": "10s"},
                "ack_after": "local",
            })
        return config

    def run(self) -> dict[str, Any]:
        """The whole soak; the results (``ok`` False with ``problems`` when the books fail)."""
        s = self.s
        disk = SpoolDisk(self.root / "spool-disk")
        note = disk.mount()
        if note:
            self.notes.append(note)
        try:
            with running() as start:
                storescp = start(StoreSCP(self.root / "storescp"))
                orthanc = None
                if find_orthanc() and find_dicomweb_plugin():
                    orthanc = start(Orthanc(self.root / "orthanc", aet="VIEWER", dicomweb=True))
                else:
                    self.notes.append("Orthanc with DICOMweb not found: no STOW-RS destination")
                moto = start(MotoServer(self.root / "moto"))
                moto.create_bucket("soak")
                pg, dsn = None, ""
                if s.cluster:
                    if not Postgres.available():
                        raise BenchError("--soak-cluster needs PostgreSQL (apt-get install "
                                         "postgresql)")
                    pg = start(Postgres(self.root / "pg", fsync=True))
                    dsn = pg.new_database("soak")
                    moto.create_bucket("soak-spool")
                    os.environ["SOAK_DSN"] = dsn  # router_env() passes our environment on
                for n in range(2 if s.cluster else 1):
                    spool = disk.path / f"node{n}"
                    cfg = self._router_config(n, storescp, orthanc, moto, pg, dsn)
                    cfg["spool"] = str(spool)
                    self.nodes.append(start(RouterServer(self.root / f"router{n}", cfg)))
                peers: dict[str, Any] = {"storescp": storescp, "orthanc": orthanc,
                                         "moto": moto, "pg": pg}
                return self._soak(peers, disk)
        finally:
            disk.free()
            disk.unmount()
            os.environ.pop("SOAK_DSN", None)

    # ---- the soak ---------------------------------------------------------------------------

    def _ports(self) -> list[int]:
        with self._node_lock:
            return [node.port for node in self.nodes]

    def _soak(self, peers: dict[str, Any], disk: SpoolDisk) -> dict[str, Any]:
        s = self.s
        seconds = s.minutes * 60
        kinds = ["storescp", "router-kill", "s3-freeze"]
        if peers["orthanc"] is not None:
            kinds.insert(1, "orthanc")
        if disk.mounted:
            kinds.append("disk-full")
        if peers["pg"] is not None:
            kinds.append("postgresql")
        # every kind at least once, one fault at a time, evenly spread over the soak
        interval = min(60.0, seconds / (len(kinds) + 1))
        hold = max(3.0, min(15.0, interval / 3))
        senders = [Sender(n, self.root / f"sender{n}", self._ports, self.nodes[0].aet,
                          self.books, self.stop_new, s.seed * 100 + n)
                   for n in range(s.senders)]
        sampler = threading.Thread(target=self._sample, name="soak-sampler", daemon=True)
        started = time.monotonic()
        for t in senders:
            t.start()
        sampler.start()
        self.progress(f"soak: {s.senders} senders, a fault every {interval:.0f} s "
                      f"({', '.join(kinds)}), {s.minutes:g} min")
        i = 0
        while True:
            due = started + (i + 1) * interval
            if due + hold > started + seconds or self.stop_faults.wait(due - time.monotonic()):
                break
            self._inject(kinds[i % len(kinds)], hold, peers, disk)
            i += 1
        remaining = seconds - (time.monotonic() - started)
        if remaining > 0:
            time.sleep(remaining)
        self.progress(f"soak: senders stop ({self.books.studies} studies, "
                      f"{len(self.books.acked)} instances acknowledged)")
        for t in senders:
            t.finish_by = time.monotonic() + 120
        self.stop_new.set()
        for t in senders:
            t.join(timeout=180)
        unsent = sum(len(t.pending) for t in senders)
        drain_started = time.monotonic()
        missing = self._drain(peers)
        drained = time.monotonic() - drain_started
        self.stop_faults.set()
        sampler.join(timeout=10)
        return self._books(peers, missing, unsent, drained, time.monotonic() - started)

    def _inject(self, kind: str, hold: float, peers: dict[str, Any], disk: SpoolDisk) -> None:
        fault = Fault(kind, time.monotonic())
        self.progress(f"soak: fault {kind}")
        if kind in ("storescp", "orthanc", "postgresql"):
            peer = peers["pg" if kind == "postgresql" else kind]
            peer.stop()
            self.stop_faults.wait(hold)
            peer.start()
        elif kind == "s3-freeze":
            pid = peers["moto"].pid
            os.kill(pid, signal.SIGSTOP)
            try:
                self.stop_faults.wait(hold)
            finally:
                os.kill(pid, signal.SIGCONT)
        elif kind == "router-kill":
            with self._node_lock:
                node = self.nodes[self.kills % len(self.nodes)]
            os.kill(node.pid, signal.SIGKILL)
            node.stop()  # reaps it
            self.kills += 1
            node.start()
            fault.note = f"node {self.nodes.index(node)}"
        elif kind == "disk-full":
            written = disk.fill()
            fault.note = f"{written / 2**20:.0f} MB of ballast"
            try:
                self.stop_faults.wait(hold)
            finally:
                disk.free()
        fault.seconds = time.monotonic() - fault.started
        self.faults.append(fault)

    def _sample(self) -> None:
        while not self.stop_faults.wait(SAMPLE_EVERY):
            with self._node_lock:
                nodes = list(enumerate(self.nodes))
            for n, node in nodes:
                proc = node.proc
                if proc is None or proc.poll() is not None:
                    continue
                rss = proc_status_kb(proc.pid, "VmRSS")
                try:
                    fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
                except OSError:
                    continue
                if rss is not None:
                    self.samples.append(Sample(time.monotonic(), n, proc.pid, rss, fds))

    # ---- the books --------------------------------------------------------------------------

    def _arrived(self, peers: dict[str, Any]) -> dict[str, set[str]]:
        """SOP Instance UIDs at each destination."""
        got: dict[str, set[str]] = {}
        got["pacs"] = {p.name.split(".", 1)[1][:-len(".dcm")] for p in peers["storescp"].files()}
        client = peers["moto"].client()
        keys: set[str] = set()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket="soak"):
            keys.update(Path(o["Key"]).stem for o in page.get("Contents", []))
        got["archive"] = keys
        if peers["orthanc"] is not None:
            got["viewer"] = peers["orthanc"].instance_sop_uids()
        return got

    def _drain(self, peers: dict[str, Any]) -> dict[str, set[str]]:
        """Wait for every acknowledged instance everywhere; what is still missing at the end."""
        missing: dict[str, set[str]] = {}

        def complete() -> bool:
            got = self._arrived(peers)
            missing.clear()
            missing.update({d: self.books.acked - uids for d, uids in got.items()})
            return not any(missing.values())

        with contextlib.suppress(BenchError):
            wait_until(complete, timeout=self.s.drain_timeout, interval=3.0,
                       what="every acknowledged instance at every destination")
        return missing

    def _ledger(self) -> dict[str, int]:
        """Ledger rows, re-sends and the most sends of one instance (SQLite or PostgreSQL)."""
        rows: list[tuple[str, int]] = []
        if self.s.cluster:
            import psycopg

            with psycopg.connect(os.environ.get("SOAK_DSN", "")) as conn:
                rows = list(conn.execute("SELECT destination, sends FROM ledger"))
        else:
            db = sqlite3.connect(self.nodes[0].spool / "state.db")
            try:
                rows = list(db.execute("SELECT destination, sends FROM ledger"))
            finally:
                db.close()
        return {"rows": len(rows), "resends": sum(max(0, n - 1) for _, n in rows),
                "max_sends": max((n for _, n in rows), default=0)}

    def _flat(self) -> dict[str, Any]:
        """RSS and open files of the longest-lived router process: its last quarter against the
        quarter after its first minute (start-up and warm-up excluded)."""
        by_pid: dict[int, list[Sample]] = {}
        for sample in self.samples:
            by_pid.setdefault(sample.pid, []).append(sample)
        if not by_pid:
            return {"samples": 0}
        longest = max(by_pid.values(), key=lambda v: v[-1].t - v[0].t)
        warm = [x for x in longest if x.t - longest[0].t >= min(60.0, (longest[-1].t
                                                                         - longest[0].t) / 4)]
        q = max(1, len(warm) // 4)
        early, late = warm[:q], warm[-q:]

        def med(values: list[int]) -> float:
            values = sorted(values)
            return float(values[len(values) // 2]) if values else 0.0

        rss0, rss1 = med([x.rss_kb for x in early]), med([x.rss_kb for x in late])
        fd0, fd1 = med([x.fds for x in early]), med([x.fds for x in late])
        return {"samples": len(longest), "seconds": round(longest[-1].t - longest[0].t, 1),
                "rss_mb_early": round(rss0 / 1024, 1), "rss_mb_late": round(rss1 / 1024, 1),
                "fds_early": fd0, "fds_late": fd1,
                "flat": rss1 <= rss0 * 1.25 + 10 * 1024 and fd1 <= fd0 + 10}

    def _books(self, peers: dict[str, Any], missing: dict[str, set[str]], unsent: int,
               drained: float, elapsed: float) -> dict[str, Any]:
        ledger = self._ledger()
        logs = [node.log_path.read_text(errors="replace") for node in self.nodes]
        tracebacks = sum(text.count("Traceback") for text in logs)
        # the disk-full fault must have been felt: associations or instances refused for it
        disk_refusals = sum(text.count("min_free_disk") for text in logs)
        flat = self._flat()
        faults: dict[str, int] = {}
        for f in self.faults:
            faults[f.kind] = faults.get(f.kind, 0) + 1
        problems = []
        for dest, uids in sorted(missing.items()):
            if uids:
                problems.append(f"{len(uids)} acknowledged instance(s) never reached {dest}, "
                                f"e.g. {sorted(uids)[:3]}")
        # at-least-once: what was on the wire when a router was killed or a destination went away
        # may go once more (its answer was lost), never more often than that
        if ledger["max_sends"] > 1 + len(self.faults):
            problems.append(f"an instance went on the wire {ledger['max_sends']} times with "
                            f"{len(self.faults)} fault(s)")
        if "disk-full" in faults and not disk_refusals:
            problems.append("the disk-full fault refused nothing: the spool never felt it")
        if tracebacks:
            problems.append(f"{tracebacks} traceback(s) in the router log(s)")
        if flat.get("samples") and not flat["flat"]:
            problems.append(f"the router grew: {flat}")
        if not self.books.acked:
            problems.append("nothing was acknowledged")
        return {
            "ok": not problems, "problems": problems, "minutes": round(elapsed / 60, 2),
            "cluster": self.s.cluster, "nodes": len(self.nodes), "senders": self.s.senders,
            "studies": self.books.studies, "acked": len(self.books.acked),
            "refused_responses": self.books.refused, "cut_associations": self.books.cut,
            "never_acknowledged": unsent, "sender_errors": sorted(set(self.books.errors))[:5],
            "delivered": {d: len(self.books.acked) - len(m) for d, m in sorted(missing.items())},
            "destinations": sorted(missing), "faults": faults, "router_kills": self.kills,
            "disk_full_refusals": disk_refusals,
            "ledger": ledger, "drain_seconds": round(drained, 1), "tracebacks": tracebacks,
            "memory": flat, "notes": self.notes,
        }


def render(result: dict[str, Any]) -> list[str]:
    """The soak's report lines (text and Markdown alike)."""
    faults = ", ".join(f"{k} ×{v}" for k, v in sorted(result["faults"].items()))
    delivered = ", ".join(f"{d} {n}" for d, n in result["delivered"].items())
    mem = result["memory"]
    lines = [
        f"soak: {result['minutes']} min, {result['nodes']} node(s), {result['senders']} senders: "
        f"{result['studies']} studies, {result['acked']} instances acknowledged "
        f"({result['refused_responses']} refused responses and {result['cut_associations']} "
        f"cut associations sent again; {result['never_acknowledged']} never acknowledged)",
        f"soak: faults {faults}; delivered {delivered}; re-sends {result['ledger']['resends']} "
        f"(most sends of one instance {result['ledger']['max_sends']}, router kills "
        f"{result['router_kills']}); drained in {result['drain_seconds']} s; "
        f"tracebacks {result['tracebacks']}",
    ]
    if mem.get("samples"):
        lines.append(f"soak: router RSS {mem['rss_mb_early']} → {mem['rss_mb_late']} MB, open "
                     f"files {mem['fds_early']:.0f} → {mem['fds_late']:.0f} over "
                     f"{mem['seconds']} s of one process")
    lines += [f"soak: note: {n}" for n in result["notes"]]
    lines.append("soak: OK" if result["ok"] else
                 "soak: FAILED: " + "; ".join(result["problems"]))
    return lines


def run_soak(settings: SoakSettings, root: Path,
             progress: Callable[[str], None]) -> dict[str, Any]:
    """Run the soak under ``root``; BenchError when it could not run at all."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        return Soak(settings, root, progress).run()
    finally:
        shutil.rmtree(root / "spool-disk", ignore_errors=True)


__all__ = ["BENCH_S3_KEY", "SoakSettings", "render", "run_soak"]
