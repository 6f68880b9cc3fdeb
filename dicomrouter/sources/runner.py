"""Polls every pull source on its interval, one thread each, and records its health."""

from __future__ import annotations

import logging
import threading
import time

from .. import metrics
from ..config import Config
from ..destinations.base import Context
from ..spool import Spool
from ..state import State
from . import build
from .base import Source

log = logging.getLogger("dicomrouter.sources")


class SourcePollers:
    def __init__(self, cfg: Config, state: State, spool: Spool) -> None:
        self.state = state
        self.lease = cfg.state.lease
        context = Context(cfg.ae_title, state, spool, cfg)
        # the dicomweb source query_retrieve_proxy names is the PACS's address, not polled
        self.sources: list[Source] = [build(s, context) for name, s in cfg.sources.items()
                                      if name != cfg.query_retrieve_proxy]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for src in self.sources:
            if not src.cfg.poll:  # a peer only prefetch rules query (prefetch/)
                log.info("source %s: %s, not polled (poll: false)", src.name, src.describe())
                continue
            log.info("source %s: %s, every %g s", src.name, src.describe(), src.cfg.interval)
            t = threading.Thread(target=self._run, args=(src,), name=f"source-{src.name}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for src in self.sources:
            src.stopping.set()
        for t in self._threads:
            t.join(30)

    @staticmethod
    def _next_wait(src: Source) -> float:
        """The interval, or less when a study waiting to be stable at the source is due
        before it."""
        if src.wake_at is None:
            return src.cfg.interval
        return min(src.cfg.interval, max(0.2, src.wake_at - time.time() + 0.05))

    def _run(self, src: Source) -> None:
        failing = False
        held = True
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                # several routers: one node polls a source; another takes over if it stops
                if not self.state.hold_lease(f"source:{src.name}",
                                             src.cfg.interval + self.lease):
                    if held:
                        log.info("source %s: polled by another node", src.name)
                    held = False
                    self._stop.wait(src.cfg.interval)
                    continue
                held = True
                pulled = src.poll()
                src.housekeeping()
            except Exception as exc:  # one line per failure, the poller goes on
                # our errors are sentences; a library's gets its type name
                error = str(exc) if type(exc).__module__.startswith("dicomrouter") else \
                    f"{type(exc).__name__}: {exc}"
                log.warning("source %s: poll failed (next in %g s): %s", src.name,
                            src.cfg.interval, error)
                failing = True
                metrics.POLLS.labels(src.name, "error").inc()
                try:
                    self.state.source_polled(src.name, error)
                except Exception as db_exc:
                    log.error("source %s: cannot record the poll: %s", src.name, db_exc)
            else:
                metrics.POLLS.labels(src.name, "ok").inc()
                if failing:
                    log.info("source %s: polling again", src.name)
                failing = False
                if pulled:
                    log.info("source %s: pulled from %d study(ies) in %.1f s", src.name,
                             pulled, time.monotonic() - started)
                try:
                    self.state.source_polled(src.name, None)
                except Exception as db_exc:
                    log.error("source %s: cannot record the poll: %s", src.name, db_exc)
            self._stop.wait(self._next_wait(src))
