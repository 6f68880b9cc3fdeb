"""Ordered delivery inside a study: the route key ``order`` (``series`` or ``references``).

A job's run normally sends what the ledger lists, split into contiguous parts, one per
association. With ``order`` the run's sessions instead take instances one at a time from an
``OrderedFeed`` (the same interface as ``feed.ForwardFeed``), sorted series by series: series by
SeriesNumber then first arrival, instances by InstanceNumber then arrival.

``series``: the next series starts only once every instance of the previous one is finished
(answered by the destination, success or refusal), so series never overlap at the destination,
whatever ``associations`` says; with several associations the instances of one series are
taken in order by whichever is free (with one, the order is exact).

``references``: an instance whose header references other SOP instances (presentation states,
key object selections, structured reports, any ReferencedSOPInstanceUID under the reference
sequences below) is taken only once every instance it references in the study is delivered to
that destination **per the ledger** (the session that sent a referenced instance records it
before it is counted as finished). The references are read from the headers at job time (not
indexed at receive: the receive path stays a 64 KiB scan) and kept in a bounded cache by spool
key, so a retry reads nothing again. A reference to an instance the study does not hold in the
spool (another study, never received, deleted) does not block: the referencing instance goes
after everything else of the run, with one log line. A referenced instance that is refused (or
fails) holds the instances referencing it back: they are reported as refused ("held back"), so
the job fails and its retry sends them once the ledger shows their targets delivered. A
session that confirms only at its end (storage commitment, DICOMweb batches) cannot release
them in the session: the run then opens another round of sessions for them once the first
ones committed. Instances that reference each other (a cycle) are released one at a time,
with one log line.
"""

from __future__ import annotations

import heapq
import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from . import metrics
from .state import Instance, Job, State

log = logging.getLogger("dicomrouter.delivery")

#: top-level sequences whose items (at any depth) name the instances an object references
REFERENCE_SEQUENCES = (
    "ReferencedSeriesSequence",  # presentation states
    "CurrentRequestedProcedureEvidenceSequence",  # key object selections, SR
    "PertinentOtherEvidenceSequence",
    "ContentSequence",  # SR content items (IMAGE, COMPOSITE)
    "ReferencedImageSequence",
    "ReferencedInstanceSequence",
    "ReferencedSOPSequence",
    "SourceImageSequence",
    "PredecessorDocumentsSequence",
)
REFERENCED_UID = 0x00081155  # ReferencedSOPInstanceUID
CACHE_SIZE = 200_000  # spool keys whose references are remembered (about 100 bytes each)
WAIT = 0.2  # seconds a session waits for a referenced instance before looking again

_cache: OrderedDict[str, frozenset[str]] = OrderedDict()
_cache_lock = threading.Lock()


def order_of(cfg: Any, job: Job, destination: str) -> str | None:
    """The order the job's routes ask for to ``destination``: ``references`` wins over
    ``series`` (its instances are still taken series by series); None: no order."""
    orders = {r.order for r in cfg.routes
              if r.order and r.name in job.routes and destination in r.to}
    if "references" in orders:
        return "references"
    return "series" if orders else None


def _number(value: str | None) -> float:
    try:
        return float(str(value).split("\\")[0])
    except (TypeError, ValueError):
        return float("inf")  # no number: after those that have one


def series_order(instances: Sequence[Instance], arrival: dict[str, int]) -> list[Instance]:
    """Series by SeriesNumber then first arrival; in each, InstanceNumber then arrival.
    ``arrival``: SOP Instance UID → its rank among the study's receptions."""
    first: dict[str, int] = {}
    for inst in instances:
        rank = arrival.get(inst.sop_uid, len(arrival))
        first[inst.series_uid] = min(first.get(inst.series_uid, rank), rank)
    return sorted(instances, key=lambda i: (
        _number(i.tags.get("SeriesNumber")), first[i.series_uid], i.series_uid,
        _number(i.tags.get("InstanceNumber")), arrival.get(i.sop_uid, len(arrival))))


