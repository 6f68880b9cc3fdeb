"""The lean DICOM listener for C-STORE and C-ECHO: one blocking thread per association.

Why: pynetdicom's reactor and DUL threads poll with 1 ms sleeps and decode every PDU into objects,
which caps one association near a third of DCMTK's storescp (see docs/performance.md). Here each
association thread blocks on its socket, walks P-DATA PDVs with ``struct``, streams dataset
fragments straight into the spool's receive file, and answers C-STORE-RSP itself. The durability
promise is the same as on the pynetdicom path: ``Spool.accept`` (fsync of the receive slot,
index tags) runs before the response is written; ``Spool.place`` (rename, commit) right after
it, while the sender prepares its next request (a crash in between: start-up adopts the slot).

This module is the listening socket, its accept loop, the watchdog for the deadlines, TLS and
the hand-off of other services (Q/R, commitment) to pynetdicom; ``association.py`` serves one
association, ``connection.py`` is what is tracked of a connection.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import AllStoragePresentationContexts
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.transport import AssociationServer

from .. import metrics
from ..config import Config, ListenerConfig
from ..spool import Spool
from ..storage_contexts import STORAGE_SOP_CLASSES, supported_contexts
from ..tlsctx import describe_error, server_context, subject_of
from .association import StorageAssociation
from .connection import Connection
from .qr import GET_MODELS, GET_STORE_SYNTAXES
from .replay import ReplaySocket
from .server import acceptor_ae

log = logging.getLogger("dicomrouter.scp")


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
        self.contexts = supported_contexts()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()
        self._conns: dict[socket.socket, Connection] = {}  # in accept order
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._services: list[tuple[str, Any, Callable[..., Any], bool]] = []
        self._service_syntaxes: set[str] = set()
        self.service_server: AssociationServer | None = None

    @property
    def has_services(self) -> bool:
        """Some pynetdicom services (Q/R, commitment) are served on this port too."""
        return bool(self._services)

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
        services = proposed & self._service_syntaxes
        # C-GET brings its storage contexts (the peer receives): pynetdicom's association
        return bool(services) and (bool(services & GET_MODELS)
                                   or not proposed & STORAGE_SOP_CLASSES)

    def hand_off(self, info: Connection, head: bytes = b"") -> None:
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
        info = Connection(conn, peer, time.monotonic() + self.limits.acse_timeout,
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
    def _expire(info: Connection, why: str) -> None:
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

    def _handshake(self, info: Connection) -> bool:
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

    def _serve(self, info: Connection) -> None:
        handed_off = False
        try:
            if self.tls is not None and not self._handshake(info):
                return
            handed_off = StorageAssociation(self, info).run()
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
