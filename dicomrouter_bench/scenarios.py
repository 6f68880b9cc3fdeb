"""The measurements P1-P5: each starts its own peers on free loopback ports and stops them.

Every measurement is one key in a run's dict (``"P1/small/router"``) whose value is a dict of
numbers, or ``{"error": message}`` when it could not be taken. Raw seconds are stored; rates,
medians and ratios are computed by :mod:`.report`.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from . import flatcost, stowin
from .cluster import cpu_seconds
from .corpus import LARGE_COLS, LARGE_ROWS, Corpus, large_frames, make_corpus
from .procs import (
    LOOPBACK,
    BenchError,
    MotoServer,
    Orthanc,
    Peer,
    Postgres,
    RouterServer,
    StoreSCP,
    StoreSCU,
    find_dicomweb_plugin,
    find_orthanc,
    free_port,
    log_tail,
    running,
    storescu_argv,
    wait_until,
)

SCENARIOS = ("P1", "P2", "P3", "P4", "P5", "P7", "P8")
RECEIVE_CORPORA = ("small", "ct")
P4_CORPORA = ("large", "study")  # one ≥ 500 MB instance; a ~2 GB study
STUDY_FRAMES = 4  # frames per instance of P4's big study (2.1 MB instances)
# router: the receive log (receive_log: true); router-slots: the fsync'd receive slots
P1_RECEIVERS = ("storescp", "router", "router-slots", "orthanc")
P5_RECEIVERS = ("storescp", "storescp-fork", "router", "router-2")
LONG_STABLE_AGE = "1h"  # P1/P5: the router only receives, no study completes during the run
# The Orthanc gateway P2 compares with: forward every stable study to the modality "target".
# (SendToModality() in Orthanc's Lua takes an *instance* ID; for a study use the REST API.)
GATEWAY_LUA = """function OnStableStudy(studyId, tags, metadata)
  RestApiPost('/modalities/target/store', studyId)