def _walk(ds: Dataset, out: set[str], depth: int = 0) -> None:
    if depth > 16:
        return
    for elem in ds:
        if elem.tag == REFERENCED_UID and elem.value:
            out.update(str(v).strip() for v in (
                elem.value if isinstance(elem.value, list | tuple) else [elem.value]))
        elif elem.VR == "SQ":
            for item in elem.value or ():
                _walk(item, out, depth + 1)


def references(spool: Any, inst: Instance) -> frozenset[str]:
    """The SOP Instance UIDs ``inst`` references (its header's reference sequences), cached by
    spool key; an unreadable header references nothing (it is sent, and refused, as usual)."""
    with _cache_lock:
        found = _cache.get(inst.key)
        if found is not None:
            _cache.move_to_end(inst.key)
            return found
    out: set[str] = set()
    try:
        with spool.open(inst) as data:
            ds = dcmread(io.BufferedReader(data), stop_before_pixels=True,
                         specific_tags=list(REFERENCE_SEQUENCES))
            for kw in REFERENCE_SEQUENCES:
                if kw in ds:
                    for item in ds[kw].value or ():
                        _walk(item, out)
    except Exception as exc:  # the file's problem is reported when it is sent
        log.debug("references of %s not read: %s: %s", inst.sop_uid, type(exc).__name__, exc)
    out.discard(inst.sop_uid)
    out.discard("")
    found = frozenset(out)
    with _cache_lock:
        _cache[inst.key] = found
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return found


