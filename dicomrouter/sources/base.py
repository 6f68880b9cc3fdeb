"""The one interface every pull source implements, and what they share: when a study is due
(its instance count at the source differs from what the last complete pull saw, and stayed
so for ``source_stable_age``) and the bookkeeping of one pull."""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlparse

from ..config import Config, SourceConfig
from ..destinations.base import Context
from ..scp.ingest import store_file
from ..spool import Spool
from ..state import SourceStudy, State

log = logging.getLogger("dicomrouter.sources")


class PullError(Exception):
    """A poll could not finish (peer down, refused, an instance refused by the spool); what
    was pulled before stays, the rest is tried again at the next poll."""


class Stability:
    """Whether a study's instance count at the source stayed the same for ``age`` seconds, as
    the polls saw it. Kept in memory: after a restart a study waits the age once more."""

    def __init__(self, age: float) -> None:
        self.age = age
        self._seen: dict[str, tuple[int, float]] = {}  # key → (count, first seen at it)

    def stable(self, key: str, count: int, now: float) -> bool | None:
        """True once stable; False while waiting; None when the count is new (it waits)."""
        seen = self._seen.get(key)
        if seen is None or seen[0] != count:
            self._seen[key] = (count, now)
            return True if self.age <= 0 else None
        return now - seen[1] >= self.age

    def forget(self, key: str) -> None:
        self._seen.pop(key, None)

    def keep_only(self, keys: Iterable[str]) -> None:
        """Forget the studies the last poll did not see (out of the window, deleted)."""
        keep = set(keys)
        for key in [k for k in self._seen if k not in keep]:
            del self._seen[key]

    def next_ready(self) -> float | None:
        """When the first study now waiting becomes stable (None: none waits)."""
        return min((since + self.age for _, since in self._seen.values()), default=None)


@dataclass
class Pull:
    """One pull of one study: the source sets ``source_instances`` once nothing is missing."""

    source_instances: int | None = None
    first: bool = False  # the study's first instances from this source
    brought: int = 0  # instances this pull brought into the router (an interrupted one's too)


class Source(ABC):
    """A peer the router polls; built from its validated model and the ``Context`` (which
    brings the router's configuration, the state and the spool). A source type is one module:
    its model (``config.source_type``) and its class (``sources.implements``)."""

    def __init__(self, cfg: SourceConfig, ctx: Context) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.ctx = ctx
        self.router: Config = ctx.config
        self.state: State = ctx.state  # type: ignore[assignment]
        self.spool: Spool = ctx.spool
        self.stopping = threading.Event()
        self.stability = Stability(float(getattr(cfg, "source_stable_age", 0.0) or 0.0))
        #: poll again at this time (a waiting study becomes stable) if before the interval
        self.wake_at: float | None = None

    @abstractmethod
    def poll(self) -> int:
        """Pull what is new; returns the number of studies something was pulled of. Raises on
        failure."""

    def housekeeping(self) -> None:  # noqa: B027 - optional hook
        """After each poll (e.g. delete at the source what was delivered everywhere)."""

    def describe(self) -> str:
        return self.cfg.type

    def due(self, row: SourceStudy | None, key: str, count: int, now: float) -> bool:
        """Whether to pull the study now: the source counts other instances than when a pull
        last left nothing missing, and that count has not changed for ``source_stable_age``
        (a study still being stored at the source waits)."""
        if count <= 0 or (row is not None and row.source_instances == count):
            self.stability.forget(key)
            return False
        stable = self.stability.stable(key, count, now)
        if stable:
            self.stability.forget(key)
            return True
        if stable is None:
            log.debug("source %s: study %s has %d instance(s) there; pulled once that count "
                      "holds for %g s", self.name, key, count, self.stability.age)
        return False

    @contextmanager
    def pulling(self, key: str, study_uid: str, delete_after: bool = False) -> Iterator[Pull]:
        """Bracket one study's pull: the state keeps the router's count of the study as the
        baseline, and records at the end (also when the pull fails) what it brought and, when
        ``source_instances`` was set, that the study is whole at that count."""
        pull = Pull()
        self.state.source_pull_started(self.name, key, study_uid)
        try:
            yield pull
        finally:
            pull.first, pull.brought = self.state.source_pulled(
                self.name, key, study_uid, pull.source_instances, delete_after)

    def store(self, chunks: Iterable[bytes]) -> dict[str, str]:
        """Ingest one pulled Part 10 file; its index tags. PullError if the spool refused it."""
        url = getattr(self.cfg, "url", None)
        host = urlparse(url).hostname if url else None
        status, comment, tags = store_file(self.spool, chunks, self.name, self.router.ae_title,
                                           {"_SourceHost": host} if host else None)
        if tags is None:
            raise PullError(f"an instance was refused with 0x{status:04X}: {comment}")
        return tags


def describe_pull(pull: Pull, missing: int, count: int) -> str:
    """How a pull went, for the log: a new study or a delta, and what it brought (an
    interrupted pull's instances included)."""
    kind = "new study" if pull.first else "delta" if pull.brought else "nothing new"
    return f"{kind}, {missing} of {count} instance(s) there were missing; {pull.brought} in"


__all__ = ["Pull", "PullError", "Source", "Stability", "describe_pull"]
