"""The one interface every pull source implements."""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable
from urllib.parse import urlparse

from ..config import Config, SourceConfig
from ..scp.ingest import store_file
from ..spool import Spool
from ..state import State

log = logging.getLogger("dicomrouter.sources")


class PullError(Exception):
    """A poll could not finish (peer down, refused, an instance refused by the spool); what
    was pulled before stays, the rest is tried again at the next poll."""


class Source(ABC):
    def __init__(self, cfg: SourceConfig, router: Config, state: State, spool: Spool) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.router = router
        self.state = state
        self.spool = spool
        self.stopping = threading.Event()

    @abstractmethod
    def poll(self) -> int:
        """Pull what is new; returns the number of studies pulled. Raises on failure."""

    def housekeeping(self) -> None:  # noqa: B027 - optional hook
        """After each poll (e.g. delete at the source what was delivered everywhere)."""

    def describe(self) -> str:
        return self.cfg.type

    def store(self, chunks: Iterable[bytes]) -> dict[str, str]:
        """Ingest one pulled Part 10 file; its index tags. PullError if the spool refused it."""
        url = self.cfg.options.get("url")
        host = urlparse(url).hostname if url else None
        status, comment, tags = store_file(self.spool, chunks, self.name, self.router.ae_title,
                                           {"_SourceHost": host} if host else None)
        if tags is None:
            raise PullError(f"an instance was refused with 0x{status:04X}: {comment}")
        return tags
