"""The composition root: builds the router's parts from its configuration, starts and stops
them. Wiring and life cycle only; the policy lives in the parts (``completion`` decides when a
study is complete and routes it, ``delivery`` gets it there, ``scp`` and ``sources`` take
instances in, ``spool`` and ``state`` keep them)."""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from . import conversion, destinations, health, metrics
from .completion import Housekeeping, StudyTracker
from .config import Config
from .delivery import DeliveryWorkers
from .notifications import Notifier
from .outbox import Outbox
from .prefetch import Prefetcher
from .processing import destination as _processing  # noqa: F401 - registers process:<route>
from .receivers import ReceiverProcesses
from .scp import services
from .scp.listener import FastStorageSCP
from .scp.server import StorageSCP
from .sources.runner import SourcePollers
from .spool import spool_for
from .state import Job, JobState, state_for

if TYPE_CHECKING:  # imported where built: each only when configured
    from .hl7 import Hl7Service
    from .proxy import QueryRetrieveProxy

log = logging.getLogger("dicomrouter")


class ListenError(OSError):
    """A port the router must listen on cannot be bound (in use, no permission)."""


def _bind(what: str, bind: str, port: int, reuse_port: bool = False) -> socket.socket:
    try:
        return socket.create_server((bind, port), backlog=128, reuse_port=reuse_port)
    except OSError as exc:
        why = "is in use (another router or PACS?)" if exc.errno == errno.EADDRINUSE else \
            (exc.strerror or str(exc))
        raise ListenError(exc.errno, f"cannot listen for {what} on {bind}:{port}: port {port} "
                          f"{why}") from None


