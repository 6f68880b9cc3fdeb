"""The one interface every destination implements."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..config import DestinationConfig
from ..ratelimit import TokenBucket
from ..state import Instance, State


class DeliveryError(Exception):
    """The destination cannot take anything now (unreachable, refused the association...).

    The job fails as a whole and is retried later.
    """

    #: waiting cannot heal it: the job is dead-lettered at once, not retried
    permanent = False


class PermanentFailure(DeliveryError):
    """A failure that waiting cannot heal (the destination refuses our AE title, the bucket
    does not exist, an HTTP 4xx, the study is no longer whole in the spool): the job goes to the
    dead letter at once with the reason and ``action``, what the operator can do about it (after
    which ``dicomrouter retry --dead`` requeues it)."""

    permanent = True

    def __init__(self, reason: str, action: str) -> None:
        super().__init__(f"{reason} (not retried: {action})")
        self.reason = reason
        self.action = action


class Interrupted(DeliveryError):
    """The router stops while a session waits (a remote processing step waiting for
    results): the job is released unfinished, not counted as a failed attempt."""


class InstanceRejected(Exception):
    """This one instance was refused (a failure status); the others may still go.

    ``permanent``: the same bytes will be refused again (the dataset does not match its SOP
    class, the peer cannot understand it, a transform refuses it, the spool file is gone);
    when every failure of a run is permanent, the job is dead-lettered at once.
    """

    def __init__(self, reason: str, permanent: bool = False) -> None:
        super().__init__(reason)
        self.permanent = permanent


class Session(ABC):
    """One delivery batch (for a network destination, one association).

    The contract the ledger relies on: ``send`` returns True when the instance is durable at
    the destination once it returns (C-STORE success, a file written and synced), False when it
    was only buffered; ``commit`` delivers what was buffered (a zip, a STOW-RS batch, a staged
    folder moved into place, a study-wide C-MOVE) and returns the SOP Instance UIDs now durable
    there. A session that learns what became durable batch by batch (each STOW-RS response,
    each series' C-MOVE) says so at once through :meth:`durable`: the ledger records it then, so
    a later failure or a crash does not forget it and the retry sends only the rest. Nothing
    else marks an instance delivered; an exception from ``commit`` marks nothing more, and the
    job's retry sends the other buffered instances again. ``close`` releases resources and says
    nothing about delivery.

    The ledger's ``sends`` counts what went on the wire. A session whose ``send`` transmits
    (``transmits_on_send``) is counted before each ``send``; a buffering one calls
    :meth:`transmitting` right before a batch leaves, and :meth:`not_transmitted` when the
    connection could not even be made.
    """

    #: ``send`` puts the instance on the wire (False: it buffers; see :meth:`transmitting`)
    transmits_on_send = True
    #: set by the delivery worker; see :meth:`durable`, :meth:`transmitting`
    on_durable: Callable[[Sequence[str]], None] | None = None
    on_transmit: Callable[[Sequence[str], int], None] | None = None

    def durable(self, uids: Sequence[str]) -> None:
        """These instances (as sent) are durable at the destination now."""
        if self.on_durable is not None and uids:
            self.on_durable(list(uids))

    def transmitting(self, uids: Sequence[str]) -> None:
        """These buffered instances (as sent) go on the wire now."""
        if self.on_transmit is not None and uids:
            self.on_transmit(list(uids), 1)

    def not_transmitted(self, uids: Sequence[str]) -> None:
        """The batch announced by :meth:`transmitting` never left (no connection)."""
        if self.on_transmit is not None and uids:
            self.on_transmit(list(uids), -1)

    @abstractmethod
    def send(self, inst: Instance, data: BinaryIO) -> bool:
        """Deliver (True) or buffer (False) one instance read from ``data`` (``Spool.open``);
        raise InstanceRejected (this one) or DeliveryError (the destination, now)."""

    #: why buffered instances were not delivered (uid → reason), filled by ``commit``
    refused: dict[str, str] = {}  # noqa: RUF012 - read-only default; sessions assign their own

    def commit(self) -> Sequence[str]:
        """Deliver what ``send`` buffered; the SOP Instance UIDs now durable at the
        destination. Instance-by-instance destinations have nothing to commit."""
        return ()

    def close(self) -> None:  # noqa: B027 - optional hook
        """End the batch (release the association)."""

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Context:
    """What every destination and pull source is built with, besides its own validated model:
    the router's AE title (the default calling AE), the state (storage commitment reports,
    sources' cursors), the spool (where pulled instances go), the router's configuration, and
    the clock."""

    router_ae: str = "DICOMROUTER"
    state: State | None = None
    spool: Any = None
    config: Any = None
    clock: Callable[[], float] = time.time


class Destination(ABC):
    """A place studies are delivered to; built from its validated model and the context.
    A destination type is one module: its model (registered with ``config.destination_type``)
    and its class (registered with ``registry.implements``)."""

    #: how many sessions may send parts of one study at the same time (dicom: ``associations``)
    associations: int = 1
    #: a session gets every instance of the study, not only the undelivered ones (a zip is the
    #: study: a late arrival re-sends it whole)
    whole_study: bool = False
    #: a session is a connection worth keeping open for the next arrival (an association):
    #: ``forward: immediate`` runs wait ``forward_keep_open`` on it for more instances
    holds_connection: bool = False

    def takes(self, inst: Instance) -> bool:
        """Whether this destination ever gets ``inst`` (a processing step never gets the
        results of processing): what it does not take is no reason to send it the study."""
        return True

    def interrupt(self) -> None:  # noqa: B027 - optional hook
        """The router stops: end a long wait inside a session now (a remote processing step
        waiting for results)."""

    def __init__(self, cfg: DestinationConfig, ctx: Context) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.name = cfg.name
        #: ``max_rate``: one bucket for every session of this destination, whatever thread;
        #: each type asks it for its bytes where they leave (None: no cap)
        rate = getattr(cfg, "max_rate", None)
        self.limiter: TokenBucket | None = TokenBucket(rate) if rate else None

    @abstractmethod
    def open(self, instances: Sequence[Instance], routes: Sequence[str] = ()) -> Session:
        """Start a batch for these instances (contexts are negotiated from them up front);
        ``routes`` are the routes that sent the study here (manifests name them)."""

    #: a folder on the spool's disk for the destination's temporary files (a study's zip),
    #: set by the delivery workers before any session; emptied by :meth:`recover` at start
    workdir: Path | None = None

    def describe(self) -> str:
        return self.cfg.type

    #: what :meth:`probe` does, for the log ("C-ECHO", "HTTP HEAD"...)
    probe_kind = "the next delivery"

    def probe(self) -> None:  # noqa: B027 - optional hook
        """Is the destination reachable again? Called while its circuit breaker is open
        (breaker.py); raises DeliveryError (or OSError) with why not. Cheap and sending no
        study: a C-ECHO, an HTTP request, an S3 head-bucket, a test file. The default finds
        nothing wrong, so the breaker lets the next job try (and opens again if it fails)."""

    def recover(self) -> list[str]:
        """Start-up, before any delivery: clean up what a crashed run left behind (temporary
        files, an unfinished upload); one log line per thing done. Default: nothing."""
        return []
