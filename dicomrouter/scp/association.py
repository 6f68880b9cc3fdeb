"""One association on the lean C-STORE path, driven by blocking reads on its socket.

Why hand-written: see ``listener.py``. This module walks P-DATA PDVs with ``struct``, streams
dataset fragments straight into the spool's receive file, and answers C-STORE-RSP itself; the
durability promise is ``Spool.accept`` (fsync of the receive slot, index tags) before the
response is written, ``Spool.place`` (rename, commit) right after it. Association negotiation
reuses pynetdicom's PDU classes: it happens once per association.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from typing import Any, BinaryIO, Protocol

from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from .. import metrics
from ..config import Config, Limits, ListenerConfig
from ..dicomfile import file_meta
from ..dimse import (
    APPLICATION_CONTEXT,
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    CANNOT_UNDERSTAND,
    MAX_COMMAND,
    NO_DATASET,
    PDU_HEADER,
    PDV_HEADER,
    VERIFICATION,
    ProtocolError,
    encode_response,
    parse_command,
    read_exact,
    ui,
    us,
    user_information,
)
from ..spool import LogReceiveFile, ReceiveFile, Spool, note
from . import ingest
from .connection import Connection, peer_closed

log = logging.getLogger("dicomrouter.scp")

CHUNK = 1 << 20


class Listener(Protocol):
    """What an association needs from the listener that accepted it."""

    cfg: Config
    listener: ListenerConfig
    limits: Limits
    spool: Spool
    contexts: list[PresentationContext]

    @property
    def has_services(self) -> bool: ...

    def wants(self, raw: bytes) -> bool: ...

    def hand_off(self, info: Connection, head: bytes = b"") -> None: ...

    def established(self) -> int: ...


# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
_RJ_CONTEXT = (0x01, 0x01, 0x02)  # application context name not supported
_RJ_CALLING = (0x01, 0x01, 0x03)  # calling AE title not recognised
_RJ_CALLED = (0x01, 0x01, 0x07)  # called AE title not recognised
_RJ_LIMIT = (0x02, 0x03, 0x02)  # transient, local limit exceeded
_RJ_NAMES = {_RJ_CONTEXT: "rejected: application context", _RJ_CALLING: "rejected: calling AE",
             _RJ_CALLED: "rejected: called AE", _RJ_LIMIT: "rejected: local limit"}



def _printable_ae(value: bytes) -> bool:
    return all(0x20 <= b < 0x7F and b != 0x5C for b in value)



def _refused_context(context_id: int | None, result: int) -> PresentationContext:
    cx = PresentationContext()
    cx.context_id = context_id
    cx.result = result
    cx.transfer_syntax = [ImplicitVRLittleEndian]  # not tested by the requestor when refused
    return cx



class StorageAssociation:
    """One association, driven by blocking reads on its socket."""

    def __init__(self, server: Listener, info: Connection) -> None:
        self.server = server
        self.spool = server.spool
        self.info = info
        self.conn: Any = info.tls if info.tls is not None else info.sock
        self.peer = info.peer
        limits = server.limits
        self.rf: BinaryIO = self.conn.makefile("rb", buffering=256 * 1024)  # type: ignore
        self.calling = ""
        self.called = ""
        self.contexts: dict[int, tuple[str, str]] = {}  # id → (abstract syntax, syntax)
        self.stored = 0
        self.failed = 0
        self.studies: set[str] = set()
        self._buf: bytearray | None = None  # made at the first dataset (not for a C-ECHO)
        # the message being received
        self._command = bytearray()
        self._cmd: dict[int, bytes] | None = None
        self._cx = 0
        self._rx: ReceiveFile | LogReceiveFile | None = None
        self._note: bytes | None = None  # the reception note (spool/note.py), once known
        self._network = limits.network_timeout
        self._dimse = limits.dimse_timeout
        self._idle_why = f"no DIMSE message within dimse_timeout ({limits.dimse_timeout:g} s)"
        self._pdu_why = f"a PDU not received within network_timeout ({limits.network_timeout:g} s)"

    # ---- PDU level ------------------------------------------------------------------------

    def _next_pdu(self) -> tuple[int, int]:
        """Read a PDU header; an idle association (no message under way) has dimse_timeout for
        it, one in the middle of a message network_timeout. The PDU's body then gets
        network_timeout per started MiB."""
        info = self.info
        if self._cmd is None and not self._command:
            info.deadline, info.waiting_for = time.monotonic() + self._dimse, self._idle_why
        else:
            info.deadline, info.waiting_for = time.monotonic() + self._network, self._pdu_why
        pdu_type, length = PDU_HEADER.unpack(read_exact(self.rf, 6))
        info.deadline = time.monotonic() + self._network * (1 + (length >> 20))
        info.waiting_for = self._pdu_why
        return pdu_type, length

    def _peek(self, n: int) -> bytes:
        """The next ``n`` bytes, left in the socket (for a hand-off to pynetdicom)."""
        while True:
            data = self.conn.recv(n, socket.MSG_PEEK)
            if len(data) >= n:
                return data
            if not data or self.info.expired or peer_closed(self.conn):
                raise ConnectionError("connection closed before a whole A-ASSOCIATE-RQ")
            time.sleep(0.005)  # the rest of the RQ is on its way (rare: it is one segment)

    def _for_services(self) -> bool:
        """Peek at the A-ASSOCIATE-RQ: is it for the pynetdicom services (Q/R, ...)?"""
        pdu_type, length = PDU_HEADER.unpack(self._peek(6))
        if pdu_type != 0x01 or length > self.server.limits.max_associate_rq_size:
            return False
        return self.server.wants(self._peek(6 + length))

    def _hand_off(self, head: bytes = b"") -> bool:
        log.info("association from %s: query/retrieve or other services, handed to "
                 "pynetdicom", self.peer)
        self.server.hand_off(self.info, head)
        return True

    def run(self) -> bool:
        """Serve the association; True if it was handed to the pynetdicom services."""
        how = "closed"
        try:
            tls = self.info.tls is not None
            if self.server.has_services and not tls and self._for_services():
                return self._hand_off()
            pdu_type, length = PDU_HEADER.unpack(read_exact(self.rf, 6))
            if pdu_type != 0x01:
                raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
            cap = self.server.limits.max_associate_rq_size
            if length > cap:
                log.warning("rejected association from %s: its A-ASSOCIATE-RQ declares %d bytes, "
                            "over max_associate_rq_size (%d)", self.peer, length, cap)
                self._reject(_RJ_LIMIT)
                return False
            raw = PDU_HEADER.pack(1, length) + read_exact(self.rf, length)
            # Over TLS nothing can be peeked: the RQ is read, and replayed if it goes on
            if tls and self.server.has_services and self.server.wants(raw):
                return self._hand_off(raw)
            if not self._negotiate(raw):
                return False
            while True:
                pdu_type, length = self._next_pdu()
                if pdu_type == 0x04:
                    self._p_data(length)
                elif pdu_type == 0x05:
                    if length != 4:
                        raise ProtocolError(f"A-RELEASE-RQ of {length} bytes")
                    read_exact(self.rf, length)
                    self.conn.sendall(b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00")
                    how = "released"
                    return False
                elif pdu_type == 0x07:
                    how = "aborted by the peer"
                    return False
                else:
                    raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
        except ProtocolError as exc:
            how = f"aborted: {exc}"
            log.warning("association from %s (%s): %s", self.calling or "?", self.peer, exc)
            self._abort()
        except (ConnectionError, TimeoutError, OSError) as exc:
            how = f"lost ({exc.__class__.__name__}: {exc})"
            if self.info.expired:
                how = f"closed: {self.info.expired}"
                if self.info.associated:
                    self._abort()
                log.warning("connection from %s (%s) %s", self.calling or "?", self.peer, how)
        finally:
            self._discard_partial()
            if self.stored or self.failed:
                log.info("association from %s to %s (%s) %s: %d instance(s) stored, %d "
                         "refused, %d study(ies)", self.calling, self.called, self.peer, how,
                         self.stored, self.failed, len(self.studies))
        return False

    def _abort(self, reason: int = 0x00) -> None:
        """A-ABORT, source: service provider."""
        with contextlib.suppress(OSError):
            self.conn.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x02" + bytes([reason]))

    def _reject(self, reason: tuple[int, int, int]) -> None:
        metrics.ASSOCIATIONS.labels(_RJ_NAMES.get(reason, "rejected")).inc()
        rj_prim = A_ASSOCIATE()
        rj_prim.result, rj_prim.result_source, rj_prim.diagnostic = reason
        rj = A_ASSOCIATE_RJ()
        rj.from_primitive(rj_prim)
        with contextlib.suppress(OSError):
            self.conn.sendall(rj.encode())

    def _negotiate(self, raw: bytes) -> bool:
        """Answer the A-ASSOCIATE-RQ; True if the association is established.

        PS3.8: AE titles that are not printable ASCII are not recognised (A-ASSOCIATE-RJ); an
        RQ that does not decode is an invalid PDU (A-ABORT); a presentation context without an
        abstract or a transfer syntax is refused on its own, the others are negotiated.
        """
        called_raw, calling_raw = raw[10:26], raw[26:42]
        for what, value, reason in (("calling", calling_raw, _RJ_CALLING),
                                    ("called", called_raw, _RJ_CALLED)):
            if not _printable_ae(value):
                log.warning("rejected association from %s: %s AE title %s is not printable "
                            "ASCII", self.peer, what, value)
                self._reject(reason)
                return False
        rq = A_ASSOCIATE_RQ()
        try:
            rq.decode(raw)
            prim = rq.to_primitive()
        except Exception as exc:
            log.warning("association from %s aborted: A-ASSOCIATE-RQ does not decode (%s: %s)",
                        self.peer, type(exc).__name__, str(exc)[:200])
            self._abort(0x06)  # invalid PDU parameter value
            return False
        self.calling = (prim.calling_ae_title or "").strip()
        self.called = (prim.called_ae_title or "").strip()
        cfg = self.server.cfg
        lst = self.server.listener
        limits = self.server.limits
        allowed = lst.allowed_calling_aes
        by_subject = lst.tls.subject_aes if lst.tls is not None else {}
        reason = None
        if prim.application_context_name != APPLICATION_CONTEXT:
            reason, why = _RJ_CONTEXT, "unsupported application context name"
        elif allowed and self.calling not in allowed:
            reason, why = _RJ_CALLING, "not in allowed_calling_aes"
        elif by_subject and self.calling not in by_subject.get(self.info.subject, ()):
            reason, why = _RJ_CALLING, (f"not allowed for the client certificate "
                                        f"{self.info.subject or '(none)'} (tls.subject_aes)")
        elif lst.check_called_ae and self.called != lst.ae_title:
            reason, why = _RJ_CALLED, f"not our AE title {lst.ae_title} (check_called_ae)"
        elif self.server.established() >= limits.max_associations:
            reason, why = _RJ_LIMIT, f"max_associations ({limits.max_associations}) reached"
        elif self.spool.disk_low():
            reason, why = _RJ_LIMIT, "less than min_free_disk free on the spool's disk"
        if reason is not None:
            log.warning("rejected association from calling AE %r to %r (%s): %s", self.calling,
                        self.called, self.peer, why)
            self._reject(reason)
            return False
        good, refused = [], []
        for cx in prim.presentation_context_definition_list:
            if not cx.abstract_syntax or not cx.transfer_syntax:
                refused.append(_refused_context(cx.context_id, 0x04 if cx.abstract_syntax
                                                else 0x03))
            else:
                good.append(cx)
        results, _roles = negotiate_as_acceptor(good, self.server.contexts)
        results = sorted([*results, *refused], key=lambda cx: int(cx.context_id or 0))
        self.contexts = {int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                         for cx in results if cx.result == 0x00}
        ac = A_ASSOCIATE()
        ac.application_context_name = APPLICATION_CONTEXT
        ac.calling_ae_title = prim.calling_ae_title
        ac.called_ae_title = prim.called_ae_title
        ac.result = 0x00
        ac.result_source = 0x01
        ac.presentation_context_definition_results_list = results
        ac.user_information = user_information(cfg.max_pdu)
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(ac)
        self.info.associated = True
        self.conn.sendall(pdu.encode())
        metrics.ASSOCIATIONS.labels("accepted").inc()
        log.info("association from %s to %s (%s) accepted: %d of %d presentation context(s)",
                 self.calling, self.called, self.peer, len(self.contexts), len(results))
        return True

    def _p_data(self, length: int) -> None:
        """Walk the PDVs of one P-DATA-TF; dataset bytes go straight to the receive file."""
        remaining = length
        while remaining > 0:
            if remaining < 6:
                raise ProtocolError("truncated PDV")
            item_length, cx_id, control = PDV_HEADER.unpack(read_exact(self.rf, 6))
            fragment = item_length - 2
            remaining -= 4 + item_length
            if fragment < 0 or remaining < 0:
                raise ProtocolError("PDV length beyond its PDU")
            if cx_id not in self.contexts:
                raise ProtocolError(f"PDV for unknown presentation context {cx_id}")
            if control & 0x01:
                if len(self._command) + fragment > MAX_COMMAND:
                    raise ProtocolError("command set too large")
                self._command += read_exact(self.rf, fragment)
                if control & 0x02:
                    self._on_command(cx_id, bytes(self._command))
                    self._command.clear()
            else:
                self._dataset_fragment(cx_id, fragment)
                if control & 0x02:
                    self._on_dataset_end()

    # ---- DIMSE level ----------------------------------------------------------------------

    def _on_command(self, cx_id: int, raw: bytes) -> None:
        cmd = parse_command(raw)
        field = us(cmd, 0x0100)
        if field == C_ECHO_RQ:
            log.info("C-ECHO from %s (%s)", self.calling, self.peer)
            self.conn.sendall(encode_response(cx_id, C_ECHO_RSP, us(cmd, 0x0110),
                                              ui(cmd, 0x0002) or VERIFICATION, 0x0000))
            return
        if field != C_STORE_RQ:
            raise ProtocolError(f"unsupported DIMSE command 0x{field:04X}")
        if us(cmd, 0x0800) == NO_DATASET:
            self._respond_store(cx_id, cmd, CANNOT_UNDERSTAND, "no dataset")
            return
        self._cmd = cmd
        self._cx = cx_id

    def _dataset_fragment(self, cx_id: int, n: int) -> None:
        if self._cmd is None or cx_id != self._cx:
            raise ProtocolError("dataset fragment without its C-STORE-RQ")
        if self._rx is None:
            self._rx = self.spool.new_receive_file(logged=True)
            if self._note is None:  # the routing keys start-up's adoption needs (note.py)
                self._note = note.pack(self.calling, self.called, self._routing_keys())
            self._rx.write(note.overlay(file_meta(ui(self._cmd, 0x0002), ui(self._cmd, 0x1000),
                                                  self.contexts[cx_id][1], self.calling),
                                        0, self._note))
        if self._buf is None:
            self._buf = bytearray(CHUNK)
        view = memoryview(self._buf)
        rx = self._rx
        while n > 0:
            got = self.rf.readinto(view[:min(n, CHUNK)])  # type: ignore[attr-defined]
            if not got:
                raise ConnectionError("connection closed by the peer")
            rx.write(view[:got])
            n -= got

    def _on_dataset_end(self) -> None:
        started = time.perf_counter()
        try:
            self._store_dataset()
        finally:
            metrics.STORE_LATENCY.observe(time.perf_counter() - started)

    def _store_dataset(self) -> None:
        cmd, rx, cx_id = self._cmd, self._rx, self._cx
        self._cmd, self._rx = None, None
        assert cmd is not None
        if rx is None:  # an empty dataset
            self._respond_store(cx_id, cmd, CANNOT_UNDERSTAND, "empty dataset")
            return
        status, comment, accepted = ingest.accept(
            self.spool, rx, self.calling, self.called, (ui(cmd, 0x0002), ui(cmd, 0x1000)))
        if accepted is None:
            self._respond_store(cx_id, cmd, status, comment)
            return
        self.studies.add(accepted.tags["StudyInstanceUID"])
        accepted.tags.update(self._routing_keys())
        try:
            self._respond_store(cx_id, cmd, 0x0000)
        finally:  # durable already, answered or not: rename and record it (overlaps the
            self.spool.place(accepted)  # sender's next request)

    def _routing_keys(self) -> dict[str, str]:
        """The index tags this association gives each instance: the Listener and SourceHost
        routing keys."""
        return {"_Listener": self.server.listener.name,
                "_SourceHost": self.peer.rsplit(":", 1)[0]}

    def _respond_store(self, cx_id: int, cmd: dict[int, bytes], status: int,
                       comment: str = "") -> None:
        if status == 0:
            self.stored += 1
        else:
            self.failed += 1
        self.conn.sendall(encode_response(cx_id, C_STORE_RSP, us(cmd, 0x0110),
                                          ui(cmd, 0x0002), status, ui(cmd, 0x1000), comment))

    def _discard_partial(self) -> None:
        """A dataset cut off by an abort or a lost connection: never acknowledged, removed."""
        if self._rx is not None:
            self._rx.close()
            with contextlib.suppress(OSError):
                os.unlink(self._rx.name)
            self._rx = None
