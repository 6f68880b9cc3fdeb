"""Circuit breakers: one per destination, in each router process (a cluster node has its own).

After ``breaker_failures`` consecutive runs that failed at the connection level (a transient
``DeliveryError``: no connection, association refused or lost, timeout, HTTP 5xx, S3
unreachable) the destination's breaker *opens*: its workers stop claiming jobs, so jobs wait
without using attempts, and one worker probes the destination (``Destination.probe``: C-ECHO,
HTTP HEAD, S3 head-bucket, a test file) every ``probe_every``. The runs before it opens are
attempts: config refuses a ``breaker_failures`` at or above the destination's
``retry.max_attempts`` (then no job dies of an outage). The first probe that reaches it
*closes* the breaker: the destination's failed jobs are made due at once and its workers
woken. Until a run succeeds after that, one more connection failure opens it again
(half-open), and only one worker (the prober) runs jobs until a run's outcome is known, so a
peer that answers the probe but not the delivery costs one attempt per probe, not
``breaker_failures`` nor one per worker.

An instance refused by the peer (a C-STORE failure status, a STOW-RS failure reason) is the
peer answering: it is not a connection failure and resets the count.

The log says each transition once (opened: why; closed: after how long); the state of every
breaker is the gauge ``dicomrouter_breaker_open`` and is written to this node's row in the
state database (``State.publish_breakers``) on each transition, where ``status`` reads it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from . import metrics
from .config import Config
from .destinations import DeliveryError, Destination
from .logsafe import escape
from .state import State

log = logging.getLogger("dicomrouter.breaker")

CLOSED, OPEN = "closed", "open"


class Breaker:
    """One destination's breaker; thread-safe (its workers share it)."""

    def __init__(self, dest: Destination, threshold: int, probe_every: float,
                 on_change: Callable[[Breaker], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.dest = dest
        self.threshold = threshold  # 0: never opens
        self.probe_every = probe_every
        self._on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()
        self.state = CLOSED
        self.failures = 0  # consecutive connection-level failures
        self.half_open = False  # closed by a probe; no run has succeeded since
        self.reason = ""  # the failure that opened it
        self.since = time.time()  # wall clock of the last transition
        self._opened = 0.0  # monotonic time it opened
        self.probes = 0  # failed probes since it opened
        self.last_probe = ""  # why the last probe failed
        self._next_probe = 0.0
        self._probing = False
        self._trial: int | None = None  # half-open: the one worker (thread) admitted

    def observe(self, unreachable: bool, error: str | None) -> None:
        """The outcome of one run: ``unreachable``, it failed at the connection level."""
        with self._lock:
            self._trial = None  # an outcome: half-open, the others may run again (or wait)
            if not unreachable:
                self.failures, self.half_open = 0, False
                return
            self.failures += 1
            if self.state == OPEN or not self.threshold or (
                    self.failures < self.threshold and not self.half_open):
                return
            self.state, self.reason, self.probes, self.last_probe = OPEN, error or "", 0, ""
            self.since, self._opened = time.time(), self._clock()
            self._next_probe = self._opened + self.probe_every
            how = "again after the probe's success" if self.half_open else \
                f"after {self.failures} consecutive connection failures"
            self.half_open = False
        log.warning("destination %s: circuit breaker open %s (last: %s); its jobs wait without "
                    "using attempts, probing (%s) every %g s", self.dest.name, how,
                    escape(error or "?"), self.dest.probe_kind, self.probe_every)
        self._on_change(self)

    def admits(self, wait: Callable[[float], None]) -> bool:
        """Whether a worker may claim a job now. While open: probe if one is due and no other
        worker is probing (True if the probe closed it), else ``wait`` a little (False).
        Half-open (closed by a probe, no run outcome since): only the worker that probed."""
        with self._lock:
            if self.state == CLOSED:
                me = threading.get_ident()
                if not self.half_open or self._trial in (None, me):
                    if self.half_open:
                        self._trial = me
                    return True
                trying = True
            else:
                trying = False
        if trying:  # another worker runs the first job since the probe: wait for its outcome
            wait(0.2)
            return False
        with self._lock:
            now = self._clock()
            probe = not self._probing and now >= self._next_probe
            if probe:
                self._probing = True
            else:
                delay = 0.2 if self._probing else self._next_probe - now
        if not probe:
            wait(max(0.05, min(1.0, delay)))
            return False
        why = ""
        try:
            self.dest.probe()
            reached = True
        except DeliveryError as exc:  # a permanent one is an answer: the job will say it
            reached, why = exc.permanent, str(exc)
        except OSError as exc:
            reached, why = False, f"{exc.strerror or exc}"
        except Exception as exc:  # a bug in a probe must not keep the breaker open forever
            reached, why = True, f"{type(exc).__name__}: {exc}"
            log.error("destination %s: its probe failed with an internal error (%s); the "
                      "breaker lets the next job try", self.dest.name, escape(why))
        with self._lock:
            self._probing = False
            if not reached:
                self.probes += 1
                self.last_probe = why
                self._next_probe = self._clock() + self.probe_every
        if not reached:
            self._on_change(self)  # status shows the probes (no log line: not a transition)
            return False
        with self._lock:
            self.state, self.failures, self.half_open = CLOSED, 0, True
            self._trial = threading.get_ident()  # this worker tries the first job
            self.since = time.time()
            took = self._clock() - self._opened
            probes = self.probes
        log.info("destination %s: circuit breaker closed: %s reached it after %.0f s open "
                 "(%d failed probe(s)); its jobs resume", self.dest.name, self.dest.probe_kind,
                 took, probes)
        self._on_change(self)
        return True

    def view(self) -> dict[str, Any]:
        """What status, the web page and the API show."""
        with self._lock:
            out: dict[str, Any] = {"state": self.state, "since": self.since,
                                   "consecutive_failures": self.failures,
                                   "breaker_failures": self.threshold,
                                   "probe_every": self.probe_every, "probe": self.dest.probe_kind}
            if self.state == OPEN:
                out.update(reason=self.reason, failed_probes=self.probes,
                           last_probe_error=self.last_probe,
                           next_probe=time.time() + max(0.0, self._next_probe - self._clock()))
            return out


class Breakers:
    """The breakers of one router's destinations. On each transition: the gauge, this node's
    row in the state (for ``status``), and on closing the failed jobs made due and the workers
    woken (``notify``)."""

    def __init__(self, cfg: Config, state: State, destinations: dict[str, Destination],
                 notify: Callable[[Iterable[str]], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.state = state
        self.notify = notify
        self._publish = threading.Lock()
        self.by_name = {
            name: Breaker(dest, cfg.destinations[name].breaker_failures,
                          cfg.destinations[name].probe_every, self._changed, clock)
            for name, dest in destinations.items()}
        for name in self.by_name:
            metrics.BREAKER_OPEN.labels(name).set(0)
        #: called with (destination, state) after each transition (groups.py moves studies)
        self.listeners: list[Callable[[str, str], None]] = []

    def observe(self, destination: str, unreachable: bool, error: str | None) -> None:
        self.by_name[destination].observe(unreachable, error)

    def admits(self, destination: str, wait: Callable[[float], None]) -> bool:
        return self.by_name[destination].admits(wait)

    def views(self) -> dict[str, dict[str, Any]]:
        return {name: b.view() for name, b in self.by_name.items()}

    def _changed(self, breaker: Breaker) -> None:
        name = breaker.dest.name
        metrics.BREAKER_OPEN.labels(name).set(1 if breaker.state == OPEN else 0)
        try:
            with self._publish:  # one writer at a time: the row holds every breaker
                self.state.publish_breakers(self.views())
            if breaker.state == CLOSED:
                self.state.retry_now(name)
        except Exception as exc:  # the state is down: delivery is failing anyway
            log.error("destination %s: could not record its breaker in the state database: "
                      "%s: %s", name, type(exc).__name__, exc)
        if breaker.state == CLOSED:
            self.notify([name])
        for listener in self.listeners:
            listener(name, breaker.state)
