"""C-MOVE and C-GET as an SCP: the responses, and the C-STORE sub-operations that send every
matching instance in a syntax the receiver took (PS3.4 C.4.2, C.4.3).

pynetdicom's Query/Retrieve service class opens the move destination's association itself,
with the contexts the handler yields, before any status can be sent: a refused C-MOVE could only
be answered 0xC515 (no contexts) or after associating, and a refused C-GET always reported one
failed sub-operation. ``RetrieveServiceClass`` keeps pynetdicom's C-FIND and, when the bound
C-MOVE/C-GET handler is marked ``answers_itself``, lets the handler answer: it gets a
``Responder`` as ``event.responder`` and either refuses (a status, no sub-operation counts) or
runs ``perform`` with a sender.

* C-MOVE (``MoveSender``): a new association to the destination with the ``dicom``
  destination's lean sender (``destinations/fastsend.py``) and contexts: one per (SOP class,
  stored syntax) plus an uncompressed one per SOP class; groups of instances whose contexts
  would pass 128 go on successive associations (``store.batches``). Each instance goes in its
  stored syntax when the destination took it, else converted to an accepted uncompressed one
  (``store.target_syntax`` → ``transcode``). The C-STOREs carry the Move Originator.
* C-GET (``GetSender``): C-STOREs on the requester's association, in the contexts where it took
  the storage SCP role: the stored syntax when accepted, else the first accepted of ``TARGETS``
  (Explicit VR, Implicit VR, Deflated, RLE, JPEG-LS lossless, JPEG 2000 lossless).

Conversions are lossless; a lossy stored image (JPEG Baseline/Extended, lossy JPEG 2000) goes
as stored when the receiver takes its syntax, else decoded and flagged Lossy Image Compression
01 (``transcode.mark_lossy``), never encoded lossily again. An instance that cannot go (no
usable context, a conversion that fails, a refusal) is a failed sub-operation with its reason
in the log; the others go on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, BinaryIO, Protocol, TypeVar

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.service_class import QueryRetrieveServiceClass

from ..destinations.base import DeliveryError, InstanceRejected
from ..destinations.fastsend import FastStoreAssociation
from ..destinations.store import (
    Peer,
    batches,
    converted_file,
    no_syntax,
    source_path,
    store_outcome,
)
from ..spool import Spool
from ..state import Instance
from ..transcode import TARGETS

log = logging.getLogger("dicomrouter.qr")

SUCCESS, WARNING, CANCEL = 0x0000, 0xB000, 0xFE00
UNABLE_TO_PERFORM = 0xA702  # every sub-operation failed
#: C-GET: what an instance may be converted to when its stored syntax was not accepted
GET_TARGETS = tuple(str(t) for t in TARGETS)

F = TypeVar("F", bound=Callable[..., Any])


def answers_itself(handler: F) -> F:
    """Mark a C-MOVE/C-GET handler that sends its own responses through ``event.responder``."""
    handler.answers_itself = True  # type: ignore[attr-defined]
    return handler


@dataclass
class Counts:
    """Sub-operations of one request (PS3.4 C.4.2.1.4: Remaining, Completed, Failed, Warning)."""

    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)


class Responder:
    """The C-MOVE/C-GET responses to one request, on the requester's association."""

    def __init__(self, service: QueryRetrieveServiceClass, req: C_MOVE | C_GET,
                 context: Any) -> None:
        self.service = service
        self.req = req
        self.context = context
        self.what = "C-MOVE" if isinstance(req, C_MOVE) else "C-GET"
        self.finished = False

    @property
    def cancelled(self) -> bool:
        """A C-CANCEL for this request has arrived."""
        return bool(self.service.is_cancelled(self.req.MessageID))

    @property
    def connected(self) -> bool:
        return bool(self.service.assoc.is_established)

    def refuse(self, status: int, comment: str = "") -> None:
        """A final failure before any sub-operation: no counts (none was attempted)."""
        self._send(status, comment=comment)

    def pending(self, counts: Counts) -> None:
        self._send(0xFF00, counts, remaining=True)

    def cancel(self, counts: Counts) -> None:
        self._send(CANCEL, counts, remaining=True, failed_list=True)

    def final(self, counts: Counts) -> int:
        """The final response after the sub-operations; returns its status."""
        if not counts.failed and not counts.warning:
            status = SUCCESS
        elif not counts.completed and not counts.warning:
            status = UNABLE_TO_PERFORM
        else:
            status = WARNING
        self._send(status, counts, failed_list=status != SUCCESS)
        return status

    def _send(self, status: int, counts: Counts | None = None, remaining: bool = False,
              comment: str = "", failed_list: bool = False) -> None:
        rsp = C_MOVE() if self.what == "C-MOVE" else C_GET()
        rsp.MessageID = self.req.MessageID
        rsp.MessageIDBeingRespondedTo = self.req.MessageID
        rsp.AffectedSOPClassUID = self.req.AffectedSOPClassUID
        rsp.Status = status
        if comment:
            rsp.ErrorComment = comment.encode("ascii", "replace").decode()[:64]
        if counts is not None:
            if remaining:
                rsp.NumberOfRemainingSuboperations = counts.remaining
            rsp.NumberOfCompletedSuboperations = counts.completed
            rsp.NumberOfFailedSuboperations = counts.failed
            rsp.NumberOfWarningSuboperations = counts.warning
        if failed_list and counts is not None:
            ds = Dataset()
            ds.FailedSOPInstanceUIDList = list(counts.failed_uids)
            ts = self.context.transfer_syntax[0]
            rsp.Identifier = BytesIO(encode(ds, ts.is_implicit_VR, ts.is_little_endian,
                                            ts.is_deflated))
        if status != 0xFF00:
            self.finished = True
        self.service.dimse.send_msg(rsp, self.context.context_id)


