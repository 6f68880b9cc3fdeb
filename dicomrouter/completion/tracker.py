"""The study tracker: finds stable studies and routes them into delivery jobs.

A study is complete when nothing arrived for it for the stable age (the shortest of the global
one and the routes' own), when every instance its sender announced is in (``count_query``),
when a route's ``expect`` is met, or, still receiving, after ``force_complete_after``. Each
matched route fires once its own stable age is over; ``level: series`` routes send each series
once it is stable on its own; route delivery windows hold the jobs they create;
``forward: immediate`` routes send instances as they arrive (forward.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .. import metrics
from ..config import Config
from ..priority import placement, route_priority
from ..processing.remote import LATER, PART, TAKEN, LateResults, RemoteClaims
from ..processing.results import ResultRouter
from ..routing import Decision, cache_fill, route
from ..sources import source_names
from ..spool import Spool
from ..state import STATE_ERRORS, Instance, State, StudyState
from .counts import ask_counts
from .forward import ImmediateForwarder
from .iocm import Corrections
from .mpps import MppsCompletion

log = logging.getLogger("dicomrouter")

TICK = 0.2  # how often stable studies are looked for; bounds the lateness of a completion
EXPECT_EVERY = 1.0  # expect: and level: series are checked this often


class StudyTracker:
    """One thread: each tick completes the studies that became stable, and runs the periodic
    work it is given (``periodic``: the housekeeping) every few seconds."""

    def __init__(self, cfg: Config, state: State, spool: Spool,
                 notify: Callable[[Sequence[str]], None],
                 settled: Callable[[str], None],
                 clock: Callable[[], float] = time.time,
                 events: Callable[..., None] | None = None) -> None:
        self.cfg = cfg
        self.state = state
        self.spool = spool
        self.notify = notify  # wake the delivery workers of these destinations
        self.settled = settled  # a study turned out delivered everywhere already
        self.clock = clock
        # notifications: events(name, study_uid, **facts) (never blocks; see notifications/)
        self.events = events or (lambda *_args, **_facts: None)
        self.source_names = source_names(cfg)
        # routes with their own stable age: studies are looked at after the shortest one
        # (a series-level route's stable age is its series', not the study's)
        self.route_ages = [r.stable_age for r in cfg.routes
                           if r.stable_age is not None and r.level == "study"]
        self.min_stable_age = min([cfg.stable_age, *self.route_ages])
        # senders asked (C-FIND) how many instances a study has: complete when they are all in
        self.counted = [ae for ae, k in cfg.known_aes.items() if k.count_query]
        self.expecting = [r for r in cfg.routes if r.expect]  # expect: complete early
        self.per_series = [r for r in cfg.routes if r.level == "series"]
        self.forwarder = ImmediateForwarder(cfg, state, spool, notify, self.source_names) \
            if any(r.forward == "immediate" for r in cfg.routes) else None
        # MPPS: complete when the listed instances are in; flag incomplete; IAN (mpps.py)
        self.mpps = MppsCompletion(cfg, state, self.complete, self.events, clock)
        self.corrections = Corrections(state, spool, notify)  # IOCM: follow the ledger
        self.results = ResultRouter(cfg, state, notify)  # processing results (issue 29)
        # a remote step's results come back (also late: LateResults)
        self.remote = RemoteClaims(state, spool.open, LateResults(cfg, state, spool))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, periodic: Callable[[], None]) -> None:
        self._thread = threading.Thread(target=self._run, args=(periodic,),
                                        name="study-tracker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self, periodic: Callable[[], None]) -> None:
        last_periodic = last_expect = 0.0
        plan = self.cfg.sweep
        next_sweep = plan.next_after(self.clock()) if plan is not None else None
        while not self._stop.wait(TICK):
            try:
                self.tick()
                if (self.expecting or self.per_series) and \
                        time.monotonic() - last_expect > EXPECT_EVERY:
                    last_expect = time.monotonic()
                    if self.expecting:
                        self.check_expectations()
                    if self.per_series:
                        self.route_stable_series()
                if plan is not None and next_sweep is not None and self.clock() >= next_sweep:
                    if self.state.hold_lease("sweep", 600.0):  # one node sweeps
                        self.sweep()
                    next_sweep = plan.next_after(self.clock())
                if time.monotonic() - last_periodic > 5.0:
                    last_periodic = time.monotonic()
                    periodic()
            except STATE_ERRORS as exc:  # a full disk, a locked database: one line
                log.error("study tracker: %s: %s (will try again)", type(exc).__name__, exc)
            except Exception:
                log.exception("study tracker error (will try again)")

    def tick(self) -> None:
        """Complete what became stable; route what a route's own stable age now lets go;
        forward what arrived for ``forward: immediate`` routes."""
        self.corrections.tick()  # rejection notes first: their cancellations come at once
        for study in self.state.due_studies(self.min_stable_age,
                                            force_after=self.cfg.force_complete_after):
            self.complete(study)
        if self.route_ages:
            for study in self.state.awaiting_studies(self.clock()):
                self.complete_waiting(study)
        if self.counted and self.state.hold_lease("count-queries", 10.0):
            ask_counts(self.cfg, self.state, self.counted)
        if self.forwarder is not None:  # after the completions: its errors are its own
            self.forwarder.tick()
        self.mpps.tick()

    def complete(self, study_uid: str, known_complete: str = "") -> None:
        """Route a stable study: create its delivery jobs, or keep it as unrouted.
        ``known_complete``: why every instance is known to be in (a COMPLETED MPPS), so no
        stable age needs to pass."""
        seen = self.state.study(study_uid)
        if seen is None:
            return
        instances = self.state.instances(study_uid, present_only=False)
        claimed = self.remote.claim(study_uid, seen, instances)
        if claimed in (TAKEN, LATER):
            return  # results of a remote processing step: the step takes them
        if claimed == PART:  # a mixed generation: the rest is routed as usual
            instances = self.state.instances(study_uid, present_only=False)
        if self.results.handle(study_uid, seen, instances):
            return  # processing results: routed by their route's results:, not the table
        decision = route(self.cfg.routes, instances, self.spool.open, self.source_names,
                         orders=self.state.hl7_order)
        counted = bool(known_complete) or (bool(self.counted) and
                                           self.state.all_announced_in(study_uid))
        forced = self._forced(seen, counted)
        if forced and self.cfg.force_complete == "hold":
            self.state.hold_study(study_uid, forced + "; held (force_complete: hold): reroute "
                                  "it by hand when it is complete")
            log.warning("study %s: %s; held for an operator", study_uid, forced)
            self.events("held", study_uid, reason=forced + " (force_complete: hold)",
                        routes=list(decision.routes), destinations=list(decision.destinations))
            return
        ready_routes, ready, waiting, met = self._ready(decision, seen.last_received,
                                                        counted or bool(forced), instances)
        if waiting and not ready:  # every matching route has a longer stable age: not yet
            self.state.set_await(study_uid, seen.last_received + min(waiting.values()))
            return
        # every matching route places the jobs, also one still waiting for its stable age:
        # a hold (or a priority) is never bypassed by another route being ready first
        placed = placement(self.cfg.routes, decision.routes, ready)
        if not self.state.route_study(study_uid, ready, ready_routes, seen, decision.summary(),
                                      placed):
            return  # an instance arrived meanwhile; it completes later
        self.corrections.after_routing(study_uid, seen.generation, ready)
        self._say_held(study_uid, decision.routes, placed.held)
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
        if seen.state != StudyState.UNROUTED or ready:
            metrics.STUDIES.labels("routed" if ready else "unrouted").inc()
            facts = {"routes": ready_routes, "destinations": ready, "generation": seen.generation,
                     "calling_ae": seen.calling_ae, "instances": len(instances),
                     "new_instances": sum(1 for i in instances
                                          if i.generation == seen.generation)}
            self.events("completed", study_uid, **facts, waiting_routes=list(waiting))
            self.mpps.completed(study_uid, instances)
            if ready:
                self.events("routed", study_uid, **facts)
        self._log_routed(study_uid, seen, instances, ready_routes, ready, waiting)

    def _log_routed(self, study_uid: str, seen: Any, instances: Sequence[Instance],
                    ready_routes: list[str], ready: list[str], waiting: dict[str, float]) -> None:
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
            self.notify(ready)
        elif seen.state != StudyState.UNROUTED and cache_fill(instances):
            log.info("study %s complete (%s): fetched by the Q/R proxy, so only routes naming "
                     "Proxied see it and none matched; kept in the spool as a cache", study_uid,
                     who)
        elif seen.state != StudyState.UNROUTED:
            log.warning("study %s complete (%s): %d instance(s) matched no route; kept in the "
                        "spool as unrouted", study_uid, who, new)

    def _forced(self, seen: Any, counted: bool) -> str:
        """Why a study still receiving is completed anyway (force_complete_after), or ''."""
        after = self.cfg.force_complete_after
        if not after or counted or seen.state != StudyState.RECEIVING:
            return ""
        if self.clock() - seen.last_received >= self.min_stable_age:
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

    def route_stable_series(self) -> None:
        """level: series routes: each series of a receiving study that had no arrival for the
        route's stable age, and that the route's conditions match, goes now on its own."""
        for r in self.per_series:
            age = r.stable_age if r.stable_age is not None else self.cfg.stable_age
            for study_uid, series_uid, generation in self.state.stable_series(
                    age, r.name, self.clock()):
                series = [i for i in self.state.instances(study_uid)
                          if i.series_uid == series_uid and i.generation == generation]
                decision = route([r], series, self.spool.open, self.source_names,
                                 orders=self.state.hl7_order)
                desc = series[0].tags.get("SeriesDescription", "") if series else ""
                dests = list(decision.destinations)
                why = (f"series {series_uid}" + (f" ({desc})" if desc else "") +
                       f" stable for {age:g} s: " +
                       (f"route {r.name!r} sends it to {', '.join(dests)}" if dests else
                        f"route {r.name!r} does not match it ({decision.summary()})"))
                self.state.route_series(study_uid, series_uid, generation, r.name, dests, why,
                                        route_priority(r))
                if dests:
                    log.info("study %s: %s", study_uid, why)
                    self.notify(dests)
                    self.events("routed", study_uid, routes=[r.name], destinations=dests,
                                series_instance_uid=series_uid, instances=len(series))

    def check_expectations(self) -> None:
        """Receiving studies a route with ``expect`` now matches and finds complete: route
        them (that route) now rather than after the stable age."""
        for uid in self.state.studies_in_state("receiving"):
            instances = self.state.instances(uid, present_only=False)
            if not instances:
                continue
            current = [i for i in instances if i.generation == instances[-1].generation]
            decision = route(self.expecting, current, self.spool.open, self.source_names,
                             orders=self.state.hl7_order)
            by_name = {r.name: r for r in self.expecting}
            if any(by_name[n].expectation_met(current) for n in decision.routes):
                self.complete(uid)

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

    def complete_waiting(self, study_uid: str) -> None:
        """A routed study whose next route's own stable age is over: add its destinations."""
        seen = self.state.study(study_uid)
        if seen is None:
            return
        instances = self.state.instances(study_uid, present_only=False)
        decision = route(self.cfg.routes, instances, self.spool.open, self.source_names,
                         orders=self.state.hl7_order)
        ready_routes, ready, waiting, _met = self._ready(decision, seen.last_received)
        new = self._add_jobs(study_uid, decision, ready, ready_routes, "stable age over")
        self.state.set_await(study_uid, seen.last_received + min(waiting.values())
                             if waiting else None)
        if new:
            self.corrections.after_routing(study_uid, seen.generation, ready)
            log.info("study %s: the stable age of %s is over → %s", study_uid,
                     ", ".join(repr(r) for r in ready_routes), ", ".join(new))
            self.notify(new)
            self.events("routed", study_uid, routes=ready_routes, destinations=new,
                        instances=len(instances))
        elif not waiting and self.state.settle_study(study_uid):  # all were delivered already
            self.settled(study_uid)

    def _add_jobs(self, study_uid: str, decision: Decision, dests: Sequence[str],
                  routes: Sequence[str], why: str, explanation: str = "") -> list[str]:
        """Jobs for ``dests`` the study has none for yet (those are returned), placed by every
        matching route; jobs already queued there that a matching route holds are held now
        (or get its priority). Says which were held."""
        if not dests:
            return []
        placed = placement(self.cfg.routes, decision.routes, dests)
        held = self.state.hold_placed(study_uid, placed)
        new = self.state.sweep_study(study_uid, dests, routes, explanation, why, placed)
        self._say_held(study_uid, decision.routes,
                       set(held).union(d for d in new if d in placed.held))
        return new

    def _say_held(self, study_uid: str, routes: Sequence[str], held: Iterable[str]) -> None:
        """The log line and the ``held`` notification for jobs a hold: true route held."""
        dests = sorted(held)
        if not dests:
            return
        log.info("study %s: held for %s (a route with hold: true) until 'dicomrouter "
                 "release' or 'reject'", study_uid, ", ".join(dests))
        self.events("held", study_uid, reason="a route with hold: true", routes=list(routes),
                    destinations=dests)

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
            decision = route(self.cfg.routes, instances, self.spool.open, self.source_names,
                             orders=self.state.hl7_order)
            new = self._add_jobs(uid, decision, decision.destinations, decision.routes,
                                 "sweep", decision.summary())
            if new:
                changed += 1
                log.info("sweep: study %s now also goes to %s (%s)", uid, ", ".join(new),
                         ", ".join(repr(r) for r in decision.routes))
                self.notify(new)
                self.events("routed", uid, routes=list(decision.routes), destinations=new,
                            instances=len(instances))
        log.info("sweep: %d study(ies) in the spool checked against the routing table, %d "
                 "routed to new destinations", checked, changed)
        return changed

    def reroute(self, study_uid: str) -> str:
        """Route a study in the spool again with the current rules: 'routed', 'unrouted',
        or 'unknown' (not in the spool)."""
        if not self.state.reopen_study(study_uid):
            return "unknown"
        self.complete(study_uid)
        study = self.state.study(study_uid)
        return study.state if study is not None else "unknown"
