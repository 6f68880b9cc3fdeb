"""The router as a Query/Retrieve SCP over what its spool holds: pynetdicom's C-FIND, C-MOVE
and C-GET service classes with our handlers (PS3.4 annex C), Patient Root and Study Root.

Matching is ``query.parse`` → ``State.qr_rows`` (indexed columns). C-MOVE destinations come
from ``known_aes``; an unknown one gets 0xA801 from pynetdicom when the handler yields no
address. Sub-operations, their counts and the failed SOP Instance UID list are pynetdicom's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt

from .. import query
from ..config import Config
from ..qrscu import MODELS
from ..spool import Spool
from ..state import Instance, State

log = logging.getLogger("dicomrouter.qr")

PATIENT_ROOT = {str(sop) for sop in MODELS["patient"]}  # (find, move, get) per root
GET_MODELS = {str(MODELS["patient"][2]), str(MODELS["study"][2])}
MAX_CONTEXTS = 128


class ServiceAE(AE):
    """A pynetdicom AE whose calling AE title for outgoing associations can be set per thread.

    pynetdicom opens the C-MOVE sub-operation association from the handler's thread with the
    AE's own title; ``known_aes.<AE>.calling_ae`` asks for another one toward that peer.
    """

    _calling = threading.local()

    @property  # type: ignore[override]
    def ae_title(self) -> str:
        return getattr(self._calling, "title", None) or self._ae_title

    @ae_title.setter
    def ae_title(self, value: str) -> None:
        AE.ae_title.fset(self, value)  # type: ignore[attr-defined]

    def set_calling(self, title: str | None) -> None:
        self._calling.title = title


def _peer(event: evt.Event) -> str:
    r = event.assoc.requestor
    return f"{r.ae_title} ({r.address}:{r.port})"


def store_contexts(instances: list[Instance]) -> list[Any]:
    """Presentation contexts for sending ``instances``: each SOP class with the stored syntax
    (as received) and the uncompressed ones pynetdicom can convert between."""
    by_class: dict[str, list[str]] = {}
    for inst in instances:
        syntaxes = by_class.setdefault(inst.sop_class, [])
        for ts in (inst.transfer_syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if ts and str(ts) not in syntaxes:
                syntaxes.append(str(ts))
    contexts = [build_context(sop, syntaxes) for sop, syntaxes in by_class.items()]
    return contexts[:MAX_CONTEXTS]


class QueryRetrieveSCP:
    """C-FIND / C-MOVE / C-GET handlers bound to the router's state and spool."""

    def __init__(self, cfg: Config, state: State, spool: Spool) -> None:
        self.cfg = cfg
        self.state = state
        self.spool = spool

    def services(self) -> list[tuple[str, Any, Any]]:
        """(abstract syntax, event, handler) for the listener's ``add_service``."""
        out: list[tuple[str, Any, Any]] = []
        for find, move, get in (MODELS["patient"], MODELS["study"]):
            out += [(str(find), evt.EVT_C_FIND, self.on_find),
                    (str(move), evt.EVT_C_MOVE, self.on_move),
                    (str(get), evt.EVT_C_GET, self.on_get)]
        return out

    def _parse(self, event: evt.Event, what: str) -> query.Query:
        patient_root = str(event.context.abstract_syntax) in PATIENT_ROOT
        try:
            return query.parse(event.identifier, patient_root)
        except query.QueryError:
            raise
        except Exception as exc:  # an identifier pydicom cannot decode
            raise query.QueryError(0xC000 if what != "C-MOVE" else 0xC500,
                                   f"cannot read the identifier: {type(exc).__name__}: "
                                   f"{exc}") from None

    # ---- C-FIND ----------------------------------------------------------------------------

    def on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        try:
            q = self._parse(event, "C-FIND")
        except query.QueryError as exc:
            log.warning("C-FIND from %s refused with 0x%04X: %s", _peer(event), exc.status, exc)
            yield exc.status, None
            return
        limit = self.cfg.limits.max_query_results
        rows = self.state.qr_rows(q, limit + 1)
        log.info("C-FIND from %s: %s → %d match(es)%s", _peer(event), query.describe(q),
                 min(len(rows), limit), " (max_query_results reached)" if len(rows) > limit
                 else "")
        for row in rows[:limit]:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, query.response(q, row)
        if len(rows) > limit:
            # Warning: more matches than max_query_results
            yield 0xB000, None

    # ---- C-MOVE and C-GET ------------------------------------------------------------------

    def _selected(self, event: evt.Event, what: str) -> tuple[query.Query, list[Instance]]:
        q = self._parse(event, what)
        if not q.matches:
            raise query.QueryError(0xA900,
                                   f"a {what} needs at least one key with a value")
        return q, self.state.qr_instances(q)

    def _dataset(self, inst: Instance) -> Dataset | None:
        try:
            with self.spool.open(inst) as f:
                return dcmread(f)
        except Exception as exc:  # deleted since the query, unreadable: a failed sub-operation
            log.error("instance %s of study %s cannot be read from the spool (%s: %s)",
                      inst.sop_uid, inst.study_uid, type(exc).__name__, exc)
            return None

    def _send(self, event: evt.Event, instances: list[Instance]
              ) -> Iterator[tuple[int, Dataset | None]]:
        for inst in instances:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            ds = self._dataset(inst)
            if ds is None:
                missing = Dataset()  # counted as a failed sub-operation by pynetdicom
                missing.SOPInstanceUID = inst.sop_uid
                yield 0xFF00, missing
                continue
            yield 0xFF00, ds

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        target = str(event.move_destination or "").strip()
        known = self.cfg.known_aes.get(target)
        if known is None:
            log.warning("C-MOVE from %s to %r refused with 0xA801: move destination unknown "
                        "(not in known_aes: %s)", _peer(event), target,
                        ", ".join(self.cfg.known_aes) or "none configured")
            yield None, None
            return
        try:
            q, instances = self._selected(event, "C-MOVE")
        except query.QueryError as exc:
            log.warning("C-MOVE from %s refused with 0x%04X: %s", _peer(event), exc.status, exc)
            yield known.host, known.port  # pynetdicom asks for these before any status
            yield 1
            yield exc.status, None
            return
        studies = sorted({i.study_uid for i in instances})
        log.info("C-MOVE from %s: %s → %d instance(s) of %d study(ies) to %s (%s:%d)",
                 _peer(event), query.describe(q), len(instances), len(studies), target,
                 known.host, known.port)
        ae = event.assoc.ae
        if known.calling_ae and isinstance(ae, ServiceAE):
            ae.set_calling(known.calling_ae)
        try:
            yield known.host, known.port, {"contexts": store_contexts(instances) or
                                           [build_context(UID("1.2.840.10008.1.1"))]}
        finally:
            if isinstance(ae, ServiceAE):
                ae.set_calling(None)
        yield len(instances)
        yield from self._send(event, instances)

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        try:
            q, instances = self._selected(event, "C-GET")
        except query.QueryError as exc:
            log.warning("C-GET from %s refused with 0x%04X: %s", _peer(event), exc.status, exc)
            yield 1  # (zero sub-operations would be answered with success)
            yield exc.status, None
            return
        log.info("C-GET from %s: %s → %d instance(s)", _peer(event), query.describe(q),
                 len(instances))
        yield len(instances)
        yield from self._send(event, instances)
