"""The router as a Query/Retrieve SCP over what its spool holds (PS3.4 annex C), Patient Root
and Study Root: pynetdicom's C-FIND service with our handler, and C-MOVE / C-GET answered by
our handlers through ``retrieve.RetrieveServiceClass`` (statuses, counts and sub-operations).

Matching is ``query.parse`` → ``State.qr_rows`` (indexed columns). Before parsing, the raw
identifier is walked (``walk.check_bytes``): pydicom reads an element whose declared length runs
past the data as if it were whole. C-MOVE destinations come from ``known_aes``.

Statuses (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4):

* 0xA900 an identifier the information model does not allow: no or unknown level, PATIENT in
  Study Root, a value its VR does not allow (``notadate``, a range with three ends), a C-MOVE or
  C-GET without any key value; 0xC000 an identifier that cannot be decoded; no sub-operation
  counts with either (none was attempted).
* C-FIND: 0xFF00 per match, 0xFF01 when the identifier has keys the router does not support;
  past ``max_query_results`` the first matches and a final 0xA700 (Refused: Out of Resources)
  with a comment: C-FIND has no warning status, and Success would claim every match was sent.
* C-MOVE: 0xA801 for a destination not in ``known_aes`` or that cannot be reached.
* With ``query_retrieve_proxy`` (``proxy/``): C-FIND answers merged with the PACS's, a final
  0xC001 when the PACS cannot be asked (the spool's matches were sent); C-MOVE/C-GET fetch
  what the spool lacks and send it on as it arrives, 0xA701 when the PACS cannot be asked and
  the spool holds nothing of the request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt

from .. import query
from ..config import Config
from ..destinations.base import DeliveryError
from ..destinations.store import Peer
from ..netutil import serve_query_retrieve_with, stream_c_store_from_files
from ..proxy import Listed, QueryRetrieveProxy
from ..qrscu import MODELS
from ..spool import Spool
from ..state import Instance, State
from ..walk import Malformed, check_bytes
from .retrieve import (
    GetSender,
    Missing,
    MoveSender,
    Responder,
    RetrieveServiceClass,
    StreamingMoveSender,
    answers_itself,
)
from .retrieve import perform as perform_suboperations

log = logging.getLogger("dicomrouter.qr")

PATIENT_ROOT = {str(sop) for sop in MODELS["patient"]}  # (find, move, get) per root
GET_MODELS = {str(MODELS["patient"][2]), str(MODELS["study"][2])}
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                 ExplicitVRBigEndian)
#: What the router accepts in the storage contexts a C-GET requester proposes (it is the SCP
#: there, the router sends): per context the first of these the requester lists. Uncompressed
#: first, unlike a storage association: a requester offering several syntaxes in one context
#: (DCMTK getscu: one context per SOP class) then gets every instance, whatever its stored
#: syntax, losslessly; a context with only compressed syntaxes gets those.
GET_STORE_SYNTAXES = list(_UNCOMPRESSED) + [ts for ts in AllTransferSyntaxes
                                            if ts not in _UNCOMPRESSED]


class ServiceAE(AE):
    """The pynetdicom AE of the listener's Q/R and commitment services (``server.acceptor_ae``)."""


def _peer(event: evt.Event) -> str:
    r = event.assoc.requestor
    return f"{r.ae_title} ({r.address}:{r.port})"


