"""Delivery workers: take jobs from the state database and send their instances.

A job is one (study, destination). Each run sends only the instances the ledger does not show as
delivered there, so a retry or a restart never re-sends what already arrived (except the single
instance that was on the wire when the process died, one per association with
``associations: N``: it is counted in ``ledger.sends``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import metrics, ordering
from .breaker import Breakers
from .coerce import Coercer
from .config import Config
from .destinations import DeliveryError, Destination, InstanceRejected
from .destinations.base import Interrupted, PermanentFailure
from .feed import ForwardFeed
from .groups import Groups
from .priority import chunks
from .rules import keys_of
from .spool import Spool, SpoolReader
from .state import Instance, Job, JobState, State
from .transforms import TransformError, bind, transform_file
from .values import PROXIED_TAG

log = logging.getLogger("dicomrouter.delivery")

MIN_PER_ASSOCIATION = 8  # a smaller study is not worth another association


@dataclasses.dataclass
class RunResult:
    """What one session (or all sessions of a run) achieved."""

    sent: int = 0
    rejected: list[str] = dataclasses.field(default_factory=list)  # "uid: reason"
    error: str | None = None  # the destination failed as a whole
    error_permanent: bool = False  # ... and waiting will not heal it
    rejected_permanent: int = 0  # how many of ``rejected`` will be refused again
    interrupted: bool = False  # the workers stopped before every instance was sent
    taken: int = 0  # instances the session started on (a forwarding run's share)
    yielded: bool = False  # stopped after a chunk: a more urgent job of the destination is due
    unreachable: bool = False  # a transient DeliveryError: counts for the circuit breaker

    @property
    def permanent(self) -> bool:
        """Dead-letter at once: the failure is permanent, or every refusal is."""
        if self.error is not None:
            return self.error_permanent
        return bool(self.rejected) and self.rejected_permanent == len(self.rejected)

    def add(self, other: RunResult) -> None:
        self.sent += other.sent
        self.rejected += other.rejected
        self.rejected_permanent += other.rejected_permanent
        self.interrupted = self.interrupted or other.interrupted
        self.taken += other.taken
        self.unreachable = self.unreachable or other.unreachable
        if self.error is None and other.error is not None:
            self.error, self.error_permanent = other.error, other.error_permanent


class DeliveryWorkers:
    """``concurrency`` threads per destination, woken when jobs appear or come due."""

    def __init__(self, cfg: Config, state: State, spool: Spool,
                 destinations: dict[str, Destination],
                 on_finished: Callable[[Job, str], None],
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock  # injectable: delivery windows are tested by moving it
        self.state = state
        self.spool = spool
        self.destinations = destinations
        self.on_finished = on_finished
        # one condition per destination: a study routed to A wakes only A's workers
        self._wake = {name: threading.Condition() for name in destinations}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._waiting: set[str] = set()  # destinations waiting for their window (logged once)
        self.breakers = Breakers(cfg, state, destinations, self.notify)
        self.groups = Groups(state, destinations, self.breakers, self.notify)  # type: group
        self.coercer = Coercer(cfg, state)  # coerce: lookups before the transforms
        self._coercions: dict[int, tuple[Any, ...]] = {}  # job id → this run's coercions

    def start(self) -> None:
        # transformed copies left by a crash were never delivered from: remove them
        shutil.rmtree(os.path.join(self.spool.root, "transforms"), ignore_errors=True)
        for name, dest in self.destinations.items():
            # each destination's temporary files (a study's zip) on the spool's disk, in a
            # folder of its own: never mistaken for a receive slot at the next start
            dest.workdir = Path(self.spool.root) / "exports" / name
            for line in dest.recover():
                log.warning("destination %s: %s", name, line)
        for name, dest in self.destinations.items():
            for n in range(self.cfg.destinations[name].concurrency):
                t = threading.Thread(target=self._loop, args=(dest,), daemon=True,
                                     name=f"deliver-{name}-{n}")
                t.start()
                self._threads.append(t)

    def notify(self, destinations: Iterable[str] | None = None) -> None:
        """Wake the workers of these destinations (all when None): jobs appeared or came due."""
        for name in self._wake if destinations is None else destinations:
            cond = self._wake.get(name)
            if cond is not None:
                with cond:
                    cond.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        for dest in self.destinations.values():  # a max_rate wait ends now (ratelimit.py)
            if getattr(dest, "limiter", None) is not None:
                dest.limiter.interrupt()
            dest.interrupt()  # a remote processing step's wait too
        self.notify()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _outside_window(self, dest: Destination) -> bool:
        """Outside the destination's delivery window: log once, sleep (woken by notify, or at
        most 1 s: the clock may be moved in tests), and say so."""
        window = self.cfg.destinations[dest.name].schedule
        if window is None:
            return False
        now = self.clock()
        if window.is_open(now):
            if dest.name in self._waiting:
                self._waiting.discard(dest.name)
                log.info("destination %s: its delivery window (%s) is open", dest.name,
                         window.describe())
            return False
        due = self.state.next_due(dest.name)
        if due is not None and dest.name not in self._waiting:
            self._waiting.add(dest.name)
            opens = window.next_open(now)
            log.info("destination %s: outside its delivery window (%s); jobs wait until %s",
                     dest.name, window.describe(),
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(opens)))
        with self._wake[dest.name]:
            self._wake[dest.name].wait(min(1.0, max(0.05, window.next_open(now) - now)))
        return True

    def _loop(self, dest: Destination) -> None:
        """Claim and run jobs until stopped; survives any error (a full disk, a locked or broken
        database, a bug): it logs one line, waits (1 s doubling to 30 s) and carries on, first
        recording the end of the job it was running, so delivery resumes by itself."""
        policy = self.cfg.destinations[dest.name].retry_policy
        unfinished: tuple[Job, str] | None = None  # a run that raised; its end is not recorded
        unsettled: tuple[Job, str] | None = None  # recorded; on_finished not yet done
        delay = 0.0
        while not self._stop.is_set():
            try:
                if unfinished is not None:
                    job, error = unfinished
                    unsettled = (job, self.state.finish_job(job, error, policy.max_attempts,
                                                            policy.delay(job.attempts + 1)))
                    unfinished = None
                if unsettled is not None:
                    job, outcome = unsettled
                    if outcome:
                        self.on_finished(job, outcome)
                    unsettled = None
                admits = self.groups.admits if dest.name in self.groups else \
                    self.breakers.admits
                if self._outside_window(dest) or not admits(
                        dest.name, lambda t: self._sleep(dest.name, t)):
                    continue  # outside its window, or its circuit breaker is open
                job = self.state.claim_job(dest.name, self.clock())
                if job is None:
                    # Idle: sleep until woken, this destination's next retry, or 1 s (a
                    # `dicomrouter retry` from another process is seen by then). Only reads.
                    due = self.state.next_due(dest.name)
                    wait = 1.0 if due is None else min(1.0, max(0.05, due - time.time()))
                    with self._wake[dest.name]:
                        self._wake[dest.name].wait(wait)
                    delay = 0.0
                    continue
                try:
                    unsettled = (job, self.run(job, dest))
                except Exception as exc:
                    unfinished = (job, f"internal error: {type(exc).__name__}: {exc}")
                    raise
                delay = 0.0
            except Exception as exc:  # never let a worker thread die
                delay = min(30.0, max(1.0, delay * 2))
                log.error("delivery to %s: %s: %s (the worker carries on in %.0f s)",
                          dest.name, type(exc).__name__, exc, delay)
                self._stop.wait(delay)

    def run(self, job: Job, dest: Destination) -> str:
        """One attempt at a job; returns the job's new state ('' if interrupted by shutdown).
        A group's job is sent by the member chosen for its study, under the member's ledger
        and breaker (groups.py)."""
        policy = self.cfg.destinations[job.destination].retry_policy
        if job.destination in self.groups:
            dest = self.groups.member_for(job, self.groups.by_name[job.destination])
        # a whole-study export leaves out what a rejection note rejected (IOCM)
        rejected = self.state.rejected_uids(job.study_uid) if dest.whole_study else set()
        todo = [i for i in self.state.instances(job.study_uid) if i.sop_uid not in rejected] \
            if dest.whole_study else self.state.undelivered(job.study_uid, dest.name)
        if job.series_only is not None:  # level: series, the study is still receiving
            todo = [i for i in todo if i.series_uid in job.series_only]
        if not dest.whole_study:
            todo = self._without_cached(job, todo)
        attempt = job.attempts + 1
        started = time.monotonic()
        due = not dest.whole_study or self._whole_study_due(job, dest)
        if due:
            log.info("study %s → %s (%s): sending %d instance(s), attempt %d/%d",
                     job.study_uid, dest.name, dest.describe(), len(todo), attempt,
                     policy.max_attempts)
        if not due:  # every instance is there as it is now: the study is not sent again
            result = RunResult()
        elif dest.whole_study and len(todo) < len(self.state.instances(job.study_uid, False)) \
                - len(rejected):
            # never overwrite a whole-study export (a zip) with part of the study
            gone = PermanentFailure(
                "part of the study was deleted from the spool after an earlier export, so the "
                "study cannot be exported whole again",
                "keep studies for late arrivals (retention), or have the sender send the study "
                "again (purge it first)")
            result = RunResult(error=str(gone), error_permanent=True)
        else:
            try:  # coerce: the study's lookups first (a source that is down fails the run)
                self._coercions[job.id] = self.coercer.prepare(job, dest.name, todo,
                                                               self.spool.open)
                result = self._send_chunks(job, dest, todo)
            except DeliveryError as exc:
                result = RunResult(error=str(exc), error_permanent=exc.permanent)
            finally:
                self._coercions.pop(job.id, None)
        sent, rejected, error = result.sent, result.rejected, result.error
        if result.yielded:  # back to pending, not an attempt: the next run sends the rest
            if sent:  # its chunks reached the destination: a success for the breaker
                self.breakers.observe(dest.name, False, None)
            self.state.release_job(job)
            log.info("study %s → %s: %d instance(s) sent, %d left; a more urgent job of the "
                     "destination goes first", job.study_uid, dest.name, sent, len(todo) - sent)
            return ""
        if self._stop.is_set() and error is None and (
                result.interrupted or sent + len(rejected) < len(todo)):
            self.state.release_job(job)
            log.info("study %s → %s: interrupted by shutdown after %d instance(s); will resume",
                     job.study_uid, dest.name, sent)
            return ""
        self.breakers.observe(dest.name, result.unreachable, result.error)
        if job.destination in self.groups and result.unreachable and \
                not self.groups.healthy(dest.name):  # this run opened the member's breaker
            self.state.release_job(job)  # not an attempt: the study moves at its next run
            log.warning("study %s → group %s: %s is down (circuit open) after %d instance(s); "
                        "the study moves to another member", job.study_uid, job.destination,
                        dest.name, sent)
            return ""
        if error is None and rejected:
            error = f"{len(rejected)} of {len(todo)} instance(s) refused; first: {rejected[0]}"
            if result.permanent:
                error += " (not retried: the same data would be refused again; fix the cause, " \
                         "then 'dicomrouter retry --dead')"
        outcome = self.state.finish_job(job, error, policy.max_attempts,
                                        policy.delay(attempt), permanent=result.permanent)
        took = time.monotonic() - started
        metrics.DELIVERIES.labels(dest.name, outcome if outcome not in (
            JobState.PENDING, JobState.HELD) else ("delivered" if error is None else "failed")
        ).inc()
        metrics.DELIVERY_TIME.labels(dest.name).observe(took)
        if attempt > 1:
            metrics.RETRIES.labels(dest.name).inc()
        if error is None:
            log.info("study %s → %s: delivered %d instance(s) in %.2f s", job.study_uid,
                     dest.name, sent, took)
        elif outcome == JobState.DEAD and result.permanent:
            log.error("study %s → %s: attempt %d failed permanently, dead-lettered without "
                      "retrying (study kept in the spool; 'dicomrouter retry --dead' requeues "
                      "it): %s", job.study_uid, dest.name, attempt, error)
        elif outcome == JobState.DEAD:
            log.error("study %s → %s: attempt %d/%d failed, dead-lettered (study kept in the "
                      "spool; 'dicomrouter retry --dead' requeues it): %s", job.study_uid,
                      dest.name, attempt, policy.max_attempts, error)
        elif outcome == JobState.HELD:
            log.warning("study %s → %s: attempt %d/%d failed after %d delivered: %s",
                        job.study_uid, dest.name, attempt, policy.max_attempts, sent, error)
        else:
            log.warning("study %s → %s: attempt %d/%d failed after %d delivered, retry in %.0f s:"
                        " %s", job.study_uid, dest.name, attempt, policy.max_attempts, sent,
                        policy.delay(attempt), error)
        if outcome == JobState.HELD:  # a late arrival came meanwhile, and a route holds it
            log.info("study %s → %s: its new generation is held (a route with hold: true) "
                     "until 'dicomrouter release' or 'reject'", job.study_uid, dest.name)
        return outcome

    def _whole_study_due(self, job: Job, dest: Destination) -> bool:
        """Whether a whole-study destination (a zip, a processing step) has anything to get:
        an instance it never had, or one received again with other content. An identical
        re-send (or one its running job delivered meanwhile) is not a reason to send the whole
        study again: the re-sent instances are marked identical and the job is done. A study
        that is due is sent whole, identical re-sends included (the session needs them all)."""
        pending = [i for i in self.state.undelivered(job.study_uid, dest.name) if dest.takes(i)]
        if job.series_only is not None:
            pending = [i for i in pending if i.series_uid in job.series_only]
        before = self.state.delivered_digests(job.study_uid, dest.name) if pending else {}
        same = [i.sop_uid for i in pending
                if i.sop_uid in before and self._same_content(i, before)]
        if len(same) < len(pending):
            return True
        if same:
            self.state.mark_identical(same, dest.name, job.study_uid)
        log.info("study %s → %s: nothing new for it (%d instance(s) received again with "
                 "identical content): the study is not sent again", job.study_uid, dest.name,
                 len(same))
        return False

    def _without_cached(self, job: Job, todo: list[Instance]) -> list[Instance]:
        """What the Q/R proxy fetched into a study (marked Proxied) goes only where a route
        naming ``Proxied`` sends it: an instance pushed into a cached study is sent on without
        the PACS's own instances around it (README "Q/R proxy"). A job without routes (sent
        by hand) takes everything."""
        if not job.routes or not any(i.tags.get(PROXIED_TAG) for i in todo):
            return todo
        by_name = {r.name: r for r in self.cfg.routes}
        if any(n not in by_name or "Proxied" in keys_of(by_name[n].when) for n in job.routes):
            return todo
        return [i for i in todo if not i.tags.get(PROXIED_TAG)]

    def _send_chunks(self, job: Job, dest: Destination, todo: list[Instance]) -> RunResult:
        """Send ``todo`` ``chunk_instances`` at a time; after a chunk, stop (``yielded``) if a
        more urgent job of the destination is due (priority.py). Whole-study destinations,
        forwarding runs and ordered runs (a chunk would be ordered only within itself) go in
        one piece."""
        whole = dest.whole_study or bool(self.cfg.destinations[dest.name].whole_study())
        parts = [todo] if whole or self._keep_open(job, dest) or \
            ordering.order_of(self.cfg, job, dest.name) else \
            chunks(todo, self.cfg.chunk_instances)
        total = RunResult()
        for n, part in enumerate(parts):
            total.add(self._send(job, dest, list(part)))
            if total.error is not None or total.interrupted or self._stop.is_set():
                break
            if n + 1 < len(parts) and not total.rejected and \
                    self.state.urgent_due(dest.name, job.priority, self.clock()):
                total.yielded = True
                break
        return total

    def _send(self, job: Job, dest: Destination, todo: list[Instance]) -> RunResult:
        """Send ``todo`` over ``dest.associations`` sessions at once (contiguous parts, so each
        series mostly travels in order on one association)."""
        if not todo:
            return RunResult()
        keep_open = self._keep_open(job, dest)
        order = ordering.order_of(self.cfg, job, dest.name)
        if order and not keep_open:
            return self._send_ordered(job, dest, todo, order)
        feed: ForwardFeed | None = None
        if keep_open:  # forwarding while receiving: the sessions take what arrives
            feed = ForwardFeed(self.state, job.study_uid, dest.name, todo, keep_open,
                               self._stop, lambda t: self._sleep(dest.name, t))
            n = dest.associations
            parts = [todo] * n  # each session negotiates for all, takes from the feed
        else:
            n = min(dest.associations, max(1, len(todo) // MIN_PER_ASSOCIATION))
            if n <= 1:
                return self._send_part(job, dest, todo)
            size = -(-len(todo) // n)
            parts = [todo[i:i + size] for i in range(0, len(todo), size)]
        return self._sessions(job, dest, parts, feed)

    def _send_ordered(self, job: Job, dest: Destination, todo: list[Instance],
                      order: str) -> RunResult:
        """Route key ``order``: the sessions take ``todo`` in order from a feed, in rounds
        (ordering.py); what waits for a target not delivered is reported refused."""
        run = ordering.OrderedRun(order, self.state, self.spool, job, todo, self._stop)
        total = RunResult()
        for part, feed in run.rounds():
            n = min(dest.associations, max(1, len(part) // MIN_PER_ASSOCIATION))
            result = self._sessions(job, dest, [part] * n, feed)
            total.add(result)
            if result.error is not None:
                break
        if not self._stop.is_set():
            total.rejected += run.held()
        return total

    def _sessions(self, job: Job, dest: Destination, parts: list[list[Instance]],
                  feed: ForwardFeed | ordering.OrderedFeed | None) -> RunResult:
        """One session per part, at once (with a feed each takes its share from it)."""
        results = [RunResult() for _ in parts]

        def part(i: int) -> None:
            try:
                results[i] = self._send_part(job, dest, parts[i], feed)
            except Exception as exc:  # reported as the job's error, never a dead thread
                error = f"internal error: {type(exc).__name__}: {exc}"
                log.error("study %s → %s: association %d of %d failed: %s", job.study_uid,
                          dest.name, i + 1, len(parts), error)
                results[i] = RunResult(error=error)

        threads = [threading.Thread(target=part, args=(i,), daemon=True,
                                    name=f"{threading.current_thread().name}-{i + 1}")
                   for i in range(1, len(parts))]
        for t in threads:
            t.start()
        part(0)
        for t in threads:
            t.join()
        if feed is not None and any(r.error is None for r in results):
            # a forwarding run's extra association that could not even start (a peer that
            # limits associations per AE) sent nothing: the others took its share
            for i, r in enumerate(results):
                if r.error is not None and not r.taken:
                    log.warning("study %s → %s: association %d of %d not used: %s",
                                job.study_uid, dest.name, i + 1, len(results), r.error)
                    results[i] = RunResult()
        total = RunResult()
        for r in results:
            total.add(r)
        return total

    def _sleep(self, destination: str, seconds: float) -> None:
        """Wait up to ``seconds``; the tracker's notify (an arrival) wakes it early."""
        with self._wake[destination]:
            self._wake[destination].wait(seconds)

    def _keep_open(self, job: Job, dest: Destination) -> float:
        """How long the run's sessions wait for the next arrival (``forward_keep_open``): a
        job of a ``forward: immediate`` route, of a study still receiving, to a destination
        whose session is an association (feed.py). 0: the run ends with its list."""
        wait = self.cfg.forward_keep_open
        if not wait or not dest.holds_connection or not any(
                r.forward == "immediate" and r.name in job.routes for r in self.cfg.routes):
            return 0.0
        study = self.state.study(job.study_uid)
        return wait if study is not None and study.state == "receiving" else 0.0

    def _send_part(self, job: Job, dest: Destination, todo: list[Instance],
                   feed: ForwardFeed | ordering.OrderedFeed | None = None) -> RunResult:
        """Send ``todo`` in one session (with a ``feed``: this session's share of it and of
        what arrives meanwhile; ``todo`` only negotiates).
        The ledger counts each send when it goes on the wire and records as delivered only
        what the session confirms: ``send`` → True (recorded with the next count, in the same
        commit), what it reports durable as it goes, or the UIDs ``commit`` returns."""
        result = RunResult()
        rejected = result.rejected
        previous: str | None = None  # delivered, not yet recorded
        buffered: list[str] = []  # waiting for the session's confirmation
        recorded: set[str] = set()  # buffered ones the session confirmed (ledger written)
        ops = self.transforms_for(job, dest.name)
        temps: list[str] = []  # transformed copies, kept until the session is over
        alias: dict[str, str] = {}  # SOP Instance UID sent (de-identified) → the original

        digests: dict[str, str] = {}  # content digest of what was sent (SOP UID → digest)
        # re-received instances: the digest of what this destination already got
        before = self.state.delivered_digests(job.study_uid, dest.name) \
            if todo and not dest.whole_study else {}  # whole: _whole_study_due decided
        identical: list[str] = []

        def durable(uids: list[str]) -> None:
            """The session confirmed these (as sent): record them now, not at the end."""
            originals = [u for u in (alias.get(x, x) for x in uids) if u not in recorded]
            self.state.mark_delivered(originals, dest.name, digests)
            recorded.update(originals)

        def transmitted(uids: list[str], delta: int) -> None:
            self.state.count_sends([alias.get(u, u) for u in uids], dest.name, job.study_uid,
                                   delta)

        def flush() -> None:
            nonlocal previous
            if previous:
                self.state.mark_delivered([previous], dest.name, digests)
                previous = None

        try:
            with dest.open(todo, job.routes) as session:
                session.on_durable, session.on_transmit = durable, transmitted
                counted = session.transmits_on_send
                for inst in todo if feed is None else feed.instances(flush):
                    result.taken += 1
                    if self._stop.is_set():
                        result.interrupted = True
                        break
                    if inst.sop_uid in before and self._same_content(inst, before):
                        identical.append(inst.sop_uid)  # the sender's retry: already there
                        continue
                    self.state.mark_sending(inst.sop_uid, dest.name, job.study_uid, previous,
                                            count=counted, digest=digests.get(previous or ""))
                    previous = None
                    try:
                        with self.spool.open(inst) as data:
                            digest = data.digest()
                            if digest:
                                digests[inst.sop_uid] = digest
                            if ops:
                                delivered = self._send_transformed(session, inst, data, ops,
                                                                   temps, alias, dest.name)
                            else:
                                delivered = session.send(inst, data)
                    except DeliveryError:
                        raise
                    except Exception as exc:  # this instance failed: say why, go on
                        reason = str(exc) if isinstance(exc, InstanceRejected) else \
                            "spool file missing" if isinstance(exc, FileNotFoundError) else \
                            f"internal error: {type(exc).__name__}: {exc}"
                        rejected.append(f"{inst.sop_uid}: {reason}")
                        if isinstance(exc, FileNotFoundError) or getattr(exc, "permanent",
                                                                         False):
                            result.rejected_permanent += 1
                        log.warning("study %s → %s: instance %s refused: %s", job.study_uid,
                                    dest.name, inst.sop_uid, reason)
                        continue
                    if delivered:
                        previous = inst.sop_uid
                        result.sent += 1
                    else:
                        buffered.append(inst.sop_uid)
                flush()
                durable(list(session.commit()))  # also when nothing is buffered
                refused = {alias.get(u, u): why for u, why in session.refused.items()}
                rejected += [f"{uid}: " + refused.get(
                    uid, "not confirmed by the destination's commit")
                             for uid in buffered if uid not in recorded]
        except DeliveryError as exc:
            if isinstance(exc, Interrupted) and self._stop.is_set():
                result.interrupted = True  # a remote step's wait: resumed, not an attempt
            else:
                result.error, result.error_permanent = str(exc), exc.permanent
                result.unreachable = not exc.permanent
        finally:
            if previous:  # a success status came back before the failure
                self.state.mark_delivered([previous], dest.name, digests)
            if identical:
                self.state.mark_identical(identical, dest.name, job.study_uid)
                log.info("study %s → %s: %d instance(s) received again with identical content "
                         "not sent again", job.study_uid, dest.name, len(identical))
            result.sent += len(recorded.intersection(buffered))
            for path in temps:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        return result

    def transforms_for(self, job: Job, destination: str) -> tuple[Any, ...]:
        """The transforms of the routes that sent the study to ``destination``, then the
        destination's own, in that order; this run's coercions (coerce.py) before them all."""
        ops: list[Any] = list(self._coercions.get(job.id, ()))  # coerce runs first
        for route in self.cfg.routes:
            if route.name in job.routes and (destination in route.to or
                                             job.destination in route.to):
                ops += bind(route.transforms, self.state, f"route {route.name}")
        return (*ops, *bind(self.cfg.destinations[destination].transforms, self.state,
                            f"destination {destination}"))

    def _same_content(self, inst: Instance, before: dict[str, str]) -> bool:
        """The spool's copy of a re-received instance has the digest of what the destination
        got last time (an identical re-send); a changed instance has another."""
        try:
            with self.spool.open(inst) as data:
                return data.digest() == before[inst.sop_uid]
        except OSError:
            return False

    def _send_transformed(self, session: Any, inst: Instance, data: Any, ops: tuple[Any, ...],
                          temps: list[str], alias: dict[str, str], destination: str) -> bool:
        """Send a transformed copy of ``inst`` (``data``: its spool reader; the copy is written
        next to the spool, streamed)."""
        folder = os.path.join(self.spool.root, "transforms")  # same disk; emptied at start
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{inst.sop_uid}-{uuid.uuid4().hex[:8]}.dcm")
        temps.append(path)
        try:
            size, tags = transform_file(data, ops, path)
        except TransformError as exc:
            # the same transform of the same bytes fails again: not worth a retry
            raise InstanceRejected(f"transform: {exc}", permanent=True) from None
        sop = tags.get("SOPInstanceUID") or inst.sop_uid
        if sop != inst.sop_uid:  # de-identified: the ledger keeps both UIDs
            alias[sop] = inst.sop_uid
            self.state.record_sent_uid(inst.sop_uid, destination, sop)
        # the copy's own names (folder paths, object keys, manifests are made from them)
        copy_inst = dataclasses.replace(
            inst, size=size, sop_uid=sop, study_uid=tags.get("StudyInstanceUID") or
            inst.study_uid, series_uid=tags.get("SeriesInstanceUID") or inst.series_uid,
            tags={**inst.tags, **tags})
        with SpoolReader(path) as copy:
            return bool(session.send(copy_inst, copy))
