"""Storage SCP: the AE that PACS, modalities and Orthanc send to.

C-ECHO, and C-STORE for every storage SOP class pynetdicom knows with every transfer syntax pydicom
knows; datasets are kept as received. A C-STORE is acknowledged with 0x0000 only after the spool
made the instance durable (file fsync'd and renamed, row committed).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from .. import metrics
from ..config import Config, ListenerConfig
from ..dimse import error_comment
from ..netutil import adjust_associations, receive_c_store_into, set_reception_note
from ..spool import ReceiveFile, Spool, note
from ..storage_contexts import ACCEPTED_SYNTAXES
from . import ingest
from .qr import ServiceAE

log = logging.getLogger("dicomrouter.scp")



def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = error_comment(comment)
    return ds


def acceptor_ae(cfg: Config, listener: ListenerConfig | None = None) -> AE:
    """A pynetdicom AE that accepts like our listener: limits, AE checks, Verification."""
    lst = listener or cfg.listener
    adjust_associations()
    ae = ServiceAE(ae_title=lst.ae_title)
    ae.maximum_pdu_size = cfg.max_pdu
    limits = cfg.limits
    ae.maximum_associations = limits.max_associations
    ae.network_timeout = limits.network_timeout
    ae.dimse_timeout = limits.dimse_timeout
    ae.acse_timeout = limits.acse_timeout
    # off by default: several called AE titles may be routed differently (CalledAE)
    ae.require_called_aet = lst.check_called_ae
    ae.require_calling_aet = list(lst.allowed_calling_aes)
    ae.add_supported_context(Verification)
    return ae


class _AssociationTally:
    __slots__ = ("calling", "peer", "stored", "failed", "studies")

    def __init__(self, calling: str, peer: str) -> None:
        self.calling = calling
        self.peer = peer
        self.stored = 0
        self.failed = 0
        self.studies: set[str] = set()


class StorageSCP:
    """Wraps a pynetdicom AE (``receiver: pynetdicom``); same interface as FastStorageSCP."""

    def __init__(self, cfg: Config, spool: Spool, listener: ListenerConfig | None = None) -> None:
        self.cfg = cfg
        self.listener = listener or cfg.listener
        self.spool = spool
        self.server: ThreadedAssociationServer | None = None
        self._tally: dict[int, _AssociationTally] = {}
        self._lock = threading.Lock()
        self._services: list[tuple[str, Any, Any, bool]] = []

    def add_service(self, abstract_syntax: str, event: Any, handler: Any,
                    roles: bool = False) -> None:
        """Serve another SOP class with a pynetdicom handler (Q/R, ...). Call before start."""
        self._services.append((abstract_syntax, event, handler, roles))

    def start(self) -> ThreadedAssociationServer:
        receive_c_store_into(self.spool.new_receive_file)
        ae = acceptor_ae(self.cfg, self.listener)
        for cx in AllStoragePresentationContexts:
            # both roles: a C-GET requestor proposes to be the storage SCP
            ae.add_supported_context(cx.abstract_syntax, ACCEPTED_SYNTAXES, scu_role=True,
                                     scp_role=True)
        for syntax, _, _, roles in self._services:
            if roles:
                ae.add_supported_context(syntax, scu_role=True, scp_role=True)
            else:
                ae.add_supported_context(syntax)
        handlers: list[Any] = [(event, handler) for _, event, handler, _ in self._services] + [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]
        lst = self.listener
        self.server = ae.start_server((lst.bind, lst.port), block=False,
                                      evt_handlers=handlers)
        log.info("listening as %s on %s:%d, listener %s (allowed calling AEs: %s)",
                 lst.ae_title, lst.bind, lst.port, lst.name,
                 ", ".join(lst.allowed_calling_aes) or "any")
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    @staticmethod
    def _peer(event: evt.Event) -> str:
        r = event.assoc.requestor
        return f"{r.address}:{r.port}"

    @staticmethod
    def _called(event: evt.Event) -> str:
        prim = getattr(event.assoc.requestor, "primitive", None)
        called = getattr(prim, "called_ae_title", None)
        return (called or event.assoc.acceptor.ae_title).strip()

    def _on_echo(self, event: evt.Event) -> int:
        log.info("C-ECHO from %s (%s)", event.assoc.requestor.ae_title, self._peer(event))
        return 0x0000

    def _routing_keys(self, assoc: Any) -> dict[str, str]:
        """The index tags this listener gives each instance: Listener and SourceHost."""
        return {"_Listener": self.listener.name, "_SourceHost": str(assoc.requestor.address)}

    def _on_requested(self, event: evt.Event) -> None:
        """Before the association is accepted (no dataset can have come yet): the reception
        note its datasets' files carry, for start-up's adoption (spool/note.py)."""
        prim = event.assoc.requestor.primitive
        calling = str(getattr(prim, "calling_ae_title", "") or "").strip()
        set_reception_note(event.assoc, note.pack(calling, self._called(event),
                                                  self._routing_keys(event.assoc)))

    def _on_accepted(self, event: evt.Event) -> None:
        calling = event.assoc.requestor.ae_title
        metrics.ASSOCIATIONS.labels("accepted").inc()
        with self._lock:
            self._tally[id(event.assoc)] = _AssociationTally(calling, self._peer(event))
        log.debug("association from %s (%s) accepted", calling, self._peer(event))

    def _on_rejected(self, event: evt.Event) -> None:
        calling = event.assoc.requestor.ae_title
        metrics.ASSOCIATIONS.labels("rejected").inc()
        allowed = self.listener.allowed_calling_aes
        if allowed and calling not in allowed:
            log.warning("rejected association from calling AE %r (%s): not in "
                        "allowed_calling_aes", calling, self._peer(event))
        else:
            log.warning("rejected association from calling AE %r (%s)", calling,
                        self._peer(event))

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            t = self._tally.pop(id(event.assoc), None)
        if t is None or not (t.stored or t.failed):
            return
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        log.info("association from %s (%s) %s: %d instance(s) stored, %d refused, %d study(ies)",
                 t.calling, t.peer, how, t.stored, t.failed, len(t.studies))

    def _count(self, event: evt.Event, ok: bool, study: str | None = None) -> None:
        with self._lock:
            t = self._tally.get(id(event.assoc))
            if t is None:
                return
            if ok:
                t.stored += 1
                if study:
                    t.studies.add(study)
            else:
                t.failed += 1

    def _on_store(self, event: evt.Event) -> int | Dataset:
        with metrics.STORE_LATENCY.time():
            return self._store(event)

    def _store(self, event: evt.Event) -> int | Dataset:
        req = event.request
        rx = getattr(req, "_dataset_file", None)
        calling = event.assoc.requestor.ae_title
        sop = str(req.AffectedSOPInstanceUID)
        if not isinstance(rx, ReceiveFile):
            self._count(event, False)
            log.error("C-STORE %s from %s: no dataset received", sop, calling)
            return _failure(ingest.CANNOT_UNDERSTAND, "no dataset")
        status, comment, accepted = ingest.accept(
            self.spool, rx, calling, self._called(event),
            (str(req.AffectedSOPClassUID), sop))
        if accepted is None:
            self._count(event, False)
            return _failure(status, comment)
        accepted.tags.update(self._routing_keys(event.assoc))
        self.spool.place(accepted)
        study = accepted.tags["StudyInstanceUID"]
        self._count(event, True, study)
        log.debug("stored %s of study %s from %s", sop, study, calling)
        return 0x0000