class OrderedFeed:
    """One round's instances, handed to the run's sessions in order (see the module doc).

    ``deps``: instance → the instances of this round it waits for; ``last``: instances that
    go after everything else (they reference what the spool does not hold); ``held``:
    instance → why it is held back from the start."""

    def __init__(self, state: State, job: Job, order: str, todo: list[Instance],
                 deps: dict[str, set[str]], last: set[str], stop: threading.Event) -> None:
        self.state = state
        self.job = job
        self.order = order
        self.todo = todo
        self.stop = stop
        self.held: dict[str, str] = {}  # SOP Instance UID → why it was not sent
        self._index = {inst.sop_uid: n for n, inst in enumerate(todo)}
        self._deps = deps
        self._dependents: dict[str, list[str]] = {}
        for uid, targets in deps.items():
            for target in targets:
                self._dependents.setdefault(target, []).append(uid)
        self._last = set(last)
        self._waiting = {uid for uid in deps if deps[uid]} | self._last  # not yet ready
        self._ready = [n for n, inst in enumerate(todo) if inst.sop_uid not in self._waiting]
        heapq.heapify(self._ready)
        self._done: set[str] = set()
        self._in_flight = 0
        # series: how many instances of each series are not finished; the lowest series with
        # some is the only one taken from
        self._series = [inst.series_uid for inst in todo]
        self._left: dict[str, int] = {}
        self._rank: dict[str, int] = {}
        for n, s in enumerate(self._series):
            self._left[s] = self._left.get(s, 0) + 1
            self._rank.setdefault(s, n)
        self._cond = threading.Condition()

    # ---- what the sessions call ------------------------------------------------------------

    def instances(self, before_wait: Callable[[], None]) -> Iterator[Instance]:
        """One session's share, in order; ``before_wait`` records the session's last delivery
        in the ledger (called before it waits, and before an instance others wait for counts
        as finished)."""
        while True:
            inst = self._take(before_wait)
            if inst is None:
                return
            try:
                yield inst
            finally:  # answered, refused, or the session failed on it
                self._finished(inst, before_wait)

    def _take(self, before_wait: Callable[[], None]) -> Instance | None:
        with self._cond:
            while not self.stop.is_set():
                n = self._next()
                if n is not None:
                    self._in_flight += 1
                    return self.todo[n]
                if not self._in_flight and not self._resolve():
                    self._give_up()
                    return None
                if self._in_flight:
                    self._cond.release()
                    try:
                        before_wait()
                    finally:
                        self._cond.acquire()
                    self._cond.wait(WAIT)
            return None

    def _next(self) -> int | None:
        if not self._ready:
            return None
        if self.order == "series":  # an earlier series not finished: wait for it
            rank = self._rank[self._series[self._ready[0]]]
            if any(left for s, left in self._left.items() if self._rank[s] < rank):
                return None
        return heapq.heappop(self._ready)

    def _finished(self, inst: Instance, flush: Callable[[], None]) -> None:
        waiting = self._dependents.get(inst.sop_uid)
        try:
            if waiting:
                flush()  # the ledger shows it delivered before its dependents are looked at
        finally:  # (if the ledger could not be written, they find it undelivered)
            self._count_finished(inst, waiting)

    def _count_finished(self, inst: Instance, waiting: list[str] | None) -> None:
        with self._cond:
            self._in_flight -= 1
            self._done.add(inst.sop_uid)
            self._left[inst.series_uid] -= 1
            complete = [uid for uid in waiting or () if uid in self._waiting and
                        uid not in self._last and self._deps[uid] <= self._done]
            if complete:
                self._check(complete)
            self._cond.notify_all()

    @property
    def finished(self) -> int:
        """How many instances the sessions finished (sent or refused) in this round."""
        return len(self._done)

    def _check(self, uids: list[str]) -> None:
        """These instances' targets are all finished: ready if the ledger shows every one
        delivered here, else held back."""
        delivered = self.state.delivered_uids(self.job.study_uid, self.job.destination)
        for uid in uids:
            missing = sorted(self._deps[uid] - delivered)
            self._waiting.discard(uid)
            if missing:
                self.held[uid] = f"held back: it references {missing[0]}, not delivered to " \
                                 f"{self.job.destination}"
            else:
                heapq.heappush(self._ready, self._index[uid])

    def _resolve(self) -> bool:
        """Nothing ready, nothing on the wire: release what goes last, or break a cycle.
        False: the round is over."""
        waiting = sorted((self._index[u] for u in self._waiting), key=int)
        if not waiting:
            return False
        last = [n for n in waiting if self.todo[n].sop_uid in self._last and
                self._deps.get(self.todo[n].sop_uid, set()) <= self._done]
        if last:
            for n in last:
                self._last.discard(self.todo[n].sop_uid)
                if self._deps.get(self.todo[n].sop_uid):
                    self._check([self.todo[n].sop_uid])
                else:
                    self._waiting.discard(self.todo[n].sop_uid)
                    heapq.heappush(self._ready, n)
            return True
        # a cycle: instances that wait only for instances that wait or were delivered (none
        # that was refused, none held back)
        delivered = self._done & self.state.delivered_uids(self.job.study_uid,
                                                           self.job.destination)
        doomed = (self._done - delivered) | self.held.keys()
        changed = True
        while changed:  # what waits, however indirectly, for one of those stays held
            changed = False
            for uid in self._waiting - doomed:
                if self._deps.get(uid, set()) & doomed:
                    doomed.add(uid)
                    changed = True
        free = self._waiting - doomed
        for n in waiting:
            uid = self.todo[n].sop_uid
            if uid in free and self._deps.get(uid, set()) <= delivered | free:
                other = sorted(self._deps.get(uid, set()) & free) or ["?"]
                log.warning("study %s → %s: instances reference each other (%s and %s); "
                            "%s is sent first", self.job.study_uid, self.job.destination, uid,
                            other[0], uid)
                self._waiting.discard(uid)
                self._last.discard(uid)
                heapq.heappush(self._ready, n)
                return True
        return False

    def _give_up(self) -> None:
        for uid in self._waiting:
            blocking = sorted(self._deps.get(uid, set()) - self._done) or ["?"]
            self.held.setdefault(uid, f"held back: it references {blocking[0]}, not "
                                      f"delivered to {self.job.destination}")
        self._waiting.clear()
        self._cond.notify_all()  # the other sessions end too


