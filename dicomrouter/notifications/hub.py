"""The notifier: where the router's parts report events, and the dispatcher that turns each
into the payload the subscribed notifications send.

``emit`` is called on the tracker's and the delivery workers' threads: it only puts the event
into a bounded queue (full: dropped, counted per notification that wanted it). The dispatcher
thread reads what the payload needs from the state (a job's attempts and error, a study's
counts) and hands it to each notification that wants it (``send.Target``).

``received`` is seen by polling the studies that are receiving (every ``RECEIVED_POLL`` s,
only when a notification subscribes to it): instances come in through the listener, the
receiver processes and the pull sources, in this process or others (several routers), and the
state is where they all meet. One event per study arrival: the first instance of a study, or
of a late arrival that reopens it (its generation). The studies receiving when the router
starts were announced by the run before: not again (at most once). With several routers one
node announces (a lease).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import Any

from ..config import Config
from ..state import STATE_ERRORS, State
from .events import Event, StudyTags, default_payload, iso, wanted
from .send import Pending, Target, build_targets

log = logging.getLogger("dicomrouter.notifications")

RECEIVED_POLL = 0.25  # s between two looks for new receiving studies
INBOX = 10_000  # events waiting for the dispatcher


class Notifier:
    """Events in (``emit``), notifications out; inert without ``notifications:``."""

    def __init__(self, cfg: Config, state: State) -> None:
        self.cfg = cfg
        self.state = state
        self.targets: list[Target] = build_targets(cfg.notifications)
        self._inbox: queue.Queue[Event | None] = queue.Queue(INBOX)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._receiving: set[tuple[str, int]] | None = None  # (study, generation) seen
        self._inbox_full = False

    @property
    def enabled(self) -> bool:
        return bool(self.targets)

    def wants(self, name: str) -> bool:
        return any(name in t.model.events for t in self.targets)

    # ---- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        if not self.targets:
            return
        if self.wants("received"):
            self._receiving = self._receiving_now()  # announced by the run before
            self._threads.append(threading.Thread(target=self._watch_receiving,
                                                  name="notify-received", daemon=True))
        self._threads.append(threading.Thread(target=self._dispatch, name="notify-dispatch",
                                              daemon=True))
        for t in self._threads:
            t.start()
        for target in self.targets:
            target.start()
            log.info("notification %s: %s on %s", target.name, target.where,
                     ", ".join(target.model.events))

    def stop(self) -> None:
        """Stop without waiting for receivers (each notification's attempt under way gets a
        moment); what is queued is not sent."""
        if not self.targets:
            return
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._inbox.put_nowait(None)
        for target in self.targets:  # all at once: each may be waiting for a receiver
            target.request_stop()
        deadline = time.monotonic() + 2.0
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for target in self.targets:
            target.stop(max(0.0, deadline - time.monotonic()))

    # ---- events in --------------------------------------------------------------------------

    def emit(self, name: str, study_uid: str, **facts: Any) -> None:
        """Report an event (see ``EVENTS``). Never blocks nor raises: queued, or dropped
        with one log line while the queue is full."""
        if not self.targets:
            return
        event = Event(name, study_uid, facts=facts)
        if not any(wanted(t.model, event) for t in self.targets):
            return
        try:
            self._inbox.put_nowait(event)
            self._inbox_full = False
        except queue.Full:
            if not self._inbox_full:
                log.warning("notifications: %d events wait for the dispatcher; dropping new "
                            "ones until it catches up", INBOX)
            self._inbox_full = True
            for t in self.targets:
                if wanted(t.model, event):
                    t.offer_dropped()

    def held(self, study_uid: str, reason: str, routes: list[str] | None = None,
             destinations: list[str] | None = None) -> None:
        """A study held for an operator (``force_complete: hold``, a route's ``hold``)."""
        self.emit("held", study_uid, reason=reason, routes=list(routes or []),
                  destinations=list(destinations or []))

    # ---- the dispatcher ---------------------------------------------------------------------

    def _dispatch(self) -> None:
        while not self._stop.is_set():
            try:
                event = self._inbox.get(timeout=1.0)
            except queue.Empty:
                continue
            if event is None:
                return
            try:
                self._enrich(event)
            except STATE_ERRORS as exc:  # sent with what the event has
                log.warning("notifications: %s event of study %s: state not readable (%s: %s); "
                            "sent without its counts", event.name, event.study_uid,
                            type(exc).__name__, exc)
            except Exception as exc:
                log.error("notifications: %s event of study %s: internal error %s: %s",
                          event.name, event.study_uid, type(exc).__name__, exc)
            payload = default_payload(event, self.cfg.ae_title, str(self.cfg.node_id))
            study = StudyTags(self.state, event.study_uid)
            for target in self.targets:
                if wanted(target.model, event):
                    target.offer(Pending(event, payload, study))

    def _enrich(self, event: Event) -> None:
        """Add what the state knows and the emitter did not have at hand."""
        facts = event.facts
        if event.name in ("delivered", "failed", "dead") and facts.get("destination"):
            rows = self.state.jobs(destination=facts["destination"],
                                   study_uids=[event.study_uid], limit=1)
            if rows:
                job = rows[0]
                facts.setdefault("routes", job["routes"])
                facts["instances"] = job["delivered"]
                facts["instances_in_study"] = job["total"]
                study = self.state.study(event.study_uid)
                # receiving: a forward: immediate or level: series run; more may follow
                facts["study_state"] = str(study.state) if study is not None else None
                if event.name != "delivered":
                    dest = self.cfg.destinations.get(facts["destination"])
                    facts["max_attempts"] = dest.retry_policy.max_attempts if dest else None
                    facts["error"] = job["last_error"]
                    if event.name == "failed":  # when it failed, not when this reads it
                        facts["next_attempt"] = iso(event.at + facts.pop("retry_in", 0.0))
        elif event.name in ("received", "completed") and "instances" not in facts:
            rows = self.state.study_rows(study_uid=event.study_uid)
            if rows:
                facts.setdefault("calling_ae", rows[0]["calling_ae"])
                facts.setdefault("generation", rows[0]["generation"])
                facts["instances"] = rows[0]["instances_received"]

    # ---- received ---------------------------------------------------------------------------

    def _receiving_now(self) -> set[tuple[str, int]]:
        try:
            return {(uid, gen) for uid, gen, _last in self.state.receiving_studies()}
        except STATE_ERRORS as exc:
            log.warning("notifications: cannot read the receiving studies (%s: %s)",
                        type(exc).__name__, exc)
            return set()

    def _watch_receiving(self) -> None:
        failing = False
        while not self._stop.wait(RECEIVED_POLL):
            try:
                now = {(uid, gen) for uid, gen, _last in self.state.receiving_studies()}
                new = now - (self._receiving or set())
                self._receiving = now  # a study that completes and is reopened: a new generation
                if new and (not self.cfg.cluster or
                            self.state.hold_lease("notify-received", 10.0)):
                    for uid, gen in sorted(new, key=lambda x: x[0]):
                        self.emit("received", uid, generation=gen)
                failing = False
            except STATE_ERRORS as exc:
                if not failing:
                    log.warning("notifications: cannot read the receiving studies (%s: %s); "
                                "will try again", type(exc).__name__, exc)
                failing = True
            except Exception as exc:
                log.error("notifications: received watcher: internal error %s: %s",
                          type(exc).__name__, exc)
