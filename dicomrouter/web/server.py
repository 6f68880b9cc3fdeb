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
    def __init__(self, app: Any, sock: socket.socket) -> None:
        self.bind, self.port = sock.getsockname()[:2]
        self.sock = sock
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="web", daemon=True)
        self.thread.start()
        log.info("web status page, REST API and /metrics on http://%s:%d/", self.bind,
                 self.port)

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(10)
        self.sock.close()
