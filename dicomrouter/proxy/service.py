"""What the Q/R proxy does with the PACS (README "Q/R proxy", docs/conformance.md):

* **C-FIND**: every query at STUDY, SERIES or IMAGE level (and PATIENT) is also asked of the
  PACS; the answers are merged, the spool's first, a PACS answer whose unique key (the level's
  UID) the spool already answered dropped, and every answer carries the router's AE title as
  RetrieveAETitle, so a retrieve comes through the router (and fills its cache).
* **C-MOVE / C-GET**: the instances the PACS holds of the selected studies (series, instances)
  and the spool does not are fetched, and each is sent on to the requester as soon as it is in
  the spool (``stream``), after what the spool held.
* **WADO-RS** (``fetch``): the hook the DICOMweb server calls for a study not in the spool.
* **The cache**: a fetched study stays in the spool, marked Proxied (routes do not see it unless
  they name ``Proxied``), and is removed once nobody fetched or retrieved it for
  ``query_retrieve_proxy_cache``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from pydicom.dataset import Dataset

from .. import query
from ..config import Config
from ..scp.retrieve import Missing
from ..spool import Spool
from ..state import Instance, State
from ..values import PROXIED_TAG
from .pacs import Listed, Pacs, PacsError, pacs_for

log = logging.getLogger("dicomrouter.proxy")

_DONE = object()


class StillFetching(Exception):
    """``fetch`` gave up waiting while the PACS was still sending the study (the fetch goes on:
    asked again later, the study is served from the cache)."""


def _values(q: query.Query, keyword: str) -> list[str]:
    """The values a single-value or list match of ``keyword`` asks for (none: any)."""
    for m in q.matches:
        if m.keyword == keyword and m.kind in ("single", "list"):
            return list(m.values)
    return []


class QueryRetrieveProxy:
    """The Q/R proxy of one router process (a listener's Q/R handlers share it)."""

    def __init__(self, cfg: Config, state: State, spool: Spool) -> None:
        pacs = pacs_for(cfg, state, spool)
        assert pacs is not None, "query_retrieve_proxy is not set"
        self.pacs: Pacs = pacs
        self.cfg, self.state, self.spool = cfg, state, spool
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # WADO-RS fetches under way, by (study, series): a second request joins the first
        self._fetching: dict[tuple[str, str | None], threading.Event] = {}
        self._fetching_lock = threading.Lock()

    def describe(self) -> str:
        return f"Q/R proxy to {self.pacs.describe()}"

    # ---- C-FIND ------------------------------------------------------------------------------

    def merge(self, local: list[Dataset], identifier: Dataset, level: str, ae_title: str,
              model: str = "study") -> tuple[list[Dataset], str]:
        """The spool's answers and the PACS's, deduplicated by the level's unique key, each
        with RetrieveAETitle ``ae_title``; and what went wrong at the PACS ("": nothing; the
        spool's answers are still all there)."""
        key = query.UNIQUE_KEYS[level]
        seen = {str(ds.get(key, "")) for ds in local}
        problem = ""
        limit = self.cfg.query_retrieve_proxy_max_answers
        try:
            remote, capped = self.pacs.find(identifier, limit, model)
            if capped:
                problem = f"the PACS has more than {limit} matches " \
                          "(query_retrieve_proxy_max_answers)"
        except PacsError as exc:
            remote, problem = [], f"PACS not reachable: {exc}"
        except Exception as exc:  # noqa: BLE001 - answers the PACS sent that make no sense
            remote, problem = [], f"PACS not reachable: its answer cannot be read: " \
                f"{type(exc).__name__}: {exc}"
        out = list(local)
        for ds in remote:
            uid = str(ds.get(key, "") or "")
            if uid and uid in seen:
                continue
            seen.add(uid)
            out.append(ds)
        for ds in out:
            ds.RetrieveAETitle = ae_title
        log.info("Q/R proxy: C-FIND %s level: %d answer(s) from the spool, %d from the PACS "
                 "(%d new)%s", level, len(local), len(remote), len(out) - len(local),
                 f"; {problem}" if problem else "")
        return out, problem

    # ---- C-MOVE / C-GET ---------------------------------------------------------------------

    def plan(self, identifier: Dataset, q: query.Query,
             held: Sequence[Instance]) -> tuple[list[Listed], str]:
        """What the PACS holds of the request and the spool does not; and why the PACS could
        not be asked ("" when it was)."""
        studies = _values(q, "StudyInstanceUID")
        try:
            if not studies:
                studies = self.pacs.studies(identifier)
            listed = self.pacs.listing(studies, _values(q, "SeriesInstanceUID"),
                                       _values(q, "SOPInstanceUID"))
        except PacsError as exc:
            return [], f"PACS not reachable: {exc}"
        except Exception as exc:  # noqa: BLE001 - answers that make no sense: the spool's go
            return [], f"PACS not reachable: its answer cannot be read: " \
                f"{type(exc).__name__}: {exc}"
        have = {i.sop_uid for i in held}
        present = self.state.held_instances([i.sop for i in listed])
        return [i for i in listed if i.sop not in have and i.sop not in present], ""

    def stream(self, missing: Sequence[Listed]) -> Iterator[Instance | Missing]:
        """Fetch ``missing`` from the PACS; each instance as soon as it is in the spool, then
        the ones that did not come (``Missing``)."""
        arrivals: queue.Queue[Any] = queue.Queue()
        failure: list[str] = []

        def run() -> None:
            try:
                self.pacs.retrieve(missing, arrivals.put)
            except PacsError as exc:
                failure.append(str(exc))
            except Exception as exc:  # a defect: said once, the requester still gets a status
                failure.append(f"{type(exc).__name__}: {exc}")
            finally:
                arrivals.put(_DONE)

        for study in sorted({m.study for m in missing}):
            self.state.proxy_used(study, time.time())
        threading.Thread(target=run, name="qr-proxy-fetch", daemon=True).start()
        wanted = {m.sop: m for m in missing}
        came: set[str] = set()
        while True:
            item = arrivals.get()
            if item is _DONE:
                break
            if item.sop_uid in wanted and item.sop_uid not in came:
                came.add(item.sop_uid)
                yield item
        why = failure[0] if failure else "not sent by the PACS"
        if failure:
            log.warning("Q/R proxy: fetching from %s failed after %d of %d instance(s): %s",
                        self.pacs.describe(), len(came), len(wanted), why)
        for sop, m in wanted.items():
            if sop not in came:
                yield Missing(sop, m.study, why)

    def served(self, instances: Sequence[Instance]) -> None:
        """A retrieve served these from the spool: cached studies stay longer."""
        now = time.time()
        cached = set(self.state.proxy_unused_since(now + 1))
        for study in sorted({i.study_uid for i in instances} & cached):
            self.state.proxy_used(study, now)

    # ---- WADO-RS hook ------------------------------------------------------------------------

    def fetch(self, study_uid: str, series_uid: str | None = None,
              timeout: float | None = None) -> bool:
        """Bring the study (or one series) into the spool from the PACS; True once every
        instance the PACS lists of it is in the spool and indexed (the DICOMweb server's hook
        for a study it does not hold)."""
        deadline = time.monotonic() + (timeout if timeout is not None
                                       else self.cfg.query_retrieve_proxy_timeout)
        series = [series_uid] if series_uid else []
        try:
            listed = self.pacs.listing([study_uid], series)
        except Exception as exc:  # noqa: BLE001 - PacsError, or answers that make no sense:
            # one line, and the DICOMweb client gets its 404 rather than a 500
            why = str(exc) if isinstance(exc, PacsError) else \
                f"its answer cannot be read: {type(exc).__name__}: {exc}"
            log.warning("Q/R proxy: fetching study %s from %s: %s", study_uid,
                        self.pacs.describe(), why)
            return False
        if not listed:
            return False
        held = self.state.held_instances([i.sop for i in listed])
        missing = [i for i in listed if i.sop not in held]
        self.state.proxy_used(study_uid, time.time())
        if not missing:
            return True
        done = self._start_fetch(study_uid, series_uid, missing)
        finished = done.wait(max(0.0, deadline - time.monotonic()))
        held = self.state.held_instances([i.sop for i in listed])
        ok = all(i.sop in held for i in listed)
        count = f"{sum(1 for i in listed if i.sop in held)} of {len(listed)} instance(s)"
        log.info("Q/R proxy: study %s%s for WADO-RS: %s in the spool%s", study_uid,
                 f" series {series_uid}" if series_uid else "", count,
                 "" if ok or finished else "; the PACS is still sending")
        if not ok and not finished:
            raise StillFetching(f"{count} of study {study_uid} came from the PACS within "
                                "wado_proxy_timeout; the rest is still coming")
        return ok

    def _start_fetch(self, study_uid: str, series_uid: str | None,
                     missing: list[Any]) -> threading.Event:
        """The fetch of (study, series) under way, or a new one: set once it ended. At most
        ``query_retrieve_proxy_max_fetches`` at once (StillFetching past that: 503)."""
        key = (study_uid, series_uid)
        with self._fetching_lock:
            done = self._fetching.get(key)
            if done is not None:
                return done  # the same study asked again meanwhile: one transfer
            limit = self.cfg.query_retrieve_proxy_max_fetches
            if len(self._fetching) >= limit:
                raise StillFetching(f"{limit} studies are being fetched from the PACS already "
                                    "(query_retrieve_proxy_max_fetches)")
            done = self._fetching[key] = threading.Event()

        def run() -> None:
            try:
                for _item in self.stream(missing):
                    pass
            except Exception as exc:  # noqa: BLE001 - one line; the waiters see what is in
                log.warning("Q/R proxy: fetching study %s ended: %s: %s", study_uid,
                            type(exc).__name__, exc)
            finally:
                with self._fetching_lock:
                    self._fetching.pop(key, None)
                done.set()

        threading.Thread(target=run, name="qr-proxy-wado", daemon=True).start()
        return done

    # ---- the cache ---------------------------------------------------------------------------

    def expire(self, now: float | None = None) -> int:
        """Remove the fetched studies nobody used for ``query_retrieve_proxy_cache``; those
        a route sent on wait until their jobs are done. Returns how many went."""
        now = time.time() if now is None else now
        gone = 0
        for study in self.state.proxy_unused_since(now - self.cfg.query_retrieve_proxy_cache):
            row = self.state.study(study)
            if row is not None and row.state not in ("unrouted", "delivered", "purged"):
                continue  # still receiving, or a route that names Proxied is sending it
            if row is not None and row.state != "purged" and not all(
                    i.tags.get(PROXIED_TAG) for i in self.state.instances(study)):
                # pushed instances too: the study is the router's, kept as any other
                log.info("Q/R proxy: study %s leaves the cache but stays in the spool (it "
                         "holds instances that were sent to the router)", study)
            elif row is not None and row.state != "purged":
                freed = self.spool.purge(study)
                log.info("Q/R proxy: study %s left the cache (unused for %g s; %d bytes)",
                         study, self.cfg.query_retrieve_proxy_cache, freed)
                gone += 1
            self.state.proxy_forget(study)
        return gone

    def start(self) -> None:
        """The cache's clock: expired studies are looked for every minute (the main process
        only)."""
        self._thread = threading.Thread(target=self._run, name="qr-proxy-cache", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        every = max(1.0, min(60.0, self.cfg.query_retrieve_proxy_cache / 4))
        while not self._stop.wait(every):
            try:
                self.expire()
            except Exception as exc:  # the state is down: tried again next time
                log.warning("Q/R proxy: cache expiry failed: %s: %s", type(exc).__name__, exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