end
"""

Measurement = dict[str, Any]


@dataclass
class Settings:
    """What to run, and how big (the command-line options)."""

    runs: int = 3
    scenarios: frozenset[str] = frozenset(SCENARIOS)
    small: int = 1000
    ct: int = 300
    large_mb: float = 500.0
    study_mb: float = 2000.0  # P4's big study: instances of STUDY_FRAMES 512x512 frames
    stable_age: int = 1
    associations: int = 8
    forward_associations: int = 4  # the router's dicom destination in P2
    stow_concurrency: int = 4  # P3: the router's dicomweb destination's parallel_requests
    storescp_pdu: int | None = None  # storescp's -pdu (None: its default, 16 kB)
    nodes: int = 3  # P7: 1..nodes routers on one PostgreSQL + S3
    flat_studies: int = 20_000  # P8: the large state (synthetic rows) against the empty one
    flat_instances: int = 1_000_000
    keep: bool = False
    orthanc: bool = field(default_factory=lambda: find_orthanc() is not None)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"runs": self.runs, "scenarios": sorted(self.scenarios), "small": self.small,
                "ct": self.ct, "large_mb": self.large_mb, "study_mb": self.study_mb,
                "stable_age": self.stable_age,
                "associations": self.associations,
                "forward_associations": self.forward_associations,
                "stow_concurrency": self.stow_concurrency,
                "storescp_pdu": self.storescp_pdu, "nodes": self.nodes,
                "flat_studies": self.flat_studies, "flat_instances": self.flat_instances,
                "orthanc": self.orthanc}


def _timeout(corpus: Corpus) -> float:
    """A generous deadline for moving ``corpus`` once (a noisy 2-core box: ~1 MB/s floor)."""
    return 300.0 + 2.0 * corpus.mb + 0.2 * corpus.count


def _address(peer: Peer) -> tuple[str, int]:
    """(AE title, DICOM port) of a receiving peer."""
    if isinstance(peer, Orthanc):
        return peer.aet, peer.dicom_port
    if isinstance(peer, StoreSCP | RouterServer):
        return peer.aet, peer.port
    raise TypeError(type(peer).__name__)


def _count(peer: Peer) -> int:
    if isinstance(peer, StoreSCP | Orthanc | RouterServer | MotoServer):
        return peer.count()
    raise TypeError(type(peer).__name__)


class Bench:
    """Generates the corpora and takes every measurement of every run."""

    def __init__(self, settings: Settings, root: Path, progress: Callable[[str], None]) -> None:
        self.settings = settings
        self.root = root
        self.progress = progress
        self.corpora: dict[str, Corpus] = {}
        self.runs: list[dict[str, Measurement]] = []
        self.errors = 0

    # ---- corpora ----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Generate the corpora the selected scenarios need."""
        s = self.settings
        wanted: list[tuple[str, int, int, int, int]] = []
        if s.scenarios & {"P1", "P2", "P3", "P5", "P7", "P8"}:
            wanted.append(("small", s.small, 64, 64, 1))
        if s.scenarios & {"P1", "P2", "P3"}:
            wanted.append(("ct", s.ct, 512, 512, 1))
        if "P4" in s.scenarios:
            wanted.append(("large", 1, LARGE_ROWS, LARGE_COLS, large_frames(s.large_mb)))
            per_instance = STUDY_FRAMES * LARGE_ROWS * LARGE_COLS * 2 / 1e6
            wanted.append(("study", max(1, math.ceil(s.study_mb / per_instance)), LARGE_ROWS,
                           LARGE_COLS, STUDY_FRAMES))
        for seed, (name, count, rows, cols, frames) in enumerate(wanted, 1):
            started = time.monotonic()
            corpus = make_corpus(name, self.root / "corpora", count, rows, cols, frames, seed)
            self.corpora[name] = corpus
            self.progress(f"corpus {name}: {corpus.describe()} in "
                          f"{time.monotonic() - started:.1f} s")

    # ---- running ----------------------------------------------------------------------------

    def run(self) -> None:
        """Every selected scenario, ``runs`` times, interleaved run by run."""
        s = self.settings
        for i in range(s.runs):
            data: dict[str, Measurement] = {}
            self.runs.append(data)
            flip = i % 2 == 1  # alternate which side of a pair goes first
            if "P1" in s.scenarios:
                receivers = [r for r in P1_RECEIVERS if r != "orthanc" or s.orthanc]
                for corpus in RECEIVE_CORPORA:
                    for kind in reversed(receivers) if flip else receivers:
                        self._measure(i, data, f"P1/{corpus}/{kind}",
                                      partial(self.receive, kind=kind, corpus_name=corpus))
            if "P1" in s.scenarios and self._certs() is not None:  # DICOM TLS, small corpus
                kinds = ["storescp-tls", "router-tls"]
                for kind in reversed(kinds) if flip else kinds:
                    self._measure(i, data, f"P1/small/{kind}",
                                  partial(self.receive, kind=kind, corpus_name="small"))
            if "P2" in s.scenarios and s.orthanc:
                modes = ["router", "gateway", "router-immediate"]
                for corpus in RECEIVE_CORPORA:
                    for mode in reversed(modes) if flip else modes:
                        self._measure(i, data, f"P2/{corpus}/{mode}",
                                      partial(self.end_to_end, mode=mode, corpus_name=corpus))
            if "P3" in s.scenarios:  # ingest only: STOW-RS in against C-STORE in
                modes = ["stow-in", "cstore-in"]
                for mode in reversed(modes) if flip else modes:
                    self._measure(i, data, f"P3/ct/{mode}",
                                  partial(self.ingest, mode=mode, corpus_name="ct"))
            if "P3" in s.scenarios and s.orthanc and find_dicomweb_plugin():
                modes = ["stow", "cstore"]
                for corpus in RECEIVE_CORPORA:
                    for mode in reversed(modes) if flip else modes:
                        self._measure(i, data, f"P3/{corpus}/{mode}",
                                      partial(self.dicomweb, mode=mode, corpus_name=corpus))
            if "P5" in s.scenarios:
                for kind in ("storescp", "router"):  # one association: P1's, or measured now
                    key = f"P1/small/{kind}"
                    if key not in data:
                        self._measure(i, data, key,
                                      partial(self.receive, kind=kind, corpus_name="small"))
                kinds = list(reversed(P5_RECEIVERS)) if flip else list(P5_RECEIVERS)
                for kind in kinds:
                    self._measure(i, data, f"P5/small/{kind}",
                                  partial(self.receive, kind=kind, corpus_name="small",
                                          parts=s.associations))
            if "P7" in s.scenarios:
                self._cluster(i, data)
            if "P8" in s.scenarios:
                self._flat(i, data, flip)
            if "P4" in s.scenarios:  # last: its 2 GB of writes must not slow the others
                for corpus in P4_CORPORA:
                    self._measure(i, data, f"P4/{corpus}/router",
                                  partial(self.large, corpus_name=corpus))
                # the big study through the exports that buffer a study: STOW-RS, an S3 zip
                if s.orthanc and find_dicomweb_plugin():
                    self._measure(i, data, "P4/study/stow",
                                  partial(self.large, corpus_name="study", via="stow"))
                if MotoServer.available():
                    self._measure(i, data, "P4/study/s3zip",
                                  partial(self.large, corpus_name="study", via="s3zip"))
                self._measure(i, data, "P4/study/folderzip",
                              partial(self.large, corpus_name="study", via="folderzip"))

    def _cluster(self, i: int, data: dict[str, Measurement]) -> None:
        """P7: the embedded default, one cluster node in both ack_after modes, then 2..N
        nodes with the senders spread over them."""
        from . import cluster

        missing = cluster.available()
        if missing:
            if i == 0:
                self.progress(f"P7 skipped: {missing} not available")
            return
        corpus = self.corpora["small"]
        if "P1/small/router" not in data:
            self._measure(i, data, "P1/small/router",
                          partial(self.receive, kind="router", corpus_name="small"))
        variants = [(1, "shared", False), (1, "local", False),
                    *((n, "shared", False) for n in range(2, self.settings.nodes + 1))]
        if self.settings.nodes >= 2 and shutil.which("taskset"):
            variants.append((2, "shared", True))  # each node on a CPU of its own
        for nodes, ack, pinned in variants:
            self._measure(i, data, f"P7/small/nodes{nodes}-{ack}" + ("-pinned" * pinned),
                          partial(cluster.receive, corpus=corpus, nodes=nodes, ack=ack,
                                  stable_age=LONG_STABLE_AGE, timeout=_timeout(corpus),
                                  pinned=pinned))

    def _flat(self, i: int, data: dict[str, Measurement], flip: bool) -> None:
        """P8: the empty and the large state, on SQLite and (if here) on PostgreSQL."""
        s = self.settings
        backends = ["sqlite", "postgresql"] if Postgres.available() else ["sqlite"]
        if len(backends) == 1 and i == 0:
            self.progress("P8 on PostgreSQL skipped: PostgreSQL or psycopg not available")
        sizes = [("empty", 0, 0), ("large", s.flat_studies, s.flat_instances)]
        for backend in backends:
            prefix = "P8" if backend == "sqlite" else "P8/pg"
            for name, studies, instances in reversed(sizes) if flip else sizes:
                self._measure(i, data, f"{prefix}/{name}", partial(
                    flatcost.measure, corpus=self.corpora["small"], studies=studies,
                    instances=instances, timeout=_timeout(self.corpora["small"]),
                    backend=backend))

    def _measure(self, i: int, data: dict[str, Measurement], key: str,
                 fn: Callable[[Path], Measurement]) -> None:
        work = self.root / "runs" / f"run{i + 1}" / key.replace("/", "-")
        label = f"[run {i + 1}/{self.settings.runs}] {key}"
        # Write back what earlier steps left dirty (corpora, spools, the large instance), so the
        # kernel does not flush hundreds of MB in the middle of this measurement.
        os.sync()
        try:
            result = fn(work)
        except BenchError as exc:
            self.errors += 1
            data[key] = {"error": str(exc).splitlines()[0]}
            self.progress(f"{label}: FAILED: {exc}")
            for log in sorted(work.rglob("*.log")):
                self.progress(f"----- {log} -----\n{log_tail(log, 15)}")
        else:
            data[key] = result
            self.progress(f"{label}: {_brief(result)}")
        finally:
            if not self.settings.keep:
                shutil.rmtree(work, ignore_errors=True)

    # ---- peers ------------------------------------------------------------------------------

    def _certs(self) -> Any:
        """Test certificates for the TLS measurements (None without ``cryptography``)."""
        if not hasattr(self, "_tls_certs"):
            try:
                from .tlscerts import make_certs
            except ImportError:
                self._tls_certs = None
                self.progress("P1 over TLS skipped: the cryptography package is missing")
            else:
                self._tls_certs = make_certs(self.root / "certs")
        return self._tls_certs

    @contextmanager
    def _receiver(self, work: Path, kind: str) -> Iterator[Peer]:
        """A started receiver of ``kind`` that only receives (no forwarding)."""
        peer: Peer
        pdu = ["-pdu", str(self.settings.storescp_pdu)] if self.settings.storescp_pdu else []
        if kind == "storescp":
            peer = StoreSCP(work / "storescp", extra=pdu)
        elif kind == "storescp-fork":
            peer = StoreSCP(work / "storescp", extra=["--fork", *pdu])
        elif kind == "router":
            peer = RouterServer(work / "router", {"stable_age": LONG_STABLE_AGE,
                                                  "receive_log": True})
        elif kind == "router-slots":  # the slot path: one fsync of a new file per instance
            peer = RouterServer(work / "router", {"stable_age": LONG_STABLE_AGE,
                                                  "receive_log": False})
        elif kind == "router-2":  # two receiver processes on the port (receivers: 2)
            peer = RouterServer(work / "router", {"stable_age": LONG_STABLE_AGE, "receivers": 2})
        elif kind == "orthanc":
            peer = Orthanc(work / "orthanc")
        elif kind == "storescp-tls":
            c = self._certs()
            peer = StoreSCP(work / "storescp", extra=["+tls", str(c.server.key),
                                                     str(c.server.cert), "+cf", str(c.ca), *pdu])
        elif kind == "router-tls":
            c = self._certs()
            peer = RouterServer(work / "router", {"stable_age": LONG_STABLE_AGE, "tls": {
                "cert": str(c.server.cert), "key": str(c.server.key), "ca": str(c.ca),
                "verify_client": True}})
        else:
            raise ValueError(kind)
        with peer:
            yield peer

    def _send(self, work: Path, peer: Peer, corpus: Corpus, parts: int = 1,
              tick: Callable[[], None] | None = None, secure: bool = False) -> float:
        """storescu → ``peer`` (``parts`` concurrent associations); wall seconds."""
        aet, port = _address(peer)
        tls: list[str] = []
        if secure:
            c = self._certs()
            tls = ["+tls", str(c.client.key), str(c.client.cert), "+cf", str(c.ca)]
        argvs = [storescu_argv(files, port, aet, corpus.transfer_syntax, calling=f"BENCHSCU{n}",
                               extra=tls)
                 for n, files in enumerate(corpus.parts(parts), 1)]
        return StoreSCU(work / "storescu").run(argvs, timeout=_timeout(corpus), tick=tick)

    @staticmethod
    def _expect(peer: Peer, n: int, what: str) -> None:
        wait_until(lambda: _count(peer) >= n, timeout=120, interval=0.2, ignore=(OSError,),
                   what=f"{n} instance(s) in {what}")

    # ---- the measurements -------------------------------------------------------------------

    def receive(self, work: Path, kind: str, corpus_name: str, parts: int = 1) -> Measurement:
        """P1 / P5: wall time of storescu (``parts`` associations at once) into ``kind``."""
        corpus = self.corpora[corpus_name]
        with self._receiver(work, kind) as peer:
            # CPU of the receiver, its receiver processes and forked children: on a 2-core box
            # concurrency cannot show as speed, the CPU per instance says what more cores buy
            cpu0 = cpu_seconds(peer.pid, with_children=True, reaped=True)
            seconds = self._send(work, peer, corpus, parts, secure=kind.endswith("-tls"))
            self._expect(peer, corpus.count, kind)
            cpu = cpu_seconds(peer.pid, with_children=True, reaped=True) - cpu0
        return {"seconds": seconds, "instances": corpus.count, "bytes": corpus.size,
                "associations": parts, "cpu_seconds": cpu}

    def end_to_end(self, work: Path, mode: str, corpus_name: str) -> Measurement:
        """P2: storescu start → every instance in the target Orthanc, minus the stable age.

        ``mode`` is ``router`` (dicomrouter with a dicom destination) or ``gateway`` (an Orthanc
        whose Lua ``OnStableStudy`` forwards the study), both with the same stable age, or
        ``router-immediate``: the router's route with ``forward: immediate``, which does not
        wait for the stable age, so nothing is subtracted from its time.
        """
        corpus = self.corpora[corpus_name]
        age = self.settings.stable_age
        with running() as start:
            target = start(Orthanc(work / "target", aet="TARGET"))
            sender: Peer
            if mode in ("router", "router-immediate"):
                forward = "immediate" if mode == "router-immediate" else "complete"
                sender = RouterServer(work / "router", {
                    "stable_age": f"{age}s",
                    "destinations": {"target": {
                        "type": "dicom", "ae_title": target.aet, "host": LOOPBACK,
                        "port": target.dicom_port,
                        "associations": self.settings.forward_associations}},
                    "routes": [{"name": "everything", "to": ["target"], "forward": forward}],
                })
            elif mode == "gateway":
                lua = work / "gateway.lua"
                lua.write_text(GATEWAY_LUA)
                sender = Orthanc(work / "gateway", aet="GATEWAY", stable_age=age,
                                 modalities={"target": [target.aet, LOOPBACK, target.dicom_port]},
                                 lua_scripts=[lua])
            else:
                raise ValueError(mode)
            start(sender)
            return self._through(work, sender, target, corpus, mode,
                                 waits=mode != "router-immediate")

    def _through(self, work: Path, sender: Peer, target: Orthanc, corpus: Corpus,
                 via: str, waits: bool = True) -> Measurement:
        """storescu → ``sender`` → every instance in ``target``: seconds from storescu's start,
        minus the stable age when the sender ``waits`` for it (P2, P3)."""
        age = self.settings.stable_age if waits else 0
        started = time.perf_counter()
        receive = self._send(work, sender, corpus)

        def arrived() -> bool:
            if not sender.alive():
                raise BenchError(f"{sender.name} died; log {sender.log_path}")
            return target.count() >= corpus.count

        wait_until(arrived, timeout=_timeout(corpus) + 10 * age, interval=0.05,
                   ignore=(OSError, ValueError), what=f"{corpus.count} instances in Orthanc "
                   f"{target.aet} (via {via})")
        total = time.perf_counter() - started
        return {"seconds": total - age, "total_seconds": total, "receive_seconds": receive,
                "stable_age": age, "instances": corpus.count, "bytes": corpus.size}

    def dicomweb(self, work: Path, mode: str, corpus_name: str) -> Measurement:
        """P3: storescu → router → the same Orthanc through STOW-RS (its DICOMweb plugin;
        ``stow_concurrency`` requests in flight per study) or C-STORE (one association, the
        destination's default); seconds from storescu's start to every instance in Orthanc,
        minus the stable age."""
        corpus = self.corpora[corpus_name]
        age = self.settings.stable_age
        with running() as start:
            target = start(Orthanc(work / "target", aet="TARGET", dicomweb=True))
            if mode == "stow":
                destination: dict[str, Any] = {
                    "type": "dicomweb", "url": f"{target.url}/dicom-web",
                    "parallel_requests": self.settings.stow_concurrency}
            elif mode == "cstore":
                destination = {"type": "dicom", "ae_title": target.aet, "host": LOOPBACK,
                               "port": target.dicom_port}
            else:
                raise ValueError(mode)
            router = start(RouterServer(work / "router", {
                "stable_age": f"{age}s", "destinations": {"target": destination},
                "routes": [{"name": "everything", "to": ["target"]}]}))
            return self._through(work, router, target, corpus, mode)

    def ingest(self, work: Path, mode: str, corpus_name: str) -> Measurement:
        """P3 ingest: wall time of the corpus into the router (receive log on, nothing
        forwarded) by STOW-RS (one streamed request, ``stow-in``) or by storescu (one
        association, ``cstore-in``), until the response; then every instance recorded."""
        corpus = self.corpora[corpus_name]
        port = free_port()
        with running() as start:
            router = start(RouterServer(work / "router", {
                "stable_age": LONG_STABLE_AGE, "receive_log": True,
                "dicomweb": {"port": port}}))
            if mode == "stow-in":
                seconds = stowin.post_corpus(LOOPBACK, port, corpus.files, _timeout(corpus))
            elif mode == "cstore-in":
                seconds = self._send(work, router, corpus)
            else:
                raise ValueError(mode)
            self._expect(router, corpus.count, f"the router ({mode})")
        return {"seconds": seconds, "instances": corpus.count, "bytes": corpus.size}

    def large(self, work: Path, corpus_name: str, via: str = "router") -> Measurement:
        """P4: peak RSS (VmHWM) of the router receiving and forwarding a corpus (the large
        instance, or the big study): by C-STORE to storescp (``router``), by STOW-RS to
        Orthanc's DICOMweb plugin (``stow``), as one zip to an S3 server (``s3zip``, moto) or
        into a folder (``folderzip``)."""
        corpus = self.corpora[corpus_name]
        age = self.settings.stable_age
        with running() as start:
            sink: Peer | None = None
            if via == "folderzip":
                destination: dict[str, Any] = {"type": "folder", "path": str(work / "zips"),
                                               "zip": True}
            elif via == "router":
                sink = start(StoreSCP(work / "sink", aet="SINK"))
                destination = {"type": "dicom", "ae_title": sink.aet, "host": LOOPBACK,
                               "port": sink.port}
            elif via == "stow":
                sink = start(Orthanc(work / "sink", aet="SINK", dicomweb=True))
                destination = {"type": "dicomweb", "url": f"{sink.url}/dicom-web"}
            elif via == "s3zip":
                sink = start(MotoServer(work / "sink"))
                sink.create_bucket("bench")
                destination = {"type": "s3", "bucket": "bench", "endpoint_url": sink.url,
                               "region": "us-east-1", "access_key_env": "BENCH_S3_KEY",
                               "secret_key_env": "BENCH_S3_KEY"}
            else:
                raise ValueError(via)
            router = start(RouterServer(work / "router", {
                "stable_age": f"{age}s",
                "destinations": {"sink": destination},
                "routes": [{"name": "everything", "to": ["sink"]}],
            }))
            idle_kb = router.rss_kb()
            sampled = {"receive": 0, "forward": 0}  # max VmRSS seen in each phase, kB

            def sample(phase: str) -> None:
                sampled[phase] = max(sampled[phase], router.rss_kb() or 0)

            started = time.perf_counter()
            receive = self._send(work, router, corpus, tick=partial(sample, "receive"))

            def delivered() -> bool:
                if not router.alive():
                    raise BenchError(f"the router died; log {router.log_path}")
                sample("forward")
                return "delivered to every destination" in router.log(50)

            wait_until(delivered, timeout=_timeout(corpus) + 10 * age, interval=0.05,
                       what=f"the {corpus_name} corpus delivered ({via})")
            total = time.perf_counter() - started
            peak_kb = router.peak_rss_kb()
            if sink is not None:
                self._expect(sink, 1 if via == "s3zip" else corpus.count, f"the sink ({via})")
            elif len(list((work / "zips").rglob("*.zip"))) != 1:
                raise BenchError(f"no zip of the study in {work / 'zips'}")
        if peak_kb is None or idle_kb is None:
            raise BenchError("cannot read VmHWM/VmRSS from /proc (not Linux?)")
        return {"peak_rss_mb": peak_kb * 1024 / 1e6, "idle_rss_mb": idle_kb * 1024 / 1e6,
                "receive_rss_max_mb": sampled["receive"] * 1024 / 1e6,
                "forward_rss_max_mb": sampled["forward"] * 1024 / 1e6,
                "receive_seconds": receive, "deliver_seconds": total - receive - age,
                "bytes": corpus.size, "instances": corpus.count}


