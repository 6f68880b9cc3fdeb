"""A lean DICOM acceptor for C-STORE and C-ECHO: one blocking thread per association.

Why: pynetdicom's reactor and DUL threads poll with 1 ms sleeps and decode every PDU into objects,
which caps one association near a third of DCMTK's storescp (see docs/performance.md). Here each
association thread blocks on its socket, walks P-DATA PDVs with ``struct``, streams dataset
fragments straight into the spool's receive file, and answers C-STORE-RSP itself. The durability
promise is the same as on the pynetdicom path: ``Spool.accept`` (fsync of the receive slot,
index tags) runs before the response is written; ``Spool.place`` (rename, commit) right after
it, while the sender prepares its next request (a crash in between: start-up adopts the slot).

Association negotiation (A-ASSOCIATE-RQ decoding, presentation context negotiation, the
A-ASSOCIATE-AC/RJ encoding) reuses pynetdicom's PDU classes: it happens once per association.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, AllStoragePresentationContexts
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor
from pynetdicom.transport import AssociationServer

from .. import metrics
from ..config import Config, ListenerConfig
from ..dimse import (
    APPLICATION_CONTEXT,
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    CANNOT_UNDERSTAND,
    IMPLEMENTATION_VERSION,
    MAX_COMMAND,
    NO_DATASET,
    PDU_HEADER,
    PDV_HEADER,
    VERIFICATION,
    ProtocolError,
    encode_response,
    parse_command,
    read_exact,
    text,
    ui,
    us,
    user_information,
)
from ..spool import ReceiveFile, Spool
from ..tlsctx import describe_error, server_context, subject_of
from . import ingest
from .contexts import STORAGE_SOP_CLASSES, supported_contexts
from .replay import ReplaySocket

log = logging.getLogger("dicomrouter.scp")

CHUNK = 1 << 20


# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
_RJ_CONTEXT = (0x01, 0x01, 0x02)  # application context name not supported
_RJ_CALLING = (0x01, 0x01, 0x03)  # calling AE title not recognised
_RJ_CALLED = (0x01, 0x01, 0x07)  # called AE title not recognised
_RJ_LIMIT = (0x02, 0x03, 0x02)  # transient, local limit exceeded
_RJ_NAMES = {_RJ_CONTEXT: "rejected: application context", _RJ_CALLING: "rejected: calling AE",
             _RJ_CALLED: "rejected: called AE", _RJ_LIMIT: "rejected: local limit"}


_TCP_CLOSE_WAIT = 8  # tcp_info.tcpi_state (Linux): the peer sent FIN


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the peer ended its side: a peek cannot tell (it keeps returning the bytes that
    are there), so a half-closed sender would otherwise be waited for until acse_timeout."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_CLOSE_WAIT
    except (OSError, AttributeError):
        return False


def _printable_ae(value: bytes) -> bool:
    return all(0x20 <= b < 0x7F and b != 0x5C for b in value)


def _refused_context(context_id: int | None, result: int) -> PresentationContext:
    cx = PresentationContext()
    cx.context_id = context_id
    cx.result = result
    cx.transfer_syntax = [ImplicitVRLittleEndian]  # not tested by the requestor when refused
    return cx


def _meta_element(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sxxI", 2, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", 2, elem, vr, len(value)) + value


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group of a Part 10 file."""
    body = (_meta_element(0x0001, b"OB", b"\x00\x01")
            + _meta_element(0x0002, b"UI", text(sop_class, b"\x00"))
            + _meta_element(0x0003, b"UI", text(sop_instance, b"\x00"))
            + _meta_element(0x0010, b"UI", text(transfer_syntax, b"\x00"))
            + _meta_element(0x0012, b"UI", text(PYNETDICOM_IMPLEMENTATION_UID, b"\x00"))
            + _meta_element(0x0013, b"SH", text(IMPLEMENTATION_VERSION, b" ")))
    if source_ae:
        body += _meta_element(0x0016, b"AE", text(source_ae, b" "))
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body