class RetrieveServiceClass(QueryRetrieveServiceClass):
    """pynetdicom's Query/Retrieve service class, whose C-MOVE and C-GET are answered by a
    handler marked ``answers_itself`` (others get pynetdicom's own)."""

    def _move_scp(self, req: C_MOVE, context: Any) -> None:
        if not self._answers_itself(evt.EVT_C_MOVE):
            return super()._move_scp(req, context)
        self._retrieve(req, context, evt.EVT_C_MOVE)
        return None

    def _get_scp(self, req: C_GET, context: Any) -> None:
        if not self._answers_itself(evt.EVT_C_GET):
            return super()._get_scp(req, context)
        self._retrieve(req, context, evt.EVT_C_GET)
        return None

    def _answers_itself(self, event: Any) -> bool:
        handler = self.assoc.get_handlers(event)
        return bool(handler) and bool(getattr(handler[0], "answers_itself", False))

    def _retrieve(self, req: C_MOVE | C_GET, context: Any, event: Any) -> None:
        responder = Responder(self, req, context)
        try:
            evt.trigger(self.assoc, event, {"request": req, "context": context.as_tuple,
                                            "_is_cancelled": self.is_cancelled,
                                            "responder": responder})
        except Exception as exc:  # a defect: one line, and the requester still gets an answer
            r = self.assoc.requestor
            log.error("%s from %s (%s:%s) failed: %s: %s", responder.what, r.ae_title,
                      r.address, r.port, type(exc).__name__, exc)
            if not responder.finished and responder.connected:
                responder.refuse(0xC000, f"{type(exc).__name__} in the router")


@dataclass(frozen=True)
class Missing:
    """An instance a retrieve meant to send that never reached the spool (the Q/R proxy: the
    PACS did not send it): a failed sub-operation."""

    sop_uid: str
    study_uid: str
    reason: str


class Sender(Protocol):
    def store(self, index: int, inst: Instance, source: BinaryIO) -> int:
        """Send instance ``index``; its success or warning status, else InstanceRejected
        (this instance) or DeliveryError (the association)."""

    def close(self) -> None: ...


def perform(responder: Responder, instances: Iterable[Instance | Missing], sender: Sender,
            spool: Spool, where: str, total: int | None = None) -> Counts:
    """Send every instance as a sub-operation, with a pending response after each but the last
    and the final one (or Cancel); ``where`` names the receiver in log lines. ``instances``
    may be a stream (the Q/R proxy's, as they arrive from the PACS) of ``total`` items."""
    counts = Counts(total if total is not None else len(instances))  # type: ignore[arg-type]
    try:
        for index, inst in enumerate(instances):
            if responder.cancelled:
                responder.cancel(counts)
                log.info("%s to %s cancelled by the requester: %d completed, %d remaining",
                         responder.what, where, counts.completed, counts.remaining)
                return counts
            if isinstance(inst, Missing):
                log.warning("%s to %s: instance %s of study %s failed: %s", responder.what,
                            where, inst.sop_uid, inst.study_uid, inst.reason)
                status = None
            else:
                status = _one(index, inst, sender, spool, where, responder.what)
            if status is None:
                counts.failed += 1
                counts.failed_uids.append(inst.sop_uid)
            elif status == SUCCESS:
                counts.completed += 1
            else:
                counts.warning += 1
            counts.remaining -= 1
            if not responder.connected:
                log.warning("%s to %s: the requester left after %d sub-operation(s)",
                            responder.what, where, index + 1)
                return counts
            if counts.remaining:
                responder.pending(counts)
    finally:
        sender.close()
    status = responder.final(counts)
    log.info("%s to %s: 0x%04X, %d completed, %d failed, %d warning", responder.what, where,
             status, counts.completed, counts.failed, counts.warning)
    return counts


def _one(index: int, inst: Instance, sender: Sender, spool: Spool, where: str,
         what: str) -> int | None:
    """One sub-operation: its status, or None when it failed (the reason logged)."""
    try:
        source = spool.open(inst)
    except Exception as exc:  # deleted since the query, unreadable
        reason = f"cannot be read from the spool ({type(exc).__name__}: {exc})"
    else:
        try:
            with source:
                return sender.store(index, inst, source)
        except (InstanceRejected, DeliveryError) as exc:
            reason = str(exc)
    log.warning("%s to %s: instance %s of study %s failed: %s", what, where, inst.sop_uid,
                inst.study_uid, reason)
    return None


