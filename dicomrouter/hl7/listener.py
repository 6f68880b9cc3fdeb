"""The MLLP listener: python-hl7's asyncio MLLP server (``hl7.mllp.start_hl7_server``) on an
event loop of its own thread, the limits, and the hand-off of each message to ``receive``.

``receive(block, peer) -> ACK`` runs on a small thread pool (it stores the message: the
state's commit and fsync must not stall the loop) and must not raise. Limits: at most
``max_connections`` connections (more are closed at once, one log line), a message larger
than ``max_message_size`` is answered AR and its connection closed (MLLP cannot resync inside
a message), a connection without a complete message for ``idle_timeout`` is closed, and a
message not stored within ``ack_timeout`` is answered AE (the sender sends it again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hl7.mllp import InvalidBlockError, start_hl7_server

from .. import metrics
from ..config.hl7 import Hl7ListenerModel
from ..logsafe import escape
from ..tlsctx import describe_error, server_context
from .message import INTERNAL, SEGMENT_SEQUENCE, ack

log = logging.getLogger("dicomrouter.hl7")

Receive = Callable[[bytes, str], str]


class Hl7Listener:
    """The listening socket (bound by the caller), its loop thread and its connections."""

    def __init__(self, cfg: Hl7ListenerModel, receive: Receive, sock: socket.socket,
                 application: str) -> None:
        self.cfg = cfg
        self.receive = receive
        self.sock = sock
        self.application = application
        self.tls: ssl.SSLContext | None = server_context(cfg.tls) if cfg.tls else None
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hl7-store")
        self._writers: set[Any] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hl7-listener", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        senders = ", ".join(f"{s.application or '*'}/{s.facility or '*'}"
                            for s in self.cfg.allowed_senders) or "any"
        log.info("HL7 listening on %s:%d (MLLP%s; allowed senders: %s)", self.cfg.bind,
                 self.cfg.port, " over TLS" if self.tls else "", senders)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(self._loop_error)
        try:
            self._server = loop.run_until_complete(start_hl7_server(
                self._connected, sock=self.sock, limit=self.cfg.max_message_size,
                encoding="latin-1"))
        finally:
            self._ready.set()
        loop.run_forever()
        loop.close()

    @staticmethod
    def _loop_error(loop: Any, context: dict[str, Any]) -> None:
        """asyncio's own reports (a TLS handshake that failed...): one line, no traceback."""
        exc = context.get("exception")
        why = describe_error(exc) if isinstance(exc, ssl.SSLError) else (
            f"{type(exc).__name__}: {exc}" if exc else context.get("message", "?"))
        log.warning("HL7 listener: %s", escape(str(why)))

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        self._pool.shutdown(wait=True, cancel_futures=False)

    def _connected(self, reader: Any, writer: Any) -> None:
        """A new connection (called from ``connection_made``, before any byte is read): with
        TLS, reading waits for ``start_tls`` (else the ClientHello would land in the MLLP
        reader's buffer)."""
        if self.tls is not None:
            writer.transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._client(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _client(self, reader: Any, writer: Any) -> None:
        peername = writer.get_extra_info("peername") or ("?", 0)
        peer = f"{peername[0]}:{peername[1]}"
        if self.connections >= self.cfg.max_connections:
            log.warning("HL7 connection from %s closed: more than max_connections (%d)", peer,
                        self.cfg.max_connections)
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.add(writer)
        try:
            if self.tls is not None:  # here, not in the server: a failed handshake is logged
                try:
                    await asyncio.wait_for(writer.start_tls(self.tls), self.cfg.idle_timeout)
                except (ssl.SSLError, OSError, TimeoutError) as exc:
                    why = describe_error(exc) if isinstance(exc, ssl.SSLError) else \
                        f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                    log.warning("HL7 TLS handshake with %s failed: %s", peer, escape(why))
                    return
            await self._serve(reader, writer, peer)
        except (ConnectionError, OSError) as exc:
            log.info("HL7 connection from %s ended: %s", peer, escape(str(exc) or
                                                                     type(exc).__name__))
        except Exception as exc:  # a bug: one line, the listener goes on
            log.error("HL7 connection from %s ended by an internal error: %s: %s", peer,
                      type(exc).__name__, escape(str(exc)))
        finally:
            self.connections -= 1
            self._writers.discard(writer)
            writer.close()

    async def _serve(self, reader: Any, writer: Any, peer: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                block = await asyncio.wait_for(reader.readblock(), self.cfg.idle_timeout)
            except asyncio.IncompleteReadError as exc:
                if exc.partial.strip():
                    log.warning("HL7 connection from %s closed in the middle of a message "
                                "(%d bytes, not acknowledged)", peer, len(exc.partial))
                return
            except TimeoutError:
                log.info("HL7 connection from %s closed: no complete message within "
                         "idle_timeout (%g s)", peer, self.cfg.idle_timeout)
                return
            except ValueError:  # the stream limit: larger than max_message_size
                log.warning("HL7 message from %s refused (AR): larger than max_message_size "
                            "(%d bytes); connection closed", peer, self.cfg.max_message_size)
                metrics.HL7_MESSAGES.labels("unreadable", "AR").inc()
                await self._answer(writer, ack(
                    None, "AR", f"message larger than {self.cfg.max_message_size} bytes",
                    INTERNAL, self.application))
                return
            except InvalidBlockError:
                log.warning("HL7 data from %s refused (AR): not an MLLP block (no <VT> "
                            "start); connection closed", peer)
                metrics.HL7_MESSAGES.labels("unreadable", "AR").inc()
                await self._answer(writer, ack(
                    None, "AR", "not an MLLP block", SEGMENT_SEQUENCE,
                    self.application))
                return
            try:
                answer = await asyncio.wait_for(
                    loop.run_in_executor(self._pool, self.receive, block, peer),
                    self.cfg.ack_timeout)
            except TimeoutError:
                log.error("HL7 message from %s answered AE: not stored within ack_timeout "
                          "(%g s); the sender should send it again", peer,
                          self.cfg.ack_timeout)
                metrics.HL7_MESSAGES.labels("unknown", "AE").inc()
                answer = ack(None, "AE", "not stored in time, send again", INTERNAL,
                             self.application)
            await self._answer(writer, answer)

    async def _answer(self, writer: Any, ack: str) -> None:
        writer.writeblock(ack.encode(self.cfg.encoding, "replace"))
        await writer.drain()