class _Connection:
    """What the listener tracks of one TCP connection: its deadline, whether it associated,
    and its TLS layer (``tls``, once the handshake is done; ``sock`` stays the raw socket the
    watchdog shuts down)."""

    __slots__ = ("sock", "peer", "deadline", "waiting_for", "associated", "expired", "tls",
                 "subject")

    def __init__(self, sock: socket.socket, peer: str, deadline: float,
                 waiting_for: str) -> None:
        self.sock = sock
        self.peer = peer
        self.deadline = deadline
        self.waiting_for = waiting_for  # what the deadline is for, for the log line
        self.associated = False
        self.expired = ""  # why the listener cut it short
        self.tls: ssl.SSLSocket | None = None
        self.subject = ""  # the client certificate's CN=..., over TLS

    @property
    def live(self) -> socket.socket:
        """The socket to use: the TLS one once wrapped (wrapping detaches ``sock``, which
        stays only as the key of the listener's table)."""
        return self.tls if self.tls is not None else self.sock


class FastStorageSCP:
    """The listening socket, its association threads, and the watchdog that enforces the
    deadlines (same interface as StorageSCP).

    Limits (config keys, docs/security.md): a connection has ``acse_timeout`` to deliver its
    A-ASSOCIATE-RQ (ARTIM), and at most ``max_pending_connections`` may be waiting to associate
    (a new one pushes the oldest out), so trickling or idle connections cannot lock out real
    senders; established associations are limited to ``max_associations``; every PDU must
    arrive within ``network_timeout`` (per MiB of it), and an association with no message for
    ``dimse_timeout`` is aborted. Deadlines are checked by one watchdog thread, so the
    per-PDU path only stores a number.
    """

    def __init__(self, cfg: Config, spool: Spool, sock: socket.socket | None = None,
                 listener: ListenerConfig | None = None) -> None:
        self.cfg = cfg
        self.listener = listener or cfg.listener
        self._bound = sock  # the listening socket, if the caller bound it already
        self.tls = server_context(self.listener.tls) if self.listener.tls else None
        self.limits = cfg.limits
        self.spool = spool
        self._contexts = supported_contexts()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()
        self._conns: dict[socket.socket, _Connection] = {}  # in accept order
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._services: list[tuple[str, Any, Callable[..., Any], bool]] = []
        self._service_syntaxes: set[str] = set()
        self.service_server: AssociationServer | None = None

    def add_service(self, abstract_syntax: str, event: Any, handler: Callable[..., Any],
                    roles: bool = False) -> None:
        """Serve ``abstract_syntax`` with a pynetdicom handler (e.g. ``evt.EVT_C_FIND``) on the
        same port: an association that proposes it (and no storage class) is handed, socket and
        all, to a pynetdicom acceptor; ``roles``: accept the requestor in either role (SCP/SCU
        role selection, as storage commitment reports need). Call before ``start``."""
        self._services.append((abstract_syntax, event, handler, roles))
        self._service_syntaxes.add(abstract_syntax)

    def _start_services(self) -> None:
        """A pynetdicom AE for the handed-off associations. Its server never accepts: its
        listening socket is closed at once; associations reach it through ``hand_off``."""
        from .qr import GET_MODELS, GET_STORE_SYNTAXES
        from .server import acceptor_ae

        ae = acceptor_ae(self.cfg, self.listener)
        handlers = []
        for syntax, event, handler, roles in self._services:
            if roles:
                ae.add_supported_context(syntax, scu_role=True, scp_role=True)
            else:
                ae.add_supported_context(syntax)
            handlers.append((event, handler))
        if self._service_syntaxes & GET_MODELS:
            # a C-GET requestor proposes storage contexts in which it is the SCP
            for cx in AllStoragePresentationContexts:
                ae.add_supported_context(cx.abstract_syntax, GET_STORE_SYNTAXES,
                                         scu_role=False, scp_role=True)
        server = AssociationServer(ae, ("127.0.0.1", 0), self.listener.ae_title,
                                   ae.supported_contexts, evt_handlers=handlers)
        server.socket.close()
        self.service_server = server

    def wants(self, raw: bytes) -> bool:
        """Whether an A-ASSOCIATE-RQ is for the pynetdicom services (not for storage)."""
        rq = A_ASSOCIATE_RQ()
        try:
            rq.decode(raw)
            proposed = {str(cx.abstract_syntax)
                        for cx in rq.to_primitive().presentation_context_definition_list}
        except Exception:
            return False  # the lean path answers a broken RQ itself
        from .qr import GET_MODELS

        services = proposed & self._service_syntaxes
        # C-GET brings its storage contexts (the peer receives): pynetdicom's association
        return bool(services) and (bool(services & GET_MODELS)
                                   or not proposed & STORAGE_SOP_CLASSES)

    def hand_off(self, info: _Connection, head: bytes = b"") -> None:
        """Give a connection whose A-ASSOCIATE-RQ is still unread to the pynetdicom acceptor
        (over TLS, the RQ was read already: ``head`` is replayed to pynetdicom first)."""
        assert self.service_server is not None
        with self._lock:
            self._conns.pop(info.sock, None)  # pynetdicom's timeouts apply from here
        host, port = info.live.getpeername()[:2]
        sock: Any = info.sock
        if info.tls is not None:
            sock = ReplaySocket(info.tls, head)
        self.service_server.finish_request(sock, (host, port))

    def start(self) -> None:
        if self._services:
            self._start_services()
        # With several receiver processes each binds the port; the kernel spreads connections.
        lst = self.listener
        sock = self._bound or socket.create_server((lst.bind, lst.port), backlog=128,
                                                   reuse_port=self.cfg.receivers > 1
                                                   and lst is self.cfg.listener)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="scp-accept", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch, name="scp-watchdog", daemon=True)
        self._watchdog.start()
        tls = "plain DICOM" if lst.tls is None else (
            f"DICOM TLS ({lst.tls.min_version}+, client certificates "
            f"{'required' if lst.tls.verify_client else 'not required'})")
        log.info("listening as %s on %s:%d, %s, listener %s (allowed calling AEs: %s; called "
                 "AE %s)", lst.ae_title, lst.bind, lst.port, tls, lst.name,
                 ", ".join(lst.allowed_calling_aes) or "any",
                 "checked" if lst.check_called_ae else "not checked")

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        with self._lock:
            for info in list(self._conns.values()):
                with contextlib.suppress(OSError, ValueError):
                    info.live.shutdown(socket.SHUT_RDWR)
        for t in (self._thread, self._watchdog):
            if t is not None:
                t.join(5)
        with self._lock:
            threads = list(self._threads)
        for t in threads:  # each ends at its next read; placement finishes first
            t.join(10)
        if self.service_server is not None:
            for assoc in self.service_server.active_associations:
                assoc.abort()

    def established(self) -> int:
        with self._lock:
            return sum(1 for c in self._conns.values() if c.associated)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        backoff = 0.0
        while not self._stop.is_set():
            try:
                conn, addr = self._sock.accept()
            except OSError as exc:
                if self._stop.is_set():
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if not backoff:
                        log.error("cannot accept connections: %s; new senders wait in the "
                                  "listen queue until descriptors or memory free up",
                                  exc.strerror or exc)
                    backoff = min(1.0, max(0.05, backoff * 2))
                    self._stop.wait(backoff)  # never spin on a full descriptor table
                continue
            if backoff:
                log.info("accepting connections again")
                backoff = 0.0
            self._admit(conn, f"{addr[0]}:{addr[1]}")

    def _admit(self, conn: socket.socket, peer: str) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(max(self.limits.network_timeout, self.limits.dimse_timeout))
        except OSError:
            conn.close()
            return
        info = _Connection(conn, peer, time.monotonic() + self.limits.acse_timeout,
                           f"no A-ASSOCIATE-RQ within acse_timeout "
                           f"({self.limits.acse_timeout:g} s)")
        with self._lock:
            self._conns[conn] = info
            pending = [c for c in self._conns.values() if not c.associated]
            oldest = pending[0] if len(pending) > self.limits.max_pending_connections else None
        if oldest is not None:
            self._expire(oldest, f"dropped: more than max_pending_connections "
                                 f"({self.limits.max_pending_connections}) connections waiting "
                                 "to associate, and it was the oldest")
        t = threading.Thread(target=self._serve, args=(info,), daemon=True,
                             name=f"assoc-{peer}")
        with self._lock:
            self._threads.add(t)
        try:
            t.start()
        except RuntimeError as exc:  # no more threads: refuse this one connection
            log.error("connection from %s closed: cannot start a thread (%s)", peer, exc)
            with self._lock:
                self._threads.discard(t)
                self._conns.pop(conn, None)
            conn.close()

    @staticmethod
    def _expire(info: _Connection, why: str) -> None:
        """Cut a connection short: its thread sees the end of the stream and stops."""
        if not info.expired:
            info.expired = why
            with contextlib.suppress(OSError, ValueError):
                info.live.shutdown(socket.SHUT_RD)
        else:  # still there after a grace period (blocked in a send): close both ways
            with contextlib.suppress(OSError, ValueError):
                info.live.shutdown(socket.SHUT_RDWR)

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            now = time.monotonic()
            with self._lock:
                late = [c for c in self._conns.values() if c.deadline < now]
            for info in late:
                if not info.expired:
                    self._expire(info, info.waiting_for)
                    info.deadline = now + 5.0  # grace before closing both ways
                else:
                    self._expire(info, info.expired)

    def _handshake(self, info: _Connection) -> bool:
        """TLS server handshake (bounded by acse_timeout through the watchdog)."""
        assert self.tls is not None
        try:
            info.tls = self.tls.wrap_socket(info.sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            why = info.expired or describe_error(exc)
            metrics.ASSOCIATIONS.labels("rejected: TLS").inc()
            log.warning("TLS handshake with %s on listener %s failed: %s", info.peer,
                        self.listener.name, why)
            return False
        info.subject = subject_of(info.tls.getpeercert())
        return True

    def _serve(self, info: _Connection) -> None:
        handed_off = False
        try:
            if self.tls is not None and not self._handshake(info):
                return
            handed_off = _Association(self, info).run()
        except Exception as exc:  # a bug: one line, never a dead listener
            log.error("association from %s ended by an internal error: %s: %s", info.peer,
                      type(exc).__name__, exc)
        finally:
            with self._lock:
                self._conns.pop(info.sock, None)
                self._threads.discard(threading.current_thread())
            if not handed_off:
                if info.tls is not None:
                    info.tls.close()
                info.sock.close()


class _Association:
    """One association, driven by blocking reads on its socket."""

    def __init__(self, server: FastStorageSCP, info: _Connection) -> None:
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
        self._rx: ReceiveFile | None = None
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
            if not data or self.info.expired or _peer_closed(self.conn):
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
            if self.server._services and not tls and self._for_services():
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
            if tls and self.server._services and self.server.wants(raw):
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
        results, _roles = negotiate_as_acceptor(good, self.server._contexts)
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
            self._rx = self.spool.new_receive_file()
            self._rx.write(file_meta(ui(self._cmd, 0x0002), ui(self._cmd, 0x1000),
                                     self.contexts[cx_id][1], self.calling))
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
        accepted.tags["_Listener"] = self.server.listener.name  # the Listener routing key
        accepted.tags["_SourceHost"] = self.peer.rsplit(":", 1)[0]  # the SourceHost key
        try:
            self._respond_store(cx_id, cmd, 0x0000)
        finally:  # durable already, answered or not: rename and record it (overlaps the
            self.spool.place(accepted)  # sender's next request)

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
