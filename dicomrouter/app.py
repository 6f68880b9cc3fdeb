"""The running router: SCP → spool → study tracker → routing → delivery, and housekeeping."""

from __future__ import annotations

import errno
import logging
import os
import queue
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import destinations, metrics
from .config import Config
from .delivery import DeliveryWorkers
from .receivers import ReceiverProcesses
from .routing import Decision, route
from .scp import services
from .scp.fast import FastStorageSCP
from .scp.server import StorageSCP
from .sources import source_names
from .sources.runner import SourcePollers
from .spool import spool_for
from .state import Instance, Job, state_for

log = logging.getLogger("dicomrouter")

TICK = 0.2  # how often stable studies are looked for; bounds the lateness of a completion


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
        self.clock = clock  # injectable (tests move it): delivery windows
        # Bind first: a port in use fails here, before the spool or state.db is created.
        self._dicom_socks = []
        for i, lst in enumerate(cfg.listeners or (cfg.listener,)):
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
        self.state = state_for(cfg)  # SQLite in the spool, or the cluster's PostgreSQL
        self.spool = spool_for(cfg, self.state)
        self.destinations = {name: destinations.build(d, cfg.ae_title)
                             for name, d in cfg.destinations.items()}
        for dest in self.destinations.values():
            if hasattr(dest, "state"):  # storage commitment reports are kept there
                dest.state = self.state
        self.workers = DeliveryWorkers(cfg, self.state, self.spool, self.destinations,
                                       self._job_finished, clock)
        self.scps: list[StorageSCP | FastStorageSCP] = [
            FastStorageSCP(cfg, self.spool, sock, lst) if cfg.receiver == "fast"
            else StorageSCP(cfg, self.spool, lst) for lst, sock in self._dicom_socks]
        for scp in self.scps:
            services.register(scp, cfg, self.state, self.spool)
        self.receivers = ReceiverProcesses(cfg)
        self.sources = SourcePollers(cfg, self.state, self.spool)
        self._source_names = source_names(cfg)
        # routes with their own stable age: studies are looked at after the shortest one
        # (a series-level route's stable age is its series', not the study's)
        self._route_ages = [r.stable_age for r in cfg.routes
                            if r.stable_age is not None and r.level == "study"]
        self._min_stable_age = min([cfg.stable_age, *self._route_ages])
        # senders asked (C-FIND) how many instances a study has: complete when they are all in
        self._counted = [ae for ae, k in cfg.known_aes.items() if k.count_query]
        self._expecting = [r for r in cfg.routes if r.expect]  # expect: complete early
        self._per_series = [r for r in cfg.routes if r.level == "series"]
        self._stop = threading.Event()
        self._tracker: threading.Thread | None = None
        self._warned_quota = False
        self._cleanup: queue.Queue[str | None] = queue.Queue()
        self._cleaner = threading.Thread(target=self._clean, name="spool-cleanup", daemon=True)
        self._heart: threading.Thread | None = None
        self._next_orphan_scan = 0.0

    # ---- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Recover what a previous run left, then start delivering and receiving."""
        self.state.heartbeat(self._node_info())
        if self.cfg.cluster:
            log.info("node %s of a cluster: state in PostgreSQL (lease %g s), %s, ack_after %s",
                     self.cfg.node_id, self.cfg.state.lease,
                     f"shared spool {self.spool.store.describe()}"  # type: ignore[attr-defined]
                     if self.cfg.shared_spool else "no shared spool (one node only)",
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
        reset, due = self.state.reset_running_jobs()
        if reset:
            log.info("%d delivery job(s) interrupted by an earlier stop are pending again", reset)
        if due:
            log.info("%d failed delivery job(s) are retried now rather than after their backoff",
                     due)
        unrouted = self.state.studies_in_state("unrouted")
        for study in unrouted:  # the routing table may have changed since
            self.complete(study)
        summary = self.state.summary()
        pending = sum(n for q in summary["queues"].values()
                      for s, n in q.items() if s in ("pending", "failed"))
        receiving = sum(1 for s in summary["studies"] if s["state"] == "receiving")
        log.info("state %s: %d study(ies) in the spool (%d receiving), %d job(s) to deliver, "
                 "%d dead", "PostgreSQL" if self.cfg.cluster else self.cfg.state_db,
                 len(summary["studies"]), receiving, pending,
                 len(summary["dead"]))
        for name, dest in self.destinations.items():
            log.info("destination %s: %s", name, dest.describe())
        if self.cfg.sweep is not None:
            log.info("sweep of the spooled studies: %s", self.cfg.sweep.describe())
        self.spool.start()
        self._cleaner.start()
        self.workers.start()
        self._tracker = threading.Thread(target=self._track, name="study-tracker", daemon=True)
        self._tracker.start()
        for scp in self.scps:
            scp.start()
        self.receivers.start()
        self.sources.start()
        if self._web_sock is not None:
            from .web.api import create_app
            from .web.server import WebServer

            metrics.watch_state(self.state, self.cfg.spool)
            self.web = WebServer(create_app(self), self._web_sock)
            self.web.start()
        self._listening = True

    def _node_info(self) -> dict[str, Any]:
        from importlib.metadata import version

        try:
            ours = version("dicomrouter")
        except Exception:
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
        self.sources.stop()
        self.receivers.stop()
        for scp in self.scps:
            scp.stop()
        self._stop.set()
        self.workers.stop()
        self._cleanup.put(None)
        self._cleaner.join(30)
        self.spool.stop()
        if self._tracker:
            self._tracker.join(10)
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

    # ---- study completion ------------------------------------------------------------------

    def _track(self) -> None:
        last_housekeeping = last_expect = 0.0
        plan = self.cfg.sweep
        next_sweep = plan.next_after(self.clock()) if plan is not None else None
        while not self._stop.wait(TICK):
            try:
                for study in self.state.due_studies(self._min_stable_age,
                                                    force_after=self.cfg.force_complete_after):
                    self.complete(study)
                if self._route_ages:
                    for study in self.state.awaiting_studies(self.clock()):
                        self._complete_waiting(study)
                if self._counted and self.state.hold_lease("count-queries", 10.0):
                    self._ask_counts()
                if (self._expecting or self._per_series) and \
                        time.monotonic() - last_expect > 1.0:
                    last_expect = time.monotonic()
                    if self._expecting:
                        self._check_expectations()
                    if self._per_series:
                        self._route_stable_series()
                if plan is not None and next_sweep is not None and self.clock() >= next_sweep:
                    if self.state.hold_lease("sweep", 600.0):  # one node sweeps
                        self.sweep()
                    next_sweep = plan.next_after(self.clock())
                if time.monotonic() - last_housekeeping > 5.0:
                    last_housekeeping = time.monotonic()
                    self._housekeeping()
            except (OSError, sqlite3.Error) as exc:  # a full disk, a locked database: one line
                log.error("study tracker: %s: %s (will try again)", type(exc).__name__, exc)
            except Exception:
                log.exception("study tracker error (will try again)")

    def complete(self, study_uid: str) -> None:
        """Route a stable study: create its delivery jobs, or keep it as unrouted."""
        seen = self.state.study(study_uid)
        if seen is None:
            return
        instances = self.state.instances(study_uid, present_only=False)
        decision = route(self.cfg.routes, instances, self.spool.open, self._source_names)
        counted = bool(self._counted) and self.state.all_announced_in(study_uid)
        forced = self._forced(seen, counted)
        if forced and self.cfg.force_complete == "hold":
            self.state.hold_study(study_uid, forced + "; held (force_complete: hold): reroute "
                                  "it by hand when it is complete")
            log.warning("study %s: %s; held for an operator", study_uid, forced)
            return
        ready_routes, ready, waiting, met = self._ready(decision, seen.last_received,
                                                        counted or bool(forced), instances)
        if waiting and not ready:  # every matching route has a longer stable age: not yet
            self.state.set_await(study_uid, seen.last_received + min(waiting.values()))
            return
        if not self.state.route_study(study_uid, ready, ready_routes, seen, decision.summary()):
            return  # an instance arrived meanwhile; it completes later
        for name, why in met.items():
            self.state.note(study_uid, f"route {name!r}: {why}, before its stable age")
        if forced:
            self.state.note(study_uid, forced + "; routed as it is")
            log.warning("study %s: %s; routed as it is", study_uid, forced)
        if waiting:
            self.state.set_await(study_uid, seen.last_received + min(waiting.values()), "; ".join(
                f"route {name!r} waits for its stable age ({age:g} s)"
                for name, age in waiting.items()))
        self._hold_for_windows(study_uid, ready_routes, ready)
        if seen.state != "unrouted" or ready:
            metrics.STUDIES.labels("routed" if ready else "unrouted").inc()
        new = sum(1 for i in instances if i.generation == seen.generation)
        who = f"patient {seen.patient_id or '?'}, from {seen.calling_ae}"
        if ready:
            log.info("study %s complete (%s): %d new instance(s), generation %d; matched %s "
                     "→ %s%s", study_uid, who, new, seen.generation,
                     ", ".join(repr(r) for r in ready_routes), ", ".join(ready),
                     "; waiting for " + ", ".join(repr(r) for r in waiting) if waiting else "")
            if seen.generation > 1:
                for j in self.state.partial_jobs(study_uid):
                    log.warning("study %s → %s: %d of %d instance(s) were deleted from the "
                                "spool before the study was routed there; it gets the rest "
                                "(partial)", study_uid, j["destination"], j["missing"],
                                len(instances))
            self.workers.notify(ready)
        elif seen.state != "unrouted":
            log.warning("study %s complete (%s): %d instance(s) matched no route; kept in the "
                        "spool as unrouted", study_uid, who, new)

    def _forced(self, seen: Any, counted: bool) -> str:
        """Why a study still receiving is completed anyway (force_complete_after), or ''."""
        after = self.cfg.force_complete_after
        if not after or counted or seen.state != "receiving":
            return ""
        if self.clock() - seen.last_received >= self._min_stable_age:
            return ""  # stable by the timer
        since = self.state.receiving_for(seen.study_uid, self.clock())
        if since < after:
            return ""
        return (f"still receiving after {since:.0f} s: force_complete_after "
                f"({after:g} s) reached")

    def _hold_for_windows(self, study_uid: str, ready_routes: list[str],
                          ready: list[str]) -> None:
        """Jobs only routes with a delivery window created wait for the earliest window."""
        by_name = {r.name: r for r in self.cfg.routes}
        now = self.clock()
        for dest in ready:
            windows = [by_name[n].schedule for n in ready_routes if dest in by_name[n].to]
            if not windows or any(w is None for w in windows) or \
                    any(w.is_open(now) for w in windows):
                continue
            until = min(w.next_open(now) for w in windows)
            self.state.hold_jobs(study_uid, [dest], until, f"delivery to {dest} scheduled for "
                                 f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(until))} "
                                 f"(route window {windows[0].describe()})")

    def _route_stable_series(self) -> None:
        """level: series routes: each series of a receiving study that had no arrival for the
        route's stable age, and that the route's conditions match, goes now on its own."""
        for r in self._per_series:
            age = r.stable_age if r.stable_age is not None else self.cfg.stable_age
            for study_uid, series_uid, generation in self.state.stable_series(
                    age, r.name, self.clock()):
                series = [i for i in self.state.instances(study_uid)
                          if i.series_uid == series_uid and i.generation == generation]
                decision = route([r], series, self.spool.open, self._source_names)
                desc = series[0].tags.get("SeriesDescription", "") if series else ""
                dests = list(decision.destinations)
                why = (f"series {series_uid}" + (f" ({desc})" if desc else "") +
                       f" stable for {age:g} s: " +
                       (f"route {r.name!r} sends it to {', '.join(dests)}" if dests else
                        f"route {r.name!r} does not match it ({decision.summary()})"))
                self.state.route_series(study_uid, series_uid, generation, r.name, dests, why)
                if dests:
                    log.info("study %s: %s", study_uid, why)
                    self.workers.notify(dests)

    def _check_expectations(self) -> None:
        """Receiving studies a route with ``expect`` now matches and finds complete: route
        them (that route) now rather than after the stable age."""
        for uid in self.state.studies_in_state("receiving"):
            instances = self.state.instances(uid, present_only=False)
            if not instances:
                continue
            current = [i for i in instances if i.generation == instances[-1].generation]
            decision = route(self._expecting, current, self.spool.open, self._source_names)
            by_name = {r.name: r for r in self._expecting}
            if any(by_name[n].expectation_met(current) for n in decision.routes):
                self.complete(uid)

    def _ask_counts(self) -> None:
        """Ask senders with ``count_query`` for the instance count of their new studies (one
        C-FIND each); the study then completes as soon as that many are in, before the stable
        age. A sender that cannot say leaves the stable age alone in charge."""
        from pydicom.dataset import Dataset

        from .qrscu import PeerError, Remote, find

        for study_uid, calling in self.state.to_count(self._counted)[:4]:
            known = self.cfg.known_aes[calling]
            remote = Remote(calling, known.host, known.port,
                            known.calling_ae or self.cfg.ae_title, 10.0)
            q = Dataset()
            q.QueryRetrieveLevel = "STUDY"
            q.StudyInstanceUID = study_uid
            q.NumberOfStudyRelatedInstances = ""
            try:
                answers = find(remote, q)
                count = int(answers[0].get("NumberOfStudyRelatedInstances") or 0) \
                    if answers else 0
            except (PeerError, ValueError, TypeError) as exc:
                self.state.set_expected(study_uid, 0, f"{calling} could not say how many "
                                        f"instances the study has ({exc}); the stable age "
                                        "decides")
                continue
            if count > 0:
                self.state.set_expected(study_uid, count, f"{calling} announced {count} "
                                        "instance(s) (C-FIND)")
                log.info("study %s: %s announced %d instance(s)", study_uid, calling, count)
            else:
                self.state.set_expected(study_uid, 0, f"{calling} did not announce an instance "
                                        "count; the stable age decides")

    def _ready(self, decision: Decision, last_received: float, complete: bool = False,
               instances: Sequence[Instance] = ()
               ) -> tuple[list[str], list[str], dict[str, float], dict[str, str]]:
        """The matched routes whose stable age (their own, or the global one) is over, their
        destinations, and the routes still waiting (name → stable age). ``complete``: every
        announced instance is in, no timer needs to pass."""
        by_name = {r.name: r for r in self.cfg.routes}
        met: dict[str, str] = {}  # routes complete by their expectation, and why
        elapsed = float("inf") if complete else self.clock() - last_received
        ready_routes: list[str] = []
        waiting: dict[str, float] = {}
        for name in decision.routes:
            r = by_name.get(name)
            age = r.stable_age if r is not None and r.stable_age is not None and \
                r.level == "study" else self.cfg.stable_age
            if age <= elapsed + 0.05:
                ready_routes.append(name)
            elif r is not None and (why := r.expectation_met(
                    [i for i in instances if i.generation == instances[-1].generation]
                    if instances else [])):
                ready_routes.append(name)  # complete by its expectation, before the timer
                met[name] = why
            else:
                waiting[name] = age
        ready = list(dict.fromkeys(d for name in ready_routes for d in by_name[name].to
                                   if d in decision.destinations))
        return ready_routes, ready, waiting, met

    def _complete_waiting(self, study_uid: str) -> None:
        """A routed study whose next route's own stable age is over: add its destinations."""
        seen = self.state.study(study_uid)
        if seen is None:
            return
        instances = self.state.instances(study_uid, present_only=False)
        decision = route(self.cfg.routes, instances, self.spool.open, self._source_names)
        ready_routes, ready, waiting, _met = self._ready(decision, seen.last_received)
        new = self.state.sweep_study(study_uid, ready, ready_routes,
                                     why="stable age over") if ready else []
        self.state.set_await(study_uid, seen.last_received + min(waiting.values())
                             if waiting else None)
        if new:
            log.info("study %s: the stable age of %s is over → %s", study_uid,
                     ", ".join(repr(r) for r in ready_routes), ", ".join(new))
            self.workers.notify(new)
        elif not waiting and self.state.settle_study(study_uid):  # all were delivered already
            self._log_delivered(study_uid)
            if not self.cfg.keep_after_delivery and self.cfg.retention <= 0:
                self._cleanup.put(study_uid)

    def sweep(self) -> int:
        """Route the spooled studies to what the current table sends them to and they have no
        job for yet; returns how many got new destinations."""
        changed = checked = 0
        for uid in self.state.sweepable_studies():
            if self._stop.is_set():
                break
            instances = self.state.instances(uid)
            if not instances:
                continue
            checked += 1
            decision = route(self.cfg.routes, instances, self.spool.open, self._source_names)
            new = self.state.sweep_study(uid, decision.destinations, decision.routes,
                                         decision.summary())
            if new:
                changed += 1
                log.info("sweep: study %s now also goes to %s (%s)", uid, ", ".join(new),
                         ", ".join(repr(r) for r in decision.routes))
                self.workers.notify(new)
        log.info("sweep: %d study(ies) in the spool checked against the routing table, %d "
                 "routed to new destinations", checked, changed)
        return changed

    # ---- operations (web API) ------------------------------------------------------------------

    def reroute(self, study_uid: str) -> str:
        """Route a study in the spool again with the current rules: 'routed', 'unrouted',
        or 'unknown' (not in the spool)."""
        if not self.state.reopen_study(study_uid):
            return "unknown"
        self.complete(study_uid)
        study = self.state.study(study_uid)
        return study.state if study is not None else "unknown"

    def notify_destination(self, destination: str) -> None:
        self.workers.notify([destination])

    def readiness(self) -> dict[str, str]:
        """What keeps the router from doing its job now (empty: ready)."""
        from .web.api import source_problems, spool_problems

        problems: dict[str, str] = {}
        try:
            rows = self.state.source_rows()
        except Exception as exc:
            problems["state"] = f"state database: {type(exc).__name__}: {exc}"
            rows = []
        if not self.cfg.cluster and not os.access(self.cfg.state_db, os.W_OK):
            problems["state"] = f"state database {self.cfg.state_db} is not writable"
        store = getattr(self.spool, "store", None)
        if store is not None and (why := store.reachable()):
            problems["shared_spool"] = why
        for p in spool_problems(self.cfg.spool, self.cfg.limits.min_free_disk):
            problems["spool"] = p
        if not getattr(self, "_listening", False):
            problems["listener"] = "the DICOM listener is not started"
        for p in source_problems(rows, {n: s.interval for n, s in self.cfg.sources.items()}):
            problems[f"source {p.split()[1]}"] = p
        return problems

    # ---- after delivery --------------------------------------------------------------------

    def _job_finished(self, job: Job, outcome: str) -> None:
        if outcome != "delivered":
            if outcome == "pending":
                self.workers.notify([job.destination])
            return
        if self.state.settle_study(job.study_uid):
            self._log_delivered(job.study_uid)
            if not self.cfg.keep_after_delivery and self.cfg.retention <= 0:
                self._cleanup.put(job.study_uid)  # not on the delivery thread: unlinks are slow

    def _log_delivered(self, study_uid: str) -> None:
        partial = self.state.partial_jobs(study_uid)
        if not partial:
            log.info("study %s delivered to every destination", study_uid)
            return
        log.warning("study %s delivered to every destination, partially to %s: instances "
                    "deleted from the spool before a late arrival routed the study there "
                    "(keep studies for late arrivals with retention)", study_uid,
                    ", ".join(f"{j['destination']} ({j['missing']} missing)" for j in partial))

    def _clean(self) -> None:
        """Delete the spool files of delivered studies (checked again under the study lock)."""
        while True:
            study = self._cleanup.get()
            if study is None:
                return
            try:
                freed = self.spool.delete_delivered(study, "delivered")
                if freed:
                    log.info("study %s: spool files deleted (%d bytes)", study, freed)
            except Exception as exc:
                log.error("study %s: spool cleanup failed (%s: %s); the files stay and are "
                          "deleted at the next housekeeping", study, type(exc).__name__, exc)

    def _housekeeping(self) -> None:
        self.spool.retry_placements()
        if hasattr(self.spool, "prune_local"):  # copies of studies another node deleted
            self.spool.prune_local()
            # objects acknowledged by a node that died before recording them: one node looks
            if time.monotonic() > self._next_orphan_scan and \
                    self.state.hold_lease("shared-orphans", 900.0):
                self._next_orphan_scan = time.monotonic() + 600.0
                self.spool.adopt_shared_orphans()  # type: ignore[attr-defined]
        if not self.cfg.keep_after_delivery:
            # Retention over, or a cleanup that a stop interrupted: delete off this thread.
            cutoff = time.time() - max(self.cfg.retention, 0.0)
            for study in self.state.delivered_in_spool_before(cutoff):
                if self.cfg.retention > 0:
                    log.info("study %s: retention period over", study)
                self._cleanup.put(study)
        if self.spool.max_bytes:
            full = self.spool.over_quota()
            if full and not self._warned_quota:
                log.warning("spool quota reached (%d of %d bytes): new instances are refused "
                            "with 0xA700 until space frees", self.spool.used_bytes,
                            self.spool.max_bytes)
            elif not full and self._warned_quota:
                log.info("spool below its quota again; receiving")
            self._warned_quota = full