class OrderedRun:
    """One ordered job run: rounds of sessions (``rounds``), then what was held back."""

    def __init__(self, order: str, state: State, spool: Any, job: Job,
                 todo: list[Instance], stop: threading.Event) -> None:
        self.order = order
        self.state = state
        self.spool = spool
        self.job = job
        self.stop = stop
        # a rejected instance (IOCM) is never sent: a reference to it holds nothing back
        rejected = state.rejected_uids(job.study_uid)
        study = [i for i in state.instances(job.study_uid) if i.sop_uid not in rejected]
        self.arrival = {inst.sop_uid: n for n, inst in enumerate(study)}
        self.todo = series_order(todo, self.arrival)
        self.feed: OrderedFeed | None = None
        self._logged = False

    def rounds(self) -> Iterator[tuple[list[Instance], OrderedFeed]]:
        """(instances, feed) of each round: the first has every instance; another follows
        only for instances held back whose targets the ledger now shows delivered (sessions
        that confirm at their end)."""
        todo = self.todo
        while todo and not self.stop.is_set():
            self.feed = self._plan(todo)
            if len(self.feed.held) == len(todo):
                return  # every one waits for a target that was not delivered
            yield self.feed.todo, self.feed
            held = set(self.feed.held)
            if not held or not self.feed.finished:
                return  # all sent, or no progress: what is held stays held
            undelivered = {i.sop_uid for i in self.state.undelivered(self.job.study_uid,
                                                                     self.job.destination)}
            todo = [i for i in todo if i.sop_uid in held and i.sop_uid in undelivered]

    def held(self) -> list[str]:
        """``uid: reason`` of the instances not sent because what they reference was not
        delivered (reported as refused: the job is retried)."""
        if self.feed is None or not self.feed.held:
            return []
        held = self.feed.held
        metrics.HELD_BACK.labels(self.job.destination).inc(len(held))
        first = next(iter(held))
        log.warning("study %s → %s: %d instance(s) held back until what they reference is "
                    "delivered there; first: %s: %s", self.job.study_uid, self.job.destination,
                    len(held), first, held[first])
        return [f"{uid}: {why}" for uid, why in held.items()]

    def _delivered(self) -> set[str]:
        return self.state.delivered_uids(self.job.study_uid, self.job.destination)

    def _plan(self, todo: list[Instance]) -> OrderedFeed:
        deps: dict[str, set[str]] = {}
        last: set[str] = set()
        blocked: dict[str, str] = {}
        if self.order == "references":
            here = {i.sop_uid for i in todo}
            delivered: set[str] | None = None
            outside: list[str] = []
            for inst in todo:
                refs = references(self.spool, inst)
                if not refs:
                    continue
                deps[inst.sop_uid] = refs & here
                elsewhere = refs - here
                if not elsewhere:
                    continue
                unknown = elsewhere - self.arrival.keys()
                if unknown:
                    last.add(inst.sop_uid)
                    outside.append(sorted(unknown)[0])
                if elsewhere - unknown:  # in the study, not in this round: delivered?
                    if delivered is None:
                        delivered = self._delivered()
                    undone = sorted(elsewhere - unknown - delivered)
                    if undone:
                        blocked[inst.sop_uid] = f"held back: it references {undone[0]}, " \
                                                f"not delivered to {self.job.destination}"
            changed = True
            while changed:  # what waits for a held-back instance is held back too
                changed = False
                for uid, targets in deps.items():
                    if uid not in blocked and targets & blocked.keys():
                        target = sorted(targets & blocked.keys())[0]
                        blocked[uid] = f"held back: it references {target}, not delivered " \
                                       f"to {self.job.destination}"
                        changed = True
            if outside and not self._logged:
                self._logged = True
                log.info("study %s → %s: %d instance(s) reference instances the spool does "
                         "not hold in this study (first: %s); they are sent after the rest",
                         self.job.study_uid, self.job.destination, len(outside),
                         outside[0])
        feed = OrderedFeed(self.state, self.job, self.order,
                           [i for i in todo if i.sop_uid not in blocked],
                           {u: d for u, d in deps.items() if u not in blocked},
                           last - blocked.keys(), self.stop)
        feed.held.update(blocked)
        return feed