class MoveSender:
    """The C-STORE sub-operations of a C-MOVE: associations of their own to the destination."""

    def __init__(self, peer: Peer, instances: Sequence[Instance],
                 originator: tuple[str, int]) -> None:
        self.peer = peer
        self.originator = originator
        pairs = [(i.sop_class, i.transfer_syntax) for i in instances]
        groups = batches(pairs)
        self._pairs = [{pairs[i] for i in group} for group in groups]
        self._group_of = {i: n for n, group in enumerate(groups) for i in group}
        self._group = -1
        self._assoc: FastStoreAssociation | None = None
        self._broken = ""  # why the current group's association cannot be opened

    def open(self) -> None:
        """The first association (DeliveryError: the destination cannot be reached)."""
        if self._pairs:
            self._open(0)

    def _open(self, group: int) -> None:
        self.close()
        self._group, self._broken = group, ""
        try:
            self._assoc = FastStoreAssociation(self.peer, self._pairs[group])
        except DeliveryError as exc:
            self._broken = str(exc)
            raise
        self._assoc.move_originator = self.originator

    def store(self, index: int, inst: Instance, source: BinaryIO) -> int:
        group = self._group_of[index]
        if group != self._group or (self._assoc is None and not self._broken):
            self._open(group)  # the next group, or again after a lost association
        if self._assoc is None:
            raise DeliveryError(self._broken)
        try:
            return self._assoc.store(source, inst.sop_class, inst.transfer_syntax, inst.sop_uid)
        except DeliveryError:
            self.close()
            raise

    def close(self) -> None:
        if self._assoc is not None:
            assoc, self._assoc = self._assoc, None
            assoc.release()


class StreamingMoveSender(MoveSender):
    """The C-MOVE sub-operations of a retrieve whose instances are not all known when it starts
    (the Q/R proxy streams them from the PACS): the association proposes the (SOP class,
    syntax) pairs known so far, and is opened again with the new pair when one comes that it
    lacks (at most ``MAX_PAIRS``; past that, what it has: an uncompressed conversion)."""

    MAX_PAIRS = 60

    def __init__(self, peer: Peer, pairs: Iterable[tuple[str, str]],
                 originator: tuple[str, int]) -> None:
        super().__init__(peer, [], originator)
        self.pairs = set(pairs)
        self._proposed: set[tuple[str, str]] = set()

    def open(self) -> None:
        if self.pairs:
            self._open_with()

    def _open_with(self) -> None:
        self.close()
        self._proposed = set(self.pairs)
        self._assoc = FastStoreAssociation(self.peer, self._proposed)
        self._assoc.move_originator = self.originator

    def store(self, index: int, inst: Instance, source: BinaryIO) -> int:
        pair = (inst.sop_class, inst.transfer_syntax)
        if pair not in self.pairs and len(self.pairs) < self.MAX_PAIRS:
            self.pairs.add(pair)
        if self._assoc is None or (pair not in self._proposed and pair in self.pairs):
            self._open_with()
        assert self._assoc is not None
        try:
            return self._assoc.store(source, inst.sop_class, inst.transfer_syntax, inst.sop_uid)
        except DeliveryError:
            self.close()
            raise


class GetSender:
    """The C-STORE sub-operations of a C-GET: on the requester's own association."""

    def __init__(self, assoc: Any, message_id: int) -> None:
        r = assoc.requestor
        self.assoc = assoc
        self.peer = Peer(r.ae_title, r.address, r.port)
        # the contexts in which the requester took the storage SCP role (we send)
        self.accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                         for cx in assoc.accepted_contexts if cx.as_scu}
        self._message_id = message_id

    def target(self, sop_class: str, ts: str) -> str | None:
        """The syntax to send an instance in: as stored, else a lossless conversion."""
        return next((c for c in (ts, *GET_TARGETS) if (sop_class, c) in self.accepted), None)

    def store(self, index: int, inst: Instance, source: BinaryIO) -> int:
        ts = inst.transfer_syntax
        target = self.target(inst.sop_class, ts)
        if target is None:
            raise no_syntax(self.peer, inst.sop_class, ts)
        self._message_id = self._message_id % 0xFFFF + 1
        if target == ts:  # streamed from the spool file (pynetdicom's chunked send)
            rsp = self.assoc.send_c_store(source_path(source), msg_id=self._message_id)
        else:
            with converted_file(source, ts, target, self.peer) as path:
                rsp = self.assoc.send_c_store(path, msg_id=self._message_id)
        if not rsp or "Status" not in rsp:
            raise DeliveryError(f"no C-STORE response from {self.peer} (timeout or connection "
                                "lost)")
        return store_outcome(int(rsp.Status), str(rsp.get("ErrorComment", "")), source,
                             self.peer)

    def close(self) -> None:
        """The association is the requester's: it stays."""
