"""uvicorn in a thread of the router process; the socket is bound before the router starts
anything else, so a port in use fails ``serve`` at once."""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

import uvicorn

log = logging.getLogger("dicomrouter.web")


class WebServer:
    def __init__(self, app: Any, sock: socket.socket, what: str = "web status page, REST API "
                 "and /metrics", tls: tuple[str, str] | None = None) -> None:
        """``what`` names the server in its log line; ``tls`` is (certificate, key) for HTTPS."""
        self.bind, self.port = sock.getsockname()[:2]
        self.sock = sock
        self.what = what
        self.scheme = "https" if tls else "http"
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5,
                                ssl_certfile=tls[0] if tls else None,
                                ssl_keyfile=tls[1] if tls else None)
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="web", daemon=True)
        self.thread.start()
        log.info("%s on %s://%s:%d/", self.what, self.scheme, self.bind, self.port)

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(10)
        self.sock.close()