class QueryRetrieveSCP:
    """C-FIND / C-MOVE / C-GET handlers bound to the router's state and spool."""

    def __init__(self, cfg: Config, state: State, spool: Spool,
                 proxy: QueryRetrieveProxy | None = None) -> None:
        self.cfg = cfg
        self.state = state
        self.spool = spool
        self.proxy = proxy  # query_retrieve_proxy: the PACS behind the router

    def services(self) -> list[tuple[str, Any, Any]]:
        """(abstract syntax, event, handler) for the listener's ``add_service``."""
        serve_query_retrieve_with(RetrieveServiceClass)
        stream_c_store_from_files()  # C-GET sub-operations stream the spool files
        out: list[tuple[str, Any, Any]] = []
        for find, move, get in (MODELS["patient"], MODELS["study"]):
            out += [(str(find), evt.EVT_C_FIND, self.on_find),
                    (str(move), evt.EVT_C_MOVE, self.on_move),
                    (str(get), evt.EVT_C_GET, self.on_get)]
        return out

    def _parse(self, event: evt.Event) -> query.Query:
        patient_root = str(event.context.abstract_syntax) in PATIENT_ROOT
        raw = event.request.Identifier
        try:
            if raw is not None:
                check_bytes(raw.getvalue(), str(event.context.transfer_syntax),
                            self.cfg.limits.max_sequence_depth)
            return query.parse(event.identifier, patient_root)
        except query.QueryError:
            raise
        except Malformed as exc:
            raise query.QueryError(0xC000, f"the identifier is malformed: {exc}") from None
        except Exception as exc:  # an identifier pydicom cannot decode
            raise query.QueryError(0xC000, f"cannot read the identifier: {type(exc).__name__}: "
                                   f"{exc}") from None

    # ---- C-FIND ----------------------------------------------------------------------------

    def on_find(self, event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        try:
            q = self._parse(event)
        except query.QueryError as exc:
            log.warning("C-FIND from %s refused with 0x%04X: %s", _peer(event), exc.status, exc)
            yield _status(exc.status, str(exc)), None
            return
        limit = self.cfg.limits.max_query_results
        rows = self.state.qr_rows(q, limit + 1)
        log.info("C-FIND from %s: %s → %d match(es)%s%s", _peer(event), query.describe(q),
                 min(len(rows), limit), " (max_query_results reached)" if len(rows) > limit
                 else "", f"; keys not supported: {', '.join(q.unsupported)}"
                 if q.unsupported else "")
        pending = 0xFF01 if q.unsupported else 0xFF00
        answers = [query.response(q, row) for row in rows[:limit]]
        problem = ""
        if self.proxy is not None:
            model = "patient" if str(event.context.abstract_syntax) in PATIENT_ROOT \
                else "study"
            answers, problem = self.proxy.merge(answers, event.identifier, q.level,
                                                event.assoc.ae.ae_title, model)
        for ds in answers:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield pending, ds
        if len(rows) > limit:
            yield _status(0xA700, f"over max_query_results: only the first {limit} were "
                          "sent"), None
        elif problem.startswith("PACS not reachable"):
            # not Success: a study the PACS holds may be missing from these answers
            yield _status(0xC001, "PACS not reachable: the router's own matches only"), None
        elif problem:
            yield _status(0xA700, "PACS over query_retrieve_proxy_max_answers"), None

    # ---- C-MOVE and C-GET ------------------------------------------------------------------

    def _selected(self, event: evt.Event, what: str) -> tuple[query.Query, list[Instance]]:
        q = self._parse(event)
        if not q.matches:
            raise query.QueryError(0xA900, f"a {what} needs at least one key with a value")
        return q, self.state.qr_instances(q)

    @answers_itself
    def on_move(self, event: evt.Event) -> None:
        rsp: Responder = event.responder  # type: ignore[attr-defined]
        target = str(event.move_destination or "").strip()
        known = self.cfg.known_aes.get(target)
        if known is None:
            log.warning("C-MOVE from %s to %r refused with 0xA801: move destination unknown "
                        "(not in known_aes: %s)", _peer(event), target,
                        ", ".join(self.cfg.known_aes) or "none configured")
            rsp.refuse(0xA801, "move destination unknown")
            return
        if (selected := self._retrieve_request(event, rsp, "C-MOVE")) is None:
            return
        q, instances, missing = selected
        studies = sorted({i.study_uid for i in instances})
        log.info("C-MOVE from %s: %s → %d instance(s) of %d study(ies) to %s (%s:%d)%s",
                 _peer(event), query.describe(q), len(instances), len(studies), target,
                 known.host, known.port,
                 f", {len(missing)} more fetched from the PACS" if missing else "")
        requestor = event.assoc.requestor
        peer = Peer(target, known.host, known.port, known.calling_ae or event.assoc.ae.ae_title,
                    timeout=self.cfg.limits.dimse_timeout)
        originator = (requestor.ae_title, event.request.MessageID)
        sender: MoveSender = MoveSender(peer, instances, originator) if self.proxy is None \
            else StreamingMoveSender(peer, {(i.sop_class, i.transfer_syntax) for i in instances}
                                     | {(m.sop_class, ExplicitVRLittleEndian) for m in missing
                                        if m.sop_class}, originator)
        try:
            sender.open()
        except DeliveryError as exc:
            log.warning("C-MOVE from %s refused with 0xA801: %s", _peer(event), exc)
            rsp.refuse(0xA801, "move destination cannot be reached")
            return
        perform_suboperations(rsp, self._stream(instances, missing), sender, self.spool,
                              str(peer), len(instances) + len(missing))

    @answers_itself
    def on_get(self, event: evt.Event) -> None:
        rsp: Responder = event.responder  # type: ignore[attr-defined]
        if (selected := self._retrieve_request(event, rsp, "C-GET")) is None:
            return
        q, instances, missing = selected
        log.info("C-GET from %s: %s → %d instance(s)%s", _peer(event), query.describe(q),
                 len(instances),
                 f", {len(missing)} more fetched from the PACS" if missing else "")
        sender = GetSender(event.assoc, event.request.MessageID)
        perform_suboperations(rsp, self._stream(instances, missing), sender, self.spool,
                              _peer(event), len(instances) + len(missing))

    def _retrieve_request(self, event: evt.Event, rsp: Responder, what: str
                          ) -> tuple[query.Query, list[Instance], list[Listed]] | None:
        """A C-MOVE's or C-GET's query, the instances the spool holds and what the PACS must
        bring; None once refused (a bad query, or nothing that can be sent)."""
        try:
            q, instances = self._selected(event, what)
        except query.QueryError as exc:
            log.warning("%s from %s refused with 0x%04X: %s", what, _peer(event), exc.status,
                        exc)
            rsp.refuse(exc.status, str(exc))
            return None
        missing, problem = self._missing(event, q, instances, what)
        if missing is None:
            rsp.refuse(0xA701, problem[:64])
            return None
        return q, instances, missing

    # ---- the Q/R proxy -----------------------------------------------------------------------

    def _missing(self, event: evt.Event, q: query.Query, instances: list[Instance],
                 what: str) -> tuple[list[Listed] | None, str]:
        """What the PACS must bring (empty without a proxy); None when nothing can be sent
        (the PACS cannot be asked and the spool holds nothing of it), with why."""
        if self.proxy is None:
            return [], ""
        missing, problem = self.proxy.plan(event.identifier, q, instances)
        if problem and not instances:
            log.warning("%s from %s refused with 0xA701: %s", what, _peer(event), problem)
            return None, problem
        if problem:
            log.warning("%s from %s: %s; sending the %d instance(s) the spool holds", what,
                        _peer(event), problem, len(instances))
        self.proxy.served(instances)
        return missing, ""

    def _stream(self, instances: list[Instance],
                missing: list[Listed]) -> Iterator[Instance | Missing]:
        yield from instances
        if missing and self.proxy is not None:
            yield from self.proxy.stream(missing)


def _status(code: int, comment: str) -> Dataset:
    """A C-FIND status with its Error Comment (LO: at most 64 characters)."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment.encode("ascii", "replace").decode()[:64]
    return ds