class Router:
    def __init__(self, cfg: Config, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        conversion.POOL.configure(cfg.conversion_processes, cfg.conversion_timeout,
                                  cfg.conversion_idle)
        self.clock = clock  # injectable (tests move it): delivery windows
        # Bind first: a port in use fails here, before the spool or state.db is created.
        self._dicom_socks = []
        for i, lst in enumerate(cfg.all_listeners):
            sock = _bind(f"DICOM (listener {lst.name})", lst.bind, lst.port,
                         reuse_port=cfg.receivers > 1 and i == 0)
            if cfg.receiver != "fast":  # pynetdicom binds its own socket at start
                sock.close()
            self._dicom_socks.append((lst, sock))
        self.web = None
        self._web_sock: socket.socket | None = None
        if cfg.web.enabled:
            try:
                self._web_sock = _bind("the web status page (web.port)", cfg.web.bind,
                                       cfg.web.port)
            except ListenError as exc:  # the router's job is DICOM: it goes on without pages
                log.error("%s; the router runs without its status page, REST API and "
                          "/metrics (set web.port, or web.enabled: false)", exc.strerror)
        hl7_sock = _bind("HL7 (hl7.port)", cfg.hl7.bind, cfg.hl7.port) if cfg.hl7 else None
        self.dicomweb = None  # the DICOMweb server's own listener (dicomweb.port)
        self._dicomweb_sock = _bind("the DICOMweb server (dicomweb.port)", cfg.dicomweb.bind,
                                    cfg.dicomweb.port) \
            if cfg.dicomweb.enabled and cfg.dicomweb.port else None
        self.state = state_for(cfg)  # SQLite in the spool, or the cluster's PostgreSQL
        self.hl7: Hl7Service | None = None  # issue 27 (imported only when configured)
        if cfg.hl7:
            from .hl7 import Hl7Service

            self.hl7 = Hl7Service(cfg, self.state, hl7_sock)
        self.spool = spool_for(cfg, self.state)
        context = destinations.Context(cfg.ae_title, self.state, self.spool, cfg, clock)
        self.destinations = {name: destinations.build(d, context)
                             for name, d in cfg.destinations.items()}
        self.housekeeping = Housekeeping(cfg, self.state, self.spool)
        self.notifier = Notifier(cfg, self.state)  # notifications: (inert without)
        self.workers = DeliveryWorkers(cfg, self.state, self.spool, self.destinations,
                                       self._job_finished, clock)
        self.tracker = StudyTracker(cfg, self.state, self.spool, self.workers.notify,
                                    self.housekeeping.settled, clock, self.notifier.emit)
        self.scps: list[StorageSCP | FastStorageSCP] = [
            FastStorageSCP(cfg, self.spool, sock, lst) if cfg.receiver == "fast"
            else StorageSCP(cfg, self.spool, lst) for lst, sock in self._dicom_socks]
        #: the Q/R proxy (None without query_retrieve_proxy): C-FIND/C-MOVE/C-GET when
        #: query_retrieve is on, and the WADO-RS hook of the DICOMweb server either way
        self.proxy_fetcher: QueryRetrieveProxy | None = None
        if cfg.query_retrieve_proxy:
            from .proxy import QueryRetrieveProxy

            self.proxy_fetcher = QueryRetrieveProxy(cfg, self.state, self.spool)
        for scp in self.scps:
            services.register(scp, cfg, self.state, self.spool, self.proxy_fetcher)
        self.receivers = ReceiverProcesses(cfg)
        self.sources = SourcePollers(cfg, self.state, self.spool)
        self.prefetcher = Prefetcher(cfg, self.state, self.spool, clock)  # prefetch: rules
        if self.hl7 is not None:  # orders that hl7_rules hand on (prefetch: true)
            self.hl7.orders.subscribe(self.prefetcher.on_order)
        self.outbox = Outbox(cfg, self.state)  # forward_mpps, ian (issue 27)
        self._stop = threading.Event()
        self._heart: threading.Thread | None = None
        self._listening = False

    # ---- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Recover what a previous run left, then start delivering and receiving."""
        self.state.heartbeat(self._node_info())
        if self.cfg.cluster:
            log.info("node %s of a cluster: state in PostgreSQL (lease %g s), %s, ack_after %s",
                     self.cfg.node_id, self.cfg.state.lease,
                     self.spool.describe(),
                     self.cfg.ack_after if self.cfg.shared_spool else "local")
        # embedded too: status and /api/nodes tell a running router from one that stopped
        self._heart = threading.Thread(target=self._heartbeat, name="node-heartbeat",
                                       daemon=True)
        self._heart.start()
        adopted, dropped = self.spool.recover_slots()
        if adopted:
            log.info("recovered %d acknowledged instance(s) from their receive slots", adopted)
        if dropped:
            log.info("removed %d partial reception(s) left by an earlier stop (never "
                     "acknowledged)", dropped)
        adopted = self.spool.adopt_orphans()
        if adopted:
            log.warning("recorded %d spool file(s) the state database did not know (power cut "
                        "or crash between rename and commit)", adopted)
        self.spool.forget_kept_tags()  # the ones no adopted instance used
        reset, due = self.state.reset_running_jobs()
        if reset:
            log.info("%d delivery job(s) interrupted by an earlier stop are pending again", reset)
        if due:
            log.info("%d failed delivery job(s) are retried now rather than after their backoff",
                     due)
        unrouted = self.state.studies_in_state("unrouted")
        for study in unrouted:  # the routing table may have changed since
            self.tracker.complete(study)
        gauges, counts = self.state.gauges(), self.state.study_counts()
        pending = sum(n for q in gauges["queues"].values()
                      for s, n in q.items() if s in (JobState.PENDING, JobState.FAILED))
        log.info("state %s: %d study(ies) in the spool (%d receiving), %d job(s) to deliver, "
                 "%d dead", "PostgreSQL" if self.cfg.cluster else self.cfg.state_db,
                 counts["studies"], counts["receiving"], pending, len(gauges["dead"]))
        for name, dest in self.destinations.items():
            log.info("destination %s: %s", name, dest.describe())
        if self.cfg.sweep is not None:
            log.info("sweep of the spooled studies: %s", self.cfg.sweep.describe())
        self.notifier.start()  # before the listeners: the studies receiving now are known
        if self.hl7 is not None:
            self.hl7.start()
        self.spool.start()
        self.housekeeping.start()
        self.workers.start()
        self.tracker.start(self.housekeeping.run)
        for scp in self.scps:
            scp.start()
        self.receivers.start()
        self.sources.start()
        self.prefetcher.start()
        self.outbox.start()
        if self.proxy_fetcher is not None:
            log.info("%s; fetched studies are kept %g s after their last use",
                     self.proxy_fetcher.describe(), self.cfg.query_retrieve_proxy_cache)
            self.proxy_fetcher.start()
        if self._web_sock is not None:
            metrics.watch_state(self.state, self.cfg.spool)
            # imported only when enabled: FastAPI and uvicorn are ~13 MB of an idle router
            from .web.api import create_app
            from .web.dicomweb import attach
            from .web.server import WebServer

            app = create_app(self)
            if self.cfg.dicomweb.enabled:
                attach(app, self)  # STOW-RS, QIDO-RS, WADO-RS on the web port (/dicom-web/)
            self.web = WebServer(app, self._web_sock)
            self.web.start()
        if self._dicomweb_sock is not None:
            from .web.dicomweb import dicomweb_app
            from .web.server import WebServer

            tls = self.cfg.dicomweb.tls
            self.dicomweb = WebServer(dicomweb_app(self), self._dicomweb_sock,
                                      "DICOMweb server",
                                      (tls.cert, tls.key) if tls else None)
            self.dicomweb.start()
        self._listening = True

    def _node_info(self) -> dict[str, Any]:
        try:
            ours = version("dicomrouter")
        except PackageNotFoundError:
            ours = "?"
        return {"host": socket.gethostname(), "pid": os.getpid(), "version": ours,
                "listeners": [f"{lst.ae_title}@{lst.bind}:{lst.port}"
                              for lst, _sock in self._dicom_socks],
                "ack_after": self.cfg.ack_after if self.cfg.shared_spool else "local"}

    def _heartbeat(self) -> None:
        """Renew this node's row and its jobs' leases every third of the lease."""
        every = max(1.0, self.cfg.state.lease / 3)
        failing = False
        while not self._stop.wait(every):
            try:
                self.state.heartbeat()
                if failing:
                    log.info("node %s: heartbeat recorded again", self.cfg.node_id)
                failing = False
            except Exception as exc:
                if not failing:
                    log.error("node %s: heartbeat failed (%s: %s); its jobs' leases run out "
                              "in %g s unless it recovers", self.cfg.node_id,
                              type(exc).__name__, exc, self.cfg.state.lease)
                failing = True

    def stop(self) -> None:
        log.info("stopping")
        if self.web is not None:
            self.web.stop()
        if self.dicomweb is not None:
            self.dicomweb.stop()
        self.sources.stop()
        self.prefetcher.stop()
        self.outbox.stop()
        if self.proxy_fetcher is not None:
            self.proxy_fetcher.stop()
        self.receivers.stop()
        for scp in self.scps:
            scp.stop()
        if self.hl7 is not None:
            self.hl7.stop()
        self._stop.set()
        self.tracker.stop()
        self.workers.stop()
        self.notifier.stop()
        conversion.POOL.close()
        self.housekeeping.stop()
        self.spool.stop()
        self.state.close()

    def run_forever(self) -> None:
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    def request_stop(self) -> None:
        self._stop.set()

    # ---- operations (web API) ------------------------------------------------------------------

    def reroute(self, study_uid: str) -> str:
        """Route a study in the spool again with the current rules: 'routed', 'unrouted',
        or 'unknown' (not in the spool)."""
        return self.tracker.reroute(study_uid)

    def notify_destination(self, destination: str) -> None:
        self.workers.notify([destination])

    def breakers(self) -> dict[str, dict[str, Any]]:
        """Each destination's circuit breaker on this node (breaker.py)."""
        return self.workers.breakers.views()

    def readiness(self) -> dict[str, str]:
        """What keeps the router from doing its job now (empty: ready)."""
        return health.readiness(self.cfg, self.state, self.spool, self._listening)

    def _job_finished(self, job: Job, outcome: str) -> None:
        if outcome in (JobState.DELIVERED, JobState.FAILED, JobState.DEAD):
            facts: dict[str, Any] = {"destination": job.destination, "routes": list(job.routes),
                                     "attempt": job.attempts + 1}
            dest = self.cfg.destinations.get(job.destination)
            if outcome == JobState.FAILED and dest is not None:
                facts["retry_in"] = dest.retry_policy.delay(job.attempts + 1)
            self.notifier.emit(str(outcome), job.study_uid, **facts)
        if outcome == JobState.PENDING:  # requeued while it ran: at it again
            self.workers.notify([job.destination])
        self.housekeeping.job_finished(job, outcome)
