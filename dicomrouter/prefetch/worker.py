"""The prefetcher: turns triggers into durable queue rows and runs them off every receive
thread.

A watcher thread looks at the receiving studies (every 0.5 s, like the ``received``
notification): a study it has not seen, not itself a prior, is evaluated against the
``trigger: study`` rules on its first instance. ``on_order`` (the HL7 listener calls it) does the
same for ``trigger: order`` rules. A trigger is a row in the state (``prefetch_triggers``): the same
trigger again is nothing, a trigger of the rule for the same patient inside ``suppress_for`` is
recorded as suppressed; both survive a restart. ``prefetch_workers`` threads run the queue:
query the peer, choose the priors, skip what the destinations hold, mark each prior
(``prefetch_studies``, before its retrieve: the routing sees ``Prefetch`` from its first
instance on) and retrieve what the router lacks of it. A failure is retried with the rule's
``retry`` backoff; every decision goes into the history of the triggering study and of each
prior."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import metrics
from ..config import Config
from ..config.prefetch import PrefetchModel, order_trigger_key
from ..destinations.base import Context
from ..logsafe import escape as esc
from ..qrscu import PeerError, Remote
from ..routing import conditions_hold
from ..rules import all_hold
from ..sources import build as build_source
from ..sources import source_names
from ..sources.base import PullError
from ..spool import Spool
from ..spool.faults import crash_point
from ..state import STATE_ERRORS, State
from .dicom import DicomPriors, held_count, tls_for
from .dicomweb import WebPriors
from .priors import CHOSEN, Candidate, choose, cutoff

log = logging.getLogger("dicomrouter.prefetch")

WATCH_EVERY = 0.5  # new studies are looked for this often
PLACED_WAIT = 10.0  # C-MOVE sub-operations are answered before the router records them


class PrefetchError(Exception):
    """A prefetch run could not finish (peer down, refused, timed out): retried."""


class Prefetcher:
    """Prior prefetch: ``start``/``stop`` with the router; ``on_order`` for HL7 orders."""

    def __init__(self, cfg: Config, state: State, spool: Spool,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.state = state
        self.spool = spool
        self.clock = clock
        self.rules = {r.name: r for r in cfg.prefetch}
        self.on_study = [r for r in cfg.prefetch if r.trigger == "study"]
        self.on_orders = [r for r in cfg.prefetch if r.trigger == "order"]
        self.sources = source_names(cfg)
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._wake = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._web: dict[str, WebPriors] = {}  # dicomweb sources (their HTTP sessions)

    @property
    def enabled(self) -> bool:
        return bool(self.rules)

    # ---- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if not self.enabled:
            return
        reset = self.state.prefetch_reset_running()
        if reset:
            log.info("prefetch: %d run(s) interrupted by an earlier stop are due again", reset)
        for r in self.cfg.prefetch:
            log.info("prefetch rule %s: %s", r.name, r.describe())
        if self.on_orders and not (self.cfg.hl7 and any(h.prefetch for h in self.cfg.hl7_rules)):
            log.warning("prefetch rule(s) %s: trigger: order, but %s: no HL7 order reaches "
                        "them", ", ".join(r.name for r in self.on_orders),
                        "no hl7: listener" if not self.cfg.hl7 else
                        "no hl7_rules rule has prefetch: true")
        if self.on_study:
            self._spawn(self._watch, "prefetch-watch")
        for i in range(self.cfg.prefetch_workers):
            self._spawn(self._work, f"prefetch-{i + 1}")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self.wake()
        for t in self._threads:
            t.join(10)

    def wake(self) -> None:
        with self._wake:
            self._wake.notify_all()

    # ---- triggers ------------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_EVERY):
            try:
                self.look()
            except STATE_ERRORS as exc:
                log.error("prefetch: %s: %s (will try again)", type(exc).__name__, exc)
            except Exception:
                log.exception("prefetch: watching for new studies failed (will try again)")

    def look(self) -> None:
        """Evaluate the studies that started receiving since the last look."""
        receiving = {uid for uid, _gen, _last in self.state.receiving_studies()}
        for uid in sorted(receiving - self._seen):
            self.study_arrived(uid)
        self._seen = receiving

    def study_arrived(self, study_uid: str) -> None:
        """A new study: the ``trigger: study`` rules whose ``when`` holds on its first instance
        trigger (a prior a prefetch brought triggers nothing)."""
        if self.state.prefetch_prior(study_uid) is not None:
            return
        instances = self.state.instances(study_uid, present_only=False)
        if not instances:
            return
        first = instances[:1]
        tags = first[0].tags
        patient = (tags.get("PatientID") or "").strip()
        for rule in self.on_study:
            held, why = conditions_hold(rule.when, first, self.spool.open, self.sources,
                                        orders=self.state.hl7_order)
            if not held:
                log.debug("prefetch rule %s: study %s does not trigger it (%s)", rule.name,
                          study_uid, why)
                continue
            detail = {"patient_id": patient, "study_uid": study_uid,
                      "accession": (tags.get("AccessionNumber") or "").strip(), "why": why}
            self._trigger(rule, study_uid, patient, study_uid, detail, f"new study ({why})")

    def on_order(self, order: dict[str, Any]) -> None:
        """An HL7 order (ORM^O01 / OMI^O23, parsed by the HL7 listener): the ``trigger: order``
        rules whose ``when`` holds on its fields trigger. Returns at once: the queries and
        retrieves run on the prefetch workers."""
        def values(key: str) -> list[str]:
            value = order.get(key)
            return [str(value).strip()] if value not in (None, "") else [""]

        patient = str(order.get("patient_id") or "").strip()
        study_uid = str(order.get("study_uid") or "").strip()
        control = str(order.get("control_id") or "").strip()
        accession = str(order.get("accession") or "").strip()
        key = order_trigger_key(order)
        for rule in self.on_orders:
            held, why = all_hold(rule.when, values) if rule.when else (True, "no conditions")
            if not held:
                log.debug("prefetch rule %s: order %s does not trigger it (%s)", rule.name,
                          esc(key), why)
                continue
            detail = {"patient_id": patient, "study_uid": study_uid, "accession": accession,
                      "why": why, "order": {k: order.get(k) for k in order}}
            what = (f"order {esc(control or accession or '?')} "
                    f"({esc(str(order.get('message_type') or 'order'))}: {why})")
            self._trigger(rule, key, patient, study_uid, detail, what)
        self.wake()

    def _trigger(self, rule: PrefetchModel, key: str, patient: str, study_uid: str,
                 detail: dict[str, Any], what: str) -> None:
        story = study_uid or key  # an order without a Study Instance UID: its own history
        if not patient:
            self._note(story, f"prefetch rule {rule.name!r}: not triggered by {what}: "
                       "no PatientID")
            return
        outcome, earlier = self.state.prefetch_trigger(rule.name, key, patient, study_uid,
                                                       detail, rule.suppress_for, self.clock())
        if outcome == "seen":
            return
        if outcome == "suppressed":
            assert earlier is not None
            ago = self.clock() - float(earlier["created"])
            text = (f"prefetch rule {rule.name!r}: suppressed: {what} for patient "
                    f"{esc(patient)}, but {esc(earlier['trigger_key'])} triggered it "
                    f"{ago:.0f} s ago (suppress_for {rule.suppress_for:g} s): no second "
                    "retrieve")
            log.info("%s", esc(text))
            self._note(story, text)
            metrics.PREFETCH_RUNS.labels(rule.name, "suppressed").inc()
            return
        text = (f"prefetch rule {rule.name!r}: triggered by {what}: priors of patient "
                f"{esc(patient)} to be queried at {rule.source}")
        log.info("%s", esc(text))
        self._note(story, text)
        self.wake()

    def _note(self, study_uid: str, text: str) -> None:
        if study_uid:
            self.state.note(study_uid, text)

    # ---- the queue -----------------------------------------------------------------------------

    def _work(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                due = self.state.prefetch_next_due()  # a read: an idle worker writes nothing
                row = None
                if due is not None and due <= self.clock() and \
                        self.state.hold_lease("prefetch", 30.0):  # one node runs the queue
                    row = self.state.prefetch_claim(self.clock())
                backoff = 1.0
            except STATE_ERRORS as exc:
                log.error("prefetch: %s: %s (will try again)", type(exc).__name__, exc)
                self._stop.wait(backoff)
                backoff = min(30.0, backoff * 2)
                continue
            if row is None:
                wait = 1.0 if due is None else max(0.05, min(1.0, due - self.clock()))
                with self._wake:
                    self._wake.wait(wait)
                continue
            try:
                self.run(row)
            except Exception as exc:  # never lose the worker; the row is retried
                log.exception("prefetch rule %s: run for %s failed", row["rule"],
                              row["trigger_key"])
                self._failed(row, f"{type(exc).__name__}: {exc}")

    def run(self, row: dict[str, Any]) -> None:
        """One trigger: query, choose, skip what is held, retrieve; the outcome recorded."""
        rule = self.rules.get(row["rule"])
        if rule is None:
            self.state.prefetch_finished(row["rule"], row["trigger_key"], "dead",
                                         "the rule is no longer configured")
            return
        detail = row["detail"]
        try:
            outcome = self._prefetch(rule, row["trigger_key"], detail)
        except (PrefetchError, PeerError, PullError) as exc:
            self._failed(row, str(exc))
            return
        self.state.prefetch_finished(rule.name, row["trigger_key"], "done", outcome,
                                     attempts=row["attempts"] + 1)
        metrics.PREFETCH_RUNS.labels(rule.name, "done").inc()
        log.info("prefetch rule %s for %s: %s", rule.name, esc(row["trigger_key"]), esc(outcome))

    def _failed(self, row: dict[str, Any], error: str) -> None:
        rule = self.rules.get(row["rule"])
        attempts = row["attempts"] + 1
        policy = rule.retry.policy(self.cfg.retry) if rule is not None else None
        study_uid = row["detail"].get("study_uid", "") or row["trigger_key"]
        if policy is None or attempts >= int(policy.max_attempts):
            self.state.prefetch_finished(row["rule"], row["trigger_key"], "dead",
                                         "gave up", error, attempts=attempts)
            metrics.PREFETCH_RUNS.labels(row["rule"], "dead").inc()
            text = (f"prefetch rule {row['rule']!r}: failed {attempts} time(s), gave up: "
                    f"{error}")
            log.error("%s (trigger %s)", esc(text), esc(row["trigger_key"]))
        else:
            delay = policy.delay(attempts)
            self.state.prefetch_finished(row["rule"], row["trigger_key"], "failed", "",
                                         error, self.clock() + delay, attempts)
            metrics.PREFETCH_RUNS.labels(row["rule"], "failed").inc()
            text = (f"prefetch rule {row['rule']!r}: attempt {attempts} failed: {error}; "
                    f"retried in {delay:g} s")
            log.warning("%s (trigger %s)", esc(text), esc(row["trigger_key"]))
        self._note(study_uid, text)

    # ---- one run -------------------------------------------------------------------------------

    def _peer(self, rule: PrefetchModel) -> Any:
        """The peer of ``from``: DicomPriors (a known AE, a dicom source) or WebPriors (a
        dicomweb source: its timeout is the source's own)."""
        known = self.cfg.known_aes.get(rule.source)
        if known is not None:
            remote = Remote(rule.source, known.host, known.port,
                            known.calling_ae or self.cfg.ae_title, rule.timeout)
        else:
            src: Any = self.cfg.sources[rule.source]
            if src.type == "dicomweb":
                if rule.source not in self._web:
                    context = Context(self.cfg.ae_title, self.state, self.spool, self.cfg,
                                      self.clock)
                    self._web[rule.source] = WebPriors(build_source(src, context))
                return self._web[rule.source]
            remote = Remote(src.ae_title, src.host, src.port,
                            src.calling_ae_title or self.cfg.ae_title, rule.timeout,
                            tls_for(src.tls))
        return DicomPriors(remote, rule.query_model, rule.retrieve, self.cfg.ae_title,
                           self.spool)

    def _prefetch(self, rule: PrefetchModel, key: str, detail: dict[str, Any]) -> str:
        patient = detail["patient_id"]
        trigger_study = detail.get("study_uid", "")
        story = trigger_study or key  # where the decisions go (see order_trigger_key)
        peer = self._peer(rule)
        oldest = cutoff(rule, self.clock())
        candidates = peer.studies(patient)
        verdicts = choose(rule, candidates, trigger_study,
                          detail.get("accession", "") if key.startswith("order:") else "",
                          oldest, lambda c: peer.series(patient, c.uid))
        head = f"prefetch rule {rule.name!r}"
        self._note(story, f"{head}: {len(candidates)} candidate(s) for patient "
                   f"{esc(patient)} at {peer.describe()}")
        for c, verdict in verdicts:
            self._note(story, f"{head}: prior {c.describe()}: {verdict}")
        chosen = [c for c, verdict in verdicts if verdict == CHOSEN]
        done: list[str] = []
        for c in chosen:
            if self._stop.is_set():
                raise PrefetchError("stopping")
            done.append(self._one(rule, key, peer, patient, trigger_study, c, story))
        return (f"{len(candidates)} candidate(s), {len(chosen)} chosen"
                + (": " + "; ".join(done) if done else ""))

    def _one(self, rule: PrefetchModel, key: str, peer: Any, patient: str,
             trigger_study: str, c: Candidate, story: str) -> str:
        """Skip a prior the destinations hold, else mark it and retrieve what is missing;
        ``story``: the history the trigger's decisions go to."""
        head = f"prefetch rule {rule.name!r}"
        holders = self._held(rule, c)
        if holders is not None:
            text = f"prior {c.uid}: skipped: held by {holders}"
            self._note(story, f"{head}: {text}")
            return text
        held = self.state.source_held(c.uid)
        if held and self.state.prefetch_prior(c.uid) is None:
            text = (f"prior {c.uid}: skipped: the router received it otherwise "
                    f"({len(held)} instance(s)); its routing stands")
            self._note(story, f"{head}: {text}")
            return text
        self.state.prefetch_mark_prior(c.uid, rule.name, key)
        why = f"for {'study ' + trigger_study if trigger_study else key}"
        self.state.note(c.uid, f"{head}: prefetched {why} (patient {esc(patient)}) from "
                        f"{peer.describe()}")
        if c.count is not None and len(held) >= c.count:
            text = f"prior {c.uid}: already in the router ({len(held)} instance(s))"
            self._note(story, f"{head}: {text}")
            return text
        results = peer.fetch(patient, c.uid, held)
        done = sum(r.completed + r.warning for r in results)
        if peer.retrieve_by == "move" and c.count is not None:
            self._await_placement(c.uid, min(c.count, len(held) + done))
        brought = len(self.state.source_held(c.uid)) - len(held)
        metrics.PREFETCH_INSTANCES.labels(rule.name).inc(max(0, brought))
        crash_point("prefetch-retrieved")  # the crash tests: after a retrieve, before its end
        bad = [r for r in results if not r.ok]
        text = (f"prior {c.uid}: retrieved {brought} instance(s) "
                f"({len(results)} retrieve(s); routed as PrefetchRule {rule.name!r} → "
                f"{', '.join(rule.to)})")
        self.state.note(c.uid, f"{head}: {text.split(': ', 1)[1]}")
        self._note(story, f"{head}: {text}")
        if bad:
            raise PrefetchError(f"prior {c.uid}: {len(bad)} of {len(results)} retrieve(s) "
                                f"failed, first: {bad[0].describe()}")
        return text

    def _held(self, rule: PrefetchModel, c: Candidate) -> str | None:
        """Who holds the prior whole already: every destination of ``to`` is a dicom one
        whose C-FIND counts at least the peer's instances. None: fetch it."""
        if not rule.check_held or c.count is None:
            return None
        said: list[str] = []
        for name in rule.to:
            d: Any = self.cfg.destinations[name]
            if d.type != "dicom":
                return None
            remote = Remote(d.ae_title, d.host, d.port, d.calling_ae_title or self.cfg.ae_title,
                            rule.timeout, tls_for(d.tls))
            n = held_count(remote, c.uid)
            if n is None or n < c.count:
                return None
            said.append(f"{name} ({n} ≥ {c.count} instance(s))")
        return ", ".join(said)

    def _await_placement(self, study: str, target: int) -> None:
        deadline = time.monotonic() + PLACED_WAIT
        while time.monotonic() < deadline and not self._stop.is_set():
            if len(self.state.source_held(study)) >= target:
                return
            time.sleep(0.05)


__all__ = ["PrefetchError", "Prefetcher"]