def _brief(m: Measurement) -> str:
    """One progress line for a measurement."""
    if "peak_rss_mb" in m:
        return (f"peak RSS {m['peak_rss_mb']:.0f} MB (idle {m['idle_rss_mb']:.0f} MB; sampled max "
                f"{m['receive_rss_max_mb']:.0f} MB receiving, {m['forward_rss_max_mb']:.0f} MB "
                f"forwarding), received in {m['receive_seconds']:.2f} s")
    if "find_patient_ms" in m:
        r = m["receive"]
        return (f"{m['instances']} instances: start-up {m['startup_seconds']:.1f} s, C-FIND "
                f"PatientID {m['find_patient_ms']:.1f} ms, dates {m['find_dates_ms']:.1f} ms, "
                f"status {m['status_ms']:.0f} ms, /metrics {m['metrics_ms']:.1f} ms, tick "
                f"{m['tick_ms']:.2f} ms, housekeeping {m['housekeeping_ms']:.1f} ms, receive "
                f"{r['instances'] / r['seconds']:.0f} instances/s")
    if "total_seconds" in m:
        return (f"{m['seconds']:.2f} s end to end after the stable age (receive "
                f"{m['receive_seconds']:.2f} s)")
    rate = m["instances"] / m["seconds"]
    mbps = m["bytes"] / 1e6 / m["seconds"]
    return f"{m['seconds']:.2f} s, {rate:.0f} instances/s, {mbps:.1f} MB/s"
